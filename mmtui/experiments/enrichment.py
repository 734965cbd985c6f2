"""The statistics of the explanations (mmtui.experiments.explain): enrichment of a term among a unit's best images,
Benjamini-Hochberg q-values, and the AUROC of every unit for every category.

Enrichment. A run has N images (results); K of them carry a term (a content word of their caption, or a COCO
category). A unit's n best images (the store keeps each unit's best NEURON_IMAGES) include k that carry it. Under
the null (the unit's best images are a draw of n of the N, blind to the term), k is hypergeometric; p is its upper
tail P(X >= k) (scipy.stats.hypergeom.sf(k - 1, N, K, n)). Every (unit, term) pair with K >= min_support is a test;
the q-values are Benjamini-Hochberg over all of them (a term never among a unit's best images is a test with p = 1).
A unit's label is its term of least p (ties: the larger k). The shuffled control runs the same code with the rows of
the image-term table permuted (which image carries which terms), so it keeps every term's K and every image's terms.

Selectivity (the paper's S.4). For each category and each unit, the AUROC of the unit's unit_max (its best g over
the image positions, as a share of the image's total: see image_shares) between the images that carry the category and those that do not: the rank-sum (Mann-Whitney)
statistic, ties at half, for all units at once. The permutation baseline computes the same with the category labels
shuffled across images.

Pure computation: arrays and counts in, arrays out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from mmtui.defaults import DEFAULT_FDR  # there, so that the CLI reads it without numpy

if TYPE_CHECKING:
    from scipy import sparse

MIN_SUPPORT = 2  # a term carried by fewer images of the run is not tested (it could not reach significance)


def hypergeom_p(k: np.ndarray, n: np.ndarray, K: np.ndarray, N: int | np.ndarray) -> np.ndarray:
    """P(X >= k) for X ~ Hypergeometric(N images, K carrying the term, n drawn), element-wise; each distinct
    (k, n, K, N) is computed once."""
    from scipy.stats import hypergeom

    k, n, K, N = np.broadcast_arrays(*(np.asarray(a, dtype=np.int64) for a in (k, n, K, N)))
    if not k.size:
        return np.zeros(k.shape, dtype=np.float64)
    columns = [np.maximum(a.ravel(), 0) for a in (k, n, K, N)]
    dims = tuple(int(c.max()) + 1 for c in columns)
    if np.prod(dims, dtype=np.float64) >= 2.0**62:  # too many combinations for one int64 key (never in practice)
        combos, inverse = np.unique(np.stack(columns), axis=1, return_inverse=True)
    else:  # one int64 key per entry: 20x faster than np.unique(axis=1) on 2 million tests
        keys, inverse = np.unique(np.ravel_multi_index(columns, dims), return_inverse=True)
        combos = np.array(np.unravel_index(keys, dims))
    p = hypergeom.sf(combos[0] - 1, combos[3], combos[2], combos[1])
    return np.clip(p, 0.0, 1.0)[inverse.ravel()].reshape(k.shape)


def bh(p: np.ndarray, m: int | None = None) -> np.ndarray:
    """Benjamini-Hochberg q-values of `p` among `m` tests (m >= len(p): the tests not given have p = 1, which
    changes the q of the others only through m). q_(i) = min over j >= i of p_(j) * m / j, capped at 1."""
    p = np.asarray(p, dtype=np.float64)
    m = len(p) if m is None else int(m)
    if m < len(p):
        raise ValueError("m must count every test given")
    if not len(p):
        return p.copy()
    order = np.argsort(p, kind="stable")
    scaled = p[order] * m / np.arange(1, len(p) + 1)
    q = np.minimum.accumulate(scaled[::-1])[::-1]
    out = np.empty_like(q)
    out[order] = np.minimum(q, 1.0)
    return out


@dataclass
class Enrichment:
    """Each unit's best term (one row per unit that has best images and some tested term among them)."""

    unit: np.ndarray  # index into the units given
    term: np.ndarray  # index into the terms
    k: np.ndarray
    n: np.ndarray
    K: np.ndarray
    N: int
    p: np.ndarray
    q: np.ndarray
    m: int  # tests: units x tested terms

    def passing(self, fdr: float = DEFAULT_FDR) -> np.ndarray:
        return self.q < fdr


