"""What a unit writes into the vocabulary: decoder(W_out[:, k]) = top tokens of W_U @ W_out[:, k].

Conventions (method.md): "raw" is the paper's formula (no final norm, no bias); "ln_f" first multiplies
the output weights by the final norm's gain (the elementwise weight of ln_f / RMSNorm; for Gemma, whose
RMSNorm multiplies by 1 + weight, that: `LMAdapter.final_gain`). Only the real vocabulary (ids below
stack.real_vocab) takes part. W_U is the output layer's weight, tied to the input embeddings or not. A
family's final logit soft-capping (Gemma 2: cap * tanh(z / cap)) is left out: it is monotonic in each
logit, so the top tokens are the same with it, and the logits kept are the plain products W_U @ w.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from mmtui.defaults import CONVENTIONS
from mmtui.stacks.base import Stack
from mmtui.stacks.lm import LMAdapter
from mmtui.words import is_interpretable

DEFAULT_K = 10


class HasLM(Protocol):
    """What decoding a unit needs: a Stack, or an LM on its own (mmtui.experiments.verify.LMOnly)."""

    adapter: LMAdapter
    real_vocab: int


def vocab_strings(stack: Stack) -> list[str]:
    """Every real token id decoded on its own (" dog", "ing", ...)."""
    return stack.tokenizer.batch_decode([[i] for i in range(stack.real_vocab)])


def _gain(stack: HasLM, convention: str) -> torch.Tensor | None:
    if convention == "raw":
        return None
    if convention == "ln_f":
        return stack.adapter.final_gain()
    raise ValueError(f"unknown decoding convention {convention!r}; use one of {', '.join(CONVENTIONS)}")


@torch.no_grad()
def unit_logits(stack: HasLM, layer: int, units: torch.Tensor | list[int], convention: str = "raw") -> torch.Tensor:
    """W_U[:real_vocab] @ (gain *) W_out[:, units] -> [real_vocab, n_units], float32."""
    w = stack.adapter.out_weight(layer)[:, units].float()  # [d_model, n]
    gain = _gain(stack, convention)
    if gain is not None:
        w = w * gain.float()[:, None]
    w_u = stack.adapter.unembedding()[: stack.real_vocab].float()  # [V, d_model]
    return w_u @ w


@torch.no_grad()
def decode_layer(
    stack: Stack, layer: int, convention: str = "raw", k: int = DEFAULT_K, chunk: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k token ids and logits of every unit of one layer: two [d_mlp, k] tensors."""
    ids, vals = [], []
    for start in range(0, stack.d_mlp, chunk):
        units = list(range(start, min(start + chunk, stack.d_mlp)))
        top = unit_logits(stack, layer, units, convention).topk(k, dim=0)  # [k, n]
        ids.append(top.indices.T.cpu())
        vals.append(top.values.T.cpu())
    return torch.cat(ids), torch.cat(vals)


SHIPPED = Path(__file__).resolve().parent.parent / "data" / "decodings"


def cache_dir() -> Path:
    """Where decodings computed on this machine are kept ($MMTUI_CACHE, else ~/.cache/mmtui)."""
    return Path(os.environ.get("MMTUI_CACHE", Path.home() / ".cache" / "mmtui")) / "decodings"


def decoding_name(stack: Stack, convention: str, k: int) -> str:
    return f"{stack.lm_fingerprint_id}-{convention}-k{k}.npz"


def decoded_layers(
    stack: Stack, convention: str = "raw", k: int = DEFAULT_K
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(layer, token ids [d_mlp, k], logits [d_mlp, k]) for every layer: from a file made earlier for this LM
    (shipped with mmtui, or computed once on this machine), else computed and then saved for next time."""
    name = decoding_name(stack, convention, k)
    want = (stack.n_layers, stack.d_mlp, k)
    for path in (SHIPPED / name, cache_dir() / name):
        if path.is_file():
            with np.load(path) as data:
                ids, logits = data["ids"], data["logits"]
            if ids.shape == want and logits.shape == want:
                for layer in range(stack.n_layers):
                    yield layer, ids[layer].astype(np.int64), logits[layer].astype(np.float32)
                return
    all_ids = np.zeros(want, dtype=np.int32)
    all_logits = np.zeros(want, dtype=np.float32)
    for layer in range(stack.n_layers):
        ids, vals = decode_layer(stack, layer, convention, k)
        all_ids[layer], all_logits[layer] = ids.numpy(), vals.numpy()
        yield layer, all_ids[layer], all_logits[layer]
    save_decodings(cache_dir() / name, all_ids, all_logits)


def save_decodings(path: Path, ids: np.ndarray, logits: np.ndarray) -> None:
    """Write atomically (a rename), so that a run interrupted mid-write leaves no half file behind."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        small = ids.max(initial=0) < np.iinfo(np.uint16).max
        np.savez_compressed(tmp, ids=ids.astype(np.uint16 if small else np.int32), logits=logits.astype(np.float16))
        tmp.replace(path)
    except OSError:
        pass  # a read-only home only costs recomputing next time


def decode_units(
    stack: Stack,
    convention: str = "raw",
    k: int = DEFAULT_K,
    progress: Callable[[int, int], None] | None = None,
) -> Iterator[list[dict]]:
    """For each layer in turn, the rows of every unit: layer, unit, tokens, token_ids, logits, interpretable."""
    vocab = vocab_strings(stack)
    for layer, ids, vals in decoded_layers(stack, convention, k):
        rows = []
        for unit, (row_ids, row_vals) in enumerate(zip(ids.tolist(), vals.tolist(), strict=True)):
            tokens = [vocab[i] for i in row_ids]
            rows.append(
                {
                    "layer": layer,
                    "unit": unit,
                    "tokens": tokens,
                    "token_ids": row_ids,
                    "logits": row_vals,
                    "interpretable": is_interpretable(tokens),
                }
            )
        if progress is not None:
            progress(layer + 1, stack.n_layers)
        yield rows
