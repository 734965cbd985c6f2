"""Screens with nothing to browse: while the store opens, and why it cannot be browsed."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Center, Middle, Vertical
from textual.screen import Screen
from textual.widgets import Footer, Static

from mmtui.tui.widgets.title import TitleBar


class LoadingScreen(Screen[None]):
    """While the store opens (usually a few ms; the first open after an upgrade migrates it). No animation:
    it would cost start-up time for a screen that is gone at once."""

    def __init__(self, message: str) -> None:
        super().__init__()
        self.message = message

    def compose(self) -> ComposeResult:
        yield TitleBar()
        with Middle(), Center():
            yield Static(self.message, id="loading-message")


class ProblemScreen(Screen[None]):
    """A missing, empty, foreign or too-new store: what is wrong and what to do, then `q`."""

    BINDINGS = [Binding("escape", "app.quit", "Quit", show=False)]

    def __init__(self, title: str, message: str) -> None:
        super().__init__()
        self.problem_title = title
        self.message = message

    def compose(self) -> ComposeResult:
        yield TitleBar()
        with Middle(), Center(), Vertical(id="problem"):
            yield Static(self.problem_title, id="problem-title")
            yield Static(self.message, id="problem-message", markup=False)
            yield Static("Press q to quit.", id="problem-hint")
        yield Footer()
