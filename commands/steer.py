"""`mmtui steer L.K [L.K ...] IMAGE... --scale 0,2,4,8 | --add VALUE`: boost or damp units at the image
positions and show the regenerated caption, P(target) and the logit change of each unit's decoded tokens."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import JustifyMethod
from rich.table import Table

from commands._app import (
    DbOption,
    DeviceOption,
    ExitCode,
    JsonOption,
    app,
    core_errors,
    db_path,
    emit_json,
    fail,
    out,
    warn,
)
from commands._experiments import RunOption, run_stack


def _values(text: str, flag: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        fail(f"{flag} {text!r}: give numbers separated by commas, such as 0,2,4,8")
    if not values:
        fail(f"{flag} {text!r}: give one or more numbers")
    return values


@app.command()
def steer(
    items: Annotated[
        list[str],
        typer.Argument(
            help="Units (L7.u1234 or 7.1234), then images of the run (path, name or sha256).", show_default=False
        ),
    ],
    scale: Annotated[
        str | None, typer.Option("--scale", help="Multiply the units' activations by each of these (default 0,2,4,8).")
    ] = None,
    add: Annotated[
        str | None, typer.Option("--add", help="Add each of these to the units' activations instead.")
    ] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1, help="Caption length.")] = 20,
    run: RunOption = None,
    device: DeviceOption = "auto",
    db: DbOption = None,
    json_out: JsonOption = False,
) -> None:
    """Steer units: multiply (or add to) their activations at the image positions; show the caption, P(target)
    and how the logits of the units' decoded tokens change (against the unsteered pass, the first row)."""
    from mmtui.experiments.steer import SteerError, check_units, parse_unit
    from mmtui.experiments.steer import steer as run_steer
    from mmtui.store import Store

    if scale is not None and add is not None:
        fail("--scale and --add both choose the steering; pass one of them")
    mode, values = (
        ("add", _values(add, "--add")) if add is not None else ("scale", _values(scale or "0,2,4,8", "--scale"))
    )
    units: list[tuple[int, int]] = []
    images: list[str] = []
    for item in items:  # units up to the first item that is not one (or is a file)
        if not images and not Path(item).exists():
            try:
                units.append(parse_unit(item))
                continue
            except SteerError:
                pass
        images.append(item)
    if not units:
        fail("name one or more units first, as LAYER.UNIT (e.g. L7.u1234), then the images")
    if not images:
        fail("name one or more images of the run after the units (path, file name or sha256)")
    failures: list[str] = []

    def on_error(image: str, message: str) -> None:
        failures.append(image)
        warn(message)

    with core_errors(), Store.open(db_path(db), create=False) as store:
        chosen = store.run(run)
        try:
            check_units(chosen, units)  # before the stack loads
        except SteerError as error:
            fail(str(error))
        stack = run_stack(chosen, device)
        rows = run_steer(
            stack, store, chosen, units, images, values, mode=mode, max_new_tokens=max_new_tokens, on_error=on_error
        )
    if json_out:
        emit_json({"type": "steer", **row.__dict__} for row in rows)
    elif rows:
        out.print(_table(rows))
    if failures:
        raise typer.Exit(int(ExitCode.PARTIAL if rows else ExitCode.FAILED))


def _table(rows: list) -> Table:  # noqa: ANN001
    table = Table(title="Steering (first row of each image: no steering)", show_lines=True)
    columns: list[tuple[str, JustifyMethod]] = [
        ("image", "left"),
        ("setting", "right"),
        ("P(target)", "right"),
        ("caption", "left"),
    ]
    for name, justify in columns:
        table.add_column(name, justify=justify, overflow="fold")
    table.add_column("decoded tokens: logit change", overflow="fold")
    for r in rows:
        changes = "\n".join(
            f"{name}: " + ", ".join(f"{w['token'].strip() or repr(w['token'])} {w['delta']:+.2f}" for w in watched[:5])
            for name, watched in r.tokens.items()
            if watched
        )
        setting = f"x{r.value:g}" if r.mode == "scale" else f"{r.value:+g}"
        table.add_row(Path(r.image).name, setting, f"{r.p_target:.4f}", r.caption, changes)
    return table
