"""Integrated gradients against grad x act on a run's images (issue 20, item 4): time per image, completeness per
image at each rule size, and the agreement of the two rankings with a random-triple control.

    python bench/integrated.py --db STORE [--run ID] [--images 3] [--skip 0] [--top 20]
                               [--sizes 5,9,17,33] [--method riemann_trapezoid] [--control] [--chunk 32]
                               [--device cpu] [--jsonl OUT.jsonl]
    python bench/integrated.py --summarize OUT.jsonl [OUT2.jsonl ...]

Sizes are the rule's points; riemann_trapezoid's 5, 9, 17, 33 and 65 points (4 to 64 intervals) nest, so every
size comes from the passes of the largest. Prints one line per image as it finishes (also to --jsonl), then per
size: the completeness gap (|sum of a layer's IG - (y - y with the layer's entries zeroed)|, the worst layer,
relative to y - y zeroed and to y; median and worst image) and the mean Spearman and top-k overlap with bootstrap
95% intervals, the control's beside them. The computation is mmtui.experiments.integrated. --summarize prints
the table again from the lines of earlier runs (an interrupted one, or several run in turn), with no model.

Time per image on smol (Flickr8k 1056338697, top 5 triples in 4 layers, Gauss-Legendre 8 steps, the shared
2-core CPU at load 12-16, nice 5; the same IG to 5 digits in all three): the code before batching rows (9576756:
the steps of a layer in one batch, plus a plain and a zeroed pass of batch 1 per layer) 612 s (run beside another
of these benches); path_ig with --chunk 1 (one pass per row) 504 s; --chunk 32 152 s.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mmtui.experiments import integrated as ig  # noqa: E402
from mmtui.stacks.presets import load_stack_for_run  # noqa: E402
from mmtui.store import Store  # noqa: E402
from mmtui.store import experiments as xs  # noqa: E402


def _ci(summary: dict, name: str) -> str:
    lo, hi = summary[f"{name}_ci"]
    return f"{summary[name]:.3f} [{lo:.3f}, {hi:.3f}]"


def _from_record(record: dict) -> ig.ImageIG:
    """An image's IG measures back from its --jsonl line: what `ig.summary` reads (not the triples)."""
    layer_gaps = list(record["layer_gaps"].values())
    none = np.zeros(0)
    control = None
    if record.get("control_spearman") is not None:
        control = ig.Agreement(
            none.reshape(0, 3), none, none, record["control_spearman"], record["control_overlap"], record["k"],
            np.array([record["control_gap"]]), np.ones(1),
        )  # fmt: skip
    return ig.ImageIG(
        none.reshape(0, 3), none, none, record["spearman"], record["overlap"], record["k"],
        np.array([g for g, _ in layer_gaps]), np.array([d for _, d in layer_gaps]),
        result_id=record["result_id"], image=record["image"], y=record["y"], steps=record["steps"], control=control,
    )  # fmt: skip


def _table(by_size: dict[int, list[ig.ImageIG]], control: bool) -> None:
    print(
        "| points | images | not converged | gap / (y - y0), median | worst | gap / y, median | worst | Spearman | "
        "top-k overlap |" + (" control Spearman | control overlap |" if control else "")
    )
    print("|---" * (11 if control else 9) + "|")
    for n, found in sorted(by_size.items()):
        s = ig.summary(found)
        line = (
            f"| {n} | {s['images']} | {s['not_converged']} | {s['median_completeness_gap']:.2e} | "
            f"{s['worst_completeness_gap']:.2e} | {s['median_completeness_gap_y']:.2e} | "
            f"{s['worst_completeness_gap_y']:.2e} | {_ci(s, 'spearman')} | {_ci(s, 'overlap')} |"
        )
        if control:
            line += f" {_ci(s, 'control_spearman')} | {_ci(s, 'control_overlap')} |"
        print(line)


