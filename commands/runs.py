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
        modes = {r.id: store.target_modes(r.id) for r in rows}
    if json_out:
        emit_json({"type": "run", **r.to_json(), "target_modes": modes[r.id]} for r in rows)
        return
    table = Table(title=f"Runs in {db_path(db)}")
    for name in ("run", "stack", "prompt", "site", "y", "images", "results", "target modes", "shape", "last write"):
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
            ", ".join(f"{mode} {n:,}" for mode, n in modes[r.id].items()) or "-",
            f"{shape['n_layers']} layers x {shape['d_mlp']} units, {shape['n_patches']} patches",
            r.last_write or "-",
        )
    table.caption = (
        "target modes: auto (first noun of the greedy caption), human (of a human caption, --captions), word:W "
        "(--target W); one result per image and mode, and every count over a run counts results"
    )
    out.print(table)
