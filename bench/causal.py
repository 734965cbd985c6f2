"""Dose-response figures of the causal experiment (method.md, experiment 4) for a stack, as tables.

    python bench/causal.py --db /tmp/smol.db                       # print what the store holds (latest run)
    python bench/causal.py --db /tmp/smol.db --images ../shared/data/coco-mini/train2017 --limit 30
                                                                   # attribute (smol) + ablate first, then print

Prints, per ablation mode stored: the mean relative drop of P(target) with its 95% t interval over images for the
top, interpretable and random conditions at each k, the caption BERTScore, and what k means for this stack: the
share of all (unit, patch) triples and of all units that k ablates, beside the paper's GPT-J + BEiT scale
(6,400 of 28 x 16,384 x 196 = 89.9 M triples = 0.0071 %).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from mmtui.experiments.ablation import dose_response, summarize  # noqa: E402
from mmtui.store import Run, Store  # noqa: E402
from mmtui.store import experiments as xs  # noqa: E402

console = Console(width=200)
PAPER_TRIPLES = 28 * 16384 * 196
PAPER_UNITS = 28 * 16384
SMOL_KS = (0, 10, 25, 50, 100, 200, 400, 800, 1600, 3200, 6400)


def attribute_and_ablate(args: argparse.Namespace, store: Store) -> str:
    """Attribute the first --limit images with the preset, then ablate them; returns the run id."""
    from mmtui.experiments.metrics import BertScorer
    from mmtui.run.events import ImageDone, ImageFailed, ImageSkipped, RunStarted
    from mmtui.run.images import find_images
    from mmtui.run.pipeline import attribute_images, read_captions
    from mmtui.stacks import load_stack

    stack = load_stack(args.preset, device=args.device)
    files = find_images(args.images).files[: args.limit]
    captions_file = Path(args.images).parent / "annotations" / "captions_train2017.json"
    captions = read_captions(captions_file) if captions_file.is_file() and not args.model_targets else None
    start = time.perf_counter()
    run_id = None
    sha256: dict[str, str] = {}
    for event in attribute_images(stack, store, files, captions=captions, batch_size=4):
        if isinstance(event, RunStarted):
            run_id = event.run_id
        elif isinstance(event, (ImageDone, ImageSkipped)):
            sha256[event.path] = event.sha256
        elif isinstance(event, ImageFailed):
            console.print(f"[red]failed[/] {event.message}")
            if event.sha256 is not None:  # an older result of the image may be in the run
                sha256[event.path] = event.sha256
    assert run_id is not None
    attributed = time.perf_counter() - start
    run = store.run(run_id)
    ids = xs.result_ids_for_images(store, run_id, [sha256[str(f)] for f in files if str(f) in sha256])
    bert = BertScorer.load()
    start = time.perf_counter()
    n = 0
    for point in dose_response(
        stack, store, run, ids, args.k, seeds=args.seeds, mode=args.mode, unit_mode=args.unit_mode, bertscore=bert
    ):
        n += 1
        if n % 50 == 0:
            console.print(f"[dim]{n} points, {Path(point.image).name} k={point.k} {point.condition}[/]")
    ablated = time.perf_counter() - start
    console.print(
        f"attribution {attributed / max(len(ids), 1):.1f} s/image, ablation {ablated / max(len(ids), 1):.1f} s/image "
        f"({n} points, {len(ids)} images, device {stack.device})"
    )
    return run_id


def print_tables(store: Store, run: Run) -> None:
    shape = run.shape
    n_triples = shape["n_layers"] * shape["d_mlp"] * shape["n_patches"]
    n_units = shape["n_layers"] * shape["d_mlp"]
    console.print(
        f"run {run.id}: stack {run.stack.name} ({shape['n_layers']} layers x {shape['d_mlp']} units x "
        f"{shape['n_patches']} patches = {n_triples:,} triples, {n_units:,} units), {run.n_images} images"
    )
    for mode, unit_mode, n_images in xs.ablation_modes(store, run.id):
        rows = summarize(xs.ablation_points(store, run.id, mode=mode, unit_mode=unit_mode), shape=shape)
        table = Table(title=f"{mode} ablation of {unit_mode}: mean relative drop of P(target), {n_images} images")
        for name in ("k", "top", "interpretable", "random", "caption F1 top", "caption F1 random"):
            table.add_column(name, justify="right")
        table.add_column("k as % of triples / of units (paper at this k)", justify="right")
        by = {(r["condition"], r["k"]): r for r in rows}
        for k in sorted({r["k"] for r in rows}):
            cells = [str(k)]
            for condition in ("top", "interpretable", "random"):
                r = by.get((condition, k))
                cells.append("-" if r is None else f"{r['mean_drop']:.3f} [{r['lo']:.3f}, {r['hi']:.3f}] n={r['n']}")
            for condition in ("top", "random"):
                r = by.get((condition, k))
                cells.append("-" if r is None or r["n_bertscore"] == 0 else f"{r['bertscore']:.3f}")
            top = by.get(("top", k))
            frac = (
                f"{100 * top['frac_triples']:.4f}% / {100 * top['frac_units']:.2f}% "
                f"({100 * k / PAPER_TRIPLES:.4f}% / <={100 * k / PAPER_UNITS:.2f}%)"
                if top
                else "-"
            )
            cells.append(frac)
            table.add_row(*cells)
        console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", default="/tmp/smol.db")
    parser.add_argument("--run", default=None)
    parser.add_argument("--images", default=None, help="attribute and ablate these images first")
    parser.add_argument("--limit", type=int, default=30)
    parser.add_argument("--preset", default="smol")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--k", type=lambda s: [int(x) for x in s.split(",")], default=list(SMOL_KS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--mode", default="zero")
    parser.add_argument("--unit-mode", default="triples")
    parser.add_argument("--model-targets", action="store_true", help="target = the model caption's first noun")
    args = parser.parse_args()
    with Store.open(args.db, create=args.images is not None) as store:
        run_id = attribute_and_ablate(args, store) if args.images else args.run
        print_tables(store, store.run(run_id))


if __name__ == "__main__":
    main()
