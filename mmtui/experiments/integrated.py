"""Integrated gradients on an image's top triples, as a cross-check of grad x act (issue 20, item 4).

For an image and its top-K stored triples (layer, unit, patch), IG is computed layer by layer on the same hook
sites as attribution, as Captum's LayerIntegratedGradients does for one layer: the layer's chosen activations
are set to alpha * a (a: their value in the plain pass, baseline 0) while everything else runs as usual, and

    IG_i = a_i * sum_k w_k * dy/da_i (alpha_k * a)

over the nodes alpha_k and weights w_k of the chosen rule on [0, 1]: "gausslegendre" (Captum's default) or
"riemann_right". Two identities make it testable: with riemann_right and 1 step (alpha = 1) IG is grad x act,
the stored score; and completeness: per layer, the IG of its chosen entries sums to y(x) - y(those entries
zeroed), up to the rule's error. Entries of one layer do not feed each other (one MLP layer, different
positions or units), so one layer's IG keeps every path to y; across layers it would cut paths, hence layer by
layer. y is the run's y (P(target), its logit or log-probability) of the stored target and context.

Agreement with grad x act: Spearman's rho between the two rankings of the K triples, and the overlap of their
top k (k = K // 2 by default). torch and scipy load inside the functions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from mmtui.errors import MmtuiError
from mmtui.experiments.ablation_ops import load_result_image
from mmtui.store import Store
from mmtui.store import experiments as xs

if TYPE_CHECKING:
    import torch

    from mmtui.stacks.base import Stack
    from mmtui.store import Run

METHODS = ("gausslegendre", "riemann_right")
DEFAULT_STEPS = 16
DEFAULT_TOP = 20


class IntegratedError(MmtuiError):
    """IG cannot run as asked (bad rule or steps, no stored triples)."""


@dataclass
class ImageIG:
    """One image: its top triples, their stored grad x act and IG, and the agreement of the two rankings."""

    result_id: int
    image: str
    triples: np.ndarray  # [K, 3] layer, unit, patch
    grad_x_act: np.ndarray  # [K] stored scores
    ig: np.ndarray  # [K]
    spearman: float
    overlap: float  # of the top k of both rankings
    k: int
    completeness: float  # max over layers of |sum IG - (y - y zeroed)| / max(|y - y zeroed|, 1e-12)


def nodes(method: str, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """The rule's points alpha in (0, 1] and weights (summing to 1)."""
    if steps < 1:
        raise IntegratedError(f"steps must be at least 1 (got {steps})")
    if method == "riemann_right":
        return np.arange(1, steps + 1) / steps, np.full(steps, 1.0 / steps)
    if method == "gausslegendre":
        x, w = np.polynomial.legendre.leggauss(steps)
        return (x + 1) / 2, w / 2
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
    hook: Callable[[int, torch.Tensor], torch.Tensor | None] | None,
    site: str,
) -> torch.Tensor:
    """y for each row of prefix [B, P, d] with the hook active: [B]."""
    embeds, lengths = stack.build_inputs(prefix, [list(context)] * prefix.shape[0])
    if hook is None:
        hidden = stack.lm.base_model(inputs_embeds=embeds, use_cache=False).last_hidden_state
    else:
        with stack.hooks(hook, site=site):
            hidden = stack.lm.base_model(inputs_embeds=embeds, use_cache=False).last_hidden_state
    return _y(stack.logits(hidden[:, lengths[0] - 1]), token_id, y_kind)


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
    method: str = "gausslegendre",
) -> tuple[np.ndarray, float]:
    """IG of one layer's entries [n, 3] (layer, unit, patch; one layer) for a single image prefix [1, P, d], and
    the completeness gap |sum IG - (y - y with those entries zeroed)| in float64."""
    import torch

    layer = int(entries[0, 0])
    if not (entries[:, 0] == layer).all():
        raise IntegratedError("layer_ig takes the entries of one layer")
    alphas, weights = nodes(method, steps)
    positions = stack.image_slice  # patch p is sequence position positions.start + p
    patch = torch.as_tensor(entries[:, 2], dtype=torch.long, device=stack.device) + positions.start
    unit = torch.as_tensor(entries[:, 1], dtype=torch.long, device=stack.device)
    plain: dict[str, torch.Tensor] = {}

    def read(at: int, act: torch.Tensor) -> None:
        if at == layer and act.shape[1] >= positions.stop:
            plain["a"] = act[0, patch, unit].detach().clone()

    with torch.no_grad():
        y_plain = _forward_y(stack, prefix, context, token_id, y_kind, read, site)[0]
    a = plain["a"]  # [n]
    alpha = torch.as_tensor(alphas, dtype=a.dtype, device=a.device)
    leaf = (alpha[:, None] * a[None, :]).detach().requires_grad_(True)  # [steps, n]

    def patched(values: torch.Tensor) -> Callable[[int, torch.Tensor], torch.Tensor | None]:
        def hook(at: int, act: torch.Tensor) -> torch.Tensor | None:
            if at != layer or act.shape[1] < positions.stop:
                return None
            rows = torch.arange(act.shape[0], device=act.device)[:, None]
            out = act.clone()
            out[rows, patch[None, :], unit[None, :]] = values.to(act.dtype)
            return out

        return hook

    rows = prefix.expand(len(alphas), -1, -1)
    with torch.enable_grad():
        y = _forward_y(stack, rows, context, token_id, y_kind, patched(leaf), site)
        (grad,) = torch.autograd.grad(y.sum(), [leaf])
    w = torch.as_tensor(weights, dtype=torch.float64, device=a.device)
    ig = (a.double() * (w[:, None] * grad.double()).sum(dim=0)).cpu().numpy()
    with torch.no_grad():
        y_zero = _forward_y(stack, prefix, context, token_id, y_kind, patched(torch.zeros_like(a)[None]), site)[0]
    gap = abs(float(ig.sum()) - float(y_plain.double() - y_zero.double()))
    scale = max(abs(float(y_plain.double() - y_zero.double())), 1e-12)
    return ig, gap / scale


