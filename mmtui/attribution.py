"""Activation x gradient attribution of every MLP unit at every image-prompt position (method.md).

For image i with target token c: g(l, k, p) = A_k(p) * d y_c / d A_k(p), for all layers l, units k and
image positions p, from one forward and one backward pass per batch. y_c is read at the last position of
[image prefix] + prompt + the greedy caption's tokens before c.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image

from mmtui.defaults import DEFAULT_KEEP, Y_KINDS
from mmtui.errors import TargetError
from mmtui.stacks.base import DEFAULT_MAX_NEW_TOKENS, Stack

DEFAULT_TOP = DEFAULT_KEEP


@dataclass
class Target:
    """The token c whose y_c is attributed, and the caption tokens teacher-forced before it."""

    word: str
    token_id: int
    token: str
    source: str  # caption-noun | caption-first-token | word | human-caption
    split: bool  # the word is several tokens; the first is used
    context_ids: list[int]
    caption: str

    def context(self, stack: Stack) -> str:
        """The caption text teacher-forced between the prompt and the target."""
        return stack.tokenizer.decode(self.context_ids)


@dataclass
class Attribution:
    """Scores of one image for one target.

    top_*: the N highest-scoring (layer, unit, patch) triples, by signed g, descending ([N] each).
    unit_max, unit_sum: every unit's max and sum of g over the image positions ([L, d_mlp]).
    scores: the full g [L, P, d_mlp] when asked for (`full=True`), else None.
    """

    target: Target
    y_kind: str
    y_c: float
    p_target: float
    top_layer: torch.Tensor
    top_unit: torch.Tensor
    top_patch: torch.Tensor
    top_score: torch.Tensor
    unit_max: torch.Tensor
    unit_sum: torch.Tensor
    scores: torch.Tensor | None = field(default=None, repr=False)

    def top(self, n: int) -> list[tuple[int, int, int, float]]:
        """The first n triples as (layer, unit, patch, score)."""
        n = min(n, len(self.top_score))
        return list(
            zip(
                self.top_layer[:n].tolist(),
                self.top_unit[:n].tolist(),
                self.top_patch[:n].tolist(),
                self.top_score[:n].tolist(),
                strict=True,
            )
        )


def _token_index_at(stack: Stack, ids: Sequence[int], char: int) -> int:
    """Index of the generated token that holds character `char` of the decoded caption."""
    for k in range(len(ids)):
        if len(stack.tokenizer.decode(list(ids[: k + 1]))) > char:
            return k
    return len(ids) - 1


def _caption_ids(stack: Stack, ids: list[int]) -> list[int]:
    """Generated ids up to (not including) the token that starts a new line."""
    for k in range(len(ids)):
        if "\n" in stack.tokenizer.decode(list(ids[: k + 1])):
            return ids[:k]
    return ids


def resolve_target(stack: Stack, generated: list[int], word: str | None, source: str | None = None) -> Target:
    """Choose c for one image from its greedy caption ids, or from a given word.

    Given a word, the context is the greedy caption up to its first noun ("A picture of a" -> " dog").
    """
    from mmtui import nouns

    ids = _caption_ids(stack, generated)
    caption = stack.caption_text(ids)
    noun = nouns.first_noun(stack.prompt + stack.tokenizer.decode(ids), start=len(stack.prompt)) if ids else None
    noun_index = _token_index_at(stack, ids, noun.start - len(stack.prompt)) if noun else None
    if word is None:
        if not ids:
            raise TargetError("the model's caption is empty, so there is no noun to attribute; pass --target WORD")
        if noun is not None and noun_index is not None:
            token_id = ids[noun_index]
            return Target(
                word=noun.word,
                token_id=token_id,
                token=stack.token_text(token_id),
                source="caption-noun",
                split=False,
                context_ids=ids[:noun_index],
                caption=caption,
            )
        return Target(
            word=stack.token_text(ids[0]).strip(),
            token_id=ids[0],
            token=stack.token_text(ids[0]),
            source="caption-first-token",
            split=False,
            context_ids=[],
            caption=caption,
        )
    word = word.strip()
    if not word:
        raise TargetError("the target word is empty; pass a word such as --target dog")
    word_ids = stack.tokenize(" " + word)
    if not word_ids:
        raise TargetError(f"the tokenizer gives no tokens for {word!r}; pass another word")
    return Target(
        word=word,
        token_id=word_ids[0],
        token=stack.token_text(word_ids[0]),
        source=source or "word",
        split=len(word_ids) > 1,
        context_ids=ids[:noun_index] if noun_index is not None else [],
        caption=caption,
    )


def _y(logits: torch.Tensor, token_ids: torch.Tensor, y_kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(y_c per item, P(c) per item) from logits [B, V], in at least float32."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    logprobs = torch.log_softmax(logits, dim=-1)
    p = logprobs.gather(1, token_ids[:, None])[:, 0].exp()
    if y_kind == "prob":
        y = p
    elif y_kind == "logit":
        y = logits.gather(1, token_ids[:, None])[:, 0]
    elif y_kind == "logprob":
        y = logprobs.gather(1, token_ids[:, None])[:, 0]
    else:
        raise TargetError(f"unknown y kind {y_kind!r}; use one of {', '.join(Y_KINDS)}")
    return y, p


def score_targets(
    stack: Stack,
    prefix: torch.Tensor,
    targets: Sequence[Target],
    *,
    y_kind: str = "prob",
    site: str = "post",
    top: int = DEFAULT_TOP,
    full: bool = False,
) -> list[Attribution]:
    """One forward and one backward pass for a batch whose targets are known.

    prefix: image-prompt embeddings [B, P, d_model]. Parameters stay frozen: gradients flow only to the
    MLP activations (the first layer's activation is made the leaf, so backward stops there).
    """
    n_patch = prefix.shape[1]
    embeds, lengths = stack.build_inputs(prefix, [t.context_ids for t in targets])
    acts: list[torch.Tensor] = []

    def capture(_layer: int, act: torch.Tensor) -> torch.Tensor:
        if not act.requires_grad:
            act = act.detach().requires_grad_(True)
        acts.append(act)
        return act

    token_ids = torch.tensor([t.token_id for t in targets], device=stack.device)
    with torch.enable_grad(), stack.hooks(capture, site=site):
        hidden = stack.lm.base_model(inputs_embeds=embeds, use_cache=False).last_hidden_state  # [B, T, d]
        last = hidden[torch.arange(len(targets)), torch.tensor(lengths) - 1]  # [B, d]
        logits = stack.lm.get_output_embeddings()(last)  # [B, V]
        y, p = _y(logits, token_ids, y_kind)
        grads = torch.autograd.grad(y.sum(), acts)
    y, p = y.detach(), p.detach()
    with torch.no_grad():
        reduced = reduce_scores(acts, grads, n_patch, top, full)
    return [
        Attribution(
            target=t, y_kind=y_kind, y_c=float(y[i]), p_target=float(p[i]), **{k: v[i] for k, v in reduced.items()}
        )
        for i, t in enumerate(targets)
    ]


def reduce_scores(
    acts: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], n_patch: int, top: int, full: bool = False
) -> dict[str, torch.Tensor]:
    """g = act * grad at the image positions, reduced on the device to what is kept.

    acts, grads: per layer [B, T, d_mlp]. Returns per-image tensors on the CPU: top_layer, top_unit,
    top_patch, top_score [B, k] (sorted by score, descending), unit_max, unit_sum [B, L, d_mlp], and
    scores [B, L, P, d_mlp] when `full`. Sums and outputs are in at least float32 whatever the model's dtype.

    The full [B, L, P, d_mlp] tensor is never built (unless `full`): every one of an image's top-k triples
    belongs to a unit whose max is among its k largest unit maxima (up to ties at the k-th score, which
    give the same top-k scores), so only those k units' patches are ranked.
    """
    acc = torch.promote_types(acts[0].dtype, torch.float32)
    # bf16 products keep bf16's range and are summed in float32; fp16 products could underflow: float32
    prod = torch.bfloat16 if acts[0].dtype == torch.bfloat16 else acc
    gs = [
        a[:, :n_patch].to(prod) * gr[:, :n_patch].to(prod) for a, gr in zip(acts, grads, strict=True)
    ]  # L x [B, P, d]
    batch, _, d_mlp = gs[0].shape
    per_layer = n_patch * d_mlp
    unit_max = torch.stack([g.amax(dim=1) for g in gs], dim=1).to(acc)  # [B, L, d_mlp]
    unit_sum = torch.stack([g.sum(dim=1, dtype=acc) for g in gs], dim=1)
    k = min(top, per_layer * len(gs))
    # the k units with the largest maxima (all units when k exceeds their number): [B, K] flat (layer, unit)
    n_units = len(gs) * d_mlp
    best_units = unit_max.reshape(batch, n_units).topk(min(k, n_units), dim=1).indices
    layer_of, unit_of = best_units // d_mlp, best_units % d_mlp
    scores = torch.empty(*best_units.shape, n_patch, dtype=acc, device=unit_max.device)  # [B, K, P]
    for layer, g in enumerate(gs):
        rows, slots = (layer_of == layer).nonzero(as_tuple=True)
        scores[rows, slots] = g[rows, :, unit_of[rows, slots]].to(acc)
    top_score, pick = scores.reshape(batch, -1).topk(k, dim=1)  # [B, k], sorted descending
    slot, patch = pick // n_patch, pick % n_patch
    out = {
        "top_layer": layer_of.gather(1, slot).cpu(),
        "top_unit": unit_of.gather(1, slot).cpu(),
        "top_patch": patch.cpu(),
        "top_score": top_score.cpu(),
        "unit_max": unit_max.cpu(),
        "unit_sum": unit_sum.cpu(),
    }
    if full:
        out["scores"] = torch.stack(gs, dim=1).to(acc).cpu()  # [B, L, P, d_mlp]
    return out


def attribute(
    stack: Stack,
    images: Sequence[Image.Image],
    target: str | Sequence[str | None] | None = None,
    *,
    sources: Sequence[str | None] | None = None,
    y_kind: str = "prob",
    site: str = "post",
    top: int = DEFAULT_TOP,
    full: bool = False,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
) -> list[Attribution]:
    """Attribute y_c to every (layer, unit, patch) for a batch of PIL images.

    target: None (the first noun of each greedy caption), one word for all images, or one word-or-None
    per image. Returns one Attribution per image, in order.
    """
    if y_kind not in Y_KINDS:
        raise TargetError(f"unknown y kind {y_kind!r}; use one of {', '.join(Y_KINDS)}")
    words = [target] * len(images) if target is None or isinstance(target, str) else list(target)
    srcs = list(sources) if sources is not None else [None] * len(images)
    prefix = stack.encode(images)  # [B, P, d_model]
    generated = stack.generate(prefix, max_new_tokens)
    targets = [resolve_target(stack, ids, w, s) for ids, w, s in zip(generated, words, srcs, strict=True)]
    return score_targets(stack, prefix, targets, y_kind=y_kind, site=site, top=top, full=full)
