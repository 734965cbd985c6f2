"""Causal effect of multimodal neurons (method.md, experiment 4): ablate the top-k units of an image and measure
P(target) (teacher-forced exactly as in attribution) and the greedy caption regenerated with the ablation on.

Ablation happens at the image-prefix positions only, at the run's neuron site, in the prefill pass (during
cached decoding the later steps see the ablated prefix through the KV cache). What is ablated:
- unit_mode "triples" (default): k = the k best (layer, unit, patch) triples: the unit at that patch only;
- unit_mode "units": k = the k best units (by their max score over patches), at every image position.
Conditions: "top" (by signed score), "interpretable" (the top ones passing the 7-of-10 word filter) and
"random" (for each top triple a uniformly drawn unit of the same layer at the same patch; per seed, nested
over k). mode "zero" sets the activation to 0; "mean" to the unit's mean over the run's images and image
positions. Relative drop = 1 - p_after / p_before.

Import cost: torch loads inside the functions, so `import mmtui.ablation` is cheap for the TUI.
"""

from __future__ import annotations

import math
import threading
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from mmtui import experiments_store as xs
from mmtui.errors import ImageError, MmtuiError, NotFoundError
from mmtui.stats import mean_interval
from mmtui.store import Store

if TYPE_CHECKING:
    import torch

    from mmtui.metrics import BertScorer
    from mmtui.stacks.base import Stack

CONDITIONS = ("top", "random", "interpretable")
MODES = ("zero", "mean")
UNIT_MODES = ("triples", "units")
BASELINES = ("random", "none")
DEFAULT_KS = (0, 50, 100, 200, 400, 800, 1600, 3200, 6400)
DEFAULT_MAX_NEW_TOKENS = 20


class AblationError(MmtuiError):
    """An ablation cannot run as asked (bad option, no stored triples)."""


@dataclass
class AblationPoint:
    """One dose-response point: one image, one k, one condition (and seed for random)."""

    result_id: int
    image: str
    k: int
    condition: str
    seed: int | None
    p_before: float
    p_after: float
    relative_drop: float
    caption_before: str | None
    caption: str | None
    bertscore: float | None
    bertscore_model: str | None
    n_ablated: int  # (unit, position) entries replaced
    n_units: int  # distinct (layer, unit)
    mode: str
    unit_mode: str
    cached: bool = False  # read back from the store rather than computed now

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class _Config:
    k: int
    condition: str
    seed: int | None
    entries: np.ndarray  # [n, 3] (layer, unit, patch); patch -1 = every image position


def relative_drop(p_before: float, p_after: float) -> float:
    return 1.0 - p_after / p_before if p_before > 0 else math.nan


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
    run: dict[str, Any],
    result_id: int,
    ks: Sequence[int],
    *,
    baseline: str = "random",
    seeds: int = 3,
    unit_mode: str = "triples",
    interpretable: bool = True,
    convention: str = "raw",
) -> list[_Config]:
    """The ablation sets of one image for every k and condition. Conditions whose ranking has fewer than k
    entries (k beyond the stored triples, or too few interpretable units) are left out for that k."""
    shape = run["shape"]
    ranked = xs.top_triples_array(store, result_id) if unit_mode == "triples" else _top_units(store, result_id, shape)
    if len(ranked) == 0:
        raise AblationError(f"result {result_id} has no stored top triples; attribute the image again")
    k_max = min(max(ks), len(ranked))
    orders: dict[tuple[str, int | None], np.ndarray] = {("top", None): ranked[:k_max]}
    if interpretable:
        good = xs.interpretable_units(store, run["lm_id"], convention)
        keep = np.fromiter(((layer, unit) in good for layer, unit, _ in ranked.tolist()), dtype=bool, count=len(ranked))
        orders[("interpretable", None)] = ranked[keep][:k_max]
    if baseline == "random":
        for seed in range(seeds):
            orders[("random", seed)] = _random_like(ranked[:k_max], shape["d_mlp"], seed, result_id)
    configs = []
    for k in ks:
        for (condition, seed), order in orders.items():
            if k <= len(order):
                configs.append(_Config(int(k), condition, seed, order[:k]))
    return configs


