"""Check the paper stack's neuron decoding against the units the paper names (method.md, Table S.1).

Only the LM is needed: `decoder(W_out[:, k])` depends on nothing else. On GPT-J-6B the paper's units should
decode to the tokens it prints when the decoding convention matches the authors'.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mmtui.run.decoding import unit_logits
from mmtui.stacks.lm import LMAdapter
from mmtui.words import is_interpretable

# (layer, unit, the tokens the paper prints for it)
PAPER_UNITS: list[tuple[int, int, list[str]]] = [
    (14, 2019, ["horses", "racing", "ponies", "ridden"]),
    (12, 9058, ["swimming", "Swim", "swim", "fishes", "water"]),
    (7, 15772, ["animals", "embryos", "kittens", "mammals", "eggs"]),
    (5, 4923, ["birds", "cages", "species", "breeding", "insects"]),
    (7, 12134, ["aircraft", "flight", "airplanes", "Flight", "Aircraft"]),
    (5, 13680, ["driver", "drivers", "cars", "heading", "cars"]),
    (8, 14504, ["upstairs", "homeowners", "apartments", "houses", "apartment"]),
    (8, 15435, ["tennis", "tournaments", "tournament", "golf", "racing"]),
]


@dataclass
class LMOnly:
    """What decoding needs of a stack: the LM's adapter, tokenizer and real vocabulary size."""

    lm: Any
    tokenizer: Any
    real_vocab: int

    def __post_init__(self) -> None:
        self.adapter = LMAdapter(self.lm)


def load_lm_only(lm: str, revision: str | None = None, tokenizer: str | None = None) -> LMOnly:
    from mmtui.stacks.presets import load_lm

    model, tok, _ = load_lm(lm, revision, torch.float32, tokenizer)
    return LMOnly(model.eval(), tok, len(tok))


def verify_units(
    lm: LMOnly, units: list[tuple[int, int, list[str]]] = PAPER_UNITS, convention: str = "raw"
) -> list[dict]:
    """Each unit's top 10 tokens beside the paper's, with how many of the paper's appear in our top 10."""
    rows = []
    n_layers, d_mlp = lm.adapter.n_layers, lm.adapter.d_mlp
    for layer, unit, paper in units:
        row: dict[str, Any] = {"layer": layer, "unit": unit, "paper": paper}
        if not (layer < n_layers and unit < d_mlp):
            row.update(tokens=[], matched=None, note=f"not in this LM ({n_layers} layers x {d_mlp} units)")
        else:
            ids = unit_logits(lm, layer, [unit], convention)[:, 0].topk(10).indices.tolist()
            tokens = [lm.tokenizer.decode([i]) for i in ids]
            stripped = {t.strip() for t in tokens}
            row.update(
                tokens=tokens,
                matched=sum(p in stripped for p in dict.fromkeys(paper)),
                interpretable=is_interpretable(tokens),
                note="",
            )
        rows.append(row)
    return rows
