"""Folding results into the per-unit tables, in numpy: each result's best triple per unit, the aggregates of
neuron_stats and each unit's best NEURON_IMAGES results (neuron_images). `Store.refresh_stats` hands these
functions the results' packed triples and SQLite the rows they return.

A "row" here is one (result, unit) pair: the unit's best triple in that result. Arrays of rows are dicts of
equal-length columns: result_id, layer, unit, rank (of that triple), patch, score and in_top.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from mmtui.store.arrays import UNIT_IMAGE, pack_unit_images, unpack_triples, unpack_unit_images

UNIT_BITS, LAYER_BITS = 20, 12  # a (layer, unit) folds into one int (as in neuron_text's rowid: units < 2**20)


def unit_key(layer: np.ndarray, unit: np.ndarray) -> np.ndarray:
    """(layer, unit) as one int64 that sorts by layer, then unit."""
    if len(layer) and (layer.max() >= 1 << LAYER_BITS or unit.max() >= 1 << UNIT_BITS):
        raise ValueError(f"layers must be below 2**{LAYER_BITS} and units below 2**{UNIT_BITS}")
    return layer.astype(np.int64) << UNIT_BITS | unit.astype(np.int64)


def split_key(key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return key >> UNIT_BITS, key & ((1 << UNIT_BITS) - 1)


def group_starts(sorted_keys: np.ndarray) -> np.ndarray:
    """Where each run of equal values starts in a sorted array."""
    if not len(sorted_keys):
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])


def best_per_unit_of(
    layer: np.ndarray, unit: np.ndarray, patch: np.ndarray, score: np.ndarray, result_id: int = 0
) -> dict[str, np.ndarray]:
    """One row per unit among one result's triples (in rank order, so scores descending): the unit's best
    score there, its min rank and the patch of that triple. Rows come by (layer, unit)."""
    _key, first = np.unique(unit_key(layer, unit), return_index=True)  # the first occurrence: the best rank
    return {
        "result_id": np.full(len(first), result_id, dtype=np.int64),
        "layer": layer[first].astype(np.int64),
        "unit": unit[first].astype(np.int64),
        "rank": first.astype(np.int64),
        "patch": patch[first].astype(np.int64),
        "score": score[first].astype(np.float64),
    }


def best_per_unit(pending: Sequence[tuple[int, bytes | None]], count_top: int) -> dict[str, np.ndarray]:
    """best_per_unit_of over many results' blobs, one result after another, plus in_top (rank < count_top)."""
    parts = [best_per_unit_of(*unpack_triples(blob), result_id=result_id) for result_id, blob in pending]
    best = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    best["in_top"] = (best["rank"] < count_top).astype(np.int64)
    return best


def _by_key_then_score(keys: np.ndarray, score: np.ndarray) -> np.ndarray:
    """The stable order by key, then score descending: one uint64 per entry (the key above the score's float32
    bits, made to sort descending), sorted stably, so entries of equal key and score keep their order. Four
    times faster than np.lexsort on the two columns."""
    score = np.asarray(score, dtype=np.float32) + np.float32(0)  # -0.0 becomes 0.0: they compare equal
    bits = score.view(np.uint32).astype(np.uint64)
    ascending = np.where(bits & 0x80000000, 0xFFFFFFFF - bits, bits | 0x80000000)  # as the floats order
    return np.argsort(keys.astype(np.uint64) << np.uint64(32) | (0xFFFFFFFF - ascending), kind="stable")


