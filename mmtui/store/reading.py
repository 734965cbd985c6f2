"""Reads for a browser's worker threads: a query's database errors as mmtui errors, and a long read stopped
from another thread. The TUI's session uses these, so that only the store touches sqlite3."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any, TypeVar

from mmtui.errors import StoreError
from mmtui.store.core import Run, Store

T = TypeVar("T")


class Interrupted(Exception):
    """A read was stopped (`interrupt`) because a newer one replaced it."""


def read(store: Store, query: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`query(store, *args, **kwargs)`; an interrupted read raises Interrupted, any other database error
    StoreError with the store's path."""
    try:
        return query(store, *args, **kwargs)
    except sqlite3.OperationalError as error:
        if "interrupted" in str(error):
            raise Interrupted() from error
        raise StoreError(f"{store.path}: {error}; the store may be damaged or in use") from error
    except sqlite3.Error as error:
        raise StoreError(f"{store.path}: {error}; the store may be damaged or in use") from error


def interrupt(store: Store) -> None:
    """Stop the read under way on this store's connection (from any thread); it raises Interrupted."""
    store.db.conn.interrupt()


def list_runs(store: Store) -> list[Run]:
    """store.runs(), a database error raised as StoreError (a damaged file)."""
    try:
        return store.runs()
    except sqlite3.Error as error:
        raise StoreError(f"{store.path}: {error}") from error