def summarize(paths: list[Path]) -> None:
    """The table from --jsonl lines (the last line of an image and size wins)."""
    found: dict[tuple[int, int], ig.ImageIG] = {}
    for path in paths:
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                found[record["result_id"], record["steps"]] = _from_record(record)
    by_size: dict[int, list[ig.ImageIG]] = {}
    for (_, steps), f in sorted(found.items()):
        by_size.setdefault(steps, []).append(f)
    print(f"{len({r for r, _ in found})} image(s) from {', '.join(str(p) for p in paths)}")
    _table(by_size, any(f.control is not None for f in found.values()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--summarize", nargs="+", type=Path, default=None, metavar="JSONL")
    ap.add_argument("--db", type=Path)
    ap.add_argument("--run", default=None)
    ap.add_argument("--images", type=int, default=3)
    ap.add_argument("--skip", type=int, default=0, help="start at the run's image number SKIP (0-based)")
    ap.add_argument("--top", type=int, default=ig.DEFAULT_TOP)
    ap.add_argument("--sizes", default="5,9,17,33")
    ap.add_argument("--method", default="riemann_trapezoid", choices=ig.METHODS)
    ap.add_argument("--control", action="store_true")
    ap.add_argument("--chunk", type=int, default=ig.DEFAULT_CHUNK)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--jsonl", type=Path, default=None)
    args = ap.parse_args()
    if args.summarize:
        summarize(args.summarize)
        return
    if args.db is None:
        ap.error("--db is required (or --summarize)")
    sizes = [int(x) for x in args.sizes.split(",")]
    by_size: dict[int, list[ig.ImageIG]] = {n: [] for n in sizes}
    times = []
    sink = args.jsonl.open("a") if args.jsonl else None
    with Store.open(args.db, create=False) as store:
        run = store.run(args.run)
        start = time.perf_counter()
        stack = load_stack_for_run(run, device=args.device)
        print(f"stack loaded in {time.perf_counter() - start:.0f} s", file=sys.stderr)
        rows = xs.result_rows(store, run.id)[args.skip : args.skip + args.images]
        for row in rows:
            start = time.perf_counter()
            found = ig.image_ig_sizes(
                stack,
                store,
                run,
                row["id"],
                top=args.top,
                sizes=sizes,
                method=args.method,
                control=args.control,
                seed=args.seed,
                chunk=args.chunk,
            )
            took = time.perf_counter() - start
            times.append(took)
            layers = len(set(found[0].triples[:, 0].tolist()))
            for f in found:
                by_size[f.steps].append(f)
                record = {
                    "image": Path(f.image).name,
                    "result_id": f.result_id,
                    "steps": f.steps,
                    "method": args.method,
                    "top": args.top,
                    "layers": layers,
                    "seconds": took,
                    "y": f.y,
                    "gap": f.completeness,
                    "gap_y": f.completeness_y,
                    "layer_gaps": {  # per layer: |sum IG - (y - y0)| and y - y0
                        int(at): [float(g), float(d)]
                        for at, g, d in zip(sorted(set(f.triples[:, 0].tolist())), f.gaps, f.deltas, strict=True)
                    },
                    "spearman": f.spearman,
                    "overlap": f.overlap,
                    "k": f.k,
                    "control_spearman": f.control.spearman if f.control else None,
                    "control_overlap": f.control.overlap if f.control else None,
                    "control_gap": f.control.completeness if f.control else None,
                }
                print(json.dumps(record), flush=True)
                if sink:
                    sink.write(json.dumps(record) + "\n")
                    sink.flush()
    print(
        f"\n{len(times)} image(s), top {args.top}, {args.method}, sizes {sizes} from one set of passes, chunk "
        f"{args.chunk}{', with the control' if args.control else ''}: "
        f"{sum(times) / max(len(times), 1):.0f} s per image (min {min(times, default=0):.0f}, max "
        f"{max(times, default=0):.0f})"
    )
    _table(by_size, args.control)


if __name__ == "__main__":
    main()