def _masks(
    configs: Sequence[_Config], n_layers: int, n_patches: int, d_mlp: int, device: Any
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
    masks: Sequence[torch.Tensor | None], n_patches: int, means: torch.Tensor | None = None
) -> Callable[[int, torch.Tensor], torch.Tensor | None]:
    """A `stack.hooks` function replacing the masked activations at the image positions.

    masks[layer]: bool [B, P, d_mlp] or None. means: [n_layers, d_mlp] for mean ablation, None for zero.
    Passes with fewer than P positions (the cached decoding steps) are left alone.
    """
    import torch

    def hook(layer: int, act: torch.Tensor) -> torch.Tensor | None:  # act [B, T, d_mlp]
        mask = masks[layer]
        if mask is None or act.shape[1] < n_patches:
            return None
        head = act[:, :n_patches]  # [B, P, d_mlp]
        value = torch.zeros((), dtype=act.dtype, device=act.device) if means is None else means[layer].to(act)
        return torch.cat([torch.where(mask, value, head), act[:, n_patches:]], dim=1)

    return hook


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

    embeds, lengths = stack.build_inputs(prefix, [list(context_ids)] * prefix.shape[0])
    with torch.no_grad():
        if hook is None:
            hidden = stack.lm.base_model(inputs_embeds=embeds, use_cache=False).last_hidden_state
        else:
            with stack.hooks(hook, site=site):
                hidden = stack.lm.base_model(inputs_embeds=embeds, use_cache=False).last_hidden_state
        last = hidden[:, lengths[0] - 1]  # [B, d_model]; every row has the same length
        logits = stack.lm.get_output_embeddings()(last).float()  # [B, V]
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
def unit_means(stack: Stack, store: Store, run: dict[str, Any], batch_size: int = 8) -> torch.Tensor:
    """Each unit's mean activation over the run's images and their image positions: [n_layers, d_mlp].

    Computed once from the captioning forward pass ([prefix] + prompt) and kept in the store.
    """
    import torch

    shape = (stack.n_layers, stack.d_mlp)
    found = xs.get_unit_means(store, run["id"], run["site"], shape)
    if found is not None:
        return torch.from_numpy(found[0])
    total = torch.zeros(shape, dtype=torch.float64)
    n_images = 0
    rows = xs.result_rows(store, run["id"])
    images = []
    for row in rows:
        try:
            images.append(_load(row))
        except MmtuiError:
            continue  # an image gone from disk does not count; the rest still define the mean
    if not images:
        raise AblationError(f"mean ablation needs the run's images, and none of the {len(rows)} can be read")
    n_patches = stack.n_patches

    def capture(layer: int, act: torch.Tensor) -> None:
        total[layer] += act[:, :n_patches].double().sum(dim=(0, 1)).cpu()

    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        prefix = stack.encode(chunk)
        embeds, _ = stack.build_inputs(prefix, [[] for _ in chunk])
        with torch.no_grad(), stack.hooks(capture, site=run["site"]):
            stack.lm.base_model(inputs_embeds=embeds, use_cache=False)
        n_images += len(chunk)
    means = (total / (n_images * n_patches)).float()
    xs.put_unit_means(store, run["id"], run["site"], means.numpy(), n_images)
    return means


def _load(row: dict[str, Any]) -> Any:
    """The PIL image of a result row, checked against its stored sha256."""
    from mmtui.images import load_image

    loaded = load_image(row["path"])
    if loaded.sha256 != row["image_sha256"]:
        raise ImageError(row["path"], "the file changed since it was attributed; attribute it again")
    return loaded.image


# -- the dose-response loop -------------------------------------------------------------------------------
def _check(ks: Sequence[int], baseline: str, mode: str, unit_mode: str, seeds: int) -> None:
    if not ks or any(int(k) < 0 for k in ks):
        raise AblationError("--k needs one or more whole numbers >= 0, such as 0,50,100")
    if baseline not in BASELINES:
        raise AblationError(f"unknown baseline {baseline!r}; use one of {', '.join(BASELINES)}")
    if mode not in MODES:
        raise AblationError(f"unknown ablation mode {mode!r}; use one of {', '.join(MODES)}")
    if unit_mode not in UNIT_MODES:
        raise AblationError(f"unknown unit mode {unit_mode!r}; use one of {', '.join(UNIT_MODES)}")
    if seeds < 1:
        raise AblationError("--seeds must be at least 1")


def _point_from_row(row: dict[str, Any]) -> AblationPoint:
    return AblationPoint(
        result_id=row["result_id"],
        image=row["image"],
        k=row["k"],
        condition=row["condition"],
        seed=row["seed"],
        p_before=row["p_before"],
        p_after=row["p_after"],
        relative_drop=row["relative_drop"],
        caption_before=row["caption_before"],
        caption=row["caption"],
        bertscore=row["bertscore"],
        bertscore_model=row["bertscore_model"],
        n_ablated=row["n_ablated"],
        n_units=row["n_units"],
        mode=row["mode"],
        unit_mode=row["unit_mode"],
        cached=True,
    )


