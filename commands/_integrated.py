"""`mmtui explain --ig N`: integrated gradients on the top triples of the run's first N images, against their
grad x act scores (mmtui.experiments.integrated), as a table or JSON lines of type "ig" and "ig-summary"."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.table import Table

from commands._app import emit_json, out, warn
from commands._experiments import run_stack


def fmt_ci(mean: float, ci: tuple[float, float]) -> str:
    return f"{mean:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci[0] == ci[0] else f"{mean:.3f}"


def ig_check(store: Any, run: Any, *, n_images: int, top: int, steps: int, device: str, json_out: bool) -> int:
    """Run the cross-check and print it; returns how many images failed."""
    from mmtui.experiments import integrated as ig

    failed: list[int] = []

    def on_error(result_id: int, message: str) -> None:
        failed.append(result_id)
        warn(message)

    stack = run_stack(run, device)
    found = ig.run_ig(stack, store, run, n_images=n_images, top=top, steps=steps, on_error=on_error)
    summary = ig.summary(found)
    if json_out:
        emit_json(
            {
                "type": "ig",
                "image": f.image,
                "result_id": f.result_id,
                "triples": f.triples.tolist(),
                "grad_x_act": f.grad_x_act.tolist(),
                "ig": f.ig.tolist(),
                "spearman": f.spearman,
                "overlap": f.overlap,
                "k": f.k,
                "completeness_gap": f.completeness,
                "completeness_gap_y": f.completeness_y,
                "y": f.y,
            }
            for f in found
        )
        emit_json([{"type": "ig-summary", "top": top, "steps": steps, **summary}])
        return len(failed)
    table = Table(title=f"Integrated gradients vs grad x act: each image's top {top} triples ({steps} steps)")
    for name in ("image", "Spearman", "top-k overlap", "y", "completeness gap", "gap / y"):
        table.add_column(name, justify="left" if name == "image" else "right")
    for f in found:
        table.add_row(
            Path(f.image).name,
            f"{f.spearman:.3f}",
            f"{f.overlap:.2f} (k={f.k})",
            f"{f.y:.3g}",
            f"{f.completeness:.1e}",
            f"{f.completeness_y:.1e}",
        )
    table.caption = (
        f"mean Spearman {fmt_ci(summary['spearman'], summary['spearman_ci'])}, top-k overlap "
        f"{fmt_ci(summary['overlap'], summary['overlap_ci'])} over {summary['images']} image(s) (bootstrap 95%); "
        "completeness gap: |sum of a layer's IG - (y - y with its entries zeroed)| / |y - y zeroed|, the worst "
        f"layer (median {summary['median_completeness_gap']:.1e}; gap / y: the same gap as a share of y). "
        "Where the gap is not small, the steps do not suffice: raise --ig-steps."
    )
    out.print(table)
    if summary["not_converged"]:
        warn(
            f"{summary['not_converged']} of {summary['images']} image(s) have a completeness gap above "
            f"{ig.SMALL_GAP:.0%} of y - y zeroed: at {steps} steps IG has not converged there, so their agreement "
            "is not yet a result; raise --ig-steps"
        )
    return len(failed)
