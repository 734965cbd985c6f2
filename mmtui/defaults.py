"""Defaults shared by the core and the commands; importing this module is free (no torch)."""

import re

DEFAULT_PRESET = "smol"
DEFAULT_PROMPT = "A picture of"
DEFAULT_MAX_NEW_TOKENS = 20
DEFAULT_KEEP = 6400  # top (layer, unit, patch) triples stored per image: the ablation grid's largest k
NEURON_IMAGES = 20  # the cache keeps each unit's best 20 results per run (neuron_images; the TUI shows 20)
SITES = ("post", "pre")
Y_KINDS = ("prob", "logit", "logprob")
CONVENTIONS = ("raw", "ln_f")
DEFAULT_KS = (0, 50, 100, 200, 400, 800, 1600, 3200, 6400)  # the ablation's k grid (method.md, experiment 4)
GRAPHICS = ("auto", "pixels", "halfblock")  # how the browser draws images


def parse_ks(text: str, most: int | None = None) -> tuple[int, ...]:
    """`0, 50 100;200` -> (0, 50, 100, 200), sorted and unique. Raises ValueError with a message a person can act on."""
    parts = [p for p in re.split(r"[\s,;]+", text.strip()) if p]
    if not parts:
        raise ValueError("give at least one k, e.g. 0,50,100,200")
    try:
        ks = sorted({int(p) for p in parts})
    except ValueError:
        raise ValueError(f"k values are whole numbers separated by commas, not {text!r}") from None
    if ks[0] < 0:
        raise ValueError("k values cannot be negative")
    if most is not None and ks[-1] > most:
        raise ValueError(f"k = {ks[-1]} is more than the {most} triples stored per image")
    return tuple(ks)