def dose_response(
    stack: Stack,
    store: Store,
    run: dict[str, Any],
    result_ids: list[int],
    ks: Sequence[int],
    *,
    baseline: str = "random",
    seeds: int = 3,
    mode: str = "zero",
    unit_mode: str = "triples",
    captions: bool = True,
    cancel: threading.Event | None = None,
    interpretable: bool = True,
    bertscore: BertScorer | None = None,
    batch_size: int = 16,
    convention: str = "raw",
    on_error: Callable[[int, str], None] | None = None,
) -> Iterator[AblationPoint]:
    """Ablate each image's top-k units for every k and condition; yield each point once it is stored.

    run: a row of Store.runs() made with `stack`. Points already in the store (same result, mode, unit mode,
    condition, k and seed; with a caption when captions are asked for) are yielded from the store
    (`cached=True`) and not recomputed. k = 0 is the unablated pass. captions: regenerate the greedy caption
    under ablation and score it against the unablated one with `bertscore` (None: BERTScore left empty;
    identical captions score 1). cancel: checked between batches; what was stored stays. on_error: called
    with (result_id, message) for an image that cannot be used, and the loop goes on (None: raise).
    """
    _check(ks, baseline, mode, unit_mode, seeds)
    ks = sorted({int(k) for k in ks})
    site = run["site"]
    max_new = int(run.get("settings", {}).get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS))
    means = unit_means(stack, store, run) if mode == "mean" else None
    settings = {"site": site, "max_new_tokens": max_new, "convention": convention}
    for row in xs.result_rows(store, run["id"], result_ids):
        if cancel is not None and cancel.is_set():
            return
        try:
            configs = select(
                store,
                run,
                row["id"],
                ks,
                baseline=baseline,
                seeds=seeds,
                unit_mode=unit_mode,
                interpretable=interpretable,
                convention=convention,
            )
        except (AblationError, NotFoundError) as err:
            if on_error is None:
                raise
            on_error(row["id"], str(err))
            continue
        stored = {
            (p["condition"], p["k"], p["seed"]): p
            for p in xs.ablation_points(store, run["id"], mode=mode, unit_mode=unit_mode, result_ids=[row["id"]])
        }
        todo = []
        for cfg in configs:
            hit = stored.get((cfg.condition, cfg.k, cfg.seed))
            if hit is not None and (hit["caption"] is not None or not captions):
                yield _point_from_row(hit)
            else:
                todo.append(cfg)
        if not todo:
            continue
        try:
            image = _load(row)
        except MmtuiError as err:
            if on_error is None:
                raise
            on_error(row["id"], str(err))
            continue
        prefix = stack.encode([image])  # [1, P, d_model]
        p_before = float(target_probs(stack, prefix, row["context_ids"], row["target_token_id"], site=site)[0])
        caption_before = generate_captions(stack, prefix, site=site, max_new_tokens=max_new)[0] if captions else None
        for start in range(0, len(todo), batch_size):
            if cancel is not None and cancel.is_set():
                return
            chunk = todo[start : start + batch_size]
            points = _run_chunk(
                stack, row, chunk, prefix, means, site, max_new, p_before, caption_before, bertscore, mode, unit_mode
            )
            xs.add_ablation_points(
                store,
                [
                    {**asdict(p), "run_id": run["id"], "settings": {**settings, "stored_p_target": row["p_target"]}}
                    for p in points
                ],
            )
            yield from points


def _run_chunk(
    stack: Stack,
    row: dict[str, Any],
    chunk: Sequence[_Config],
    prefix: torch.Tensor,
    means: torch.Tensor | None,
    site: str,
    max_new: int,
    p_before: float,
    caption_before: str | None,
    bertscore: BertScorer | None,
    mode: str,
    unit_mode: str,
) -> list[AblationPoint]:
    """Compute one batch of ablation configs of one image (k = 0 configs need no pass)."""
    active = [c for c in chunk if len(c.entries)]
    p_after: dict[int, float] = {}
    captions: dict[int, str | None] = {}
    if active:
        masks = _masks(active, stack.n_layers, stack.n_patches, stack.d_mlp, stack.device)
        hook = ablation_hook(masks, stack.n_patches, means)
        batch = prefix.expand(len(active), -1, -1)
        probs = target_probs(stack, batch, row["context_ids"], row["target_token_id"], hook, site)
        texts = (
            generate_captions(stack, batch, hook, site, max_new) if caption_before is not None else [None] * len(active)
        )
        for cfg, p, text in zip(active, probs.tolist(), texts, strict=True):
            p_after[id(cfg)] = p
            captions[id(cfg)] = text
    for cfg in chunk:
        if not len(cfg.entries):
            p_after[id(cfg)] = p_before
            captions[id(cfg)] = caption_before
    scores = _caption_scores([captions[id(c)] for c in chunk], caption_before, bertscore)
    points = []
    for cfg, score in zip(chunk, scores, strict=True):
        entries = cfg.entries
        n_positions = int(np.where(entries[:, 2] < 0, stack.n_patches, 1).sum()) if len(entries) else 0
        points.append(
            AblationPoint(
                result_id=row["id"],
                image=row["path"],
                k=cfg.k,
                condition=cfg.condition,
                seed=cfg.seed,
                p_before=p_before,
                p_after=p_after[id(cfg)],
                relative_drop=relative_drop(p_before, p_after[id(cfg)]),
                caption_before=caption_before,
                caption=captions[id(cfg)],
                bertscore=score,
                bertscore_model=None if score is None else (bertscore.name if bertscore else "identical"),
                n_ablated=n_positions,
                n_units=len({(layer, unit) for layer, unit, _ in entries.tolist()}),
                mode=mode,
                unit_mode=unit_mode,
            )
        )
    return points


