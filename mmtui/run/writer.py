"""The cache writer of an attribute run: its own thread and SQLite connection, so the model never waits.

Each result is still one transaction (an interruption keeps every finished image); the per-unit tables
(neuron_stats, neuron_images) are folded in many results at a time (`Store.refresh_stats`), every
`refresh_every` results or `refresh_seconds`, and at the end. The score arrays and top triples are
packed on a small thread pool (numpy and zstd release the GIL), so the writer thread only talks to SQLite.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from queue import Empty, Full, Queue
from typing import TYPE_CHECKING

from mmtui.errors import StoreError
from mmtui.store import STATS_EVERY, Store, pack_result

if TYPE_CHECKING:
    from mmtui.run.events import ImageDone

_STOP = object()


class StoreWriter:
    """Write ImageDone events' records in the background; `ready()` hands them back with their result ids."""

    def __init__(
        self,
        path: Path,
        run_id: str,
        *,
        timeout: float,
        refresh_every: int = STATS_EVERY,
        refresh_seconds: float = 30.0,
    ):
        self.run_id = run_id
        self.inbox: Queue = Queue(maxsize=256)  # bounded: a slow disk slows the run down instead of filling memory
        self.outbox: Queue = Queue()
        self.refresh_every, self.refresh_seconds = refresh_every, refresh_seconds
        self._packers = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="mmtui-pack")
        self._thread = threading.Thread(target=self._work, args=(path, timeout), name="mmtui-writer", daemon=True)
        self._closed = False
        self._thread.start()

    def _work(self, path: Path, timeout: float) -> None:
        try:
            with Store.open(path, timeout=timeout).for_bulk_writes() as store:
                # a damaged cache stops the run before its first write, not after (reads every page once, while
                # the model computes the first batch)
                store.check_integrity()
                unrefreshed, last = 0, time.monotonic()
                while True:
                    item = self.inbox.get()
                    if item is _STOP:
                        break
                    event, packed = item
                    result_id = store.add_result(self.run_id, event.record, stats=False, packed=packed.result())
                    self.outbox.put(replace(event, result_id=result_id))
                    unrefreshed += 1
                    if unrefreshed >= self.refresh_every or time.monotonic() - last > self.refresh_seconds:
                        store.refresh_stats(self.run_id)
                        unrefreshed, last = 0, time.monotonic()
                store.refresh_stats(self.run_id)
        except BaseException as err:  # handed to the run, which re-raises it
            self.outbox.put(err)

    def put(self, event: ImageDone) -> None:
        """Queue an ImageDone event's record; re-raises the writer's failure if it has stopped."""
        packed = self._packers.submit(pack_result, event.record)
        while True:
            if not self._thread.is_alive():
                self._raise_failure()
            try:
                self.inbox.put((event, packed), timeout=0.5)
                return
            except Full:
                continue

    def _raise_failure(self) -> None:
        for item in self._drain():
            if isinstance(item, BaseException):
                raise item
        raise StoreError(f"the cache writer stopped; the results of run {self.run_id} so far are kept")

    def _drain(self) -> list:
        items = []
        while True:
            try:
                items.append(self.outbox.get_nowait())
            except Empty:
                return items

    def ready(self) -> Iterator[ImageDone]:
        """The ImageDone events written so far (each with its result_id); re-raises a failure of the writer."""
        for item in self._drain():
            if isinstance(item, BaseException):
                raise item
            yield item

    def finish(self) -> Iterator[ImageDone]:
        """Wait for every queued write (and the last stats refresh), then hand back the remaining events."""
        self.close()
        yield from self.ready()

    def close(self) -> None:
        """Flush and stop; safe to call twice (the run calls it again on the way out of an interruption)."""
        if self._closed:
            return
        self._closed = True
        if self._thread.is_alive():
            self.inbox.put(_STOP)
            self._thread.join()
        self._packers.shutdown(wait=True)
