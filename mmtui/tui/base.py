"""The base of the screens that read the store: `self.app` typed as the BrowseApp, and its session.

Textual types `self.app` as a plain `App`, so reading the browse app's own attributes (session, stacks,
graphics, runs, ...) would need a cast or an ignore at every use. The `getters.app` line tells the type
checker which app it is; it is not executed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from textual.screen import Screen

from mmtui.tui.failures import ShowsWorkerErrors
from mmtui.tui.session import Session

if TYPE_CHECKING:
    from textual import getters

    from mmtui.tui.app import BrowseApp


class AppScreen(ShowsWorkerErrors, Screen[None]):
    """A screen of the BrowseApp that runs workers."""

    if TYPE_CHECKING:
        app = getters.app(BrowseApp)

    @property
    def session(self) -> Session:
        """The open store's session (the app shows no screen that reads the store before it is open)."""
        session = self.app.session
        if session is None:
            raise RuntimeError("the store is not open yet")
        return session
