"""The store's side of `mmtui explain` (migration m011): reading each unit's best images, the run's captions and
unit_max, and writing and reading the units' data labels (unit_labels) and category AUROCs (category_auroc).
The computation is mmtui.experiments.explain; this module only moves rows. Never imports torch.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from mmtui.store.arrays import unpack_array, unpack_unit_images
from mmtui.store.core import Store

if TYPE_CHECKING:
    from scipy import sparse

KINDS = ("word", "category")
LABEL_COLUMNS = ("layer", "unit", "label", "k", "n", "k_all", "n_all", "p", "q", "source", "n_results", "agreement")
_SELECT = (
    "layer, unit, label, k, n, k_all AS K, n_all AS N, p, q, source, n_results, agreement"  # K, N: the code's names
)


@dataclass
class BestImages:
    """Each unit's best results in a run as a 0/1 table: rows = units (layer, unit), columns = `result_ids`."""

    layer: np.ndarray
    unit: np.ndarray
    result_ids: np.ndarray  # the run's results, ascending
    table: sparse.csr_matrix  # [n_units, n_results]


def best_images(store: Store, run_id: str) -> BestImages:
    """Every unit's best images (neuron_images) over the run's results."""
    from scipy import sparse

    run_key = store.run_key(run_id)
    result_ids = np.array(
        [r[0] for r in store.db.execute("SELECT id FROM results WHERE run_id = ? ORDER BY id", [run_id])],
        dtype=np.int64,
    )
    rows = store.db.execute(
        "SELECT layer, unit, best FROM neuron_images WHERE run_key = ? ORDER BY layer, unit", [run_key]
    ).fetchall()
    layer = np.array([r[0] for r in rows], dtype=np.int64)
    unit = np.array([r[1] for r in rows], dtype=np.int64)
    entries, counts = unpack_unit_images([r[2] for r in rows])
    cols = np.searchsorted(result_ids, entries["result"].astype(np.int64))
    known = (cols < len(result_ids)) & (result_ids[np.minimum(cols, max(len(result_ids) - 1, 0))] == entries["result"])
    owners = np.repeat(np.arange(len(rows)), counts)
    table = sparse.csr_matrix(
        (np.ones(int(known.sum()), dtype=np.int32), (owners[known], cols[known])), shape=(len(rows), len(result_ids))
    )
    return BestImages(layer, unit, result_ids, table)


def result_texts(store: Store, run_id: str) -> list[dict[str, Any]]:
    """The run's results in id order: id, path, the model's caption and the human caption (or None)."""
    return list(
        store.db.query(
            """SELECT results.id, images.path, results.caption, results.human_caption
               FROM results JOIN images ON images.sha256 = results.image_sha256
               WHERE results.run_id = ? ORDER BY results.id""",
            [run_id],
        )
    )


def unit_max_matrix(store: Store, run_id: str, result_ids: Sequence[int], dims: tuple[int, int]) -> np.ndarray:
    """unit_max of each result, flattened: [len(result_ids), n_layers * d_mlp] float32 (unit = layer * d_mlp + u)."""
    out = np.zeros((len(result_ids), dims[0] * dims[1]), dtype=np.float32)
    at = {int(r): i for i, r in enumerate(result_ids)}
    for rid, blob in store.db.execute("SELECT id, unit_max FROM results WHERE run_id = ?", [run_id]):
        if rid in at:
            out[at[rid]] = unpack_array(blob, dims).reshape(-1)
    return out


def n_results(store: Store, run_id: str) -> int:
    return int(store.db.execute("SELECT count(*) FROM results WHERE run_id = ?", [run_id]).fetchone()[0])


# -- labels ---------------------------------------------------------------------------------------------
def computed_on(store: Store, run_key: int) -> dict[str, tuple[int, str]]:
    """Per kind stored: (the run's results when computed, source of the terms). One row of each (kind, control)
    through the primary key (every row of one write carries the same figures); where the real labels and the
    control were computed on different run sizes, the smaller counts (the kind is then recomputed)."""
    out: dict[str, tuple[int, str]] = {}
    for kind in KINDS:
        found = [
            store.db.execute(
                "SELECT n_results, source FROM unit_labels WHERE run_key = ? AND kind = ? AND control = ? LIMIT 1",
                [run_key, kind, control],
            ).fetchone()
            for control in (0, 1)
        ]
        rows = [r for r in found if r is not None]
        if rows:
            out[kind] = (min(int(r[0]) for r in rows), max(r[1] for r in rows))
    return out


