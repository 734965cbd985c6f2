"""The browser's handles: the store (one connection, one query at a time, shared by worker threads) and the
model stacks, loaded on first use inside a worker and kept for the session.

Never imports torch at module level: `mmtui.stacks.presets` is imported by `StackHolder.get`, which only
runs in a worker thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from mmtui.errors import MmtuiError, StackError, StoreError, StoreLockedError, StoreTooNewError
from mmtui.store import Run, Store
from mmtui.store.reading import Interrupted, interrupt, list_runs, read

__all__ = ["Interrupted", "Session", "StackHolder", "StoreProblem", "open_store"]

if TYPE_CHECKING:
    from mmtui.stacks.base import Stack

T = TypeVar("T")


class StoreProblem(Exception):
    """Why a store cannot be browsed: a title and one paragraph saying what to do."""

    def __init__(self, title: str, message: str) -> None:
        super().__init__(message)
        self.title = title
        self.message = message


def open_store(path: Path) -> tuple[Store, list[Run]]:
    """Open the store read for browsing and list its runs. Raises StoreProblem, never a raw database error."""
    if not path.exists():
        raise StoreProblem(
            "No store here",
            f"There is no mmtui store at {path}.\n\n"
            "Run `mmtui attribute IMAGE_DIR` to make one, or pass --db PATH (or set MMTUI_DB) to open another.",
        )
    try:
        store = Store.open(path, create=False, threads=True)
    except StoreTooNewError as error:
        raise StoreProblem("Store from a newer mmtui", str(error)) from error
    except StoreLockedError as error:
        raise StoreProblem("Store is busy", str(error)) from error
    except StoreError as error:
        raise StoreProblem("Not an mmtui store", str(error)) from error
    try:
        runs = list_runs(store)
    except StoreError as error:
        store.close()
        raise StoreProblem(
            "Store cannot be read", f"{error}. The file may be damaged; pass --db to open another."
        ) from error
    if not runs:
        store.close()
        raise StoreProblem(
            "The store is empty",
            f"{path} holds no runs yet.\n\nRun `mmtui attribute IMAGE_DIR --db {path}` to attribute some images first.",
        )
    return store, runs


class _Connection:
    """One connection and the lock worker threads take turns on it with."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.lock = threading.Lock()

    def read(self, query: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        with self.lock:
            return read(self.store, query, *args, **kwargs)


class Session:
    """The open store for the browser's worker threads: one connection for what the screen waits on (a page
    of the table, a neuron, an image), and one for background reads (counts) that may take longer, so those
    never hold the screen up; a newer background read interrupts an older one."""

    def __init__(self, store: Store) -> None:
        self.front = _Connection(store)
        self.back = _Connection(Store.open(store.path, create=False, threads=True))

    @property
    def store(self) -> Store:
        return self.front.store

    def read(self, query: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`query(store, *args, **kwargs)` on the front connection. Raises MmtuiError with a usable message."""
        return self.front.read(query, *args, **kwargs)

    def read_in_background(self, query: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Like `read`, on the background connection, stopping the background read under way (which raises
        Interrupted in its own thread)."""
        interrupt(self.back.store)
        return self.back.read(query, *args, **kwargs)

    def close(self) -> None:
        interrupt(self.back.store)
        for connection in (self.front, self.back):
            with connection.lock:
                connection.store.close()


class StackHolder:
    """Model stacks by stack id, loaded on first use (in a worker thread) and kept."""

    def __init__(self, device: str = "auto") -> None:
        self.device = device
        self._stacks: dict[str, Stack] = {}
        self._lock = threading.Lock()

    def loaded(self, run: Run) -> bool:
        return run.stack.id in self._stacks

    def get(self, run: Run) -> Stack:
        """The stack of `run`; loads it the first time (seconds to minutes). Raises MmtuiError (StackError)."""
        with self._lock:
            if run.stack.id not in self._stacks:
                from mmtui.stacks.presets import load_stack_for_run

                try:
                    self._stacks[run.stack.id] = load_stack_for_run(run, self.device)
                except MmtuiError:
                    raise
                except (OSError, ValueError, RuntimeError) as error:
                    raise StackError(f"cannot load the stack of run {run.id}: {error}") from error
            return self._stacks[run.stack.id]
