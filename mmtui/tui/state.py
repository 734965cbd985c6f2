"""Plain data the screens pass around: the neuron table's query, an ablation's settings, and the parsers of
what a person types (a neuron `L.K`, a list of k values). No textual, no torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

from mmtui.defaults import DEFAULT_KS
from mmtui.store.queries import NEURON_COLUMNS, token_filter

CONTAINS_PREFIX = "~"  # the neuron filter `~dog`: tokens containing `dog`; plain `dog`: a whole token `dog`
PAGE = 100  # rows the neuron table loads at a time (more as the cursor nears the end); a screen shows ~40

# the table's columns in display order: key (as queries.NEURON_COLUMNS), header, whether high is "best"
COLUMNS: tuple[tuple[str, str, bool], ...] = (
    ("layer", "layer", False),
    ("neuron", "unit", False),
    ("max", "max", True),
    ("mean", "mean", True),
    ("top", "top-100", True),
    ("images", "stored", True),
    ("tokens", "decoded tokens", False),
)
assert {c[0] for c in COLUMNS} == set(NEURON_COLUMNS)
# shown before the tokens, not sortable: the share of the run's images whose top 100 hold the unit (G: generic,
# store.prevalence) and its data label where one beats chance (`mmtui explain`, q < LABEL_FDR)
EXTRA_COLUMNS: tuple[tuple[str, str], ...] = (("share", "share"), ("label", "data label"))
LABEL_FDR = 0.05

_NEURON = re.compile(r"^\s*l?\s*(\d+)\s*[.:/ ,]\s*u?\s*(\d+)\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class NeuronQuery:
    """What the neuron table shows: sort column and direction, layer, token text filter, decoding convention."""

    sort: str = "max"
    descending: bool = True
    layer: int | None = None
    token: str = ""
    convention: str = "raw"
    limit: int = PAGE
    specific: bool = False  # hide the run's generic units (store.prevalence.generic_above)

    @property
    def token_filter(self) -> tuple[str | None, bool]:
        """The token filter as typed -> (text, contains): `dog` finds the units with a decoded token `dog`
        (case and the space before it ignored), `~dog` those whose tokens contain `dog` (e.g. `endogenous`)."""
        if self.token.startswith(CONTAINS_PREFIX):
            return token_filter(self.token[len(CONTAINS_PREFIX) :], contains=True), True
        return token_filter(self.token), False

    def filters(self) -> dict[str, Any]:
        """The keyword arguments of queries.neuron_page / count_neurons for this query's filters."""
        token, contains = self.token_filter
        return {"layer": self.layer, "token": token, "contains": contains, "convention": self.convention}

    def sorted_by(self, column: str) -> NeuronQuery:
        """Sort by `column`; the same column again flips the direction (a new one starts at its natural order)."""
        if column == self.sort:
            return replace(self, descending=not self.descending)
        natural = next(best for key, _, best in COLUMNS if key == column)
        return replace(self, sort=column, descending=natural)

    def next_sort(self, step: int = 1) -> NeuronQuery:
        keys = [c[0] for c in COLUMNS]
        return self.sorted_by(keys[(keys.index(self.sort) + step) % len(keys)])


@dataclass(frozen=True)
class AblationSpec:
    """The settings of one dose-response run (see mmtui.experiments.ablation.dose_response)."""

    result_ids: tuple[int, ...]
    ks: tuple[int, ...] = DEFAULT_KS
    baseline: str = "random"
    seeds: int = 3
    mode: str = "zero"
    unit_mode: str = "triples"
    captions: bool = False
    label: str = ""


def parse_neuron(text: str) -> tuple[int, int] | None:
    """`7.12134`, `L7.u12134`, `7 12134`, `7:12134` -> (7, 12134); anything else -> None."""
    found = _NEURON.match(text)
    return (int(found.group(1)), int(found.group(2))) if found else None
