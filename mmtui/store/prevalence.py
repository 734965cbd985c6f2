"""Generic vs image-specific units of a run: prevalence, lift and the generic flag.

- prevalence of a unit: the share of the run's results (images) in whose top-N triples it is, N = COUNT_TOP
  (100, the paper's): neuron_stats.n_top over the run's folded results.
- lift of a unit on an image: its z-score there, (unit_max - mean) / std, where unit_max is the unit's max of
  g over the image positions (stored for every unit of every result) and mean and std are the unit's over
  the run's results (population std), from the moments `Store.refresh_stats` folds into unit_moments
  (migration m010). No lift where the run has under 2 results or the unit's values do not vary.
- generic: a unit whose prevalence is above GENERIC_SHARE, in a run of at least MIN_GENERIC_RESULTS results.

Never imports torch.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from mmtui.store.arrays import unpack_array, unpack_value
from mmtui.store.filters import token_filter, token_where

if TYPE_CHECKING:
    from mmtui.store import Run, Store
    from mmtui.store._sqlite_utils import Database

GENERIC_SHARE = 0.1
"""A unit in the top-N of more than this share of a run's images is generic.

Chosen from data: the default stack (smol) over the 80 COCO-mini photos (../shared/data; the 8 bundled samples
are among them, so the run has 80 images). Prevalence there has no gap to cut at: 1,809 of the 46,080 units
reach some image's top 100, 1,051 of them a single image, and the counts thin out smoothly up to 3 units in
94-95% of the images (L0.u196, L1.u83, L0.u1524). So the break is taken as the knee of the rank-prevalence
curve (units sorted by prevalence; the point farthest below the chord from the first to the last, "Kneedle"):
8.75% there. Rounded up to 10%: 132 units (0.3% of all) are generic, and they hold 46.5% of the run's
(image, unit) top-100 pairs; 17 units are in over half of the images. The rule "10x the share a unit would
have if the top 100s were spread evenly" gives 1.6% here (10 x 73.9 distinct units an image / 46,080), two
images of 80: it would call 758 units generic, most of them seen twice, which says nothing of their content.
Checked on 292 Flickr8k test photos: the knee falls at 6.8%; at 10%, 136 units are generic and hold 50.8% of
the pairs, the same units on top (L1.u83 in 289 of 292); on all 1,000 test photos the knee is at 5.1%, and at
10% the same 132 units are generic, holding 50.2% of the pairs (L1.u83 in 987). A unit that follows a concept common in the run can
cross 10% (on those photos "dog" is the target of 20% of them): the flag says "in many images", not "no
content"; `neurons --specific` ranks by lift for that reason."""
MIN_GENERIC_RESULTS = 10
"""Below 1 / GENERIC_SHARE results a single image would make a unit generic: such runs call none generic."""
_FLAT = 1e-12  # a unit whose variance is below this fraction of its mean square does not vary: no lift


def _conn(db: Database | sqlite3.Connection) -> sqlite3.Connection:
    return db if isinstance(db, sqlite3.Connection) else db.conn


def _dims(conn: sqlite3.Connection, run_id: str) -> tuple[int, int]:
    row = conn.execute(
        "SELECT stacks.shape FROM runs JOIN stacks ON stacks.id = runs.stack_id WHERE runs.id = ?", [run_id]
    ).fetchone()
    shape = json.loads(row[0])
    return int(shape["n_layers"]), int(shape["d_mlp"])


# -- folding ------------------------------------------------------------------------------------------------
def sum_moments(blobs: Iterable[bytes], dims: tuple[int, int]) -> tuple[int, np.ndarray, np.ndarray]:
    """(how many, sum, sum of squares) of the unpacked unit_max arrays, in float64 ([n_layers, d_mlp])."""
    total, total_sq, square = np.zeros(dims), np.zeros(dims), np.empty(dims)
    n = 0
    for blob in blobs:
        values = unpack_array(blob, dims).astype(np.float64)
        total += values
        np.multiply(values, values, out=square)
        total_sq += square
        n += 1
    return n, total, total_sq


