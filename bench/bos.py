"""What `--bos` (the LM's document-start token before the image prefix) changes on a stack, same photos, same
projection: the share of each image's top-100 triples at image patch 0, the distinct units in the top-10 slots
(each image's first 10 distinct units in rank order), P(target), and how many greedy captions change.

    python bench/bos.py [--preset smol] [--images N] [DIR ...]

Default photos: the bundled samples, then /work/shared/data/coco-mini/train2017 (sorted), N in all (24).
Loads the stack once; the bos stack shares its weights. Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mmtui.run.attribution import attribute  # noqa: E402
from mmtui.stacks import load_stack  # noqa: E402

DIRS = [ROOT / "mmtui" / "data" / "samples", ROOT.parent.parent / "shared" / "data" / "coco-mini" / "train2017"]


def _figures(results: list) -> dict:
    top10: list[tuple[int, int]] = []
    at0 = []
    for a in results:
        triples = a.top(100)
        at0.append(sum(1 for _, _, p, _ in triples if p == 0) / len(triples))
        units = list(dict.fromkeys((layer, unit) for layer, unit, _, _ in a.top(len(a.top_score))))
        top10 += units[:10]
    return {
        "top100_at_patch0": statistics.mean(at0),
        "distinct_top10_units": len(set(top10)),
        "top10_slots": len(top10),
        "p_target_mean": statistics.mean(a.p_target for a in results),
    }


def main() -> None:
    from PIL import Image

    parser = argparse.ArgumentParser()
    parser.add_argument("dirs", nargs="*", type=Path)
    parser.add_argument("--preset", default="smol")
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    files = [f for d in (args.dirs or DIRS) for f in sorted(d.glob("*.jpg"))][: args.images]
    images = [Image.open(f).convert("RGB") for f in files]
    plain = load_stack(args.preset, device="cpu")
    stacks = {"with --bos": dataclasses.replace(plain, bos=True), "without": plain}
    out: dict[str, dict] = {}
    captions: dict[str, list[str]] = {}
    for name, stack in stacks.items():
        start = time.perf_counter()
        results = []
        for i in range(0, len(images), args.batch):
            results += attribute(stack, images[i : i + args.batch])
            print(f"{name}: {len(results)}/{len(images)} ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
        out[name] = {**_figures(results), "seconds": round(time.perf_counter() - start, 1)}
        captions[name] = [a.target.caption for a in results]
    changed = sum(a != b for a, b in zip(captions["without"], captions["with --bos"], strict=True))
    print(f"{len(images)} photos, preset {args.preset}, shipped projection; greedy caption changed on {changed}")
    print(f"{'':12} {'top-100 at patch 0':>19} {'distinct units in top-10 slots':>31} {'mean P(target)':>15} {'s':>6}")
    for name, f in out.items():
        slots = f"{f['distinct_top10_units']} / {f['top10_slots']}"
        print(f"{name:12} {f['top100_at_patch0']:19.3f} {slots:>31} {f['p_target_mean']:15.3f} {f['seconds']:6.0f}")
    print(json.dumps({"n_images": len(images), "captions_changed": changed, **out}))


if __name__ == "__main__":
    main()
