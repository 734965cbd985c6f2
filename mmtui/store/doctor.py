"""Checking a cache, and salvaging what is readable from a damaged one (`mmtui doctor`).

`examine` opens the cache read-only (SQLite's mode=ro: nothing is migrated, folded or written) and reports
what it finds: whether it opens, `PRAGMA integrity_check`, the schema against this mmtui's migrations, every
run with its results and the results not yet folded into the per-unit tables (an interrupted run), rows whose
run, result, image or stack is gone, and a -wal or -journal file left beside it. Each problem carries one line
saying what to do.

`salvage` never opens the damaged file itself: it copies it (with its -wal) into a private folder beside the
output, reads that copy through `sqlite3 FILE .recover` when the sqlite3 program is installed (it reads rows
off damaged pages that SQL cannot reach), else row by row (forward, then backward, then each rowid in between,
skipping what does not read, and rows of garbage a damaged page can read as). The rows go into a fresh cache at the output, made by this mmtui's migrations;
the per-unit tables (neuron_stats, neuron_images, unit_moments) and the token text index are rebuilt, not
copied: every salvaged result is folded again. Rows whose parent row was lost are left out and counted.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmtui.errors import StoreError, is_corruption

# rebuilt in the salvaged copy, never copied: the fold's tables, the token text index (its triggers refill it
# from neuron_tokens), the schema's own bookkeeping and a table m006 folded into results.top
REBUILT = {"neuron_stats", "neuron_images", "unit_moments", "token_sets", "_sqlite_migrations", "top_neurons"}
GAP_PROBES = 1_000_000  # rowids a row-by-row read tries one by one beyond the count of rows its scans read


@dataclass
class Finding:
    """One check: its name, whether it passed, what was found, and (for a problem) what to do."""

    check: str
    ok: bool
    detail: str
    fix: str = ""


@dataclass
class RunHealth:
    """A run of the cache: its stack, its results and how many of them the per-unit tables do not count yet."""

    id: str
    stack: str
    n_results: int | None  # None: could not be counted (a damaged page)
    n_pending: int | None
    error: str = ""


@dataclass
class Checkup:
    path: Path
    opened: bool
    findings: list[Finding] = field(default_factory=list)
    runs: list[RunHealth] = field(default_factory=list)

    @property
    def problems(self) -> list[Finding]:
        return [f for f in self.findings if not f.ok]


@dataclass
class Salvage:
    """What `salvage` wrote: the rows copied per table, the results saved of those the damaged file counted
    (None: it could not count them), the orphan rows left out, and how it read the damaged copy."""

    out: Path
    method: str
    results_saved: int
    results_before: int | None
    rows: dict[str, int]
    orphans_dropped: dict[str, int]  # per table: rows whose run, result, image or stack row was lost
    folded: int
    integrity: str


def _salvage_hint(path: Path) -> str:
    return f"mmtui doctor --db {path} --salvage recovered.db, then pass --db recovered.db"


def _connect_ro(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=5)


def _error_text(error: BaseException) -> str:
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def _leftovers(path: Path) -> list[Finding]:
    found = []
    wal = Path(f"{path}-wal")
    if wal.is_file() and wal.stat().st_size > 0:
        found.append(
            Finding(
                "wal",
                False,
                f"{wal} holds {wal.stat().st_size:,} bytes of writes not yet in the cache file: an mmtui process "
                "has the cache open now, or the last one did not close it (a crash, a kill, a power cut)",
                "keep it beside the cache (it holds the latest writes, never delete it); the next mmtui command "
                "that opens the cache read-write folds it in",
            )
        )
    journal = Path(f"{path}-journal")
    if journal.is_file() and journal.stat().st_size > 0:
        found.append(
            Finding(
                "journal",
                False,
                f"{journal} is a rollback journal left by an interrupted write",
                "keep it beside the cache (never delete it); the next mmtui command that opens the cache "
                "read-write rolls the interrupted write back",
            )
        )
    return found


def examine(path: Path | str) -> Checkup:
    """Check the cache at `path` without writing to it (see the module's docstring)."""
    from mmtui.store.migrations import migrations

    path = Path(path)
    checkup = Checkup(path, opened=False)
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        checkup.findings.append(Finding("open", False, f"{path} {what}", "pass --db with the cache file"))
        return checkup
    checkup.findings += _leftovers(path)
    try:
        conn = _connect_ro(path)
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.DatabaseError as error:
        fix = f"try {_salvage_hint(path)}; else restore it from a backup, or move it aside"
        checkup.findings.append(Finding("open", False, f"{path} does not open: {_error_text(error)}", fix))
        return checkup
    with contextlib.closing(conn):
        if "_sqlite_migrations" not in names:
            detail = f"{path} is an SQLite file but not an mmtui cache"
            checkup.findings.append(Finding("open", False, detail, "pass --db with an mmtui cache file"))
            return checkup
        checkup.opened = True
        checkup.findings.append(Finding("open", True, f"{path} opens ({path.stat().st_size:,} bytes)"))
        checkup.findings.append(_integrity(conn, path))
        checkup.findings.append(_schema(conn, migrations))
        checkup.runs = _runs(conn)
        for run in checkup.runs:
            if run.error:
                fix = f"salvage what is readable: {_salvage_hint(path)}"
                checkup.findings.append(Finding("run", False, f"run {run.id}: {run.error}", fix))
            elif run.n_pending:
                checkup.findings.append(
                    Finding(
                        "interrupted",
                        False,
                        f"run {run.id}: {run.n_pending:,} of its {run.n_results:,} results are not folded into the "
                        "per-unit tables yet (the run was interrupted, or is running now)",
                        f"`mmtui neurons --run {run.id} --db {path}` folds them (any command that reads the run "
                        "read-write does); rerun `mmtui attribute` to finish the run",
                    )
                )
        orphans = _orphans(conn, path)
        damaged = [f for f in checkup.problems if f.check == "integrity"]
        if damaged and not orphans.ok and orphans.detail.startswith("orphan rows not checked"):
            damaged[0].detail += f"; {orphans.detail}"  # one problem, not two
        else:
            checkup.findings.append(orphans)
    return checkup


def _integrity(conn: sqlite3.Connection, path: Path) -> Finding:
    try:
        rows = [line for r in conn.execute("PRAGMA integrity_check(3)") for line in str(r[0]).splitlines()]
    except sqlite3.DatabaseError as error:
        rows = [_error_text(error)]
    if rows == ["ok"]:
        return Finding("integrity", True, "PRAGMA integrity_check: ok")
    return Finding(
        "integrity",
        False,
        f"PRAGMA integrity_check: {'; '.join(rows)}",
        f"the file is damaged; mmtui writes nothing more to it. Salvage what is readable: {_salvage_hint(path)}",
    )


def _schema(conn: sqlite3.Connection, migrations: Any) -> Finding:
    try:
        applied = [r[0] for r in conn.execute("SELECT name FROM _sqlite_migrations ORDER BY rowid")]
    except sqlite3.DatabaseError as error:
        return Finding("schema", False, f"the schema steps do not read: {_error_text(error)}", "salvage it")
    known = [m.name for m in migrations._migrations]
    unknown = [name for name in applied if name not in known]
    last = applied[-1] if applied else "none"
    if unknown:
        return Finding(
            "schema",
            False,
            f"written by a newer mmtui (schema step {unknown[-1]}; this mmtui knows up to {known[-1]})",
            "upgrade mmtui (pip install -U mmtui), or pass --db to use another cache file",
        )
    missing = [name for name in known if name not in applied]
    if missing:
        return Finding(
            "schema",
            True,
            f"schema step {last}, {len(missing)} behind this mmtui ({known[-1]}): the next command that opens it "
            "read-write converts it once",
        )
    return Finding("schema", True, f"schema step {last}, as this mmtui")


def _count(conn: sqlite3.Connection, sql: str, args: list[Any]) -> int:
    return int(conn.execute(sql, args).fetchone()[0])


def _runs(conn: sqlite3.Connection) -> list[RunHealth]:
    try:
        rows = conn.execute(
            "SELECT runs.id, coalesce(stacks.name, '?') FROM runs LEFT JOIN stacks ON stacks.id = runs.stack_id "
            "ORDER BY runs.rowid"
        ).fetchall()
    except sqlite3.DatabaseError as error:
        return [RunHealth("?", "?", None, None, f"the runs table does not read: {_error_text(error)}")]
    found = []
    for run_id, stack in rows:
        try:
            n = _count(conn, "SELECT count(*) FROM results WHERE run_id = ?", [run_id])
            try:
                pending: int | None = _count(
                    conn, "SELECT count(*) FROM results WHERE run_id = ? AND in_stats = 0", [run_id]
                )
            except sqlite3.OperationalError as error:  # a schema before m004 (no in_stats): not counted
                if is_corruption(error):
                    raise
                pending = None
            found.append(RunHealth(run_id, stack, n, pending))
        except sqlite3.DatabaseError as error:
            found.append(RunHealth(run_id, stack, None, None, f"its results do not read: {_error_text(error)}"))
    return found


def _orphan_counts(conn: sqlite3.Connection) -> dict[str, int]:
    """Rows whose parent row is gone, per 'table -> parent': SQLite's foreign keys, and the per-run tables that
    name a run by run_key without one."""
    counts: dict[str, int] = {}
    for table, _rowid, parent, _fk in conn.execute("PRAGMA foreign_key_check"):
        counts[f"{table} -> {parent}"] = counts.get(f"{table} -> {parent}", 0) + 1
    tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    for table in tables:
        columns = {r[1] for r in conn.execute(f'PRAGMA table_info("{table}")')}
        if table != "runs" and "run_key" in columns and not _has_foreign_key(conn, table, "run_key"):
            n = _count(conn, f'SELECT count(*) FROM "{table}" WHERE run_key NOT IN (SELECT run_key FROM runs)', [])
            if n:
                counts[f"{table} -> runs"] = counts.get(f"{table} -> runs", 0) + n
    return counts


def _has_foreign_key(conn: sqlite3.Connection, table: str, column: str) -> bool:
    return any(r[3] == column for r in conn.execute(f'PRAGMA foreign_key_list("{table}")'))


def _orphans(conn: sqlite3.Connection, path: Path) -> Finding:
    try:
        counts = _orphan_counts(conn)
    except sqlite3.DatabaseError as error:
        return Finding("orphans", False, f"orphan rows not checked: {_error_text(error)}", _salvage_hint(path))
    if not counts:
        return Finding("orphans", True, "no orphan rows (every row's run, result, image and stack is there)")
    detail = ", ".join(f"{n:,} {what}" for what, n in sorted(counts.items()))
    return Finding(
        "orphans",
        False,
        f"rows whose parent row is gone: {detail}",
        f"reads skip them; {_salvage_hint(path)} writes a copy without them",
    )


# -- salvage -----------------------------------------------------------------------------------------------------
def salvage(path: Path | str, out: Path | str, *, recover: bool | None = None) -> Salvage:
    """Copy what is readable of the cache at `path` into a fresh cache at `out` (which must not exist) and fold
    it; the file at `path` is never opened (see the module's docstring). recover: read through `sqlite3
    .recover` (True: only so; None: when the sqlite3 program is installed and its .recover works, else row by
    row; False: row by row)."""
    from mmtui.store.core import Store

    path, out = Path(path), Path(out)
    if not path.is_file():
        raise StoreError(f"no cache file at {path}; pass --db with the damaged cache")
    if out.exists() or Path(f"{out}-wal").exists():
        raise StoreError(f"{out} already exists; --salvage writes a new cache, name a file that does not exist")
    out.parent.mkdir(parents=True, exist_ok=True)
    cli = shutil.which("sqlite3")
    if recover and not cli:
        raise StoreError("the sqlite3 program is not installed; salvage row by row instead")
    with tempfile.TemporaryDirectory(prefix=".mmtui-salvage-", dir=out.parent) as tmp:
        work = Path(tmp)
        copy = work / "damaged.db"
        shutil.copyfile(path, copy)
        if Path(f"{path}-wal").is_file():
            shutil.copyfile(f"{path}-wal", f"{copy}-wal")
        results_before = _results_count(copy)
        method, source = "row by row", copy
        if cli and recover is not False:
            recovered = _recover(cli, copy, work / "recovered.db")
            if recovered is not None:
                method, source = "sqlite3 .recover", recovered
            elif recover:
                raise StoreError(
                    f"`{cli} FILE .recover` gave nothing usable here (a build whose library lacks the sqlite_dbpage "
                    "table, as Debian 12's, answers 'SQL logic error'); salvage row by row instead"
                )
        fresh = work / "salvaged.db"
        with contextlib.closing(sqlite3.connect(source)) as reader, Store.open(fresh) as store:
            rows = _copy_rows(reader, store.db.conn)
            dropped = _drop_orphans(store.db.conn)
            store.db.execute("UPDATE results SET in_stats = 0")
            store.db.conn.commit()
            folded = sum(store.refresh_stats(run.id) for run in store.runs())
            saved = _count(store.db.conn, "SELECT count(*) FROM results", [])
            integrity = "; ".join(r[0] for r in store.db.execute("PRAGMA integrity_check(5)").fetchall())
        os.replace(fresh, out)  # closed: its -wal was checkpointed and removed
    return Salvage(out, method, saved, results_before, rows, dropped, folded, integrity)


def _results_count(copy: Path) -> int | None:
    try:
        with contextlib.closing(sqlite3.connect(copy)) as conn:
            return _count(conn, "SELECT count(*) FROM results", [])
    except sqlite3.DatabaseError:
        return None


def _recover(cli: str, copy: Path, target: Path) -> Path | None:
    """`sqlite3 COPY .recover | sqlite3 TARGET`; None when it gave nothing usable."""
    with subprocess.Popen([cli, str(copy), ".recover"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL) as dump:
        subprocess.run([cli, str(target)], stdin=dump.stdout, capture_output=True, check=False)
    if dump.returncode != 0 or not target.is_file():
        return None
    try:
        with contextlib.closing(sqlite3.connect(target)) as conn:
            names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.DatabaseError:
        return None
    if "results" not in names:
        return None
    from mmtui.store.core import Store

    with contextlib.suppress(StoreError):  # an older schema: converted as any open converts it, then copied
        Store.open(target).close()
    return target


def _columns(conn: sqlite3.Connection, table: str) -> list[str]:
    return [r[1] for r in conn.execute(f'PRAGMA table_info("{table}")')]


def _copy_rows(reader: sqlite3.Connection, writer: sqlite3.Connection) -> dict[str, int]:
    """Every readable row of the tables the fresh cache has (less REBUILT and the text index), in the columns
    both have; foreign keys off while copying (parents may come after children), orphans dropped after."""
    writer.execute("PRAGMA foreign_keys = OFF")
    try:
        have = {r[0] for r in reader.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.DatabaseError as error:
        raise StoreError(f"the damaged cache's list of tables does not read ({_error_text(error)})") from error
    targets = [
        r[0]
        for r in writer.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND sql NOT LIKE 'CREATE VIRTUAL%'"
        )
    ]
    copied: dict[str, int] = {}
    for table in targets:
        if table in REBUILT or table.startswith(("sqlite_", "neuron_text")) or table not in have:
            continue
        theirs = set(_columns(reader, table))
        cols = [c for c in _columns(writer, table) if c in theirs]
        sql = f'INSERT OR IGNORE INTO "{table}" ({", ".join(cols)}) VALUES ({", ".join("?" * len(cols))})'
        n = 0
        batch: list[tuple] = []
        for row in _readable_rows(reader, table, cols):
            batch.append(row)
            if len(batch) >= 500:
                n += writer.executemany(sql, batch).rowcount
                batch.clear()
        if batch:
            n += writer.executemany(sql, batch).rowcount
        writer.commit()
        copied[table] = n
    writer.execute("PRAGMA foreign_keys = ON")
    return copied


_TYPES: dict[str, tuple[type, ...]] = {
    "INTEGER": (int,),
    "REAL": (float, int),
    "TEXT": (str,),
    "BLOB": (bytes,),
}


def _readable_rows(conn: sqlite3.Connection, table: str, cols: list[str]) -> Iterator[tuple]:
    """The rows of `table` that read, each once: in key order until a damaged page, then from the end backwards
    until one, then (a rowid table) each rowid up to the largest seen that reads on its own. A damaged page can
    also read as rows of garbage without an error: rows whose values do not fit their columns' declared types
    (or a NOT NULL) are left out, and the salvage drops those whose parent row does not exist."""
    info = {r[1]: r for r in conn.execute(f'PRAGMA table_info("{table}")').fetchall()}
    try:
        conn.execute(f'SELECT rowid FROM "{table}" LIMIT 0')
        keys = ["rowid"]
    except sqlite3.OperationalError:  # WITHOUT ROWID: its primary key
        keys = [r[1] for r in sorted(info.values(), key=lambda r: r[5]) if r[5] > 0]
    checks = [(_TYPES.get(str(info[c][2]).upper(), ()), bool(info[c][3])) for c in cols]

    def plausible(values: tuple) -> bool:
        return all(
            (v is not None or not notnull) and (v is None or not types or isinstance(v, types))
            for v, (types, notnull) in zip(values, checks, strict=True)
        )

    select = f'SELECT {", ".join(keys)}, {", ".join(cols)} FROM "{table}"'
    seen: set[tuple] = set()
    for direction in ("", " DESC"):
        order = ", ".join(f"{k}{direction}" for k in keys)
        try:
            for row in conn.execute(f"{select} ORDER BY {order}"):
                key, values = row[: len(keys)], row[len(keys) :]
                if key not in seen and plausible(values):
                    seen.add(key)
                    yield values
        except sqlite3.DatabaseError as error:
            if not is_corruption(error):
                raise
    if keys != ["rowid"] or not seen:
        return
    top = min(max(k[0] for k in seen), len(seen) + GAP_PROBES)
    for rowid in range(1, top):
        if (rowid,) in seen:
            continue
        try:
            row = conn.execute(f"{select} WHERE rowid = ?", [rowid]).fetchone()
        except sqlite3.DatabaseError as error:
            if not is_corruption(error):
                raise
            continue
        if row is not None and row[0] == rowid and plausible(row[1:]):
            seen.add((rowid,))
            yield row[1:]


def _drop_orphans(conn: sqlite3.Connection) -> dict[str, int]:
    """Delete rows whose parent row was not salvaged (a result whose run or image row was lost: every reader
    joins them, so it could never be read; an ablation point whose result was), until none is left; per-run
    tables without a foreign key go by run_key. Returns how many per table."""
    tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    dropped: dict[str, int] = {}
    while True:
        before = sum(dropped.values())
        for table in tables:
            n = 0
            for _id, _seq, parent, column, parent_column, *_ in conn.execute(
                f'PRAGMA foreign_key_list("{table}")'
            ).fetchall():
                if parent_column is None:  # every foreign key of the schema names its parent column
                    continue
                n += conn.execute(
                    f'DELETE FROM "{table}" WHERE "{column}" IS NOT NULL AND "{column}" NOT IN '
                    f'(SELECT "{parent_column}" FROM "{parent}")'
                ).rowcount
            if table != "runs" and "run_key" in _columns(conn, table) and not _has_foreign_key(conn, table, "run_key"):
                n += conn.execute(f'DELETE FROM "{table}" WHERE run_key NOT IN (SELECT run_key FROM runs)').rowcount
            if n:
                dropped[table] = dropped.get(table, 0) + n
        conn.commit()
        if sum(dropped.values()) == before:
            return dropped
