#!/usr/bin/env bash
# The GPU figures of bench/ in one run: attribution speed at GPT-J-6B scale, and cache writes at that scale.
#
# Needs: one CUDA GPU with room for GPT-J-6B in bf16 (its weights alone are about 12 GB) plus a batch of 32,
# nvidia-smi, and a Python with torch (a CUDA build) and transformers. Each step has its own time limit
# (230, 130 and 150 s), so the whole run takes at most about 9 minutes, and a stuck step leaves the others'
# figures.
#
# 1. Install, on a machine with network access, from the repository root:
#      python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[dev]"      (as in the README)
# 2. Fetch what the GPU machine needs, on that same machine:
#      bash bench/gpu_check.sh fetch
#    With the venv active, this downloads into .whl/ the wheels of the small dependencies (captum,
#    sqlite-utils, zstandard, gguf, ...) for a GPU machine that has torch and transformers but no network
#    (CPython 3.12 on x86-64 Linux: change the `pip download` line below for another Python), and writes a
#    small real cache, .gpu/smol8.db (`mmtui attribute --samples` with the default smol stack), the source
#    of step 3's records. Both folders are kept out of git (.git/info/exclude).
# 3. Copy the checkout, with .whl/ and .gpu/, to the GPU machine and run, from the repository root:
#      bash bench/gpu_check.sh
#    Wheels found in .whl/ are installed into /tmp/site (put first on PYTHONPATH); nothing else is changed.
#    The log is printed and written to $OUT/gpu_check.log (OUT defaults to /tmp/gpu_check).
#
# What it prints, step by step (each step starts with "== command" and ends with "== exit CODE after N s"):
#   0. The GPU (name, memory, driver, max SM clock) and the torch and transformers versions.
#   1. bench/attribution.py: GPT-J-6B shapes with random weights, bf16, batch 32. Seconds per batch for
#      mmtui's attribution against Captum's LayerGradientXActivation (as a user would call it, and given
#      mmtui's forward) and against two floors: a plain forward + backward ("naive floor") and the least any
#      implementation must compute ("true floor"); lower is better, and mmtui's distance to the true floor
#      is what it spends beyond the method itself.
#      Then the FLOP/s mmtui achieves against the matmul rate measured on this GPU, the peak GPU memory, the
#      end-to-end time per image (encode, caption, attribute, store write), and with --profile the operations
#      that take most GPU time and the host waits in one pass (a wait is the CPU blocking on the GPU).
#   2. The same in fp16 (GPT-J's float16 revision), batch 16, without Captum and without the end-to-end part.
#   3. bench/store_write.py: 3,072 records at GPT-J scale (28 x 16,384 units, 6,400 top triples each),
#      resampled from .gpu/smol8.db, with --spread (top units seldom recur across images: the costly case).
#      Milliseconds per image for packing, Store.add_result and Store.refresh_stats, the writer thread's
#      images per second (the most a run can write), and bytes per image in the cache by table and index.
#      Skipped when .gpu/smol8.db is missing.
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
