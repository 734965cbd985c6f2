"""Errors nobody expected, from worker threads, shown instead of lost.

Workers report the errors they expect (store, model, image) as messages of their own. Anything else ends
the worker in the ERROR state, which Textual tells only the node that ran it (Worker.StateChanged does not
bubble): every screen and widget with workers mixes this in, so it reaches the screen as a notification.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from textual.worker import Worker, WorkerState

if TYPE_CHECKING:
    from textual.app import App


class ShowsWorkerErrors:
    """Mix into a Screen or Widget (before it in the bases) that runs workers."""

    if TYPE_CHECKING:
        app: App[Any]  # the Screen's or Widget's

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        if event.state == WorkerState.ERROR:
            error = event.worker.error
            self.app.notify(f"{type(error).__name__}: {error}", title="Something failed", severity="error", timeout=15)
