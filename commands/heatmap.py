"""`mmtui heatmap LAYER NEURON IMAGE`: a neuron's activations over the patch grid, drawn on the image."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from commands._app import (
    DbOption,
    DeviceOption,
    JsonOption,
    app,
    core_errors,
    db_path,
    emit_json,
    err,
    fail,
    out,
)
from commands._experiments import RunOption, check_stack_args, check_unit, run_stack
from mmtui.defaults import Site


@app.command()
def heatmap(
    layer: Annotated[int, typer.Argument(help="Layer, 0-based.")],
    neuron: Annotated[int, typer.Argument(help="Unit index within the layer's MLP, 0-based.")],
    image: Annotated[Path, typer.Argument(help="Image file.")],
    png: Annotated[
        Path | None, typer.Option("--out", help="PNG to write (default L<layer>.u<neuron>-<image name>.png here).")
    ] = None,
    preset: Annotated[
        str | None,
        typer.Option("--preset", help="Stack to use; default the stack of the run in --db (else smol)."),
    ] = None,
    run: RunOption = None,
    site: Annotated[
        Site | None, typer.Option("--site", help="post or pre; default the run's site (else post).")
    ] = None,
    device: DeviceOption = "auto",
    db: DbOption = None,
    json_out: JsonOption = False,
) -> None:
    """Draw one neuron's activation over the patch grid of an image (bilinear, 0.95-quantile outline)."""
    from mmtui.experiments.heatmap import draw_overlay, encoder_view, frame_size, unit_activation_maps, upsample
    from mmtui.run.images import load_image

    if preset is not None and run is not None:
        fail("--preset and --run both choose the stack; pass one of them")
    check_stack_args(preset)
    with core_errors():
        picture = load_image(image)
        stack, chosen_site = _stack(preset, run, site.value if site else "", device, db_path(db), layer, neuron)
        site_name = chosen_site or Site.POST.value
        maps = unit_activation_maps(stack, picture.image, [(layer, neuron)], site_name)
        grid = maps[0]
        target = png or Path(f"L{layer}.u{neuron}-{image.stem}.png")
        view = encoder_view(stack, picture.image)
        title = f"L{layer}.u{neuron} on {image.name} ({stack.name}, site {site_name})"
        draw_overlay(view, [upsample(grid, frame_size(stack))], [title], target, columns=1)
    err.print(f"wrote {target}", highlight=False)
    flat = int(grid.argmax())
    record = {
        "type": "heatmap",
        "layer": layer,
        "unit": neuron,
        "image": str(image),
        "site": site_name,
        "grid": [[round(float(v), 5) for v in row] for row in grid],
        "max": float(grid.max()),
        "argmax_patch": flat,
        "png": str(target),
    }
    if json_out:
        emit_json([record])
        return
    table = Table(title=f"L{layer}.u{neuron} activation over the {grid.shape[0]} x {grid.shape[1]} patch grid")
    for c in range(grid.shape[1]):
        table.add_column(str(c), justify="right")
    for row in grid:
        table.add_row(*(f"{v:.2f}" for v in row))
    table.caption = f"max {grid.max():.3f} at patch {flat} (row {flat // grid.shape[1]}, column {flat % grid.shape[1]})"
    out.print(table)


def _stack(preset: str | None, run_id: str | None, site: str, device: str, db: Path, layer: int, unit: int):  # noqa: ANN202
    """The run's stack when --run is given or the cache has a run and no --preset; else the preset."""
    from mmtui.stacks import load_stack
    from mmtui.store import Store

    if preset is None and (run_id is not None or db.is_file()):
        with Store.open(db, create=False) as store:
            runs = store.runs()
            if runs or run_id is not None:
                chosen = store.run(run_id)
                check_unit(layer, unit, chosen.shape)  # before the load
                return run_stack(chosen, device), site or chosen.site
    with err.status(f"Loading the {preset or 'smol'} stack..."):
        return load_stack(preset or "smol", device=device), site
