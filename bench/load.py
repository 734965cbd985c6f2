"""How long `load_stack("smol")` takes: straight from the GGUF file (what every load did before the converted
copy), the first load (converting once into the cache), and a warm load (from the converted copy).

Each row runs in a fresh Python process, so imports count; the cache is a temp folder (MMTUI_CACHE).
    PYTHONPATH=$PWD HF_HUB_OFFLINE=1 python bench/load.py [--preset smol] [--repeat 1]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

GGUF_DIRECT = """
import time, torch
t = time.perf_counter()
from transformers import AutoModelForCausalLM, AutoTokenizer
from mmtui.stacks import presets
from mmtui.stacks.projection import file_sha256
path = presets._package_file(presets.PRESETS[{preset!r}].lm)
model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
file_sha256(path)
presets.load_encoder(presets.PRESETS[{preset!r}].encoder, torch.float32)
print(time.perf_counter() - t)
"""

STACK = """
import time
t = time.perf_counter()
from mmtui.stacks import load_stack
load_stack({preset!r}, device="cpu")
print(time.perf_counter() - t)
"""


def timed(code: str, env: dict[str, str]) -> tuple[float, float]:
    """(wall seconds of the whole process, seconds the load itself reported)."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return time.perf_counter() - start, float(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="smol")
    parser.add_argument("--repeat", type=int, default=1, help="warm loads to time")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "MMTUI_CACHE": cache, "HF_HUB_OFFLINE": "1"}
        rows = [("GGUF file, every load (before)", *timed(GGUF_DIRECT.format(preset=args.preset), env))]
        rows.append(("first load: convert once", *timed(STACK.format(preset=args.preset), env)))
        for i in range(args.repeat):
            rows.append((f"warm load {i + 1}: converted copy", *timed(STACK.format(preset=args.preset), env)))
    print(f"load_stack({args.preset!r}, device='cpu'), {os.cpu_count()} CPUs visible, fresh process per row")
    print(f"{'case':<34} {'process s':>10} {'in-process s':>13}")
    for name, wall, inner in rows:
        print(f"{name:<34} {wall:>10.1f} {inner:>13.1f}")


if __name__ == "__main__":
    main()
