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
    from mmtui.run import nouns

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
    top: int = DEFAULT_KEEP,
    full: bool = False,
) -> list[Attribution]:
    """One forward and one backward pass for a batch whose targets are known.

    prefix: image-prompt embeddings [B, P, d_model]. Parameters stay frozen: gradients flow only to the
    MLP activations (the first layer's activation is made the leaf, so backward stops there). Each
    layer's g is formed as backward reaches it (see `Products`); no activation or gradient outlives it.
    """
    embeds, lengths = stack.build_inputs(prefix, [t.context_ids for t in targets])
    products = Products(stack.n_layers, stack.image_slice)
    # indices made on the device before the forward pass is queued: a host-to-device copy after it would wait
    read_at = torch.tensor(lengths, device=stack.device) - 1
    rows = torch.arange(len(targets), device=stack.device)
    token_ids = torch.tensor([t.token_id for t in targets], device=stack.device)
    with torch.enable_grad(), stack.hooks(products.capture, site=site):
        hidden = stack.lm.base_model(inputs_embeds=embeds, use_cache=False).last_hidden_state  # [B, T, d]
        return _attribute_read(products, stack.logits(hidden[rows, read_at]), targets, token_ids, y_kind, top, full)


def caption_and_score(
    stack: Stack,
    prefix: torch.Tensor,
    words: Sequence[str | None],
    sources: Sequence[str | None],
    *,
    y_kind: str = "prob",
    site: str = "post",
    top: int = DEFAULT_KEEP,
    full: bool = False,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
) -> list[Attribution | TargetError]:
    """Caption greedily, choose each target, and attribute it, with the image prompt run through the LM once.

    The forward pass over [prefix] + prompt is both the caption's first step and the attribution's forward
    pass: it runs with the hooks and keeps its graph and its keys and values. The caption is generated on a
    detached copy of that cache; then the caption tokens before each target run on the cache itself, so
    backward reaches the image positions through their keys and values. The scores are those of
    `score_targets` (same sums, in another order: equal up to rounding). Per image: its Attribution, or the
    TargetError that `resolve_target` raised for it.
    """
    batch = prefix.shape[0]
    embeds, _ = stack.build_inputs(prefix, [[] for _ in range(batch)])
    products = Products(stack.n_layers, stack.image_slice)
    cache = stack.new_cache()
    with torch.enable_grad(), stack.hooks(products.capture, site=site):
        last = stack.run_lm(cache, inputs_embeds=embeds)[:, -1]  # [B, d]: the last prompt token
        products.recording = False
        generated = stack.greedy(last.detach(), stack.cache_copy(cache), max_new_tokens)
        chosen: list[Target | TargetError] = []
        for ids, word, source in zip(generated, words, sources, strict=True):
            try:
                chosen.append(resolve_target(stack, ids, word, source))
            except TargetError as err:
                chosen.append(err)
        targets = [t if isinstance(t, Target) else _IDLE for t in chosen]
        errors = [t for t in chosen if isinstance(t, TargetError)]
        if len(errors) == len(chosen):
            return list(errors)
        # every index on the device before the next pass is queued (the copy of one made after it would wait)
        context, lengths = stack.text_embeds([t.context_ids for t in targets])
        token_ids = torch.tensor([t.token_id for t in targets], device=stack.device)
        keep = torch.tensor([isinstance(t, Target) for t in chosen], device=stack.device)
        if max(lengths) > 0:
            counts = torch.tensor(lengths, device=stack.device)
            rows = torch.arange(batch, device=stack.device)
            hidden = stack.run_lm(cache, inputs_embeds=context)  # [B, width, d]
            last = torch.where(counts[:, None] > 0, hidden[rows, (counts - 1).clamp(min=0)], last)
        scored = _attribute_read(products, stack.logits(last), targets, token_ids, y_kind, top, full, keep=keep)
    return [t if isinstance(t, TargetError) else a for t, a in zip(chosen, scored, strict=True)]


# the target of an image whose target could not be chosen: scored along with the others, then dropped
_IDLE = Target(word="", token_id=0, token="", source="none", split=False, context_ids=[], caption="")


def _attribute_read(
    products: Products,
    logits: torch.Tensor,
    targets: Sequence[Target],
    token_ids: torch.Tensor,
    y_kind: str,
    top: int,
    full: bool,
    keep: torch.Tensor | None = None,
) -> list[Attribution]:
    """y_c from the logits at each image's read position [B, V], backward, and what is kept of g.
    keep: [B] bool, the images whose y counts (the others get no gradient)."""
    y, p = _y(logits, token_ids, y_kind)
    products.backward((y if keep is None else torch.where(keep, y, 0)).sum())
    with torch.no_grad():
        reduced = products.reduce(top, full)
    y_c, p_target = y.detach().cpu().tolist(), p.detach().cpu().tolist()
    return [
        Attribution(target=t, y_kind=y_kind, y_c=y_c[i], p_target=p_target[i], **{k: v[i] for k, v in reduced.items()})
        for i, t in enumerate(targets)
    ]


