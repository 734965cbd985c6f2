"""Caption loss of a projection: the LM's next-token NLL of a caption after [image prefix] + prompt, held-out
evaluation with the matched image vs a shuffled one, and greedy captions of held-out images.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mmtui.stacks.base import Stack
from mmtui.stacks.projection import BaseProjection


@dataclass
class HeldOutImage:
    row: int
    path: Path
    captions: list[str]
    tokens: list[list[int]]


def _autocast(stack: Stack, amp: bool):
    if amp and stack.device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def caption_nll(
    stack: Stack, projection: BaseProjection, feats: torch.Tensor, captions: Sequence[Sequence[int]], amp: bool = True
) -> tuple[torch.Tensor, int]:
    """Summed next-token NLL of each caption after [projection(feats)] + prompt, and the token count.

    feats: encoder features [B, P, d_vision]; captions: B lists of token ids (ending with EOS).
    """
    prefix = projection(feats.to(stack.device).float())  # [B, P, d_model]
    n_before, n_prompt = stack.image_slice.start + prefix.shape[1], len(stack.prompt_ids())
    with _autocast(stack, amp):
        embeds, _ = stack.build_inputs(prefix.to(stack.dtype), captions)  # [B, T, d_model]
        hidden = stack.lm.base_model(inputs_embeds=embeds, use_cache=False).last_hidden_state  # [B, T, d_model]
        rows = [i for i, c in enumerate(captions) for _ in c]
        start = n_before + n_prompt - 1  # the position that predicts a caption's first token
        cols = [start + j for c in captions for j in range(len(c))]
        logits = stack.logits(hidden[rows, cols])  # [N_tokens, V]
    targets = torch.tensor([t for c in captions for t in c], device=logits.device)
    return F.cross_entropy(logits.float(), targets, reduction="sum"), len(targets)


def _derangement(n: int, generator: torch.Generator) -> list[int]:
    """A permutation with no fixed point (n >= 2): each image paired with another image's captions."""
    order = torch.randperm(n, generator=generator).tolist()
    out = [0] * n
    for i, j in enumerate(order):
        out[j] = order[(i + 1) % n]
    return out


@torch.no_grad()
def evaluate(
    stack: Stack,
    projection: BaseProjection,
    features: torch.Tensor,
    images: Sequence[HeldOutImage],
    *,
    batch_size: int = 64,
    amp: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """Per-token caption NLL with each image's own features (matched) and with another image's (shuffled)."""
    shuffle = _derangement(len(images), torch.Generator().manual_seed(seed)) if len(images) > 1 else [0]
    result: dict[str, Any] = {"images": len(images), "captions": sum(len(im.tokens) for im in images)}
    for name, pick in (("matched", list(range(len(images)))), ("shuffled", shuffle)):
        pairs = [(images[pick[i]].row, toks) for i, im in enumerate(images) for toks in im.tokens]
        total, count = 0.0, 0
        for b in range(0, len(pairs), batch_size):
            chunk = pairs[b : b + batch_size]
            nll, n = caption_nll(stack, projection, features[[r for r, _ in chunk]], [t for _, t in chunk], amp)
            total, count = total + float(nll), count + n
        result[name] = total / max(count, 1)
        result["tokens"] = count
    result["margin"] = result["shuffled"] - result["matched"]
    return result


@torch.no_grad()
def caption_examples(
    stack: Stack, projection: BaseProjection, features: torch.Tensor, images: Sequence[HeldOutImage]
) -> list[dict[str, str]]:
    """Greedy captions of held-out images beside their first human caption."""
    if not images:
        return []
    prefix = projection(features[[im.row for im in images]].to(stack.device).float()).to(stack.dtype)
    generated = stack.generate(prefix)
    return [
        {"image": im.path.name, "caption": stack.caption_text(ids), "human": im.captions[0]}
        for im, ids in zip(images, generated, strict=True)
    ]
