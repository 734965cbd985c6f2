"""`mmtui runs`: what the cache holds."""

from __future__ import annotations

from rich.table import Table

from commands._app import DbOption, JsonOption, app, core_errors, db_path, emit_json, out


@app.command()
def runs(db: DbOption = None, json_out: JsonOption = False) -> None:
    """List the runs in the cache: stack, prompt, settings and how many images each holds."""
    from mmtui.store import Store

    with core_errors(), Store.open(db_path(db), create=False) as store:
        rows = store.runs()
    if json_out:
        emit_json({"type": "run", **r.to_json()} for r in rows)
        return
    table = Table(title=f"Runs in {db_path(db)}")
    for name in ("run", "stack", "prompt", "site", "y", "images", "results", "shape", "last write"):
        table.add_column(name, overflow="fold")
    for r in rows:
        shape = r.shape
        table.add_row(
            r.id,
            f"{r.stack.name} ({r.stack.id})",
            repr(r.prompt),
            r.site,
            r.y_kind,
            str(r.n_images),
            str(r.n_results),
            f"{shape['n_layers']} layers x {shape['d_mlp']} units, {shape['n_patches']} patches",
            r.last_write or "-",
        )
    out.print(table)
