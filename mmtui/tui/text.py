"""How numbers and model text are written on screen.

Decoded tokens and generated captions can hold control characters, lone bytes (`�`) and leading spaces;
`printable` (mmtui.words) keeps what a person can read and makes the rest visible instead of letting it move
the cursor.
"""

from __future__ import annotations

from pathlib import Path

from mmtui.words import printable

__all__ = ["image_name", "printable", "prob", "score", "token"]


def token(text: str) -> str:
    """One decoded token: leading space shown as `·`, so ` dog` and `dog` differ on screen."""
    shown = printable(text)
    if shown.startswith(" "):
        shown = "·" + shown[1:]
    return shown or "''"


def score(value: float | None) -> str:
    """Attribution scores span many decades: 3 significant digits."""
    if value is None:
        return "-"
    return f"{value:.3g}"


def prob(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def image_name(path: str) -> str:
    """File names, not full paths, on screen (the image view shows the full path once)."""
    return Path(path).name
