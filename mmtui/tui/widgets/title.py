"""The title line of every screen: `mmtui · what this screen shows`.

Not Textual's Header: its title watcher, still pending when a screen goes away at once (a fast store open,
a quit right after start), looks for a child that is gone and raises.
"""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.widgets import Static


class TitleBar(Static):
    DEFAULT_CSS = """
    TitleBar {
        dock: top;
        height: 1;
        width: 1fr;
        background: $panel;
        color: $foreground;
        text-align: center;
    }
    """

    def __init__(self, title: str = "", **kwargs: Any) -> None:
        super().__init__(self.line(title), **kwargs)

    @staticmethod
    def line(title: str) -> Text:
        text = Text("mmtui", style="bold")
        if title:
            text.append(" · " + title)
        return text

    def show(self, title: str) -> None:
        self.update(self.line(title))
