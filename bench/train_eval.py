"""Evaluate projection files on held-out images: caption loss with the matched vs a shuffled image, and
greedy captions beside the human ones.

    python bench/train_eval.py mmtui/data/smol-projection.safetensors \\
        --coco ../shared/data/coco-mini/annotations/captions_train2017.json [--flickr8k DIR --limit 200]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from mmtui.stacks.projection import load_projection
from mmtui.training.caption_data import read_coco, read_flickr8k
from mmtui.training.caption_loss import caption_examples, evaluate
from mmtui.training.data import prepare_data
from mmtui.training.train import load_training_stack


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("projections", type=Path, nargs="+")
    ap.add_argument("--coco", type=Path)
    ap.add_argument("--holdout", type=int, default=40, help="as in training: the COCO images kept out")
    ap.add_argument("--flickr8k", type=Path)
    ap.add_argument("--limit", type=int, default=0, help="held-out images per source (0: all)")
    ap.add_argument("--captions", type=int, default=40, help="greedy captions to print per source")
    ap.add_argument("--cache", type=Path, default=Path("cache/features"))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    stack = load_training_stack("smol", device=args.device)
    sources = []
    if args.coco:
        sources.append(read_coco(args.coco, holdout=args.holdout))
    if args.flickr8k:
        sources.append(read_flickr8k(args.flickr8k))
    for src in sources:  # evaluation only: keep the held-out images
        src.images = [im for im in src.images if im.heldout][: args.limit or None]
    data = prepare_data(stack, sources, args.cache, train_required=False)
    for path in args.projections:
        proj = load_projection(path, stack.encoder.dim, stack.projection.d_out).to(stack.device)
        for name, images in sorted(data.heldout.items()):
            t0 = time.monotonic()
            losses = evaluate(stack, proj, data.features, images, batch_size=16)
            shown = caption_examples(stack, proj, data.features, images[: args.captions])
            row = {"projection": str(path), "source": name, **losses, "seconds": round(time.monotonic() - t0, 1)}
            print(json.dumps(row) if args.json else row, flush=True)
            for ex in shown:
                print(json.dumps(ex) if args.json else f"  {ex['image']}: {ex['caption']!r}  | human: {ex['human']!r}")


if __name__ == "__main__":
    main()
