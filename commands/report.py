"""`mmtui report`: one HTML page with PNG figures of every experiment stored for a run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from commands._app import DbOption, DeviceOption, JsonOption, app, core_errors, db_path, emit_json, err, fail, out, warn
from commands._experiments import RunOption, open_store, run_stack


@app.command()
def report(
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for index.html and its PNGs.")] = Path("report"),
    heatmaps: Annotated[
        bool, typer.Option("--heatmaps/--no-heatmaps", help="Draw the heatmap grid (loads the run's stack).")
    ] = True,
    images: Annotated[int, typer.Option("--images", min=1, help="Images in the heatmap grid.")] = 6,
    run: RunOption = None,
    device: DeviceOption = "auto",
    db: DbOption = None,
    json_out: JsonOption = False,
) -> None:
    """Write an HTML report (dose-response, layers, KS CDFs, heatmaps, IoU, Table 1, top neurons) for a run."""
    from mmtui.errors import StackError
    from mmtui.experiments.report import build_report

    if out_dir.exists() and not out_dir.is_dir():
        fail(f"--out {out_dir} is a file; pass a folder")
    with core_errors(), open_store(db_path(db)) as store:
        chosen = store.run(run)
        stack = None
        if heatmaps:
            try:
                stack = run_stack(chosen, device)
            except StackError as error:
                warn(f"no heatmaps: {error}")
        with err.status("Drawing the figures..."):
            result = build_report(store, chosen, out_dir, stack=stack, heatmap_images=images)
    for missing in result.missing:
        warn(f"not in the report: {missing}")
    if json_out:
        emit_json(
            [
                {
                    "type": "report",
                    "report": str(result.path),
                    "figures": {k: str(v) for k, v in result.figures.items()},
                    "missing": result.missing,
                }
            ]
        )
        return
    out.print(f"wrote {result.path} with {len(result.figures)} figure(s): {', '.join(sorted(result.figures))}")
