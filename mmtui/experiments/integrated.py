"""Integrated gradients on an image's top triples, as a cross-check of grad x act (issue 20, item 4).

For an image and its top-K stored triples (layer, unit, patch), IG is computed layer by layer on the same hook
sites as attribution, as Captum's LayerIntegratedGradients does for one layer: the layer's chosen activations
are set to alpha * a (a: their value in the plain pass, baseline 0) while everything else runs as usual, and

    IG_i = a_i * sum_k w_k * dy/da_i (alpha_k * a)

over the nodes alpha_k and weights w_k of the chosen rule on [0, 1]: "gausslegendre" (Captum's default),
"riemann_right" or "riemann_trapezoid" (the default, DEFAULT_METHOD; its sizes 2^j + 1 nest, so one set of passes
gives several sizes).
Each (layer, alpha) pair is one row of a batch (path_ig), run `chunk` rows per forward and backward. Two identities make it testable: with riemann_right and 1 step (alpha = 1) IG is grad x act,
the stored score; and completeness: per layer, the IG of its chosen entries sums to y(x) - y(those entries
zeroed), up to the rule's error. Entries of one layer do not feed each other (one MLP layer, different
positions or units), so one layer's IG keeps every path to y; across layers it would cut paths, hence layer by
layer. y is the run's y (P(target), its logit or log-probability) of the stored target and context.

Agreement with grad x act: Spearman's rho between the two rankings of the K triples, and the overlap of their
top k (k = K // 2 by default); the control computes the same for as many random triples of the same layers
(their grad x act from the gradient at alpha = 1), to show what agreement chance gives. torch and scipy load
inside the functions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from mmtui.defaults import IG_STEPS, IgRule
from mmtui.errors import MmtuiError
from mmtui.experiments.ablation_ops import load_result_image
from mmtui.store import Store
from mmtui.store import experiments as xs

if TYPE_CHECKING:
    import torch

    from mmtui.stacks.base import Stack
    from mmtui.store import Run

METHODS = tuple(rule.value for rule in IgRule)
DEFAULT_METHOD = IgRule.TRAPEZOID.value
"""The default rule, chosen from data: on the default stack the path from 0 to the top entries is rough, and at the
same number of points the trapezoid rule's completeness gap was below Gauss-Legendre's (Flickr8k 1084040636, top
20 triples in 6 layers, worst layer: trapezoid 17 / 33 / 65 points 0.24 / 0.026 / 0.0062 of y - y zeroed,
Gauss-Legendre 16 / 32 points 0.23 / 0.079; bench/integrated.py). Its sizes 2^j + 1 also nest, so the gap at about
half the points (the convergence check) comes from the same passes."""
DEFAULT_STEPS = IG_STEPS
DEFAULT_TOP = 20
DEFAULT_CHUNK = 32  # rows (group, alpha) per forward and backward
SMALL_GAP = 0.05  # a completeness gap (relative to y - y zeroed) below which the rule's steps suffice


class IntegratedError(MmtuiError):
    """IG cannot run as asked (bad rule or steps, no stored triples)."""


@dataclass
class Agreement:
    """One set of triples of an image: their grad x act and IG, the agreement of the two rankings, and
    completeness per layer (the sum of IG against y(x) - y(the layer's entries zeroed))."""

    triples: np.ndarray  # [K, 3] layer, unit, patch
    grad_x_act: np.ndarray  # [K]
    ig: np.ndarray  # [K]
    spearman: float
    overlap: float  # of the top k of both rankings
    k: int
    gaps: np.ndarray  # [layers] |sum of IG - (y - y zeroed)|
    deltas: np.ndarray  # [layers] y - y zeroed

    @property
    def completeness(self) -> float:
        """The worst layer's gap relative to its y - y zeroed."""
        return float((self.gaps / np.maximum(np.abs(self.deltas), 1e-12)).max())


@dataclass
class ImageIG(Agreement):
    """One image: its top triples (grad_x_act: the stored scores), their IG, and y; `control` the same measures
    for as many random triples of the same layers, where asked."""

    result_id: int = 0
    image: str = ""
    y: float = float("nan")
    steps: int = DEFAULT_STEPS
    control: Agreement | None = None
    check_steps: int | None = None  # the convergence check: the same IG at about half the points,
    check_gap: float | None = None  # its completeness gap (as `completeness`),
    check_spearman: float | None = None  # and Spearman's rho of its IG against this IG

    @property
    def completeness_y(self) -> float:
        """The worst layer's gap relative to y."""
        return float(self.gaps.max() / max(abs(self.y), 1e-12))


def nodes(method: str, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """The rule's points alpha in [0, 1] and weights (summing to 1)."""
    if steps < 1:
        raise IntegratedError(f"steps must be at least 1 (got {steps})")
    if method == "riemann_right":
        return np.arange(1, steps + 1) / steps, np.full(steps, 1.0 / steps)
    if method == "gausslegendre":
        x, w = np.polynomial.legendre.leggauss(steps)
        return (x + 1) / 2, w / 2
    if method == "riemann_trapezoid":  # Captum's points, `steps` from 0 to 1, the two ends weighted half; Captum
        # weights a step 1/steps, not 1/(steps - 1), so its IG is (steps - 1)/steps of this (test_integrated)
        if steps < 2:
            raise IntegratedError(f"riemann_trapezoid needs at least 2 steps (got {steps})")
        w = np.full(steps, 1.0 / (steps - 1))
        w[[0, -1]] /= 2
        return np.linspace(0.0, 1.0, steps), w
    raise IntegratedError(f"unknown IG rule {method!r}; use one of {', '.join(METHODS)}")


def _y(logits: torch.Tensor, token_id: int, y_kind: str) -> torch.Tensor:
    import torch

    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if y_kind == "logit":
        return logits[:, token_id]
    logprobs = torch.log_softmax(logits, dim=-1)[:, token_id]
    return logprobs if y_kind == "logprob" else logprobs.exp()


def _forward_y(
    stack: Stack,
    prefix: torch.Tensor,
    context: Sequence[int],
    token_id: int,
    y_kind: str,
    hook: Callable[[int, torch.Tensor], torch.Tensor | None],
    site: str,
) -> torch.Tensor:
    """y for each row of prefix [B, P, d] with the hook active: [B]."""
    embeds, lengths = stack.build_inputs(prefix, [list(context)] * prefix.shape[0])
    with stack.hooks(hook, site=site):
        hidden = stack.lm.base_model(inputs_embeds=embeds, use_cache=False).last_hidden_state
    return _y(stack.logits(hidden[:, lengths[0] - 1]), token_id, y_kind)


@dataclass
class LayerPath:
    """One set of entries of one layer on its straight path from 0 to their values a: IG for each rule size asked
    (steps -> [n]), grad x act (the gradient at alpha = 1 times a), y at alpha = 1 (the plain y) and at 0."""

    entries: np.ndarray  # [n, 3]
    ig: dict[int, np.ndarray]
    grad_x_act: np.ndarray
    y: float
    y_zero: float

    def gap(self, steps: int) -> float:
        """|sum of IG - (y - y zeroed)|: completeness, absolute."""
        return abs(float(self.ig[steps].sum()) - (self.y - self.y_zero))


def _scaling_hook(
    index: Sequence[tuple[int, torch.Tensor, torch.Tensor]],
    mine: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    read: dict[int, torch.Tensor],
    positions: slice,
) -> Callable[[int, torch.Tensor], torch.Tensor | None]:
    """The hook of one chunk: in the rows of group g (mine[g] = (rows, alpha, delta)), its entries (index[g] =
    (layer, positions, units)) become alpha * a + delta, a their plain value, which goes to read[g]."""

    def hook(layer: int, act: torch.Tensor) -> torch.Tensor | None:
        hits = [g for g in mine if index[g][0] == layer]
        if not hits or act.shape[1] < positions.stop:
            return None
        out = act.clone()
        for g in hits:
            _, patch, unit = index[g]
            at, alpha, delta = mine[g]
            plain = act[at[:, None], patch[None, :], unit[None, :]].detach()
            read[g] = plain
            out[at[:, None], patch[None, :], unit[None, :]] = alpha[:, None].to(act.dtype) * plain + delta.to(act.dtype)
        return out

    return hook


def path_ig(
    stack: Stack,
    prefix: torch.Tensor,
    context: Sequence[int],
    token_id: int,
    groups: Sequence[np.ndarray],
    *,
    y_kind: str = "prob",
    site: str = "post",
    steps: int | Sequence[int] = DEFAULT_STEPS,
    method: str = DEFAULT_METHOD,
    chunk: int = DEFAULT_CHUNK,
) -> list[LayerPath]:
    """IG of each group of entries [n, 3] (layer, unit, patch; one layer per group) for one image prefix [1, P, d].

    Every (group, alpha) pair is one row of a batch: a group's rows scale its entries to alpha * a and leave the
    rest of the model as it is. The alphas are the rule's nodes for every size in `steps` (shared where rules
    nest, as riemann_trapezoid's 9, 17, 33 and 65 do), plus 0 and 1, so that y(x), y(entries zeroed) and grad x
    act come from the same passes. Rows run `chunk` at a time, one forward and backward per chunk. a is read in
    each row at its group's layer, where the row still runs the plain model (nothing before that layer is
    changed), so no separate plain pass is needed. Results are float64; with chunk=1 every row is its own pass
    (the step-by-step computation)."""
    import torch

    sizes = [steps] if isinstance(steps, int) else list(steps)
    rules = {n: nodes(method, n) for n in sizes}
    alphas = np.unique(np.concatenate([np.array([0.0, 1.0]), *(x for x, _ in rules.values())]))
    positions = stack.image_slice  # patch p is sequence position positions.start + p
    for entries in groups:
        if len(entries) == 0 or not (entries[:, 0] == entries[0, 0]).all():
            raise IntegratedError("each group holds the entries of one layer")
    index = [
        (
            int(e[0, 0]),
            torch.as_tensor(e[:, 2], dtype=torch.long, device=stack.device) + positions.start,
            torch.as_tensor(e[:, 1], dtype=torch.long, device=stack.device),
        )
        for e in groups
    ]
    plan = [(g, i) for g in range(len(groups)) for i in range(len(alphas))]  # rows: (group, alpha index)
    grads = [np.zeros((len(alphas), len(e))) for e in groups]
    values = [np.zeros((len(alphas), len(e))) for e in groups]
    ys = [np.zeros(len(alphas)) for _ in groups]
    for start in range(0, len(plan), max(1, chunk)):
        rows = plan[start : start + max(1, chunk)]
        mine: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # group -> (rows, alpha, delta)
        for g in sorted({g for g, _ in rows}):
            at = [r for r, (h, _) in enumerate(rows) if h == g]
            alpha = torch.as_tensor(alphas[[rows[r][1] for r in at]], dtype=stack.dtype, device=stack.device)
            delta = torch.zeros(len(at), len(groups[g]), dtype=stack.dtype, device=stack.device, requires_grad=True)
            mine[g] = (torch.as_tensor(at, device=stack.device), alpha, delta)
        read: dict[int, torch.Tensor] = {}
        hook = _scaling_hook(index, mine, read, positions)
        batch = prefix.expand(len(rows), -1, -1)
        with torch.enable_grad():
            y = _forward_y(stack, batch, context, token_id, y_kind, hook, site)
            leaves = [mine[g][2] for g in mine]
            found = torch.autograd.grad(y.sum(), leaves, allow_unused=True)
        y64 = y.detach().double().cpu().numpy()
        for g, grad in zip(mine, found, strict=True):
            local = mine[g][0].cpu().numpy()
            slots = [rows[r][1] for r in local]
            ys[g][slots] = y64[local]
            values[g][slots] = read[g].double().cpu().numpy()
            if grad is not None:
                grads[g][slots] = grad.double().cpu().numpy()
    out = []
    one, zero = len(alphas) - 1, 0
    for g, entries in enumerate(groups):
        a = values[g][one]
        ig = {}
        for n, (x, w) in rules.items():
            ig[n] = a * (w[:, None] * grads[g][np.searchsorted(alphas, x)]).sum(axis=0)
        out.append(LayerPath(entries, ig, a * grads[g][one], float(ys[g][one]), float(ys[g][zero])))
    return out


def layer_ig(
    stack: Stack,
    prefix: torch.Tensor,
    context: Sequence[int],
    token_id: int,
    entries: np.ndarray,
    *,
    y_kind: str = "prob",
    site: str = "post",
    steps: int = DEFAULT_STEPS,
    method: str = DEFAULT_METHOD,
    chunk: int = DEFAULT_CHUNK,
) -> tuple[np.ndarray, float]:
    """IG of one layer's entries [n, 3] (layer, unit, patch; one layer) for a single image prefix [1, P, d], and
    the completeness gap |sum IG - (y - y with those entries zeroed)| / |y - y zeroed| in float64."""
    (found,) = path_ig(
        stack, prefix, context, token_id, [entries], y_kind=y_kind, site=site, steps=steps, method=method, chunk=chunk
    )
    return found.ig[steps], found.gap(steps) / max(abs(found.y - found.y_zero), 1e-12)


def agreement(a: np.ndarray, b: np.ndarray, k: int) -> tuple[float, float]:
    """(Spearman's rho of a and b, the share of a's top k that is in b's top k)."""
    from scipy import stats

    rho = float(stats.spearmanr(a, b).statistic) if len(a) > 1 else float("nan")
    k = max(1, min(k, len(a)))
    top_a = set(np.argsort(-a, kind="stable")[:k].tolist())
    top_b = set(np.argsort(-b, kind="stable")[:k].tolist())
    return rho, len(top_a & top_b) / k


def random_triples(triples: np.ndarray, d_mlp: int, n_patches: int, seed: int) -> np.ndarray:
    """As many random (unit, patch) entries in each layer as `triples` has there, none of them in `triples`."""
    rng = np.random.default_rng(seed)
    taken = {tuple(t) for t in triples.tolist()}
    out = []
    for layer in sorted(set(triples[:, 0].tolist())):
        need = int((triples[:, 0] == layer).sum())
        mine: list[tuple[int, int, int]] = []
        while len(mine) < need:
            t = (layer, int(rng.integers(d_mlp)), int(rng.integers(n_patches)))
            if t not in taken:
                taken.add(t)
                mine.append(t)
        out.extend(mine)
    return np.asarray(out, dtype=np.int64).reshape(-1, 3)


def _by_layer(triples: np.ndarray) -> list[np.ndarray]:
    return [np.nonzero(triples[:, 0] == at)[0] for at in sorted(set(triples[:, 0].tolist()))]


def _agreement(
    triples: np.ndarray, paths: Sequence[LayerPath], steps: int, k: int, scores: np.ndarray | None = None
) -> Agreement:
    ig = np.zeros(len(triples))
    gxa = np.zeros(len(triples))
    for mine, path in zip(_by_layer(triples), paths, strict=True):
        ig[mine] = path.ig[steps]
        gxa[mine] = path.grad_x_act
    scores = gxa if scores is None else scores
    rho, overlap = agreement(scores, ig, k)
    gaps = np.array([p.gap(steps) for p in paths])
    deltas = np.array([p.y - p.y_zero for p in paths])
    return Agreement(triples, scores, ig, rho, overlap, k, gaps, deltas)


def image_ig(
    stack: Stack,
    store: Store,
    run: Run,
    result_id: int,
    *,
    top: int = DEFAULT_TOP,
    steps: int = DEFAULT_STEPS,
    method: str = DEFAULT_METHOD,
    k: int | None = None,
    control: bool = False,
    seed: int = 0,
    chunk: int = DEFAULT_CHUNK,
) -> ImageIG:
    """IG of one result's top `top` stored triples, layer by layer, and its agreement with their stored scores
    (image_ig_sizes with one size)."""
    (found,) = image_ig_sizes(
        stack,
        store,
        run,
        result_id,
        top=top,
        sizes=[steps],
        method=method,
        k=k,
        control=control,
        seed=seed,
        chunk=chunk,
    )
    return found


def image_ig_sizes(
    stack: Stack,
    store: Store,
    run: Run,
    result_id: int,
    *,
    top: int = DEFAULT_TOP,
    sizes: Sequence[int] = (DEFAULT_STEPS,),
    method: str = DEFAULT_METHOD,
    k: int | None = None,
    control: bool = False,
    seed: int = 0,
    chunk: int = DEFAULT_CHUNK,
) -> list[ImageIG]:
    """IG of one result's top `top` stored triples, layer by layer, and its agreement with their stored scores;
    one ImageIG for each rule size in `sizes` (computed from the same passes where the rule's points nest). control:
    also for as many random triples of the same layers (seeded by `seed` and the result id), whose grad x act
    comes from the gradient at alpha = 1."""
    import torch

    (row,) = xs.result_rows(store, run.id, [result_id])
    layer, unit, patch, score = (np.asarray(x)[:top] for x in store.triples(result_id))
    if len(layer) == 0:
        raise IntegratedError(f"result {result_id} has no stored triples; attribute the image again")
    triples = np.stack([layer, unit, patch], axis=1).astype(np.int64)
    sets = [triples]
    if control:
        sets.append(random_triples(triples, stack.d_mlp, stack.n_patches, seed * 1_000_003 + result_id))
    groups = [t[mine] for t in sets for mine in _by_layer(t)]
    with torch.no_grad():
        prefix = stack.encode([load_result_image(row)])
    paths = path_ig(
        stack,
        prefix,
        row["context_ids"],
        int(row["target_token_id"]),
        groups,
        y_kind=run.y_kind,
        site=run.site,
        steps=sizes,
        method=method,
        chunk=chunk,
    )
    n_top = len(_by_layer(triples))
    k = len(triples) // 2 if k is None else k
    found = []
    for n in sizes:
        mine = _agreement(triples, paths[:n_top], n, k, np.asarray(score, np.float64))
        other = _agreement(sets[1], paths[n_top:], n, k) if control else None
        found.append(
            ImageIG(**vars(mine), result_id=result_id, image=row["path"], y=paths[0].y, steps=n, control=other)
        )
    return found


def check_size(steps: int, method: str) -> int | None:
    """The rule size of the convergence check: about half of `steps` (for riemann_trapezoid the nested one,
    (steps - 1) // 2 + 1 points, so it costs no extra pass when steps - 1 is even); None where there is none."""
    half = (steps - 1) // 2 + 1 if method == "riemann_trapezoid" else steps // 2
    return half if (2 if method == "riemann_trapezoid" else 1) <= half < steps else None


def run_ig(
    stack: Stack,
    store: Store,
    run: Run,
    *,
    n_images: int,
    top: int = DEFAULT_TOP,
    steps: int = DEFAULT_STEPS,
    method: str = DEFAULT_METHOD,
    control: bool = False,
    check: bool = True,
    seed: int = 0,
    chunk: int = DEFAULT_CHUNK,
    on_error: Callable[[int, str], None] | None = None,
    on_image: Callable[[ImageIG], None] | None = None,
) -> list[ImageIG]:
    """IG at `steps` for the run's first n_images results; images that cannot be read go to on_error and are
    skipped. check: also IG at `check_size(steps, method)` points from the same passes, recorded on each ImageIG
    as check_steps, check_gap and check_spearman (a gap that is small at both sizes, and rankings that agree, say
    the rule has converged)."""
    half = check_size(steps, method) if check else None
    sizes = [steps] if half is None else [half, steps]
    out = []
    for row in xs.result_rows(store, run.id)[:n_images]:
        try:
            found = image_ig_sizes(
                stack,
                store,
                run,
                row["id"],
                top=top,
                sizes=sizes,
                method=method,
                control=control,
                seed=seed,
                chunk=chunk,
            )
        except MmtuiError as error:
            if on_error is None:
                raise
            on_error(row["id"], str(error))
            continue
        full = found[-1]
        if half is not None:
            coarse = found[0]
            full.check_steps, full.check_gap = half, coarse.completeness
            full.check_spearman = agreement(coarse.ig, full.ig, full.k)[0]
        out.append(full)
        if on_image is not None:
            on_image(full)
    return out


def summary(found: Sequence[ImageIG]) -> dict[str, Any]:
    """Mean Spearman and top-k overlap over images with bootstrap 95% intervals (the random-triple control's too,
    where computed), the completeness gaps (the median and worst image, relative to y - y zeroed and to y;
    not_converged: images above SMALL_GAP), and, where run_ig checked convergence, the median gap at the check's
    size and the median Spearman of its IG against the full IG."""
    from mmtui.experiments.stats import mean_interval

    def stat(values: Sequence[float], bounds: tuple[float, float]) -> tuple[float, tuple[float, float]]:
        got = mean_interval(values, method="bootstrap", bounds=bounds)
        return got.mean, (got.lo, got.hi)

    out: dict[str, Any] = {"images": len(found)}
    controls = [f.control for f in found if f.control is not None]
    for name, items in (("", list(found)), ("control_", controls)):
        if not items:
            continue
        out[f"{name}spearman"], out[f"{name}spearman_ci"] = stat([f.spearman for f in items], (-1.0, 1.0))
        out[f"{name}overlap"], out[f"{name}overlap_ci"] = stat([f.overlap for f in items], (0.0, 1.0))
    gaps = [f.completeness for f in found]
    gaps_y = [f.completeness_y for f in found]
    out["median_completeness_gap"] = float(np.median(gaps)) if gaps else float("nan")
    out["worst_completeness_gap"] = max(gaps, default=float("nan"))
    out["median_completeness_gap_y"] = float(np.median(gaps_y)) if gaps_y else float("nan")
    out["worst_completeness_gap_y"] = max(gaps_y, default=float("nan"))
    out["not_converged"] = sum(g > SMALL_GAP for g in gaps)
    checked = [f for f in found if f.check_gap is not None]
    if checked:
        out["check_steps"] = checked[0].check_steps
        out["median_check_gap"] = float(np.median([f.check_gap for f in checked]))
        out["median_check_spearman"] = float(np.median([f.check_spearman for f in checked]))
    return out
