"""`mmtui browse`: the terminal UI over the cache (layers, neurons, images, heatmaps, ablations)."""

from __future__ import annotations

import os
import sys
import threading
from typing import Annotated

import typer

from commands._app import DbOption, DeviceOption, app, db_path, fail
from mmtui.defaults import Graphics


@app.command()
def browse(
    run: Annotated[
        str | None, typer.Option("--run", help="Run id (prefix) to open; default: choose when there are several.")
    ] = None,
    graphics: Annotated[
        Graphics,
        typer.Option(
            "--graphics",
            help="Pictures: auto (Sixel or kitty graphics when the terminal has them, else half blocks), "
            "pixels, or halfblock.",
        ),
    ] = Graphics.AUTO,
    device: DeviceOption = "auto",
    db: DbOption = None,
) -> None:
    """Browse layers, neurons and images in a terminal UI; draw heatmaps and run ablations."""
    if not sys.stdout.isatty():
        fail("mmtui browse needs a terminal; for scripts use `mmtui neurons` or `mmtui neuron` (with --json)")
    if graphics in (Graphics.AUTO, Graphics.PIXELS):
        # textual-image asks the terminal what it can draw when first imported, which only works before
        # Textual takes over the terminal
        import textual_image.widget  # noqa: F401

    from mmtui.tui import make_app

    app = make_app(db_path(db), run_id=run, graphics=graphics.value, device=device)
    app.run()
    code = int(app.return_code or 0)
    if threading.active_count() > 1:
        # a worker may still be loading a model (minutes for GPT-J) or finishing an ablation batch; quitting
        # should not wait for it, and what finished is already in the store (one transaction per write)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    raise typer.Exit(code)
