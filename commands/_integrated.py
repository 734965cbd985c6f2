"""`mmtui explain --ig N`: integrated gradients on the top triples of the run's first N images, against their
grad x act scores, beside as many random triples of the same layers (the control) and the same IG at about half
the points (the convergence check) (mmtui.experiments.integrated), as a table or JSON lines of type "ig" and
"ig-summary"."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.table import Table

from commands._app import emit_json, out, warn
from commands._experiments import run_stack


def fmt_ci(mean: float, ci: tuple[float, float]) -> str:
    return f"{mean:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci[0] == ci[0] else f"{mean:.3f}"


def _maybe(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def ig_check(
    store: Any,
    run: Any,
    *,
    n_images: int,
    top: int,
    steps: int,
    method: str,
    control: bool,
    device: str,
    json_out: bool,
) -> int:
    """Run the cross-check and print it; returns how many images failed."""
    from mmtui.experiments import integrated as ig

    failed: list[int] = []

    def on_error(result_id: int, message: str) -> None:
        failed.append(result_id)
        warn(message)

    stack = run_stack(run, device)
    found = ig.run_ig(
        stack, store, run, n_images=n_images, top=top, steps=steps, method=method, control=control, on_error=on_error
    )
    summary = ig.summary(found)
    if json_out:
        emit_json(
            {
                "type": "ig",
                "image": f.image,
                "result_id": f.result_id,
                "method": method,
                "steps": f.steps,
                "triples": f.triples.tolist(),
                "grad_x_act": f.grad_x_act.tolist(),
                "ig": f.ig.tolist(),
                "spearman": f.spearman,
                "overlap": f.overlap,
                "k": f.k,
                "completeness_gap": f.completeness,
                "completeness_gap_y": f.completeness_y,
                "y": f.y,
                "check_steps": f.check_steps,
                "check_gap": f.check_gap,
                "check_spearman": f.check_spearman,
                "control_spearman": f.control.spearman if f.control else None,
                "control_overlap": f.control.overlap if f.control else None,
            }
            for f in found
        )
        emit_json([{"type": "ig-summary", "top": top, "method": method, "steps": steps, **summary}])
        return len(failed)
    table = Table(
        title=f"Integrated gradients vs grad x act: each image's top {top} triples ({method}, {steps} points)"
    )
    k = found[0].k if found else top // 2
    check = summary.get("check_steps")
    names = ["image", "rho", f"top-{k}"]
    if control:
        names += ["random\nrho", f"random\ntop-{k}"]
    names += ["gap"]
    if check:
        names += [f"gap at\n{check}", f"rho\n{check}:{steps}"]
    for name in names:
        if name == "image":
            table.add_column(name, overflow="fold")
        else:
            table.add_column(name, justify="right", no_wrap=True, min_width=7)
    for f in found:
        cells = [Path(f.image).name, f"{f.spearman:.3f}", f"{f.overlap:.2f}"]
        if control:
            c = f.control
            cells += [_maybe(c.spearman if c else None, ".3f"), _maybe(c.overlap if c else None, ".2f")]
        cells += [f"{f.completeness:.1e}"]
        if check:
            cells += [_maybe(f.check_gap, ".1e"), _maybe(f.check_spearman, ".3f")]
        table.add_row(*cells)
    caption = (
        f"rho: Spearman's rho of IG against grad x act over the image's top {top} triples, top-{k}: the share of "
        f"grad x act's top {k} in IG's; mean rho {fmt_ci(summary['spearman'], summary['spearman_ci'])}, top-{k} "
        f"{fmt_ci(summary['overlap'], summary['overlap_ci'])} over {summary['images']} image(s) (bootstrap 95%)"
    )
    if control and "control_spearman" in summary:
        caption += (
            f". random: the same for as many random triples of the same layers, rho "
            f"{fmt_ci(summary['control_spearman'], summary['control_spearman_ci'])}, top-{k} "
            f"{fmt_ci(summary['control_overlap'], summary['control_overlap_ci'])} (small entries sit where y is "
            "nearly linear, so chance agreement is high)"
        )
    caption += (
        ". gap: completeness, |sum of a layer's IG - (y - y with its entries zeroed)| / |y - y zeroed|, the worst "
        f"layer (median {summary['median_completeness_gap']:.1e}; as a share of y, median "
        f"{summary['median_completeness_gap_y']:.1e})."
    )
    if check:
        caption += (
            f" gap at {check}, rho {check}:{steps}: the gap at {check} points (from the same passes) and the rho of "
            f"IG at {check} points against IG at {steps}. Where the gap is not small, or rho is far from 1, raise "
            "--ig-steps."
        )
    table.caption = caption
    out.print(table)
    if summary["not_converged"]:
        warn(
            f"{summary['not_converged']} of {summary['images']} image(s) have a completeness gap above "
            f"{ig.SMALL_GAP:.0%} of y - y zeroed: at {steps} points IG has not converged there, so their agreement "
            "is not yet a result; raise --ig-steps"
        )
    return len(failed)
