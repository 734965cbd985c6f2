"""The steering figure of issue 20 (item 3): boost each labelled unit and as many random units of its layer,
and count how often the labelled unit's boost raises its label's log-probability (and logit) more.

    python bench/steer_labels.py --db STORE [--run ID] [--units 40] [--per-label 8] [--images 12] [--scale 8]
                                 [--random 2] [--fdr 0.05] [--device cpu] [--json OUT.json]

The store needs word labels (`mmtui explain`). Prints the figure (win rate with an exact binomial 95% interval
over units; pair-level win rate with a bootstrap interval) per metric and the per-unit table; the computation
is mmtui.experiments.boost.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mmtui.experiments import boost as bx  # noqa: E402
from mmtui.stacks.presets import load_stack_for_run  # noqa: E402
from mmtui.store import Store  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--db", required=True, type=Path)
    ap.add_argument("--run", default=None)
    ap.add_argument("--units", type=int, default=40)
    ap.add_argument("--per-label", type=int, default=8)
    ap.add_argument("--images", type=int, default=12)
    ap.add_argument("--scale", type=float, default=8.0)
    ap.add_argument("--random", type=int, default=2)
    ap.add_argument("--fdr", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    with Store.open(args.db, create=False) as store:
        run = store.run(args.run)
        start = time.perf_counter()
        stack = load_stack_for_run(run, device=args.device)
        loaded = time.perf_counter() - start
        units = bx.choose_units(store, run, stack, n_units=args.units, fdr=args.fdr, per_label=args.per_label)
        start = time.perf_counter()
        result = bx.boost(
            stack,
            store,
            run,
            units,
            n_images=args.images,
            scale=args.scale,
            n_random=args.random,
            seed=args.seed,
            on_image=lambda i, n: print(f"image {i}/{n} {time.perf_counter() - start:.0f}s", file=sys.stderr),
        )
        took = time.perf_counter() - start
    print(f"run {run.id} ({run.stack.name}, {run.n_images} images); stack loaded in {loaded:.0f}s, boost {took:.0f}s")
    passed = sum(u.passed for u in units)
    how = f"q < {args.fdr:g}" if passed else "none passes the FDR: each unit's most enriched word"
    print(
        f"{len(units)} labelled units ({how}; at most {args.per_label} per word), {args.random} random units of the "
        f"same layer each, scale x{args.scale:g}, {len(result.images)} images"
    )
    summaries = {m: bx.summarize(result, m, seed=args.seed) for m in bx.METRICS}
    print(
        "| metric | labelled beats random | 95% CI (exact) | binomial p | pair win rate (95% bootstrap CI) | mean change labelled | mean change random |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for m, s in summaries.items():
        print(
            f"| {m} | {s['wins']}/{s['units']} = {s['win_rate']:.2f} | {s['ci'][0]:.2f}-{s['ci'][1]:.2f} | "
            f"{s['p_binomial']:.2g} | {s['pair_win_rate']:.2f} ({s['pair_ci'][0]:.2f}-{s['pair_ci'][1]:.2f}) | "
            f"{s['mean_labelled']:+.3f} | {s['mean_random']:+.3f} |"
        )
    print()
    print("| unit | label (token) | q | change labelled | change random (mean) |")
    print("| --- | --- | --- | --- | --- |")
    for r in bx.unit_rows(result, "logprob"):
        print(
            f"| L{r['layer']}.u{r['unit']} | {r['label']} ({r['token']!r}{', 1st of ' + str(r['n_tokens']) if r['n_tokens'] > 1 else ''}) "
            f"| {r['q']:.2g} | {r['labelled']:+.3f} | {r['random']:+.3f} |"
        )
    if args.json:
        args.json.write_text(
            json.dumps({"summary": summaries, "units": bx.unit_rows(result, "logprob"), "images": result.images})
        )


if __name__ == "__main__":
    main()