def agreement(a: np.ndarray, b: np.ndarray, k: int) -> tuple[float, float]:
    """(Spearman's rho of a and b, the share of a's top k that is in b's top k)."""
    from scipy import stats

    rho = float(stats.spearmanr(a, b).statistic) if len(a) > 1 else float("nan")
    k = max(1, min(k, len(a)))
    top_a = set(np.argsort(-a, kind="stable")[:k].tolist())
    top_b = set(np.argsort(-b, kind="stable")[:k].tolist())
    return rho, len(top_a & top_b) / k


def image_ig(
    stack: Stack,
    store: Store,
    run: Run,
    result_id: int,
    *,
    top: int = DEFAULT_TOP,
    steps: int = DEFAULT_STEPS,
    method: str = "gausslegendre",
    k: int | None = None,
) -> ImageIG:
    """IG of one result's top `top` stored triples, layer by layer, and its agreement with their stored scores."""
    import torch

    (row,) = xs.result_rows(store, run.id, [result_id])
    layer, unit, patch, score = (np.asarray(x)[:top] for x in store.triples(result_id))
    if len(layer) == 0:
        raise IntegratedError(f"result {result_id} has no stored triples; attribute the image again")
    triples = np.stack([layer, unit, patch], axis=1).astype(np.int64)
    with torch.no_grad():
        prefix = stack.encode([load_result_image(row)])
    ig = np.zeros(len(triples))
    worst = 0.0
    for at in sorted(set(triples[:, 0].tolist())):
        mine = np.nonzero(triples[:, 0] == at)[0]
        values, gap = layer_ig(
            stack,
            prefix,
            row["context_ids"],
            int(row["target_token_id"]),
            triples[mine],
            y_kind=run.y_kind,
            site=run.site,
            steps=steps,
            method=method,
        )
        ig[mine] = values
        worst = max(worst, gap)
    k = len(triples) // 2 if k is None else k
    rho, overlap = agreement(np.asarray(score, dtype=np.float64), ig, k)
    return ImageIG(result_id, row["path"], triples, np.asarray(score, np.float64), ig, rho, overlap, k, worst)


def run_ig(
    stack: Stack,
    store: Store,
    run: Run,
    *,
    n_images: int,
    top: int = DEFAULT_TOP,
    steps: int = DEFAULT_STEPS,
    method: str = "gausslegendre",
    on_error: Callable[[int, str], None] | None = None,
) -> list[ImageIG]:
    """image_ig for the run's first n_images results; images that cannot be read go to on_error and are skipped."""
    out = []
    for row in xs.result_rows(store, run.id)[:n_images]:
        try:
            out.append(image_ig(stack, store, run, row["id"], top=top, steps=steps, method=method))
        except MmtuiError as error:
            if on_error is None:
                raise
            on_error(row["id"], str(error))
    return out


def summary(found: Sequence[ImageIG]) -> dict[str, Any]:
    """Mean Spearman and top-k overlap over images (with their t intervals), and the worst completeness gap."""
    from mmtui.experiments.stats import mean_interval

    rho = mean_interval([f.spearman for f in found])
    overlap = mean_interval([f.overlap for f in found], bounds=(0.0, 1.0))
    return {
        "images": len(found),
        "spearman": rho.mean,
        "spearman_ci": (rho.lo, rho.hi),
        "overlap": overlap.mean,
        "overlap_ci": (overlap.lo, overlap.hi),
        "worst_completeness_gap": max((f.completeness for f in found), default=float("nan")),
    }
