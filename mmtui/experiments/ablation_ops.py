"""The mechanics of ablation: which (layer, unit, patch) entries to ablate for each k and condition, the hook
that replaces their activations at the image positions, teacher-forced P(target) and greedy captions under a
hook, and per-unit mean activations for mean ablation. `mmtui.experiments.ablation` runs the experiment on top of these.

torch loads inside the functions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from mmtui.defaults import DEFAULT_MAX_NEW_TOKENS
from mmtui.errors import MmtuiError
from mmtui.store import Run, Store
from mmtui.store import experiments as xs

if TYPE_CHECKING:
    import torch

    from mmtui.stacks.base import Stack


class AblationError(MmtuiError):
    """An ablation cannot run as asked (bad option, no stored triples)."""


@dataclass(frozen=True)
class AblationSet:
    """What one config ablates: k, the condition, its seed (random only) and the entries."""

    k: int
    condition: str
    seed: int | None
    entries: np.ndarray  # [n, 3] (layer, unit, patch); patch -1 = every image position


# -- choosing what to ablate ---------------------------------------------------------------------------
def _top_units(store: Store, result_id: int, shape: dict[str, Any]) -> np.ndarray:
    """Every unit ranked by its max score over patches: [L * d_mlp, 3] (layer, unit, -1), best first."""
    unit_max, _ = store.unit_scores(result_id)  # [L, d_mlp]
    order = np.argsort(-unit_max.reshape(-1), kind="stable")
    d_mlp = shape["d_mlp"]
    return np.stack([order // d_mlp, order % d_mlp, np.full_like(order, -1)], axis=1)


def _random_like(ranked: np.ndarray, d_mlp: int, seed: int, result_id: int) -> np.ndarray:
    """For each entry (layer, unit, patch), in order, a random unit of the same layer at the same patch.

    Draws are without repeats of a (layer, unit, patch) entry, deterministic in (seed, result_id), and nested:
    the first k entries are the random baseline for k.
    """
    rng = np.random.default_rng([seed, result_id])
    used: set[tuple[int, int, int]] = set()
    out = np.empty_like(ranked)
    for i, (layer, _unit, patch) in enumerate(ranked.tolist()):
        while True:
            unit = int(rng.integers(d_mlp))
            if (layer, unit, patch) not in used:
                break
        used.add((layer, unit, patch))
        out[i] = (layer, unit, patch)
    return out


def select(
    store: Store,
    run: Run,
    result_id: int,
    ks: Sequence[int],
    *,
    baseline: str = "random",
    seeds: int = 3,
    unit_mode: str = "triples",
    interpretable: bool = True,
    convention: str = "raw",
) -> list[AblationSet]:
    """The ablation sets of one image for every k and condition. Conditions whose ranking has fewer than k
    entries (k beyond the stored triples, or too few interpretable units) are left out for that k."""
    shape = run.shape
    ranked = xs.top_triples_array(store, result_id) if unit_mode == "triples" else _top_units(store, result_id, shape)
    if len(ranked) == 0:
        raise AblationError(f"result {result_id} has no stored top triples; attribute the image again")
    k_max = min(max(ks), len(ranked))
    orders: dict[tuple[str, int | None], np.ndarray] = {("top", None): ranked[:k_max]}
    if interpretable:
        good = xs.interpretable_units(store, run.lm_id, convention)
        keep = np.fromiter(((layer, unit) in good for layer, unit, _ in ranked.tolist()), dtype=bool, count=len(ranked))
        orders[("interpretable", None)] = ranked[keep][:k_max]
    if baseline == "random":
        for seed in range(seeds):
            orders[("random", seed)] = _random_like(ranked[:k_max], shape["d_mlp"], seed, result_id)
    configs = []
    for k in ks:
        for (condition, order_seed), order in orders.items():
            if k <= len(order):
                configs.append(AblationSet(int(k), condition, order_seed, order[:k]))
    return configs


ABLATION_BATCH_BYTES = 2 << 30  # what one batched ablation pass may hold on the CPU (masks and activations)


def ablation_batch_rows(stack: Stack, n_rows: int, context_tokens: int = 2) -> int:
    """Rows (ablation settings of one image) per forward pass: all `n_rows` where the memory allows.

    Per row: the bool masks ([n_layers, P, d_mlp]) and a few MLP-sized activations over the sequence. The budget
    is ABLATION_BATCH_BYTES on the CPU, half the free memory on a GPU. On the smol stack every setting of an
    image fits one pass; a GPT-J-sized stack gets about 16 rows per 2 GiB.
    """
    import torch

    width = stack.n_patches + len(stack.lead_ids) + len(stack.prompt_ids()) + context_tokens
    element = torch.empty((), dtype=stack.dtype).element_size()
    per_row = stack.n_layers * stack.n_patches * stack.d_mlp + 8 * width * stack.d_mlp * element
    budget = ABLATION_BATCH_BYTES
    if stack.device.type == "cuda":
        budget = int(0.5 * torch.cuda.mem_get_info(stack.device)[0])
    return max(1, min(n_rows, budget // per_row))


def masks_for(
    configs: Sequence[AblationSet], n_layers: int, n_patches: int, d_mlp: int, device: Any
) -> list[torch.Tensor | None]:
    """Per layer, a bool mask [B, P, d_mlp] of the entries each config ablates (None: nothing in that layer)."""
    import torch

    masks: list[torch.Tensor | None] = [None] * n_layers
    for row, cfg in enumerate(configs):
        entries = torch.from_numpy(np.asarray(cfg.entries, dtype=np.int64).reshape(-1, 3))
        for layer in entries[:, 0].unique().tolist():
            if masks[layer] is None:
                masks[layer] = torch.zeros(len(configs), n_patches, d_mlp, dtype=torch.bool)
            mask = masks[layer]
            assert mask is not None
            sel = entries[entries[:, 0] == layer]
            at_patch = sel[sel[:, 2] >= 0]
            mask[row, at_patch[:, 2], at_patch[:, 1]] = True
            mask[row, :, sel[sel[:, 2] < 0][:, 1]] = True
    return [None if m is None else m.to(device) for m in masks]


def ablation_hook(
    masks: Sequence[torch.Tensor | None], positions: slice, means: torch.Tensor | None = None
) -> Callable[[int, torch.Tensor], torch.Tensor | None]:
    """A `stack.hooks` function replacing the masked activations at the image positions (`Stack.image_slice`).

    masks[layer]: bool [B, P, d_mlp] or None. means: [n_layers, d_mlp] for mean ablation, None for zero.
    Passes that do not reach the last image position (the cached decoding steps) are left alone.
    """
    import torch

    def hook(layer: int, act: torch.Tensor) -> torch.Tensor | None:  # act [B, T, d_mlp]
        mask = masks[layer]
        if mask is None or act.shape[1] < positions.stop:
            return None
        image = act[:, positions]  # [B, P, d_mlp]
        value = torch.zeros((), dtype=act.dtype, device=act.device) if means is None else means[layer].to(act)
        parts = [act[:, : positions.start], torch.where(mask, value, image), act[:, positions.stop :]]
        return torch.cat(parts, dim=1)

    return hook


def last_logits(
    stack: Stack,
    prefix: torch.Tensor,
    context_ids: Sequence[int],
    hook: Callable[[int, torch.Tensor], torch.Tensor | None] | None = None,
    site: str = "post",
) -> torch.Tensor:
    """The logits at the last position of [lead] + [prefix] + prompt + context ([B, V] float32): the pass that
    `target_probs` takes P(target) from (and steering its logits)."""
    import torch

    embeds, lengths = stack.build_inputs(prefix, [list(context_ids)] * prefix.shape[0])
    with torch.no_grad():
        if hook is None:
            hidden = stack.lm.base_model(inputs_embeds=embeds, use_cache=False).last_hidden_state
        else:
            with stack.hooks(hook, site=site):
                hidden = stack.lm.base_model(inputs_embeds=embeds, use_cache=False).last_hidden_state
        return stack.logits(hidden[:, lengths[0] - 1]).float()


def target_probs(
    stack: Stack,
    prefix: torch.Tensor,
    context_ids: Sequence[int],
    token_id: int,
    hook: Callable[[int, torch.Tensor], torch.Tensor | None] | None = None,
    site: str = "post",
) -> torch.Tensor:
    """P(token | [prefix] + prompt + context) at the last position, as in attribution: [B] float32.

    prefix: [B, P, d_model] (rows may be the same image under different ablations).
    """
    import torch

    logits = last_logits(stack, prefix, context_ids, hook, site=site)  # [B, V]
    return torch.log_softmax(logits, dim=-1)[:, token_id].exp()


def generate_captions(
    stack: Stack,
    prefix: torch.Tensor,
    hook: Callable[[int, torch.Tensor], torch.Tensor | None] | None = None,
    site: str = "post",
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
) -> list[str]:
    """Greedy captions of prefix rows [B, P, d_model] with the hook active during the prefill pass."""
    if hook is None:
        return [stack.caption_text(ids) for ids in stack.generate(prefix, max_new_tokens)]
    with stack.hooks(hook, site=site):
        return [stack.caption_text(ids) for ids in stack.generate(prefix, max_new_tokens)]


# -- mean ablation ---------------------------------------------------------------------------------------
def unit_means(stack: Stack, store: Store, run: Run, batch_size: int = 8) -> torch.Tensor:
    """Each unit's mean activation over the run's images and their image positions: [n_layers, d_mlp].

    Computed once from the captioning forward pass ([prefix] + prompt) and kept in the store.
    """
    import torch

    shape = (stack.n_layers, stack.d_mlp)
    found = xs.get_unit_means(store, run.id, run.site, shape)
    if found is not None:
        return torch.from_numpy(found[0])
    total = torch.zeros(shape, dtype=torch.float64)
    n_images = 0
    rows = xs.result_rows(store, run.id)
    images = []
    for row in rows:
        try:
            images.append(load_result_image(row))
        except MmtuiError:
            continue  # an image gone from disk does not count; the rest still define the mean
    if not images:
        raise AblationError(f"mean ablation needs the run's images, and none of the {len(rows)} can be read")
    n_patches, positions = stack.n_patches, stack.image_slice

    def capture(layer: int, act: torch.Tensor) -> None:
        total[layer] += act[:, positions].double().sum(dim=(0, 1)).cpu()

    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        prefix = stack.encode(chunk)
        embeds, _ = stack.build_inputs(prefix, [[] for _ in chunk])
        with torch.no_grad(), stack.hooks(capture, site=run.site):
            stack.lm.base_model(inputs_embeds=embeds, use_cache=False)
        n_images += len(chunk)
    means = (total / (n_images * n_patches)).float()
    xs.put_unit_means(store, run.id, run.site, means.numpy(), n_images)
    return means


def load_result_image(row: dict[str, Any]) -> Any:
    """The PIL image of a result row, checked against its stored sha256."""
    from mmtui.run.images import load_image

    return load_image(row["path"], sha256=row["image_sha256"]).image
