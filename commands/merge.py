"""`mmtui merge STORE...`: combine the caches of a sharded run into one."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from commands._app import DbOption, app, core_errors, db_path, err


@app.command()
def merge(
    stores: Annotated[list[Path], typer.Argument(help="Caches to merge (from `mmtui attribute --shard I/N`).")],
    db: DbOption = None,
) -> None:
    """Merge caches of the same stack into --db (created if needed); refuses caches of different stacks."""
    from mmtui.store import Store
    from mmtui.store.merge import merge_stores

    counts = {"added": 0, "skipped": 0}
    with core_errors(), Store.open(db_path(db)).for_bulk_writes() as target:
        for event in merge_stores(target, stores):
            counts[event.kind] += 1
    err.print(f"{counts['added']} results added to {db_path(db)}, {counts['skipped']} already there")
