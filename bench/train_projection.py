"""Train several projections for the smol stack and compare them on held-out data.

Each named run is a data mix plus training settings; every run is evaluated on the same held-out sets
(Flickr8k test; COCO-mini and ImageNet-sample images kept out of training), with the matched image and with
a shuffled one. Writes, under --out: <run>.safetensors (+ .json card) for every run, results.jsonl (one
card per line) and log.txt. --budget-s scales down the epochs of runs that would not finish in time.

    python bench/train_projection.py --flickr8k ../shared/data/flickr8k \\
        --coco ../shared/data/coco-mini/annotations/captions_train2017.json \\
        --classes ../shared/data/imagenet-sample --out out/train --runs pilot,mix-e3
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from mmtui.training.caption_data import read_class_folder, read_coco, read_flickr8k
from mmtui.training.data import TrainProgress, prepare_data
from mmtui.training.train import TrainConfig, fit, heldout_report, load_training_stack, make_card

BASE = TrainConfig(epochs=3, batch_size=128, lr=3e-3, norm="auto", captions="all", checkpoint_every=10_000)
MIX = ("flickr8k", "coco", "classes")
# name -> (data mix, settings). The runs reported in bench/train_projection.md; with --budget-s, runs after the
# first may get fewer epochs than named here (the card of each run records what it got).
RUNS: dict[str, tuple[tuple[str, ...], TrainConfig]] = {
    # the pilot recipe (Flickr8k only, one epoch of one random caption per image, batch 32), at lr 3e-3
    "pilot": (("flickr8k",), replace(BASE, epochs=1, batch_size=32, captions="one")),
    "flickr-e3": (("flickr8k",), BASE),
    "mix-e3": (MIX, BASE),
    "mix-e3-scale": (MIX, replace(BASE, learn_scale=True)),
    "mix-e3-lr6e-3": (MIX, replace(BASE, lr=6e-3)),
    "mix-e6-scale-lr3e-3": (MIX, replace(BASE, epochs=6, learn_scale=True)),
    # shipped as mmtui/data/smol-projection.safetensors
    "mix-e6-scale-lr5e-3": (MIX, replace(BASE, epochs=6, learn_scale=True, lr=5e-3)),
    "mix-e3-nonorm": (MIX, replace(BASE, norm=None)),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flickr8k", type=Path, required=True)
    ap.add_argument("--coco", type=Path, required=True)
    ap.add_argument("--coco-images", type=Path)
    ap.add_argument("--classes", type=Path, required=True)
    ap.add_argument("--holdout", type=int, default=40, help="COCO and class-folder images kept out of training")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--cache", type=Path, default=Path("cache/features"))
    ap.add_argument("--runs", default=",".join(RUNS))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--budget-s", type=float, default=0, help="wall-clock budget for all runs (0: none)")
    ap.add_argument("--limit", type=int, default=0, help="use only the first N images of each source (smoke test)")
    ap.add_argument("--workers", type=int, default=8)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "log.txt", "a", buffering=1) as log_file:
        run_all(args, Log(log_file))


class Log:
    """Timestamped lines on stdout and in log.txt; `every` throttles training-progress lines."""

    def __init__(self, fh) -> None:
        self.fh, self.started, self.last = fh, time.monotonic(), 0.0

    def __call__(self, msg: str) -> None:
        line = f"[{time.monotonic() - self.started:7.1f}s] {msg}"
        print(line, flush=True)
        self.fh.write(line + "\n")

    def progress(self, name: str):
        def report(p: TrainProgress) -> None:
            if p.phase == "train" and (time.monotonic() - self.last > 15 or p.done == p.total):
                self.last = time.monotonic()
                self(f"{name}: step {p.done}/{p.total} loss {p.loss:.3f} lr {p.lr:.2e}")

        return report


def run_all(args: argparse.Namespace, log: Log) -> None:
    started = log.started
    stack = load_training_stack("smol", device=args.device)
    log(f"stack loaded on {stack.device}: {stack.fingerprint}")
    sources = {
        "flickr8k": read_flickr8k(args.flickr8k),
        "coco": read_coco(args.coco, args.coco_images, holdout=args.holdout),
        "classes": read_class_folder(args.classes, holdout=args.holdout),
    }
    if args.limit:
        for src in sources.values():
            held = [im for im in src.images if im.heldout][: max(2, args.limit // 4)]
            src.images = [im for im in src.images if not im.heldout][: args.limit] + held
    # every run is evaluated on the held-out images of all sources, whatever it trains on
    full = prepare_data(stack, list(sources.values()), args.cache, workers=args.workers)
    log(f"features: {full.features.shape}, {len(full.problems)} unreadable; {json.dumps(full.sources)}")
    names = [n.strip() for n in args.runs.split(",") if n.strip()]
    rate: float | None = None  # training samples per second, measured on the first run
    for i, name in enumerate(names):
        mix, config = RUNS[name]
        data = full.only(mix)
        per_epoch = sum(len(t.tokens) for t in data.train) if config.captions == "all" else len(data.train)
        if args.budget_s and rate:
            left = args.budget_s - (time.monotonic() - started) - 25 * (len(names) - i)
            fits = left / (len(names) - i) * rate / per_epoch
            if fits < config.epochs:
                log(f"{name}: {config.epochs} epochs would not fit; running {fits:.2f}")
                config = replace(config, epochs=max(0.2, round(fits, 2)))
        t0 = time.monotonic()
        ckpt = args.out / f"{name}.ckpt"
        ckpt.unlink(missing_ok=True)
        proj, facts = fit(stack, data, config, ckpt, on_progress=log.progress(name))
        ckpt.unlink(missing_ok=True)
        rate = facts["steps"] * config.batch_size / max(facts["train_seconds"], 1e-3)
        if config.captions == "one":
            rate = None if i + 1 < len(names) else rate  # the pilot's small steps would misjudge the others
        losses, shown = heldout_report(stack, proj, data, batch_size=128, examples=8)
        card = make_card(
            stack, data, config, {**facts, "mix": list(mix), "run": name}, losses, shown, time.monotonic() - t0
        )
        proj.cpu().save(args.out / f"{name}.safetensors", card=card)
        (args.out / f"{name}.json").write_text(json.dumps(card, indent=2, ensure_ascii=False) + "\n")
        with open(args.out / "results.jsonl", "a") as fh:
            fh.write(json.dumps(card, ensure_ascii=False) + "\n")
        summary = {
            k: (round(v["matched"], 3), round(v["shuffled"], 3), round(v["margin"], 3)) for k, v in losses.items()
        }
        log(
            f"{name}: {facts['steps']} steps in {facts['train_seconds']}s; held-out (matched, shuffled, margin) {summary}"
        )
        for ex in shown:
            if ex["source"].startswith("coco"):
                log(f"   {ex['image']}: {ex['caption']!r}  | human: {ex['human']!r}")
        torch.cuda.empty_cache() if stack.device.type == "cuda" else None
    log("done")


if __name__ == "__main__":
    main()
