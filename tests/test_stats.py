"""Statistics checked against hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mmtui.experiments.stats import derangement, ecdf, iou, ks_test, mean_interval, quantile_mask


def test_t_interval_by_hand():
    # mean 3, s = sqrt(2.5), t_{0.975, 4} = 2.7764451, half = 2.7764451 * sqrt(2.5) / sqrt(5) = 1.9632432
    iv = mean_interval([1, 2, 3, 4, 5])
    assert iv.mean == 3 and iv.n == 5
    assert iv.lo == pytest.approx(3 - 1.9632432, abs=1e-6)
    assert iv.hi == pytest.approx(3 + 1.9632432, abs=1e-6)


def test_interval_edge_cases():
    single = mean_interval([2.0])
    assert single.mean == 2.0 and math.isnan(single.lo) and math.isnan(single.hi)  # one value: no interval
    assert mean_interval([4.0, 4.0, 4.0]).hi == 4.0  # no spread, no width
    empty = mean_interval([])
    assert empty.n == 0 and math.isnan(empty.mean)
    assert mean_interval([1.0, float("nan"), 3.0]).n == 2  # NaN dropped
    with pytest.raises(ValueError, match="interval method"):
        mean_interval([1, 2], method="wild")


def test_bootstrap_interval_is_seeded_and_brackets_the_mean():
    x = np.random.default_rng(1).normal(size=40)
    a = mean_interval(x, method="bootstrap", seed=3)
    b = mean_interval(x, method="bootstrap", seed=3)
    assert a == b
    assert a.lo < a.mean < a.hi
    t = mean_interval(x)
    assert a.hi - a.lo == pytest.approx(t.hi - t.lo, rel=0.25)  # both about 2 * 1.96 * s / sqrt(n)


def test_ks_by_hand():
    # disjoint samples of 3 and 3: D = 1; exact two-sided p = 2 / C(6, 3) = 0.1
    res = ks_test([1, 2, 3], [4, 5, 6])
    assert res.d == 1.0 and res.p == pytest.approx(0.1)
    # ECDF gap 0.5 at x = 0.2, 0.3 and 0.4, never more
    assert ks_test([0.1, 0.2, 0.3, 0.4], [0.25, 0.35, 0.45, 0.55]).d == pytest.approx(0.5)
    same = ks_test([1, 2, 3, 4], [1, 2, 3, 4])
    assert same.d == 0.0 and same.p == pytest.approx(1.0)
    with pytest.raises(ValueError):
        ks_test([], [1.0])


def test_iou_by_hand():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[0, :4] = True  # 4 pixels
    b[0, 2:4] = True
    b[1, 0:2] = True  # 4 pixels, 2 shared: union 6
    assert iou(a, b) == pytest.approx(2 / 6)
    assert iou(a, a) == 1.0
    assert iou(np.zeros((2, 2), bool), np.zeros((2, 2), bool)) == 0.0
    with pytest.raises(ValueError):
        iou(a, np.zeros((3, 3), bool))


def test_quantile_mask_keeps_the_top_five_percent():
    values = np.arange(100, dtype=float).reshape(10, 10)
    mask = quantile_mask(values, 0.95)  # 0.95 quantile = 94.05
    assert mask.sum() == 5 and mask.reshape(-1)[95:].all()
    assert not quantile_mask(np.ones((4, 4))).any()


def test_derangement_has_no_fixed_point():
    for seed in range(20):
        perm = derangement(5, seed)
        assert sorted(perm.tolist()) == list(range(5))
        assert not np.any(perm == np.arange(5))
    assert derangement(2, 0).tolist() == [1, 0]
    with pytest.raises(ValueError):
        derangement(1)


def test_ecdf():
    x, f = ecdf([3.0, 1.0, 2.0, 2.0])
    assert x.tolist() == [1.0, 2.0, 2.0, 3.0]
    assert f.tolist() == [0.25, 0.5, 0.75, 1.0]


def test_t_interval_clipped_to_the_bounds_of_the_quantity():
    drops = [1.0, 1.0, 0.2]  # relative drops: never above 1
    free = mean_interval(drops)
    assert free.hi > 1.0  # the plain t interval leaves the range
    clipped = mean_interval(drops, bounds=(-math.inf, 1.0))
    assert clipped.hi == 1.0 and clipped.lo == free.lo and clipped.mean == free.mean
