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

Import cost: torch loads inside the functions, so `import mmtui.experiments.ablation` is cheap for the TUI.
"""

from __future__ import annotations

import math
import threading
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from mmtui.defaults import ABLATION_MODES, BASELINES, UNIT_MODES
from mmtui.errors import MmtuiError, NotFoundError
from mmtui.experiments.ablation_ops import (
    DEFAULT_MAX_NEW_TOKENS,
    AblationError,
    AblationSet,
    ablation_batch_rows,
    ablation_hook,
    generate_captions,
    load_result_image,
    masks_for,
    select,
    target_probs,
    unit_means,
)
from mmtui.experiments.stats import mean_interval
from mmtui.store import Run, Store
from mmtui.store import experiments as xs

if TYPE_CHECKING:
    import torch

    from mmtui.experiments.metrics import BertScorer
    from mmtui.stacks.base import Stack

CONDITIONS = ("top", "random", "interpretable")
__all__ = [
    "AblationError",
    "AblationPoint",
    "AblationSet",
    "ablation_hook",
    "dose_response",
    "generate_captions",
    "select",
    "summarize",
    "target_probs",
    "unit_means",
]


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


def relative_drop(p_before: float, p_after: float) -> float:
    return 1.0 - p_after / p_before if p_before > 0 else math.nan


def _check(ks: Sequence[int], baseline: str, mode: str, unit_mode: str, seeds: int) -> None:
    if not ks or any(int(k) < 0 for k in ks):
        raise AblationError("--k needs one or more whole numbers >= 0, such as 0,50,100")
    if baseline not in BASELINES:
        raise AblationError(f"unknown baseline {baseline!r}; use one of {', '.join(BASELINES)}")
    if mode not in ABLATION_MODES:
        raise AblationError(f"unknown ablation mode {mode!r}; use one of {', '.join(ABLATION_MODES)}")
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
    run: Run,
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
    batch_size: int | None = None,
    convention: str = "raw",
    on_error: Callable[[int, str], None] | None = None,
    on_image: Callable[[int], None] | None = None,
) -> Iterator[AblationPoint]:
    """Ablate each image's top-k units for every k and condition; yield each point once it is stored.

    run: a row of Store.runs() made with `stack`. Points already in the store (same result, mode, unit mode,
    condition, k and seed; with a caption when captions are asked for) are yielded from the store
    (`cached=True`) and not recomputed. k = 0 is the unablated pass. captions: regenerate the greedy caption
    under ablation and score it against the unablated one with `bertscore` (None: BERTScore left empty;
    identical captions score 1). cancel: checked between batches; what was stored stays. on_error: called
    with (result_id, message) for an image that cannot be used, and the loop goes on (None: raise).
    batch_size: rows per forward pass; None: every setting of an image in one pass where the memory allows
    (`ablation_batch_rows`). The unablated P(target) (and caption) is one more row of the image's first pass.
    on_image: called with the result id once all of an image's points are yielded (e.g. for an ETA).
    """
    _check(ks, baseline, mode, unit_mode, seeds)
    ks = sorted({int(k) for k in ks})
    site = run.site
    max_new = int(run.settings.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS))
    means = unit_means(stack, store, run) if mode == "mean" else None
    settings = {"site": site, "max_new_tokens": max_new, "convention": convention}
    for row in xs.result_rows(store, run.id, result_ids):
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
            for p in xs.ablation_points(store, run.id, mode=mode, unit_mode=unit_mode, result_ids=[row["id"]])
        }
        todo = []
        for cfg in configs:
            hit = stored.get((cfg.condition, cfg.k, cfg.seed))
            if hit is not None and (hit["caption"] is not None or not captions):
                yield _point_from_row(hit)
            else:
                todo.append(cfg)
        if not todo:
            if on_image is not None:
                on_image(row["id"])
            continue
        try:
            image = load_result_image(row)
        except MmtuiError as err:
            if on_error is None:
                raise
            on_error(row["id"], str(err))
            continue
        prefix = stack.encode([image])  # [1, P, d_model]
        size = batch_size or ablation_batch_rows(stack, 1 + sum(1 for c in todo if len(c.entries)))
        before: tuple[float, str | None] | None = None  # (p, caption) unablated: a row of the first pass
        for chunk in _passes(todo, size):
            if cancel is not None and cancel.is_set():
                return
            points, before = _run_chunk(
                stack, row, chunk, prefix, means, site, max_new, before, captions, bertscore, mode, unit_mode
            )
            xs.add_ablation_points(
                store,
                [
                    {**asdict(p), "run_id": run.id, "settings": {**settings, "stored_p_target": row["p_target"]}}
                    for p in points
                ],
            )
            yield from points
        if on_image is not None:
            on_image(row["id"])


def _passes(todo: Sequence[AblationSet], size: int) -> Iterator[list[AblationSet]]:
    """The configs of one image in forward passes of at most `size` rows: the first pass holds the unablated
    row and the k = 0 configs (they need no row of their own), then the ablations in order."""
    empty = [c for c in todo if not len(c.entries)]
    active = [c for c in todo if len(c.entries)]
    first = size - 1  # the unablated row
    yield empty + active[:first]
    for start in range(first, len(active), size):
        yield active[start : start + size]


def _run_chunk(
    stack: Stack,
    row: dict[str, Any],
    chunk: Sequence[AblationSet],
    prefix: torch.Tensor,
    means: torch.Tensor | None,
    site: str,
    max_new: int,
    before: tuple[float, str | None] | None,
    captions: bool,
    bertscore: BertScorer | None,
    mode: str,
    unit_mode: str,
) -> tuple[list[AblationPoint], tuple[float, str | None]]:
    """One forward pass (and with `captions` one batched greedy decode) over one batch of ablation configs of
    one image. before: the unablated (P(target), caption); None on the first pass, which computes it as one
    more row (all-False masks leave the activations as they are) and returns it for the later passes."""
    active = [c for c in chunk if len(c.entries)]
    rows = active if before is not None else [AblationSet(0, "none", None, np.zeros((0, 3), np.int64)), *active]
    p_after: dict[int, float] = {}
    texts: dict[int, str | None] = {}
    if rows:
        hook = None
        if active:
            masks = masks_for(rows, stack.n_layers, stack.n_patches, stack.d_mlp, stack.device)
            hook = ablation_hook(masks, stack.image_slice, means)
        batch = prefix.expand(len(rows), -1, -1)
        probs = target_probs(stack, batch, row["context_ids"], row["target_token_id"], hook, site).tolist()
        made = generate_captions(stack, batch, hook, site, max_new) if captions else [None] * len(rows)
        if before is None:
            before = (probs.pop(0), made.pop(0))
        for cfg, p, text in zip(active, probs, made, strict=True):
            p_after[id(cfg)] = p
            texts[id(cfg)] = text
    assert before is not None
    p_before, caption_before = before
    for cfg in chunk:
        if not len(cfg.entries):
            p_after[id(cfg)] = p_before
            texts[id(cfg)] = caption_before
    scores = _caption_scores([texts[id(c)] for c in chunk], caption_before, bertscore)
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
                caption=texts[id(cfg)],
                bertscore=score,
                bertscore_model=None if score is None else (bertscore.name if bertscore else "identical"),
                n_ablated=n_positions,
                n_units=len({(layer, unit) for layer, unit, _ in entries.tolist()}),
                mode=mode,
                unit_mode=unit_mode,
            )
        )
    return points, before


def _caption_scores(
    captions: Sequence[str | None], reference: str | None, bertscore: BertScorer | None
) -> list[float | None]:
    """BERTScore F1 of each ablated caption against the unablated one; identical ones score 1 exactly."""
    if reference is None:
        return [None] * len(captions)
    out: list[float | None] = [1.0 if c == reference else None for c in captions]
    differ = [(i, c) for i, c in enumerate(captions) if c is not None and c != reference]
    if differ and bertscore is not None:
        f1 = bertscore.f1([c for _, c in differ], [reference] * len(differ))
        for (i, _), value in zip(differ, f1.tolist(), strict=True):
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

        drop = mean_interval(image_means("relative_drop"), level=level, method=method, bounds=(-math.inf, 1.0))
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
