"""The steering figure of issue 20 (item 3): does boosting a unit that has a data label raise its label's logit
more than boosting a random unit of the same layer does?

For each labelled unit u (label word w, first token t of " w") and each image of a sample of the run: one
unsteered pass, one with u's activations multiplied by `scale` at every image position, and `n_random` passes
with a random unit of u's layer boosted the same way instead. All rows of an image go through one batch (in
chunks), teacher-forced as in attribution: the logits are those at the target position of the stored
caption. The change of t's logit and of its log-probability against the unsteered row is kept for every row.

The units: the run's word labels (`mmtui explain`) with q below the FDR, least q first; where none passes
(the small stack), the units whose best word is the most enriched (least p), marked `passed=False` so that
the report says so. Labels whose " word" is several tokens are watched through their first token.

Summary: per unit, the mean change over the images for u and for its random units; u "wins" when its mean
is above the mean of its random units' means. The win rate comes with an exact (Clopper-Pearson) binomial
95% interval over units (chance is 1/2: under the null u and a random unit of its layer are exchangeable),
and the pair-level win rate (u against each random unit) with a bootstrap interval over units.

torch loads inside the functions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from mmtui.errors import MmtuiError
from mmtui.experiments.ablation_ops import last_logits, load_result_image
from mmtui.experiments.steer import json_ids
from mmtui.store import Store
from mmtui.store import experiments as xs
from mmtui.store.labels import labels as stored_labels

if TYPE_CHECKING:
    import torch

    from mmtui.stacks.base import Stack
    from mmtui.store import Run

METRICS = ("logprob", "logit")


class BoostError(MmtuiError):
    """The steering figure cannot run as asked (no labels stored, no images)."""


@dataclass(frozen=True)
class LabelledUnit:
    layer: int
    unit: int
    label: str
    token_id: int
    token: str
    n_tokens: int  # tokens of " label"; the first is watched
    p: float
    q: float
    passed: bool  # q below the FDR; False: the unit's most enriched word, which does not beat chance


@dataclass
class BoostResult:
    """Changes against the unsteered pass: labelled [U, I], random [U, R, I], per metric."""

    units: list[LabelledUnit]
    random_units: list[list[int]]  # [U][R]: unit indices in the labelled unit's layer
    images: list[str]
    scale: float
    labelled: dict[str, np.ndarray] = field(default_factory=dict)
    random: dict[str, np.ndarray] = field(default_factory=dict)


def choose_units(
    store: Store, run: Run, stack: Stack, *, n_units: int, fdr: float = 0.05, per_label: int | None = None
) -> list[LabelledUnit]:
    """Up to n_units labelled units: the word labels with q < fdr, else the most enriched words (see above),
    least q (then p) first; per_label: at most this many units of one word (so that one common word, such as
    "dog" on Flickr8k, does not fill the sample)."""
    found = stored_labels(store, run.key, kind="word", control=0)
    if not found:
        raise BoostError(f"run {run.id} has no word labels stored; run `mmtui explain` on it first")
    passing = [r for r in found if r["q"] < fdr]
    ranked = passing or sorted(found, key=lambda r: (r["p"], r["layer"], r["unit"]))
    taken: dict[str, int] = {}
    chosen = []
    for r in ranked:
        word = str(r["label"]).lower()
        if per_label is not None and taken.get(word, 0) >= per_label:
            continue
        taken[word] = taken.get(word, 0) + 1
        chosen.append(r)
        if len(chosen) == n_units:
            break
    out = []
    for r in chosen:
        ids = stack.tokenize(" " + str(r["label"]))
        if not ids:
            continue
        out.append(
            LabelledUnit(
                int(r["layer"]),
                int(r["unit"]),
                str(r["label"]),
                int(ids[0]),
                stack.token_text(ids[0]),
                len(ids),
                float(r["p"]),
                float(r["q"]),
                bool(passing),
            )
        )
    return out


def random_units(units: Sequence[LabelledUnit], n_random: int, d_mlp: int, seed: int = 0) -> list[list[int]]:
    """For each labelled unit, n_random distinct other units of its layer (seeded)."""
    rng = np.random.default_rng(seed)
    out = []
    for u in units:
        pool = np.delete(np.arange(d_mlp), u.unit)
        out.append([int(x) for x in rng.choice(pool, size=min(n_random, len(pool)), replace=False)])
    return out


def row_scale_hook(
    rows: Sequence[tuple[int, int] | None], scale: float, positions: slice
) -> Callable[[int, torch.Tensor], torch.Tensor | None]:
    """A `stack.hooks` function that multiplies one unit per batch row by `scale` at the image positions
    (`Stack.image_slice`): rows[b] = (layer, unit) for row b, or None for an unsteered row."""
    import torch

    per_layer: dict[int, list[tuple[int, int]]] = {}
    for b, picked in enumerate(rows):
        if picked is not None:
            per_layer.setdefault(picked[0], []).append((b, picked[1]))

    def hook(layer: int, act: torch.Tensor) -> torch.Tensor | None:  # act [B, T, d_mlp]
        entries = per_layer.get(layer)
        if not entries or act.shape[1] < positions.stop:
            return None
        image = act[:, positions].clone()
        b = torch.tensor([e[0] for e in entries], device=act.device)
        u = torch.tensor([e[1] for e in entries], device=act.device)
        image[b, :, u] = image[b, :, u] * scale
        return torch.cat([act[:, : positions.start], image, act[:, positions.stop :]], dim=1)

    return hook


def boost(
    stack: Stack,
    store: Store,
    run: Run,
    units: Sequence[LabelledUnit],
    *,
    n_images: int,
    scale: float = 8.0,
    n_random: int = 2,
    seed: int = 0,
    batch_size: int = 32,
    on_image: Callable[[int, int], None] | None = None,
) -> BoostResult:
    """The changes of each label's logit and log-probability under each boost, on n_images images of the run
    (a seeded sample; images that cannot be read are skipped)."""
    import torch

    if not units:
        raise BoostError("no labelled units to boost")
    rows_all = xs.result_rows(store, run.id)
    if not rows_all:
        raise BoostError(f"run {run.id} has no results")
    rng = np.random.default_rng(seed)
    sample = [rows_all[i] for i in sorted(rng.choice(len(rows_all), size=min(n_images, len(rows_all)), replace=False))]
    randoms = random_units(units, n_random, run.shape["d_mlp"], seed)
    plan: list[tuple[int, int] | None] = []  # the steered unit of each row after the reference
    for u, others in zip(units, randoms, strict=True):
        plan.append((u.layer, u.unit))
        plan += [(u.layer, r) for r in others]
    watch = torch.tensor([u.token_id for u in units])
    per = 1 + n_random
    lab: dict[str, list[np.ndarray]] = {m: [] for m in METRICS}
    ran: dict[str, list[np.ndarray]] = {m: [] for m in METRICS}
    done: list[str] = []
    for i, row in enumerate(sample):
        try:
            picture = load_result_image(row)
        except MmtuiError:
            continue
        prefix = stack.encode([picture])
        context = json_ids(row["context_ids"])
        ref = last_logits(stack, prefix, context, site=run.site)[0]  # [V]
        ref_lp = torch.log_softmax(ref, dim=-1)
        deltas = {m: np.empty(len(plan)) for m in METRICS}
        for start in range(0, len(plan), batch_size):
            chunk = plan[start : start + batch_size]
            hook = row_scale_hook(chunk, scale, stack.image_slice)
            logits = last_logits(stack, prefix.expand(len(chunk), -1, -1), context, hook, site=run.site)
            lp = torch.log_softmax(logits, dim=-1)
            tok = watch[[(start + j) // per for j in range(len(chunk))]]
            at = torch.arange(len(chunk))
            deltas["logit"][start : start + len(chunk)] = (logits[at, tok] - ref[tok]).numpy()
            deltas["logprob"][start : start + len(chunk)] = (lp[at, tok] - ref_lp[tok]).numpy()
        for m in METRICS:
            shaped = deltas[m].reshape(len(units), per)
            lab[m].append(shaped[:, 0])
            ran[m].append(shaped[:, 1:])
        done.append(row["path"])
        if on_image is not None:
            on_image(i + 1, len(sample))
    if not done:
        raise BoostError("none of the sampled images could be read")
    return BoostResult(
        list(units),
        randoms,
        done,
        scale,
        {m: np.stack(lab[m], axis=-1) for m in METRICS},  # [U, I]
        {m: np.stack(ran[m], axis=-1) for m in METRICS},  # [U, R, I]
    )


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """The exact binomial interval of k successes in n trials."""
    from scipy import stats

    if n == 0:
        return math.nan, math.nan
    alpha = 1 - level
    lo = 0.0 if k == 0 else float(stats.beta.ppf(alpha / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(stats.beta.ppf(1 - alpha / 2, k + 1, n - k))
    return lo, hi


def summarize(result: BoostResult, metric: str = "logprob", *, n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """The figure: unit-level wins with a Clopper-Pearson interval, pair-level win rate with a bootstrap
    interval over units, mean changes, and the two-sided binomial p against 1/2."""
    from scipy import stats

    if metric not in METRICS:
        raise BoostError(f"unknown metric {metric!r}; use one of {', '.join(METRICS)}")
    lab = result.labelled[metric].mean(axis=-1)  # [U]
    ran = result.random[metric].mean(axis=-1)  # [U, R]
    wins = lab > ran.mean(axis=1)
    k, n = int(wins.sum()), len(wins)
    lo, hi = clopper_pearson(k, n)
    pair = (lab[:, None] > ran).mean(axis=1)  # [U]
    rng = np.random.default_rng(seed)
    boots = pair[rng.integers(0, n, size=(n_boot, n))].mean(axis=1)
    b_lo, b_hi = np.quantile(boots, [0.025, 0.975])
    return {
        "metric": metric,
        "scale": result.scale,
        "units": n,
        "random_per_unit": int(ran.shape[1]),
        "images": len(result.images),
        "passed_fdr": sum(u.passed for u in result.units),
        "wins": k,
        "win_rate": k / n,
        "ci": (lo, hi),
        "p_binomial": float(stats.binomtest(k, n, 0.5).pvalue),
        "pair_win_rate": float(pair.mean()),
        "pair_ci": (float(b_lo), float(b_hi)),
        "mean_labelled": float(lab.mean()),
        "mean_random": float(ran.mean()),
    }


def unit_rows(result: BoostResult, metric: str = "logprob") -> list[dict[str, Any]]:
    """Per labelled unit: label, watched token, its mean change and its random units' mean change."""
    lab = result.labelled[metric].mean(axis=-1)
    ran = result.random[metric].mean(axis=-1)
    return [
        {
            "layer": u.layer,
            "unit": u.unit,
            "label": u.label,
            "token": u.token,
            "n_tokens": u.n_tokens,
            "p": u.p,
            "q": u.q,
            "passed": u.passed,
            "labelled": float(lab[i]),
            "random": float(ran[i].mean()),
            "random_units": result.random_units[i],
        }
        for i, u in enumerate(result.units)
    ]