def fold_moments(db: Database | sqlite3.Connection, run_id: str, run_key: int, result_ids: Sequence[int]) -> None:
    """Add these results' unit_max to the run's rows of unit_moments (made on first use), inside the caller's
    transaction. Sums add up in any grouping, so a fold of many results, a resumed run and a merge of shards
    give the same moments (up to float64 rounding)."""
    if not result_ids:
        return
    conn = _conn(db)
    dims = _dims(conn, run_id)
    blobs = (
        row[0]
        for row in conn.execute(
            "SELECT unit_max FROM results WHERE id IN (SELECT value FROM json_each(?)) ORDER BY id",
            [json.dumps(list(result_ids))],
        ).fetchall()
    )
    n, total, total_sq = sum_moments(blobs, dims)
    stored = {
        layer: (count, s, sq)
        for layer, count, s, sq in conn.execute(
            "SELECT layer, n, sum, sum_sq FROM unit_moments WHERE run_key = ?", [run_key]
        ).fetchall()
    }
    rows = []
    for layer in range(dims[0]):
        count, s, sq = n, total[layer], total_sq[layer]
        if layer in stored:
            old_n, old_s, old_sq = stored[layer]
            count += old_n
            s = s + np.frombuffer(old_s, dtype=np.float64)
            sq = sq + np.frombuffer(old_sq, dtype=np.float64)
        rows.append((run_key, layer, count, s.astype("<f8").tobytes(), sq.astype("<f8").tobytes()))
    conn.executemany(
        """INSERT INTO unit_moments (run_key, layer, n, sum, sum_sq) VALUES (?, ?, ?, ?, ?)
           ON CONFLICT (run_key, layer) DO UPDATE SET n = excluded.n, sum = excluded.sum, sum_sq = excluded.sum_sq""",
        rows,
    )


# -- reading ------------------------------------------------------------------------------------------------
def run_size(store: Store, run: Run) -> int:
    """How many results of the run the per-unit tables count (prevalence's denominator)."""
    run_key = run.key
    row = store.db.execute("SELECT max(n) FROM unit_moments WHERE run_key = ?", [run_key]).fetchone()
    return int(row[0] or 0)


def moments(store: Store, run: Run, layers: Iterable[int]) -> tuple[int, dict[int, tuple[np.ndarray, np.ndarray]]]:
    """(n, {layer: (mean, std)}) of unit_max over the run's results, for these layers (d_mlp values each; std
    NaN where n < 2 or the unit does not vary)."""
    run_key = run.key
    wanted = sorted({int(x) for x in layers})
    rows = store.db.execute(
        "SELECT layer, n, sum, sum_sq FROM unit_moments WHERE run_key = ? AND layer IN (SELECT value FROM json_each(?))",
        [run_key, json.dumps(wanted)],
    ).fetchall()
    out: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    n = 0
    for layer, count, s, sq in rows:
        n = max(n, int(count))
        mean = np.frombuffer(s, dtype=np.float64) / count
        mean_sq = np.frombuffer(sq, dtype=np.float64) / count
        var = np.maximum(mean_sq - mean * mean, 0.0)
        flat = (var <= _FLAT * mean_sq) | (count < 2)
        out[int(layer)] = (mean, np.where(flat, np.nan, np.sqrt(var)))
    return n, out


