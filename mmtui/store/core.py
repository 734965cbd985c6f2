"""The SQLite cache: `Store.open` (WAL, migrations, lock and version checks) and the runs it holds. Its results
(results.py) and neuron tokens (tokens.py) are mixins on the connection (connection.py); the plain data it takes
and returns is in records.py. Never imports torch: arrays are numpy.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

from mmtui.errors import NotFoundError, StoreError, StoreTooNewError, is_corruption
from mmtui.store._sqlite_utils import Database
from mmtui.store.connection import DEFAULT_TIMEOUT_S, _now, _translate, corrupt_error
from mmtui.store.migrations import migrations
from mmtui.store.records import (
    TARGET_MODE_SQL,
    Packed,
    ResultRecord,
    Run,
    StackIdentity,
    check_neuron,
    match_run,
    pack_result,
    run_id_for,
    storable_path,
)
from mmtui.store.results import COUNT_TOP, ResultsMixin
from mmtui.store.tokens import TokensMixin

__all__ = [
    "BULK_CACHE_MIB",
    "COUNT_TOP",
    "DEFAULT_TIMEOUT_S",
    "STATS_EVERY",
    "Packed",
    "ResultRecord",
    "Run",
    "StackIdentity",
    "Store",
    "check_neuron",
    "match_run",
    "pack_result",
    "run_id_for",
    "storable_path",
]

STATS_EVERY = 1024  # results a long write folds into the per-unit tables at a time (Store.refresh_stats). A fold's
# cost grows with the units it touches, which level off: at GPT-J scale, units seldom recurring, 1,024 take 6.8 s
# and 512 take 5.6 s (bench/store_write.py --spread); its peak memory, 420 MB (225 MB for 512)
BULK_CACHE_MIB = 64  # page cache of a connection that folds many results at a time (SQLite's default: 2 MiB)


WAL_RETRY_S = 0.05  # between tries of switching a fresh cache to WAL while another process holds it


def _enable_wal(db: Database, deadline: float) -> None:
    """Switch the cache to WAL (once per file; a no-op after). The switch needs the file to itself, and when
    several processes open a fresh cache at once SQLite may answer "database is locked" at once, without waiting
    on the busy timeout (seen in CI under load: "waited 0 s"). So the switch is tried again until `deadline`
    (time.monotonic()), as a held lock is waited on elsewhere; after it, the error goes up as the lock it is."""
    while True:
        try:
            if db.journal_mode != "wal":
                db.enable_wal()
            return
        except sqlite3.OperationalError as error:
            if ("locked" not in str(error) and "busy" not in str(error)) or time.monotonic() >= deadline:
                raise
            time.sleep(WAL_RETRY_S)


class Store(ResultsMixin, TokensMixin):
    """The cache database. Open with `Store.open(path)`; use as a context manager to close it."""

    # -- opening -----------------------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        path: Path | str,
        *,
        create: bool = True,
        timeout: float = DEFAULT_TIMEOUT_S,
        threads: bool = False,
        readonly: bool | None = None,
    ) -> Store:
        """Open (and migrate) the cache at `path`.

        create=False: a missing file is an error (read-only commands never make an empty cache).
        readonly: open it read-only (SQLite's mode=ro): no migration, no fold (`fold_pending` does nothing;
        `unfolded` says what the per-unit tables do not count yet). None: read-only when the file or its folder
        is not writable (chmod a-w, a read-only mount), else read-write.
        Raises StoreTooNewError for a cache written by a newer mmtui, StoreLockedError when another
        process holds the lock longer than `timeout` seconds.
        """
        path = Path(path)
        if path.is_dir():
            raise StoreError(f"{path} is a folder; pass a file name such as {path / 'mmtui.db'}")
        if not path.exists():
            if not create:
                raise StoreError(f"no cache at {path}; run `mmtui attribute IMAGE_DIR` first, or pass --db")
            path.parent.mkdir(parents=True, exist_ok=True)
        # a WAL file left beside the cache: the last process did not close it (a crash, a kill, a power cut)
        unclean = os.path.getsize(f"{path}-wal") > 0 if os.path.exists(f"{path}-wal") else False
        if readonly is None:
            readonly = path.exists() and not (os.access(path, os.W_OK) and os.access(path.parent, os.W_OK))
        started = time.monotonic()
        try:
            if readonly:
                uri = f"{path.resolve().as_uri()}?mode=ro"
                conn = sqlite3.connect(uri, uri=True, timeout=timeout, check_same_thread=not threads)
            else:
                conn = sqlite3.connect(str(path), timeout=timeout, check_same_thread=not threads)
            # no sqlite-utils plugins: the store uses none, and finding them reads every installed package's
            # entry points (0.1-0.5 s of each command's start)
            db = Database(conn, execute_plugins=False)
            db.execute("PRAGMA foreign_keys = ON")
            store = cls(db, path, timeout)
            store.readonly = readonly
            store._check_version()
            if readonly:
                if unclean:
                    store.check_integrity()
                if migrations.pending(db):
                    raise StoreError(
                        f"{path} is read-only and was written by an earlier mmtui: it must be converted once; make "
                        "it writable for one command (or copy it) and run again"
                    )
                return store
            _enable_wal(db, started + timeout)
            # in WAL mode, NORMAL never corrupts the file; a power cut may lose the last commits, not a crash
            db.execute("PRAGMA synchronous = NORMAL")
            if unclean:
                store.check_integrity()
            store._migrate()
        except sqlite3.DatabaseError as error:
            if is_corruption(error):
                raise corrupt_error(path, error) from error
            if isinstance(error, sqlite3.OperationalError):
                raise _translate(error, path, time.monotonic() - started) from error
            raise StoreError(f"{path} is not an mmtui cache ({error}); pass --db to use another file") from error
        return store

    def _migrate(self) -> None:
        """Apply the pending migrations under one write lock: of several processes opening a fresh cache at once,
        one upgrades it and the others wait, then find nothing left to do."""
        if not migrations.pending(self.db):
            return
        with self._write():  # BEGIN IMMEDIATE; each migration is a savepoint inside it
            migrations.apply(self.db)  # reads what is pending again, now under the lock

    def check_integrity(self) -> None:
        """`PRAGMA quick_check` (reads every page once); raises StoreCorruptError when the file is damaged."""
        try:
            rows = [line for r in self.db.execute("PRAGMA quick_check(3)").fetchall() for line in r[0].splitlines()]
        except sqlite3.DatabaseError as error:
            if not is_corruption(error):
                raise
            rows = [str(error)]
        if rows != ["ok"]:
            raise corrupt_error(self.path, "; ".join(rows))

    def _check_version(self) -> None:
        applied = {m.name for m in migrations.applied(self.db)}
        known = {m.name for m in migrations._migrations}
        unknown = sorted(applied - known)
        if unknown:
            raise StoreTooNewError(
                f"{self.path} was written by a newer mmtui (schema step {unknown[-1]}); "
                "upgrade mmtui (pip install -U mmtui) or pass --db to use another cache file"
            )
        names = set(self.db.table_names())
        if names and "_sqlite_migrations" not in names:
            raise StoreError(f"{self.path} is an SQLite file but not an mmtui cache; pass --db to use another file")

    def for_bulk_writes(self) -> Store:
        """Give this connection a page cache of BULK_CACHE_MIB, for the writer of a run or a merge: a fold of
        the stats updates rows all over neuron_stats' six B-trees and neuron_images, which outgrow SQLite's
        2 MiB default at GPT-J scale (bench/store_write.py --spread: refresh_stats twice as fast). Returns self."""
        self.db.execute(f"PRAGMA cache_size = -{BULK_CACHE_MIB * 1024}")
        return self

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- stacks and runs ---------------------------------------------------------------------------------
    def ensure_run(
        self, stack: StackIdentity, *, site: str, y_kind: str, settings: dict[str, Any] | None = None
    ) -> str:
        """Record the stack and run if new; returns the run id."""
        run_id = run_id_for(stack.id, stack.prompt, site, y_kind)
        with self._write():
            self.ensure_stack(stack)
            self.db.execute(
                """INSERT OR IGNORE INTO runs (id, stack_id, prompt, site, y_kind, settings, created, run_key)
                   VALUES (?, ?, ?, ?, ?, ?, ?, (SELECT coalesce(max(run_key), 0) + 1 FROM runs))""",
                [run_id, stack.id, stack.prompt, site, y_kind, json.dumps(settings or {}, sort_keys=True), _now()],
            )
        return run_id

    def ensure_stack(self, stack: StackIdentity) -> None:
        """Record a stack if new (inside the caller's write transaction, or in its own)."""
        with self.db.atomic():
            self.db.table("stacks").insert(
                {
                    "id": stack.id,
                    "name": stack.name,
                    "fingerprint": json.dumps(stack.fingerprint, sort_keys=True),
                    "shape": json.dumps(stack.shape),
                    "lm_id": stack.lm_id,
                    "created": _now(),
                },
                ignore=True,
            )

    def runs(self) -> list[Run]:
        """Every run with its stack and counts, newest first."""
        sql = f"""
            SELECT runs.id, runs.run_key, runs.stack_id, stacks.name AS stack, runs.prompt, runs.site, runs.y_kind,
                   runs.settings, runs.created, stacks.shape, stacks.fingerprint, stacks.lm_id,
                   (SELECT count(*) FROM results WHERE results.run_id = runs.id) AS n_results,
                   (SELECT count(DISTINCT image_sha256) FROM results WHERE results.run_id = runs.id) AS n_images,
                   (SELECT count(DISTINCT {TARGET_MODE_SQL}) FROM results WHERE results.run_id = runs.id) AS n_modes,
                   (SELECT max(created) FROM results WHERE results.run_id = runs.id) AS last_write
            FROM runs JOIN stacks ON stacks.id = runs.stack_id
            ORDER BY coalesce(last_write, runs.created) DESC
        """
        return [Run.from_row(row) for row in self.db.query(sql)]

    def run(self, run_id: str | None = None) -> Run:
        """The run whose id starts with `run_id`, or the most recently written one. Reads only: a reader of the
        per-unit tables calls `fold_pending` first."""
        runs = self.runs()
        if not runs:
            raise NotFoundError(f"{self.path} holds no runs yet; run `mmtui attribute IMAGE_DIR` first")
        return runs[0] if run_id is None else match_run(runs, run_id, self.path)
