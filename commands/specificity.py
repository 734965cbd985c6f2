"""`mmtui specificity --instances FILE`: IoU of the top units' receptive fields with COCO instance masks,
against random units of the same layers."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from commands._app import DbOption, DeviceOption, JsonOption, app, core_errors, db_path, emit_json, fail, out, warn
from commands._experiments import RunOption, fmt, open_store, print_eta, progress_bar, run_stack


def iou_json(image: str, row: dict[str, Any]) -> dict[str, Any]:
    """One IoU row for --json: a unit's row names it by "layer" and "unit"; a mean over units (top-mean,
    random-mean) has null there (the store keeps -1)."""
    mean = row["layer"] < 0
    return {"type": "iou", "image": image, **row, **({"layer": None, "unit": None} if mean else {})}


@app.command()
def specificity(
    instances: Annotated[Path, typer.Option("--instances", help="COCO instances JSON (instances_*.json).")],
    units: Annotated[int, typer.Option("--units", min=1, help="Top distinct units per image.")] = 10,
    seeds: Annotated[int, typer.Option("--seeds", min=1, help="Random same-layer draws per image.")] = 3,
    category: Annotated[
        str,
        typer.Option("--category", help="auto (target's category, else the largest), target, or largest."),
    ] = "auto",
    single: Annotated[
        bool, typer.Option("--single", help="Only images with exactly one instance of the category.")
    ] = False,
    interpretable: Annotated[
        bool, typer.Option("--interpretable", help="Only units passing the 7-of-10 word filter.")
    ] = False,
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="At most this many images.")] = None,
    run: RunOption = None,
    device: DeviceOption = "auto",
    db: DbOption = None,
    json_out: JsonOption = False,
) -> None:
    """Score how well the top units' heatmaps (> 0.95 quantile) overlap the COCO mask of the image's category."""
    from mmtui.experiments.specificity import CATEGORY_RULES, CocoInstances, score_images, summarize

    if category not in CATEGORY_RULES:
        fail(f"--category {category!r}: use one of {', '.join(CATEGORY_RULES)}")
    skipped: list[str] = []
    rows: list[dict[str, Any]] = []
    with core_errors():
        coco = CocoInstances.load(instances)
        with open_store(db_path(db)) as store:
            chosen = store.run(run)
            result_ids = [r["id"] for r in store.results(chosen.id, limit=limit)]
            stack = run_stack(chosen, device)
            with progress_bar() as progress:
                task = progress.add_task("IoU", total=len(result_ids))

                since, done = time.perf_counter(), 0

                def on_skip(path: str, why: str) -> None:
                    nonlocal done
                    done += 1
                    skipped.append(f"{path}: {why}")
                    progress.advance(task)

                for item in score_images(
                    stack,
                    store,
                    chosen,
                    coco,
                    result_ids=result_ids,
                    n_units=units,
                    seeds=seeds,
                    category=category,
                    single=single,
                    interpretable_only=interpretable,
                    on_skip=on_skip,
                ):
                    done += 1
                    if not rows and done < len(result_ids):  # the ETA up front, from the first image scored
                        print_eta("IoU: the first image(s)", time.perf_counter() - since, done, len(result_ids))
                    progress.advance(task)
                    rows.extend(item.rows)
                    if json_out:
                        emit_json(iou_json(item.image, r) for r in item.rows)
    if skipped:
        warn(f"{len(skipped)} image(s) left out, e.g. {skipped[0]}")
    if not rows:
        fail("no image of the run could be scored; check that --instances covers the attributed images")
    summary = summarize(rows)
    if json_out:
        emit_json({"type": "category", **c} for c in summary["categories"])
        emit_json(
            [
                {
                    "type": "overall",
                    **summary["overall"],
                    "wins": summary["wins"],
                    "n_categories": summary["n_categories"],
                }
            ]
        )
    else:
        table = Table(title=f"IoU of receptive fields with COCO masks, run {chosen.id} ({chosen.stack.name})")
        for name in ("category", "n", "top", "random", "diff [95% CI]", "avg top", "avg rnd"):
            table.add_column(name, justify="left" if name == "category" else "right")
        for c in [*summary["categories"], {"category": "all", **summary["overall"]}]:
            table.add_row(
                c["category"],
                str(c["n_images"]),
                fmt(c["top"]),
                fmt(c["random"]),
                f"{fmt(c['diff'])} [{fmt(c['diff_lo'], 2)}, {fmt(c['diff_hi'], 2)}]",
                fmt(c["top_mean"]),
                fmt(c["random_mean"]),
            )
        table.caption = (
            f"top units beat random same-layer units in {summary['wins']} of {summary['n_categories']} categories; "
            "mean IoU over images; diff: mean per-image difference top - random with its 95% t interval; avg: the mask of "
            "the mean heatmap of the top (or random) units"
        )
        out.print(table)