def lift(values: np.ndarray | float, mean: np.ndarray | float, std: np.ndarray | float) -> np.ndarray:
    """The z-score of each value against its unit's mean and std (NaN where std is NaN)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return (np.asarray(values, dtype=np.float64) - mean) / std


def generic_above(n: int, share: float = GENERIC_SHARE) -> float | None:
    """The n_top above which a unit is generic in a run of n results; None where the run is too small."""
    return share * n if n >= MIN_GENERIC_RESULTS else None


def annotate(rows: Iterable[dict[str, Any]], n: int, share: float = GENERIC_SHARE) -> list[dict[str, Any]]:
    """Rows with n_top (neuron listings), each given its prevalence (None in an empty run) and generic flag."""
    above = generic_above(n, share)
    out = []
    for row in rows:
        row["prevalence"] = row["n_top"] / n if n else None
        row["generic"] = above is not None and row["n_top"] > above
        out.append(row)
    return out


def unit_max_of(store: Store, result_id: int, dims: tuple[int, int]) -> np.ndarray:
    row = store.db.execute("SELECT unit_max FROM results WHERE id = ?", [result_id]).fetchone()
    return unpack_array(row[0], dims)


def unit_prevalence(
    store: Store,
    run: Run,
    layer: int,
    unit: int,
    n_top: int,
    result_ids: Sequence[int] = (),
    share: float = GENERIC_SHARE,
) -> dict[str, Any]:
    """One unit's prevalence, generic flag, mean and std of unit_max over the run, and its lift on each of
    `result_ids` ({result id: lift or None})."""
    shape = run.shape
    n, found = moments(store, run, [layer])
    mean, std = found.get(layer, (np.full(shape["d_mlp"], np.nan), np.full(shape["d_mlp"], np.nan)))
    above = generic_above(n, share)
    dims = (shape["n_layers"], shape["d_mlp"])
    lifts = {}
    for result_id in result_ids:
        blob = store.db.execute("SELECT unit_max FROM results WHERE id = ?", [result_id]).fetchone()[0]
        z = float(lift(unpack_value(blob, dims, layer, unit), mean[unit], std[unit]))
        lifts[result_id] = None if np.isnan(z) else z
    return {
        "n_results": n,
        "prevalence": n_top / n if n else None,
        "generic": above is not None and n_top > above,
        "unit_max_mean": None if np.isnan(mean[unit]) else float(mean[unit]),
        "unit_max_std": None if np.isnan(std[unit]) else float(std[unit]),
        "lifts": lifts,
    }


def _n_tops(store: Store, run_key: int, units: Sequence[tuple[int, int]]) -> list[int]:
    """neuron_stats.n_top of each (layer, unit), in order (0 for a unit without a row). CROSS JOIN (here and in
    specific_units): the list is the outer loop, each unit a primary-key lookup; SQLite's own plan scanned
    neuron_stats (6 s at GPT-J scale)."""
    found = dict(
        ((la, u), n)
        for la, u, n in store.db.execute(
            """SELECT s.layer, s.unit, s.n_top FROM json_each(?) tn
               CROSS JOIN neuron_stats s ON s.run_key = ? AND s.layer = json_extract(tn.value, '$[0]')
                                   AND s.unit = json_extract(tn.value, '$[1]')""",
            [json.dumps([list(x) for x in units]), run_key],
        ).fetchall()
    )
    return [found.get((la, u), 0) for la, u in units]


def image_generic_share(
    store: Store, run: Run, result_id: int, top: int | None = None, share: float = GENERIC_SHARE
) -> dict[str, Any]:
    """How much of an image's top-N triples (N = COUNT_TOP) belongs to the run's generic units, as the run's
    tables count now: distinct units and triples, generic ones of each, and the run size it is judged on
    (None shares where the run is too small to call any unit generic)."""
    from mmtui.store.results import COUNT_TOP

    run_key = run.key
    top = COUNT_TOP if top is None else top
    layer, unit, _patch, _score = (a[:top] for a in store.triples(result_id))
    units = sorted(set(zip(layer.tolist(), unit.tolist(), strict=True)))
    n = run_size(store, run)
    above = generic_above(n, share)
    generic = (
        {u for u, c in zip(units, _n_tops(store, run_key, units), strict=True) if c > above}
        if above is not None
        else set()
    )
    n_triples = sum((la, u) in generic for la, u in zip(layer.tolist(), unit.tolist(), strict=True))
    judged = above is not None
    return {
        "top": top,
        "units": len(units),
        "generic_units": len(generic) if judged else None,
        "triples": int(len(layer)),
        "generic_triples": n_triples if judged else None,
        "generic_share": (n_triples / len(layer) if len(layer) else 0.0) if judged else None,
        "run_results": n,
        "threshold": share,
    }


def _keys(layer: np.ndarray, unit: np.ndarray) -> np.ndarray:
    return layer.astype(np.int64) << 20 | unit.astype(np.int64)


def specific_units(
    store: Store,
    run: Run,
    image: str,
    *,
    layer: int | None = None,
    token: str | None = None,
    contains: bool = False,
    interpretable: bool | None = None,
    limit: int | None = 50,
    convention: str = "raw",
    share: float = GENERIC_SHARE,
) -> list[dict[str, Any]]:
    """`result_specific_units` of an image given by path, name or sha256 (its newest result in the run):
    `mmtui neurons --specific --image X`."""
    result_id = int(store.result(run.id, image)["id"])
    return result_specific_units(
        store,
        run,
        result_id,
        layer=layer,
        token=token,
        contains=contains,
        interpretable=interpretable,
        limit=limit,
        convention=convention,
        share=share,
    )


def result_specific_units(
    store: Store,
    run: Run,
    result_id: int,
    *,
    layer: int | None = None,
    token: str | None = None,
    contains: bool = False,
    interpretable: bool | None = None,
    limit: int | None = 50,
    convention: str = "raw",
    share: float = GENERIC_SHARE,
) -> list[dict[str, Any]]:
    """The units among a result's stored triples that are not generic, ranked by their lift on its image
    (highest first; units without a lift last, then by score): the rows of `list_neurons(image=...)` plus
    image_patch (of the unit's best triple there), prevalence, generic (False), unit_max (on this image) and
    lift. The CLI's `neurons --specific --image X` and the browser's image screen (`x`) both list these.

    Planned for speed at GPT-J scale (6,000 units an image): the run's generic units come from the n_top index
    (few), the lifts are numpy over all the image's units, and neuron_stats and the tokens are read for the
    rows returned only (with a token or interpretable filter, the tokens of every candidate first)."""
    run_key, shape, lm_id = run.key, run.shape, run.lm_id
    found = store.top_units(result_id)  # (layer, unit, best score, best rank, patch), by rank
    if layer is not None:
        found = [u for u in found if u[0] == layer]
    if not found:
        return []
    la, un = (np.array([u[i] for u in found], dtype=np.int64) for i in (0, 1))
    score, rank, patch = (np.array([u[i] for u in found]) for i in (2, 3, 4))
    n, stats = moments(store, run, set(la.tolist()))
    above = generic_above(n, share)
    keep = _not_generic(store, run_key, la, un, above)
    token = token_filter(token, contains)
    if token is not None or interpretable is not None:
        keep &= _passing(store, lm_id, convention, la, un, keep, token, contains, interpretable)
    nan = np.full(shape["d_mlp"], np.nan)
    mean = np.stack([stats.get(i, (nan, nan))[0] for i in range(shape["n_layers"])])
    std = np.stack([stats.get(i, (nan, nan))[1] for i in range(shape["n_layers"])])
    values = unit_max_of(store, result_id, (shape["n_layers"], shape["d_mlp"]))[la, un].astype(np.float64)
    z = lift(values, mean[la, un], std[la, un])
    order = np.lexsort((rank, -score, np.where(np.isnan(z), np.inf, -z)))  # lift desc (none last), score, rank
    order = order[keep[order]][:limit]
    found_stats = _aggregates(store, run_key, lm_id, convention, la[order], un[order])
    return [
        {
            "layer": int(la[i]),
            "unit": int(un[i]),
            "image_score": float(score[i]),
            "image_rank": int(rank[i]),
            "image_patch": int(patch[i]),
            **found_stats[(int(la[i]), int(un[i]))],
            "prevalence": found_stats[(int(la[i]), int(un[i]))]["n_top"] / n if n else None,
            "generic": False,
            "unit_max": float(values[i]),
            "lift": None if np.isnan(z[i]) else float(z[i]),
        }
        for i in order.tolist()
    ]


def _not_generic(store: Store, run_key: int, la: np.ndarray, un: np.ndarray, above: float | None) -> np.ndarray:
    """Which of the units (la, un) are not generic: in the top-N of at most `above` images (all, for None)."""
    keep = np.ones(len(la), dtype=bool)
    if above is not None:
        generic = store.db.execute(
            "SELECT layer, unit FROM neuron_stats WHERE run_key = ? AND n_top > ?", [run_key, above]
        ).fetchall()
        if generic:
            g = np.array(generic, dtype=np.int64)
            keep &= ~np.isin(_keys(la, un), _keys(g[:, 0], g[:, 1]))
    return keep


def _passing(
    store: Store, lm_id: str, convention: str, la: np.ndarray, un: np.ndarray, keep: np.ndarray,
    token: str | None, contains: bool, interpretable: bool | None,
) -> np.ndarray:  # fmt: skip
    """Which of the units (la, un) pass the token and interpretable filters, of those `keep` marks (their
    decoded tokens are read for those only)."""
    where, args = [], []  # type: list[str], list[Any]
    if token:  # the same filter as list_neurons: a whole token, or with `contains` any text (escaped)
        where, args = token_where(token, contains)
    if interpretable is not None:
        where.append("t.interpretable = ?")
        args.append(int(interpretable))
    passing = store.db.execute(
        f"""SELECT t.layer, t.unit FROM json_each(?) k CROSS JOIN neuron_tokens t
            ON t.lm_id = ? AND t.convention = ? AND t.layer = k.value >> 20 AND t.unit = k.value & 1048575
            {"WHERE " + " AND ".join(where) if where else ""}""",
        [json.dumps(_keys(la, un)[keep].tolist()), lm_id, convention, *args],
    ).fetchall()
    ok = np.array(passing, dtype=np.int64).reshape(-1, 2)
    return np.isin(_keys(la, un), _keys(ok[:, 0], ok[:, 1]))


def _aggregates(
    store: Store, run_key: int, lm_id: str, convention: str, la: np.ndarray, un: np.ndarray
) -> dict[tuple[int, int], dict[str, Any]]:
    """Per unit of (la, un): its aggregates and decoded tokens (read for these units only)."""
    rows = store.db.execute(
        """SELECT s.layer, s.unit, s.n_top, s.n_images, s.max_score, s.mean_score, t.tokens, t.interpretable
           FROM json_each(?) k CROSS JOIN neuron_stats s
               ON s.run_key = ? AND s.layer = k.value >> 20 AND s.unit = k.value & 1048575
           LEFT JOIN neuron_tokens t ON t.lm_id = ? AND t.convention = ? AND t.layer = s.layer
                                     AND t.unit = s.unit""",
        [json.dumps(_keys(la, un).tolist()), run_key, lm_id, convention],
    ).fetchall()
    return {
        (a, u): {
            "n_top": n_top,
            "n_images": n_images,
            "max_score": max_score,
            "mean_score": mean_score,
            "tokens": json.loads(tokens) if tokens else [],
            "interpretable": None if good is None else bool(good),
        }
        for a, u, n_top, n_images, max_score, mean_score, tokens, good in rows
    }