def _caption_scores(
    captions: Sequence[str | None], reference: str | None, bertscore: BertScorer | None
) -> list[float | None]:
    """BERTScore F1 of each ablated caption against the unablated one; identical ones score 1 exactly."""
    if reference is None:
        return [None] * len(captions)
    out: list[float | None] = [1.0 if c == reference else None for c in captions]
    differ = [i for i, c in enumerate(captions) if c is not None and c != reference]
    if differ and bertscore is not None:
        f1 = bertscore.f1([captions[i] for i in differ], [reference] * len(differ))  # type: ignore[misc]
        for i, value in zip(differ, f1.tolist(), strict=True):
            out[i] = float(value)
    return out


# -- summary -----------------------------------------------------------------------------------------------
def summarize(
    points: Sequence[AblationPoint | dict[str, Any]],
    *,
    shape: dict[str, Any] | None = None,
    level: float = 0.95,
    method: str = "t",
) -> list[dict[str, Any]]:
    """Per (condition, k): the mean relative drop over images with its `level` interval, and n (images).

    Random seeds are averaged per image first, so n counts images and the interval is over images.
    Also the mean P before and after, the mean caption BERTScore (with interval) and the mean number of
    units ablated; with the stack `shape`, what fraction of all units and of all (unit, patch) triples that is.
    """
    groups: dict[tuple[str, int], dict[int, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    modes: set[tuple[str, str]] = set()
    for p in points:
        d = p.to_json() if isinstance(p, AblationPoint) else p
        groups[(d["condition"], d["k"])][d["result_id"]].append(d)
        modes.add((d["mode"], d["unit_mode"]))
    if len(modes) > 1:
        raise AblationError(f"cannot summarise different ablation modes together: {sorted(modes)}")
    rows = []
    order = {c: i for i, c in enumerate(CONDITIONS)}
    for (condition, k), per_image in sorted(groups.items(), key=lambda kv: (order.get(kv[0][0], 9), kv[0][1])):

        def image_means(key: str, per_image: dict[int, list[dict[str, Any]]] = per_image) -> np.ndarray:
            vals = [[d[key] for d in ds if d[key] is not None] for ds in per_image.values()]
            return np.asarray([np.mean(v) if v else np.nan for v in vals], dtype=np.float64)

        drop = mean_interval(image_means("relative_drop"), level=level, method=method)
        bert = mean_interval(image_means("bertscore"), level=level, method=method)
        n_units = float(np.nanmean(image_means("n_units")))
        n_ablated = float(np.nanmean(image_means("n_ablated")))
        mode, unit_mode = next(iter(modes))
        row = {
            "condition": condition,
            "k": k,
            "n": drop.n,
            "mean_drop": drop.mean,
            "lo": drop.lo,
            "hi": drop.hi,
            "p_before": float(np.nanmean(image_means("p_before"))),
            "p_after": float(np.nanmean(image_means("p_after"))),
            "bertscore": bert.mean,
            "bertscore_lo": bert.lo,
            "bertscore_hi": bert.hi,
            "n_bertscore": bert.n,
            "seeds": max(len(ds) for ds in per_image.values()),
            "units": n_units,
            "ablated": n_ablated,
            "mode": mode,
            "unit_mode": unit_mode,
            "interval": f"{int(level * 100)}% {method}",
        }
        if shape is not None:
            row["frac_units"] = n_units / (shape["n_layers"] * shape["d_mlp"])
            row["frac_triples"] = n_ablated / (shape["n_layers"] * shape["d_mlp"] * shape["n_patches"])
        rows.append(row)
    return rows
