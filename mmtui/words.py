"""The interpretability filter of method.md: a unit is interpretable when at least 7 of its top 10
decoded tokens, stripped of the leading space, are English dictionary words of at least 3 letters.

Dictionary: SCOWL (size 50, en-US and en-GB, as Debian's wamerican + wbritish), shipped in mmtui/data.
A token counts when it, or its lower-cased form, is in the list (" Swim" -> "Swim" -> "swim").

Also `printable`: decoded tokens and generated captions made safe to show (a terminal, a figure title).
"""

from __future__ import annotations

import gzip
import unicodedata
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

WORDS_FILE = Path(__file__).resolve().parent / "data" / "scowl-words.txt.gz"
MIN_LETTERS = 3
MIN_WORDS = 7
TOP_TOKENS = 10


@lru_cache(maxsize=1)
def dictionary() -> frozenset[str]:
    with gzip.open(WORDS_FILE, "rt", encoding="utf-8") as fh:
        return frozenset(line.strip() for line in fh if line.strip())


def is_word(token: str) -> bool:
    """A token is a word when, stripped, it has >= 3 letters, only letters, and is in the dictionary."""
    text = token.strip()
    if len(text) < MIN_LETTERS or not text.isalpha() or not text.isascii():
        return False
    words = dictionary()
    return text in words or text.lower() in words


def is_interpretable(tokens: Sequence[str], min_words: int = MIN_WORDS) -> bool:
    """At least `min_words` of the (top 10) tokens are dictionary words."""
    return sum(is_word(t) for t in tokens[:TOP_TOKENS]) >= min_words


def printable(text: str) -> str:
    """Model text safe to show: newlines and tabs as spaces, control and other invisible characters as
    `\\xNN` / `\\uNNNN` escapes (so they cannot move a terminal's cursor); everything else unchanged."""
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
