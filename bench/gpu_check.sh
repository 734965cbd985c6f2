#!/usr/bin/env bash
# Issue 10's GPU figures in one prepared run on a lent device machine (/work/.library/device/README.md).
#
#   here, once:   bash bench/gpu_check.sh fetch
#                 (wheels the device image lacks into .whl/, and a small real smol store into .gpu/: both
#                 git-excluded, both carried; needs PyPI and the README's venv active)
#   the device:   run(command="bash bench/gpu_check.sh", carry=[".whl", ".gpu"], timeout_s=560)
#
# What it runs, each step under its own timeout so that one stuck step leaves the others' figures:
#   1. bench/attribution.py, GPT-J-6B shapes with random weights, bf16, batch 32: mmtui against Captum and the
#      floors, FLOP/s against the measured matmul rate, peak memory, the end-to-end breakdown, and --profile
#      (the ops that take most device time, and the host waits in one pass, for mmtui and the true floor).
#   2. the same in fp16 (GPT-J's float16 revision), batch 16, without Captum.
#   3. bench/store_write.py at GPT-J scale, 3,072 images, --spread (the costly end), from the smol store.
# The log goes to $OUT/gpu_check.log; it is also printed.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = fetch ]; then
  set -e
  for ignored in /.whl/ /.gpu/; do grep -qxF "$ignored" .git/info/exclude || echo "$ignored" >>.git/info/exclude; done
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    captum==0.9.0 sqlite-utils==4.2.1 sqlite-fts4==1.0.3 click-default-group==1.2.4 zstandard==0.25.0 gguf==0.19.0 \
    tabulate==0.10.0
  mkdir -p .gpu
  rm -f .gpu/smol8.db .gpu/smol8.db-wal .gpu/smol8.db-shm
  HF_HUB_OFFLINE=1 mmtui attribute --samples --db .gpu/smol8.db >/dev/null
  du -sh .whl .gpu
  exit
fi

out="${OUT:-/tmp/gpu_check}"
mkdir -p "$out"
exec > >(tee "$out/gpu_check.log") 2>&1
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl ||
    exit 1
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"

step() {
  local limit=$1 start=$SECONDS
  shift
  echo "== $*"
  timeout "$limit" "$@"
  echo "== exit $? after $((SECONDS - start)) s"
}
step 230 python3 bench/attribution.py --stacks gptj-random --device cuda --batch 32 --reps 5 --profile
step 130 python3 bench/attribution.py --stacks gptj-random --device cuda --batch 16 --dtype float16 --reps 5 \
  --no-captum --no-e2e
if [ -f .gpu/smol8.db ]; then
  step 150 python3 bench/store_write.py --from .gpu/smol8.db --images 3072 --spread
fi