class Products:
    """g = act * grad at the image positions of every layer, in one [B, L, P, d_mlp] buffer.

    `capture` (the forward hook) copies a layer's activation at the P image positions (`positions`) into the layer's slot
    and hooks the activation's gradient; backward multiplies the slot by that gradient the moment it is
    formed, and takes the layer's per-unit max and sum while the slot is hot. So neither the activations
    (a frozen matrix does not keep its input) nor the gradients outlive their layer: per layer only the
    [B, P, d_mlp] slot stays, and the reduction needs no pass over all layers but the top-k pick.

    Products are in the model's dtype for bf16 (bf16 keeps float32's range; sums are float32) and in at
    least float32 otherwise: fp16 products could underflow, so an fp16 model's activations wait in fp16 and
    each layer's float32 product is made in its own tensor as backward reaches it (an upfront float32
    buffer would double what the forward pass holds).
    """

    def __init__(self, n_layers: int, positions: slice) -> None:
        self.n_layers, self.positions = n_layers, positions  # the image positions (Stack.image_slice)
        self.n_patch = positions.stop - positions.start
        self.slots: torch.Tensor | None = None  # [B, L, P, d_mlp]: activations, then g in place
        self.wide: dict[int, torch.Tensor] = {}  # layer -> g [B, P, d_mlp], when wider than the activations
        self.unit_max: torch.Tensor | None = None  # [B, L, d_mlp], float32 or wider
        self.unit_sum: torch.Tensor | None = None
        self.leaves: dict[int, torch.Tensor] = {}
        self.done = [False] * n_layers
        self.recording = True  # off: later passes (caption steps, tokens after the image) are not captured

    def capture(self, layer: int, act: torch.Tensor) -> torch.Tensor:
        """Forward hook: keep the activation at the image positions, hook its gradient."""
        if not self.recording:
            return act
        if self.slots is None:
            batch, _, d_mlp = act.shape
            acc = torch.promote_types(act.dtype, torch.float32)
            self.slots = torch.empty(batch, self.n_layers, self.n_patch, d_mlp, dtype=act.dtype, device=act.device)
            self.unit_max = torch.empty(batch, self.n_layers, d_mlp, dtype=acc, device=act.device)
            self.unit_sum = torch.empty_like(self.unit_max)
        with torch.no_grad():
            self.slots[:, layer].copy_(act[:, self.positions])
        if not act.requires_grad:  # the first layer: backward stops at this leaf
            act = act.detach().requires_grad_(True)
            self.leaves[layer] = act
        else:
            act.register_hook(lambda grad, layer=layer: self._multiply(layer, grad))
        return act

    def _multiply(self, layer: int, grad: torch.Tensor) -> None:
        assert self.slots is not None and self.unit_max is not None and self.unit_sum is not None
        with torch.no_grad():
            slot = self.slots[:, layer]  # [B, P, d_mlp]
            if slot.dtype == torch.float16:
                slot = self.wide[layer] = slot.to(self.unit_max.dtype)
            slot.mul_(grad[:, self.positions])
            self.unit_max[:, layer] = slot.amax(dim=1)
            self.unit_sum[:, layer] = slot.sum(dim=1, dtype=self.unit_sum.dtype)
        self.done[layer] = True

    def backward(self, y: torch.Tensor) -> None:
        """Backpropagate y to the first captured layer, forming every layer's g on the way."""
        if self.slots is None:
            raise RuntimeError("no MLP activation was captured: the stack's hooks did not run")
        leaves = list(self.leaves)
        for layer, grad in zip(leaves, torch.autograd.grad(y, [self.leaves[i] for i in leaves]), strict=True):
            self._multiply(layer, grad)
        self.leaves.clear()
        for layer, done in enumerate(self.done):
            if not done:  # y does not depend on this layer: its gradient, and so g, is zero
                self._multiply(layer, torch.zeros_like(self.slots[:, layer]))

    def reduce(self, top: int, full: bool = False) -> dict[str, torch.Tensor]:
        """What is kept of g, per image on the CPU.

        top_layer, top_unit, top_patch, top_score [B, k] (sorted by score, descending), unit_max, unit_sum
        [B, L, d_mlp], and scores [B, L, P, d_mlp] when `full`.

        Every one of an image's top-k triples belongs to a unit whose max is among its k largest unit
        maxima (up to ties at the k-th score, which give the same top-k scores), so only those k units'
        patches are ranked: one gather, no pass over the other units and no host sync.
        """
        assert self.slots is not None and self.unit_max is not None and self.unit_sum is not None
        if self.wide:  # one [B, L, P, d_mlp] tensor: the activations are no longer needed
            self.slots = None
            self.slots = torch.stack([self.wide.pop(layer) for layer in range(self.n_layers)], dim=1)
        batch, n_layers, n_patch, d_mlp = self.slots.shape
        acc = self.unit_max.dtype
        n_units = n_layers * d_mlp
        k = min(top, n_units * n_patch)
        best_units = self.unit_max.reshape(batch, n_units).topk(min(k, n_units), dim=1).indices  # [B, K]
        layer_of, unit_of = best_units // d_mlp, best_units % d_mlp
        rows = torch.arange(batch, device=self.slots.device)[:, None]
        scores = self.slots[rows, layer_of, :, unit_of].to(acc)  # [B, K, P]
        top_score, pick = scores.reshape(batch, -1).topk(k, dim=1)  # [B, k], sorted descending
        slot, patch = pick // n_patch, pick % n_patch
        out = {
            "top_layer": layer_of.gather(1, slot).cpu(),
            "top_unit": unit_of.gather(1, slot).cpu(),
            "top_patch": patch.cpu(),
            "top_score": top_score.cpu(),
            "unit_max": self.unit_max.cpu(),
            "unit_sum": self.unit_sum.cpu(),
        }
        if full:
            out["scores"] = self.slots.to(acc).cpu()  # [B, L, P, d_mlp]
        return out


def attribute(
    stack: Stack,
    images: Sequence[Image.Image],
    target: str | Sequence[str | None] | None = None,
    *,
    sources: Sequence[str | None] | None = None,
    y_kind: str = "prob",
    site: str = "post",
    top: int = DEFAULT_KEEP,
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
    scored = caption_and_score(
        stack, prefix, words, srcs, y_kind=y_kind, site=site, top=top, full=full, max_new_tokens=max_new_tokens
    )
    for result in scored:
        if isinstance(result, TargetError):
            raise result
    return [a for a in scored if isinstance(a, Attribution)]
