"""The connection under the Store: write transactions that report a held lock or a damaged file as the store's
own errors, and the run keys every per-unit table is indexed by. `Store` (core.py) and its parts build on it."""

from __future__ import annotations

import sqlite3
import time
from datetime import datetime, timezone
from pathlib import Path

from mmtui.errors import NotFoundError, StoreCorruptError, StoreError, StoreLockedError, is_corruption
from mmtui.store._sqlite_utils import Database

DEFAULT_TIMEOUT_S = 30.0


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def corrupt_error(path: Path, error: BaseException | str) -> StoreCorruptError:
    return StoreCorruptError(
        f"{path} is damaged ({error}); nothing more is written to it. Salvage what is readable with "
        f"`mmtui doctor --db {path} --salvage recovered.db` (or `sqlite3 {path} .recover | sqlite3 recovered.db`) "
        "and pass --db recovered.db, or move it aside"
    )


def _translate(error: sqlite3.OperationalError, path: Path, waited: float) -> StoreError:
    if is_corruption(error):
        return corrupt_error(path, error)
    text = str(error)
    if "locked" in text or "busy" in text:
        return StoreLockedError(
            f"{path} is locked by another mmtui process (waited {waited:.0f} s); "
            "wait for it to finish, or pass --db to use another cache file"
        )
    return StoreError(f"{path}: {text}; check the file, or pass --db to use another cache file")


class Connection:
    """The database, its path and lock timeout, and write transactions; the base of `Store` and its parts."""

    def __init__(self, db: Database, path: Path, timeout: float) -> None:
        self.db = db
        self.path = path
        self.timeout = timeout
        self._run_keys: dict[str, int] = {}  # a run's key never changes
        self.readonly = False  # opened read-only (Store.open): nothing is folded or written

    def close(self) -> None:
        self.db.close()

    def _write(self) -> _WriteTxn:
        """A write transaction that reports a held lock as StoreLockedError."""
        return _WriteTxn(self)

    def transaction(self) -> _WriteTxn:
        """`with store.transaction():` one write transaction (BEGIN IMMEDIATE, committed at the end, rolled back
        on an error); a lock held too long raises StoreLockedError. For the store package's writers."""
        return _WriteTxn(self)

    def run_key(self, run_id: str) -> int:
        """The run's integer key, which neuron_stats and neuron_images use (m008)."""
        key = self._run_keys.get(run_id)
        if key is None:
            row = self.db.execute("SELECT run_key FROM runs WHERE id = ?", [run_id]).fetchone()
            if row is None:
                raise NotFoundError(f"no run {run_id!r} in {self.path}; see `mmtui runs`")
            key = self._run_keys[run_id] = int(row[0])
        return key


class _WriteTxn:
    def __init__(self, store: Connection) -> None:
        self.store = store

    def __enter__(self) -> None:
        self.started = time.monotonic()
        try:
            self.store.db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as error:
            raise _translate(error, self.store.path, time.monotonic() - self.started) from error

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        conn = self.store.db.conn
        if exc_type is None:
            try:
                conn.commit()
            except sqlite3.OperationalError as error:
                conn.rollback()
                raise _translate(error, self.store.path, time.monotonic() - self.started) from error
        else:
            conn.rollback()
            if isinstance(exc, sqlite3.DatabaseError) and is_corruption(exc):
                raise corrupt_error(self.store.path, exc) from exc
            if isinstance(exc, sqlite3.OperationalError):
                raise _translate(exc, self.store.path, time.monotonic() - self.started) from exc
