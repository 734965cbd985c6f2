"""How numbers and model text are written on screen.

Decoded tokens and generated captions can hold control characters, lone bytes (`�`) and leading spaces;
`printable` keeps what a person can read and makes the rest visible instead of letting it move the cursor.
"""

from __future__ import annotations

import unicodedata
from pathlib import Path


def printable(text: str) -> str:
    """Control and other invisible characters as `\\xNN` escapes; everything else unchanged."""
    if text.isprintable():
        return text
    out = []
    for ch in text:
        if ch in "\n\t":
            out.append(" ")
        elif unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn"):
            out.append(f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return "".join(out)


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