def by_unit(best: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Rows ordered by unit, then score descending, then result (rows come result by result, as
    best_per_unit gives them); and where each unit starts."""
    keys = unit_key(best["layer"], best["unit"])
    order = _by_key_then_score(keys, best["score"])
    return order, group_starts(keys[order])


def by_layer(
    best: dict[str, np.ndarray], order: np.ndarray, starts: np.ndarray
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """`by_unit`'s rows a layer at a time: (layer, the order of its rows, where each of its units starts there)."""
    layers = best["layer"][order[starts]]  # each unit's layer, ascending
    firsts = group_starts(layers)  # the first unit of each layer
    bounds = np.r_[starts, len(order)]  # where each unit's rows start, and the end
    for a, b in zip(firsts.tolist(), [*firsts[1:].tolist(), len(starts)], strict=True):
        yield int(layers[a]), order[bounds[a] : bounds[b]], starts[a:b] - bounds[a]


def fold_units(best: dict[str, np.ndarray], order: np.ndarray, starts: np.ndarray) -> dict[str, np.ndarray]:
    """Per unit over rows (in `by_unit` order): n_top, n_images, max, sum and mean score, and the result of the
    max (the first result among equal maxima)."""
    if not len(order):
        return {k: order for k in ("layer", "unit", "n_top", "n_images", "max", "sum", "mean", "best")}
    n_images = np.diff(np.r_[starts, len(order)])
    total = np.add.reduceat(best["score"][order], starts)
    first = order[starts]
    return {
        "layer": best["layer"][first],
        "unit": best["unit"][first],
        "n_top": np.add.reduceat(best["in_top"][order], starts),
        "n_images": n_images,
        "max": best["score"][first],
        "sum": total,
        "mean": total / n_images,
        "best": best["result_id"][first],
    }


def merge_best_images(
    stored: Sequence[tuple[int, int, bytes]],
    best: dict[str, np.ndarray],
    order: np.ndarray,
    starts: np.ndarray,
    keep: int,
) -> tuple[np.ndarray, list[bytes]]:
    """Each unit's best `keep` results, from its stored list and new rows: (keys of the units whose list
    changed, their new lists packed), by key.

    stored: (layer, unit, packed list) of the units that have one (`mmtui.store.arrays.pack_unit_images`), best by
    (layer, unit). best: new rows, of results newer than any in the stored lists (a fold takes every pending
    result, and result ids only grow), with their `by_unit` order and unit starts. A list is ordered by score
    descending, then result; a unit's list changes when a new row enters it.
    """
    new_keys = unit_key(best["layer"][order], best["unit"][order])  # by unit, score, result
    units = new_keys[starts]
    layers, unit_ids, blobs = zip(*stored, strict=True) if stored else ((), (), ())
    stored_keys = unit_key(np.array(layers, dtype=np.int64), np.array(unit_ids, dtype=np.int64))
    at = np.minimum(np.searchsorted(units, stored_keys), max(len(units) - 1, 0))
    touched = np.flatnonzero(units[at] == stored_keys) if len(units) else at[:0]  # the others stay as they are
    old, counts = unpack_unit_images([blobs[i] for i in touched.tolist()])
    # the old entries first, then the new rows: each part is already in the merged order (by key, score, then
    # result; old results before new ones), so the stable sort below is a merge of two runs (timsort), and on
    # equal scores it keeps the older result first
    keys = np.concatenate([np.repeat(stored_keys[touched], counts), new_keys])
    entries = np.empty(len(keys), dtype=UNIT_IMAGE)
    entries[: len(old)] = old
    fresh = entries[len(old) :]
    fresh["result"], fresh["score"], fresh["rank"], fresh["patch"] = (
        best[k][order] for k in ("result_id", "score", "rank", "patch")
    )
    merged = _by_key_then_score(keys, entries["score"])
    starts = group_starts(keys[merged])
    sizes = np.diff(np.r_[starts, len(merged)])
    kept = merged[np.arange(len(merged)) - np.repeat(starts, sizes) < keep]  # still by key, score, result
    starts = group_starts(keys[kept])
    is_new = np.arange(len(keys)) >= len(old)
    changed = np.maximum.reduceat(is_new[kept], starts) if len(kept) else np.zeros(0, dtype=bool)
    kept = kept[np.repeat(changed, np.diff(np.r_[starts, len(kept)]))]
    kept_keys = keys[kept]
    starts = group_starts(kept_keys)
    return kept_keys[starts], pack_unit_images(entries[kept], starts)
