"""What a unit writes into the vocabulary: decoder(W_out[:, k]) = top tokens of W_U @ W_out[:, k].

Conventions (method.md): "raw" is the paper's formula (no final norm, no bias); "ln_f" first multiplies
the output weights by the final norm's gain (the elementwise weight of ln_f / RMSNorm). Only the real
vocabulary (ids below stack.real_vocab) takes part.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from mmtui.defaults import CONVENTIONS
from mmtui.stacks.base import Stack
from mmtui.words import is_interpretable

DEFAULT_K = 10


def vocab_strings(stack: Stack) -> list[str]:
    """Every real token id decoded on its own (" dog", "ing", ...)."""
    return stack.tokenizer.batch_decode([[i] for i in range(stack.real_vocab)])


def _gain(stack: Stack, convention: str) -> torch.Tensor | None:
    if convention == "raw":
        return None
    if convention == "ln_f":
        return stack.adapter.final_norm().weight.detach()
    raise ValueError(f"unknown decoding convention {convention!r}; use one of {', '.join(CONVENTIONS)}")


@torch.no_grad()
def unit_logits(stack: Stack, layer: int, units: torch.Tensor | list[int], convention: str = "raw") -> torch.Tensor:
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


def decode_units(
    stack: Stack,
    convention: str = "raw",
    k: int = DEFAULT_K,
    progress: Callable[[int, int], None] | None = None,
) -> Iterator[list[dict]]:
    """For each layer in turn, the rows of every unit: layer, unit, tokens, token_ids, logits, interpretable."""
    vocab = vocab_strings(stack)
    for layer in range(stack.n_layers):
        ids, vals = decode_layer(stack, layer, convention, k)
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
