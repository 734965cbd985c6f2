"""Small statistics shared by the experiments: intervals, KS tests, IoU, quantile masks, random pairings.

numpy only at import time (scipy loads inside the KS test), so the store-only commands stay light.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mmtui.defaults import THRESHOLD_Q

CI_METHODS = ("t", "bootstrap")


@dataclass(frozen=True)
class Interval:
    """A mean with its two-sided interval at `level`: NaN bounds for a single value (no spread to estimate),
    lo = hi = mean when every value is the same."""

    mean: float
    lo: float
    hi: float
    n: int
    level: float = 0.95
    method: str = "t"


def mean_interval(
    values: Sequence[float] | np.ndarray,
    *,
    level: float = 0.95,
    method: str = "t",
    n_boot: int = 2000,
    seed: int = 0,
    bounds: tuple[float, float] = (-math.inf, math.inf),
) -> Interval:
    """Mean of `values` with a `level` interval: Student t (default) or percentile bootstrap.

    t: mean +- t_{(1+level)/2, n-1} * s / sqrt(n), s the sample standard deviation (ddof=1).
    bootstrap: the (1-level)/2 and (1+level)/2 percentiles of `n_boot` resampled means (seeded).
    bounds: the range the quantity cannot leave (a relative drop is at most 1); the t interval is clipped to it.
    NaN values are dropped; an empty input gives NaN everywhere with n = 0.
    """
    if method not in CI_METHODS:
        raise ValueError(f"unknown interval method {method!r}; use one of {', '.join(CI_METHODS)}")
    x = np.asarray(values, dtype=np.float64)
    x = x[~np.isnan(x)]
    n = int(x.size)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0, level, method)
    mean = float(x.mean())
    if n == 1:
        return Interval(mean, math.nan, math.nan, n, level, method)
    if float(x.std()) == 0.0:
        return Interval(mean, mean, mean, n, level, method)
    if method == "t":
        from scipy import stats

        half = float(stats.t.ppf((1 + level) / 2, n - 1)) * float(x.std(ddof=1)) / math.sqrt(n)
        lo, hi = max(mean - half, bounds[0]), min(mean + half, bounds[1])
        return Interval(mean, lo, hi, n, level, method)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, n, size=(n_boot, n))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return Interval(mean, float(lo), float(hi), n, level, method)


@dataclass(frozen=True)
class KSResult:
    """Two-sample Kolmogorov-Smirnov test: D = sup |F_a - F_b|, two-sided p-value (scipy)."""

    d: float
    p: float
    n_a: int
    n_b: int


def ks_test(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> KSResult:
    """Two-sample, two-sided KS test of `a` against `b` (NaNs dropped); scipy.stats.ks_2samp, method auto."""
    from scipy import stats

    xa = np.asarray(a, dtype=np.float64)
    xb = np.asarray(b, dtype=np.float64)
    xa, xb = xa[~np.isnan(xa)], xb[~np.isnan(xb)]
    if xa.size == 0 or xb.size == 0:
        raise ValueError("the KS test needs at least one value in each sample")
    res = stats.ks_2samp(xa, xb)
    return KSResult(float(res.statistic), float(res.pvalue), int(xa.size), int(xb.size))


def ecdf(values: Sequence[float] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted values, F at each) for drawing an empirical CDF as a step plot."""
    x = np.sort(np.asarray(values, dtype=np.float64))
    x = x[~np.isnan(x)]
    return x, np.arange(1, x.size + 1) / max(x.size, 1)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks of the same shape; 0 when both are empty."""
    if a.shape != b.shape:
        raise ValueError(f"IoU of masks of different shapes {a.shape} and {b.shape}")
    a, b = a.astype(bool), b.astype(bool)
    union = int(np.logical_or(a, b).sum())
    return float(np.logical_and(a, b).sum()) / union if union else 0.0


def quantile_mask(values: np.ndarray, q: float = THRESHOLD_Q) -> np.ndarray:
    """Pixels strictly above the q-quantile of `values` (method.md: keep pixels above the 0.95 quantile).

    A constant map has no pixel above its quantile and gives an empty mask.
    """
    return values > np.quantile(values, q)


def derangement(n: int, seed: int = 0) -> np.ndarray:
    """A random permutation of range(n) with no fixed point (i -> perm[i] != i), for random pairings.

    Rejection sampling (about e tries on average). Raises ValueError for n < 2, which has none.
    """
    if n < 2:
        raise ValueError("a random pairing needs at least two images")
    rng = np.random.default_rng(seed)
    while True:
        perm = rng.permutation(n)
        if not np.any(perm == np.arange(n)):
            return perm
