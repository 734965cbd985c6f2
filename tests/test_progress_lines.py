"""Progress where stderr is a file: plain lines (rich's bar draws nothing there until the end)."""

from __future__ import annotations

import io

from rich.console import Console
from rich.progress import MofNCompleteColumn, TextColumn

from commands._experiments import LoggedProgress


def _run(console: Console, every: float) -> str:
    with LoggedProgress(TextColumn("{task.description}"), MofNCompleteColumn(), console=console, every=every) as bar:
        task = bar.add_task("Ablating", total=3)
        for _ in range(3):
            bar.advance(task)
    return console.file.getvalue()  # type: ignore[attr-defined]


def test_plain_lines_when_not_a_terminal() -> None:
    text = _run(Console(file=io.StringIO(), force_terminal=False, width=100), every=0.0)
    lines = [line for line in text.splitlines() if line.startswith("Ablating: ")]
    assert [line.split(",")[0] for line in lines] == ["Ablating: 1/3", "Ablating: 2/3", "Ablating: 3/3"]
    assert "s elapsed" in lines[-1]


def test_throttled_but_the_last_line_always_written() -> None:
    text = _run(Console(file=io.StringIO(), force_terminal=False, width=100), every=3600.0)
    lines = [line.split(",")[0] for line in text.splitlines() if line.startswith("Ablating: ")]
    assert lines == ["Ablating: 1/3", "Ablating: 3/3"]


def test_no_plain_lines_on_a_terminal() -> None:
    text = _run(Console(file=io.StringIO(), force_terminal=True, width=100), every=0.0)
    assert "s elapsed" not in text
