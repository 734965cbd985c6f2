"""`mmtui doctor`: check a cache (without writing to it), and salvage what is readable from a damaged one."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from commands._app import DbOption, ExitCode, JsonOption, app, core_errors, db_path, emit_json, out


@app.command()
def doctor(
    db: DbOption = None,
    salvage_to: Annotated[
        Path | None,
        typer.Option(
            "--salvage",
            help="Copy everything readable into a new cache at this path (never touching the checked file), "
            "fold it, and say how many results were saved.",
        ),
    ] = None,
    json_out: JsonOption = False,
) -> None:
    """Check a cache without writing to it: does it open, PRAGMA integrity_check, its schema against this mmtui,
    each run's results and those not yet folded (an interrupted run), orphan rows, a -wal or -journal file left
    beside it; one line on what to do for each problem. Exit 0 healthy, 1 problems found, 2 it does not open."""
    from mmtui.store.doctor import examine, salvage

    path = db_path(db)
    checkup = examine(path)
    if json_out:
        emit_json({"type": "check", **f.__dict__} for f in checkup.findings)
        emit_json({"type": "run", **r.__dict__} for r in checkup.runs)
    else:
        for f in checkup.findings:
            out.print(f"{'ok     ' if f.ok else 'PROBLEM'} {f.check}: {f.detail}", markup=False, highlight=False)
            if f.fix:
                out.print(f"        what to do: {f.fix}", markup=False, highlight=False)
        for r in checkup.runs:
            counts = (
                f"{r.n_results:,} results, {'?' if r.n_pending is None else f'{r.n_pending:,}'} not folded"
                if r.n_results is not None
                else r.error or "?"
            )
            out.print(f"run {r.id} ({r.stack}): {counts}", markup=False, highlight=False)
    code = ExitCode.OK if not checkup.problems else ExitCode.PARTIAL
    if not checkup.opened:
        code = ExitCode.FAILED
    if salvage_to is not None:
        with core_errors():
            saved = salvage(path, salvage_to)
        if json_out:
            emit_json([{"type": "salvage", **saved.__dict__, "out": str(saved.out)}])
        else:
            before = f" of the {saved.results_before:,} the damaged file counts" if saved.results_before else ""
            orphans = ", ".join(f"{n:,} {table}" for table, n in saved.orphans_dropped.items()) or "none"
            out.print(
                f"salvaged into {saved.out} ({saved.method}): {saved.results_saved:,} results{before}, folded "
                f"again; integrity {saved.integrity}. Left out, their run, result or image row lost: {orphans} "
                f"(rerun `mmtui attribute` on those images to redo them). Use it with --db {saved.out}",
                markup=False,
                highlight=False,
            )
    problems = len(checkup.problems)
    if json_out:
        emit_json([{"type": "summary", "path": str(path), "opened": checkup.opened, "problems": problems}])
    else:
        verdict = "healthy" if not problems else f"{problems} problem{'s' * (problems != 1)} found"
        out.print(f"{path}: {verdict}", markup=False, highlight=False)
    raise typer.Exit(int(code))