def write_labels(store: Store, run_key: int, kind: str, control: int, rows: Sequence[Sequence[Any]]) -> None:
    """Replace the run's labels of this kind and control flag: rows of LABEL_COLUMNS."""
    if kind not in KINDS:
        raise ValueError(f"unknown label kind {kind!r}")
    with store._write():
        store.db.execute(
            "DELETE FROM unit_labels WHERE run_key = ? AND kind = ? AND control = ?", [run_key, kind, control]
        )
        store.db.conn.executemany(
            f"""INSERT INTO unit_labels (run_key, kind, control, {", ".join(LABEL_COLUMNS)})
                VALUES (?, ?, ?, {", ".join("?" * len(LABEL_COLUMNS))})""",
            ((run_key, kind, control, *r) for r in rows),
        )


def labels(
    store: Store,
    run_key: int,
    *,
    kind: str | None = None,
    control: int = 0,
    fdr: float | None = None,
    layer: int | None = None,
    label: str | None = None,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """Stored labels, least q first: dicts of kind, control and LABEL_COLUMNS. fdr: only q below it."""
    where: list[str] = ["run_key = ?", "control = ?"]
    args: list[Any] = [run_key, control]
    for column, value in (("kind", kind), ("layer", layer), ("lower(label)", label.lower() if label else None)):
        if value is not None:
            where.append(f"{column} = ?")
            args.append(value)
    if fdr is not None:
        where.append("q < ?")
        args.append(fdr)
    sql = f"""SELECT kind, control, {_SELECT} FROM unit_labels WHERE {" AND ".join(where)}
              ORDER BY q, p, layer, unit"""
    if limit is not None:
        sql += f" LIMIT {int(limit)}"
    return list(store.db.query(sql, args))


def unit_labels(store: Store, run_key: int, layer: int, unit: int) -> list[dict[str, Any]]:
    """A unit's stored labels (not the controls), one per kind. The kinds are named (KINDS) so that each is a
    primary-key lookup: without kind, the query walked every label of the run (917K rows at GPT-J scale)."""
    return list(
        store.db.query(
            f"""SELECT kind, {_SELECT} FROM unit_labels
                WHERE run_key = ? AND kind IN (SELECT value FROM json_each(?)) AND control = 0 AND layer = ?
                      AND unit = ? ORDER BY kind""",
            [run_key, json.dumps(KINDS), layer, unit],
        )
    )


def best_labels(
    store: Store, run_key: int, units: Sequence[tuple[int, int]], fdr: float
) -> dict[tuple[int, int], dict[str, Any]]:
    """The data label of each of these units that beats chance (q < fdr; of its kinds, the least q): a page of
    the browser's neuron table. Units without one are left out."""
    found: dict[tuple[int, int], dict[str, Any]] = {}
    if not units:
        return found
    for row in store.db.query(
        f"""SELECT l.kind, {", ".join("l." + c for c in _SELECT.split(", "))} FROM json_each(?) j
            CROSS JOIN unit_labels l ON l.run_key = ? AND l.control = 0
                AND l.layer = json_extract(j.value, '$[0]') AND l.unit = json_extract(j.value, '$[1]')
            WHERE l.q < ? ORDER BY l.q DESC""",
        [json.dumps([list(u) for u in units]), run_key, fdr],
    ):
        found[(row["layer"], row["unit"])] = row  # least q last: it stays
    return found


def set_agreement(store: Store, run_key: int, kind: str, rows: Sequence[tuple[int, int, float | None]]) -> None:
    """Store the BERTScore of labels against decoded tokens: (layer, unit, F1 or None)."""
    with store._write():
        store.db.conn.executemany(
            "UPDATE unit_labels SET agreement = ? WHERE run_key = ? AND kind = ? AND control = 0 AND layer = ? AND unit = ?",
            ((f, run_key, kind, la, u) for la, u, f in rows),
        )


def kind_counts(store: Store, run_key: int, kind: str, fdr: float) -> dict[str, Any]:
    """A kind's stored labels: source, N, units labelled at all, those with q < fdr, and the least p, real and
    shuffled. Each figure is a range or an end of the (run_key, kind, control, q | p) indexes (m012), not an
    aggregate over every stored label."""
    where = "FROM unit_labels WHERE run_key = ? AND kind = ? AND control = ?"

    def one(sql: str, control: int, *args: Any) -> Any:
        row = store.db.execute(f"{sql} {where}{' AND q < ?' if args else ''}", [run_key, kind, control, *args])
        return row.fetchone()

    first = store.db.execute(
        "SELECT source, n_all FROM unit_labels WHERE run_key = ? AND kind = ? LIMIT 1", [run_key, kind]
    ).fetchone()

    def least_p(control: int) -> float:
        row = store.db.execute(f"SELECT min(p) {where}", [run_key, kind, control]).fetchone()
        return 1.0 if row is None or row[0] is None else float(row[0])

    return {
        "source": first[0] if first else None,
        "N": int(first[1]) if first else 0,
        "units": int(one("SELECT count(*)", 0)[0]),
        "labelled": int(one("SELECT count(*)", 0, fdr)[0]),
        "shuffled": int(one("SELECT count(*)", 1, fdr)[0]),
        "best_p": least_p(0),
        "best_p_shuffled": least_p(1),
    }


def labels_per_layer(store: Store, run_key: int, fdr: float) -> list[dict[str, Any]]:
    """Per kind and layer: units with a stored label, and those with q < fdr, real and shuffled."""
    return list(
        store.db.query(
            """SELECT kind, layer,
                      sum(control = 0) AS units,
                      sum(control = 0 AND q < ?) AS labelled,
                      sum(control = 1 AND q < ?) AS shuffled
               FROM unit_labels WHERE run_key = ? GROUP BY kind, layer ORDER BY kind, layer""",
            [fdr, fdr, run_key],
        )
    )


def labelled_neurons(
    store: Store,
    run_key: int,
    lm_id: str,
    label: str,
    *,
    fdr: float,
    layer: int | None = None,
    limit: int | None = None,
    convention: str = "raw",
) -> list[dict[str, Any]]:
    """The units labelled `label` (q < fdr, case-insensitive), least q first, with their aggregates and decoded
    tokens: the rows of `neurons --label`."""
    where, args = ["l.run_key = ?", "l.control = 0", "lower(l.label) = ?", "l.q < ?"], [run_key, label.lower(), fdr]
    if layer is not None:
        where.append("l.layer = ?")
        args.append(layer)
    sql = f"""SELECT l.layer, l.unit, s.n_top, s.n_images, s.max_score, s.mean_score, t.tokens, t.interpretable,
                     l.kind, l.label, l.k, l.n, l.k_all AS K, l.n_all AS N, l.p, l.q, l.agreement
              FROM unit_labels l
              JOIN neuron_stats s ON s.run_key = l.run_key AND s.layer = l.layer AND s.unit = l.unit
              LEFT JOIN neuron_tokens t ON t.lm_id = ? AND t.convention = ? AND t.layer = l.layer AND t.unit = l.unit
              WHERE {" AND ".join(where)} ORDER BY l.q, l.p, l.layer, l.unit"""
    if limit is not None:
        sql += f" LIMIT {int(limit)}"
    rows = list(store.db.query(sql, [lm_id, convention, *args]))
    for row in rows:
        row["tokens"] = json.loads(row["tokens"]) if row["tokens"] else []
        row["interpretable"] = bool(row["interpretable"]) if row["interpretable"] is not None else None
    return rows


# -- category AUROC -------------------------------------------------------------------------------------
AUROC_COLUMNS = ("category", "rank", "layer", "unit", "auroc", "n_pos", "N", "n_results")


def write_auroc(store: Store, run_key: int, control: int, rows: Sequence[Sequence[Any]]) -> None:
    """Replace the run's category AUROCs of this control flag: rows of AUROC_COLUMNS."""
    with store._write():
        store.db.execute("DELETE FROM category_auroc WHERE run_key = ? AND control = ?", [run_key, control])
        store.db.conn.executemany(
            f"""INSERT INTO category_auroc (run_key, control, {", ".join(AUROC_COLUMNS)})
                VALUES (?, ?, {", ".join("?" * len(AUROC_COLUMNS))})""",
            ((run_key, control, *r) for r in rows),
        )


def auroc_rows(store: Store, run_key: int) -> list[dict[str, Any]]:
    """Stored category AUROCs: control, and AUROC_COLUMNS, by control, category and rank."""
    return list(
        store.db.query(
            f"""SELECT control, {", ".join(AUROC_COLUMNS)} FROM category_auroc WHERE run_key = ?
                ORDER BY control, category, rank""",
            [run_key],
        )
    )


def decoded_tokens(
    store: Store, lm_id: str, units: Sequence[tuple[int, int]], convention: str = "raw"
) -> list[list[str]]:
    """The decoded tokens of each (layer, unit) ([] where not decoded)."""
    found: dict[tuple[int, int], list[str]] = {}
    units = list(units)
    for batch in (units[a : a + 500] for a in range(0, len(units), 500)):
        for layer, unit, tokens in store.db.execute(
            """SELECT t.layer, t.unit, t.tokens FROM json_each(?) j JOIN neuron_tokens t
               ON t.lm_id = ? AND t.convention = ? AND t.layer = json_extract(j.value, '$[0]')
               AND t.unit = json_extract(j.value, '$[1]')""",
            [json.dumps([list(u) for u in batch]), lm_id, convention],
        ):
            found[(layer, unit)] = json.loads(tokens)
    return [found.get((int(la), int(u)), []) for la, u in units]