def enrichment(unit_images: sparse.csr_matrix, table: sparse.csr_matrix, min_support: int = MIN_SUPPORT) -> Enrichment:
    """Each unit's most enriched term among its best images.

    unit_images: [n_units, n_images] 0/1, a unit's row marking its best images. table: [n_images, n_terms] 0/1,
    the terms each image carries. Terms carried by fewer than `min_support` images, or by every image, are not
    tested.
    """
    from scipy import sparse

    unit_images = sparse.csr_matrix(unit_images, dtype=np.int32)
    table = sparse.csr_matrix(table, dtype=np.int32)
    N = table.shape[0]
    K_all = np.asarray(table.sum(axis=0)).ravel()
    tested = np.flatnonzero((K_all >= min_support) & (K_all < N))
    n_all = np.asarray(unit_images.sum(axis=1)).ravel()
    counts = (unit_images @ table[:, tested]).tocoo()  # k of every (unit, tested term) with k >= 1
    unit, col, k = counts.row.astype(np.int64), counts.col.astype(np.int64), counts.data.astype(np.int64)
    n, K = n_all[unit], K_all[tested][col]
    p = hypergeom_p(k, n, K, N)
    m = int((n_all > 0).sum()) * len(tested)
    q = bh(p, m)
    order = np.lexsort((-k, p, unit))  # by unit, then p ascending, then k descending
    first = order[np.r_[True, unit[order][1:] != unit[order][:-1]]] if len(order) else order
    return Enrichment(unit[first], tested[col[first]], k[first], n[first], K[first], N, p[first], q[first], m)


def shuffled(table: sparse.csr_matrix, seed: int = 0) -> sparse.csr_matrix:
    """The image-term table with its rows permuted: each image gets another image's terms."""
    perm = np.random.default_rng(seed).permutation(table.shape[0])
    return table[perm]


def auroc(scores: np.ndarray, labels: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """AUROC of every unit for every category: scores [n_images, n_units], labels [n_images, n_categories] 0/1
    -> [n_categories, n_units]. Rank-based (Mann-Whitney U / (n_pos n_neg), ties count half); NaN for a category
    that every image, or none, carries."""
    from scipy.stats import rankdata

    labels = np.asarray(labels, dtype=np.float64)
    n_pos = labels.sum(axis=0)
    n_neg = labels.shape[0] - n_pos
    out = np.empty((labels.shape[1], scores.shape[1]), dtype=np.float64)
    for a in range(0, scores.shape[1], chunk):
        ranks = rankdata(scores[:, a : a + chunk], axis=0)  # average ranks: ties count half
        out[:, a : a + chunk] = labels.T @ ranks
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (out - (n_pos * (n_pos + 1) / 2)[:, None]) / (n_pos * n_neg)[:, None]
    out[(n_pos == 0) | (n_neg == 0)] = np.nan
    return out


def image_shares(scores: np.ndarray) -> np.ndarray:
    """Each image's scores as shares of its total |score| (rows of [n_images, n_units]; an all-zero row stays 0).
    g scales with the image's y (P(target)): raw, every unit of a high-y image outranks every unit of a low-y one,
    and an AUROC measures the images' y, not the unit (on 80 COCO photos, 44,544 of 46,080 units "separated"
    person from the rest)."""
    total = np.abs(scores).sum(axis=1, keepdims=True)
    return np.divide(scores, total, out=np.zeros_like(scores), where=total > 0)


def top_units(values: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row of [n_categories, n_units] (NaN last): the indices and values of its `top` largest, descending."""
    filled = np.where(np.isnan(values), -np.inf, values)
    top = min(top, values.shape[1])
    idx = np.argsort(-filled, axis=1, kind="stable")[:, :top]
    return idx, np.take_along_axis(values, idx, axis=1)
