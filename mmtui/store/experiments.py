"""Reads and writes of the experiment tables (migration m002): ablation points, unit means, activation maps,
decoded prompts, KS tests, specificity IoUs and Table 1 agreement scores.

Plain dicts and numpy arrays in and out; one transaction per call; never imports torch.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from mmtui.errors import NotFoundError
from mmtui.store import StackIdentity, Store
from mmtui.store.connection import _now

NO_SEED = -1  # the seed column of rows whose selection is deterministic (top, interpretable)


def settings_json(settings: dict[str, Any]) -> str:
    return json.dumps(settings, sort_keys=True, default=str)


def settings_id(settings: dict[str, Any]) -> str:
    """Short stable hash of the settings that make an experiment's rows comparable."""
    return hashlib.sha256(settings_json(settings).encode()).hexdigest()[:12]


def pack_f32(array: np.ndarray) -> bytes:
    return zlib.compress(np.ascontiguousarray(array, dtype=np.float32).tobytes(), 6)


def unpack_f32(blob: bytes, shape: Sequence[int]) -> np.ndarray:
    return np.frombuffer(zlib.decompress(blob), dtype=np.float32).reshape(tuple(shape)).copy()


# -- stacks and images (for experiments that do not start from an attribution run) ----------------------
def ensure_stack(store: Store, stack: StackIdentity) -> None:
    """Record a stack (as Store.ensure_run does) so that rows keyed by stack id have their parent."""
    with store.transaction():
        store.ensure_stack(stack)


def ensure_image(store: Store, *, sha256: str, path: str, width: int, height: int) -> None:
    with store.transaction():
        store.db.table("images").upsert(
            {"sha256": sha256, "path": path, "width": width, "height": height, "added": _now()}, pk="sha256"
        )


# -- results of a run ----------------------------------------------------------------------------------
def result_rows(store: Store, run_id: str, result_ids: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """Results of a run (all, or those ids in that order) with image path and size; context_ids parsed."""
    sql = """SELECT results.id, results.image_sha256, images.path, images.width, images.height, results.target,
                    results.target_token_id, results.target_token, results.context_ids, results.caption,
                    results.human_caption, results.p_target
             FROM results JOIN images ON images.sha256 = results.image_sha256 WHERE results.run_id = ?"""
    rows = {r["id"]: r for r in store.db.query(sql + " ORDER BY results.id", [run_id])}
    for row in rows.values():
        row["context_ids"] = json.loads(row["context_ids"] or "[]")
    if result_ids is None:
        return list(rows.values())
    missing = [i for i in result_ids if i not in rows]
    if missing:
        raise NotFoundError(f"no result with id {missing[0]} in run {run_id}; see `mmtui runs`")
    return [rows[i] for i in result_ids]


def result_ids_for_images(store: Store, run_id: str, sha256s: Sequence[str]) -> list[int]:
    """The newest result of each image (by sha256) in a run, in the order given; images without one are left out."""
    out = []
    for sha in sha256s:
        row = store.db.execute(
            "SELECT id FROM results WHERE run_id = ? AND image_sha256 = ? ORDER BY id DESC LIMIT 1", [run_id, sha]
        ).fetchone()
        if row is not None and row[0] not in out:
            out.append(int(row[0]))
    return out


def interpretable_units(store: Store, lm_id: str, convention: str = "raw") -> set[tuple[int, int]]:
    """(layer, unit) of every unit whose decoded tokens pass the 7-of-10 word filter."""
    rows = store.db.execute(
        "SELECT layer, unit FROM neuron_tokens WHERE lm_id = ? AND convention = ? AND interpretable = 1",
        [lm_id, convention],
    )
    return {(int(r[0]), int(r[1])) for r in rows}


def top_triples_array(store: Store, result_id: int, limit: int | None = None) -> np.ndarray:
    """The stored top triples of a result as an int array [N, 3] of (layer, unit, patch), by rank."""
    layer, unit, patch, _score = store.triples(result_id)
    return np.stack([layer, unit, patch], axis=1)[:limit]


# -- ablation ------------------------------------------------------------------------------------------
ABLATION_COLUMNS = (
    "run_id",
    "result_id",
    "mode",
    "unit_mode",
    "condition",
    "k",
    "seed",
    "n_ablated",
    "n_units",
    "p_before",
    "p_after",
    "relative_drop",
    "caption_before",
    "caption",
    "bertscore",
    "bertscore_model",
    "settings",
)


def add_ablation_points(store: Store, rows: Iterable[dict[str, Any]]) -> None:
    """Insert (or replace) ablation points in one transaction; keys as ABLATION_COLUMNS, seed None -> -1."""
    values = []
    for r in rows:
        row = dict(r)
        row["seed"] = NO_SEED if row.get("seed") is None else int(row["seed"])
        row["settings"] = settings_json(row.get("settings") or {})
        values.append([row[c] for c in ABLATION_COLUMNS] + [_now()])
    cols = ", ".join(ABLATION_COLUMNS) + ", created"
    marks = ", ".join("?" * (len(ABLATION_COLUMNS) + 1))
    with store.transaction():
        store.db.conn.executemany(f"INSERT OR REPLACE INTO ablation_points ({cols}) VALUES ({marks})", values)


def ablation_points(
    store: Store,
    run_id: str,
    *,
    mode: str | None = None,
    unit_mode: str | None = None,
    result_ids: Sequence[int] | None = None,
) -> list[dict[str, Any]]:
    """Stored ablation points of a run (seed -1 read back as None), ordered by result, condition, k, seed."""
    sql = """SELECT a.*, images.path AS image FROM ablation_points a
             JOIN results ON results.id = a.result_id JOIN images ON images.sha256 = results.image_sha256
             WHERE a.run_id = ?"""
    args: list[Any] = [run_id]
    if mode is not None:
        sql += " AND a.mode = ?"
        args.append(mode)
    if unit_mode is not None:
        sql += " AND a.unit_mode = ?"
        args.append(unit_mode)
    if result_ids is not None:
        sql += f" AND a.result_id IN ({', '.join('?' * len(result_ids))})"
        args.extend(int(i) for i in result_ids)
    rows = list(store.db.query(sql + " ORDER BY a.result_id, a.condition, a.k, a.seed", args))
    for row in rows:
        row["seed"] = None if row["seed"] == NO_SEED else row["seed"]
        row["settings"] = json.loads(row["settings"])
    return rows


def ablation_modes(store: Store, run_id: str) -> list[tuple[str, str, int]]:
    """(mode, unit_mode, number of images) of every ablation stored for a run."""
    rows = store.db.execute(
        "SELECT mode, unit_mode, count(DISTINCT result_id) FROM ablation_points WHERE run_id = ? "
        "GROUP BY mode, unit_mode ORDER BY count(*) DESC",
        [run_id],
    )
    return [(r[0], r[1], int(r[2])) for r in rows]


# -- unit means (mean ablation) --------------------------------------------------------------------------
def get_unit_means(store: Store, run_id: str, site: str, shape: Sequence[int]) -> tuple[np.ndarray, int] | None:
    row = store.db.execute(
        "SELECT means, n_images FROM unit_means WHERE run_id = ? AND site = ?", [run_id, site]
    ).fetchone()
    return None if row is None else (unpack_f32(row[0], shape), int(row[1]))


def put_unit_means(store: Store, run_id: str, site: str, means: np.ndarray, n_images: int) -> None:
    with store.transaction():
        store.db.execute(
            "INSERT OR REPLACE INTO unit_means (run_id, site, n_images, means, created) VALUES (?, ?, ?, ?, ?)",
            [run_id, site, n_images, pack_f32(means), _now()],
        )


# -- activation maps -----------------------------------------------------------------------------------
def put_activation_maps(
    store: Store, stack_id: str, image_sha256: str, site: str, units: Sequence[tuple[int, int]], maps: np.ndarray
) -> None:
    """maps: [n_units, grid_h, grid_w], one per unit in `units`."""
    _, grid_h, grid_w = maps.shape
    with store.transaction():
        store.db.conn.executemany(
            "INSERT OR REPLACE INTO activation_maps (stack_id, image_sha256, site, layer, unit, grid_h, grid_w, acts) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (stack_id, image_sha256, site, int(layer), int(unit), grid_h, grid_w, pack_f32(m))
                for (layer, unit), m in zip(units, maps, strict=True)
            ],
        )


def get_activation_maps(
    store: Store, stack_id: str, image_sha256: str, site: str, units: Sequence[tuple[int, int]]
) -> dict[tuple[int, int], np.ndarray]:
    """The stored maps among `units` ([grid_h, grid_w] each); missing units are absent from the dict."""
    found: dict[tuple[int, int], np.ndarray] = {}
    for layer, unit in units:
        row = store.db.execute(
            "SELECT grid_h, grid_w, acts FROM activation_maps WHERE stack_id = ? AND image_sha256 = ? AND site = ? "
            "AND layer = ? AND unit = ?",
            [stack_id, image_sha256, site, int(layer), int(unit)],
        ).fetchone()
        if row is not None:
            found[(int(layer), int(unit))] = unpack_f32(row[2], (row[0], row[1]))
    return found


# -- prompts and KS tests --------------------------------------------------------------------------------
PROMPT_COLUMNS = ("kind", "image_sha256", "idx", "text", "bertscore", "bertscore_model", "clipscore", "clipscore_model")


def add_prompt_texts(store: Store, stack_id: str, settings: dict[str, Any], rows: Iterable[dict[str, Any]]) -> None:
    sid, sjson = settings_id(settings), settings_json(settings)
    values = [[stack_id, sid, *[r.get(c) for c in PROMPT_COLUMNS], sjson, _now()] for r in rows]
    with store.transaction():
        store.db.conn.executemany(
            "INSERT OR REPLACE INTO prompt_texts (stack_id, settings_id, kind, image_sha256, idx, text, bertscore, "
            "bertscore_model, clipscore, clipscore_model, settings, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            values,
        )


def prompt_texts(store: Store, stack_id: str | None = None, settings_id_: str | None = None) -> list[dict[str, Any]]:
    """Stored prompt texts; by default those of the most recently written (stack, settings)."""
    if stack_id is None or settings_id_ is None:
        row = store.db.execute(
            "SELECT stack_id, settings_id FROM prompt_texts"
            + (" WHERE stack_id = ?" if stack_id else "")
            + " ORDER BY created DESC, id DESC LIMIT 1",
            [stack_id] if stack_id else [],
        ).fetchone()
        if row is None:
            return []
        stack_id, settings_id_ = row[0], row[1]
    return list(
        store.db.query(
            "SELECT * FROM prompt_texts WHERE stack_id = ? AND settings_id = ? ORDER BY kind, image_sha256, idx",
            [stack_id, settings_id_],
        )
    )


def put_ks_test(
    store: Store,
    *,
    experiment: str,
    scope: str,
    settings: dict[str, Any],
    metric: str,
    sample_a: str,
    sample_b: str,
    n_a: int,
    n_b: int,
    d: float,
    p: float,
    model: str | None,
) -> None:
    with store.transaction():
        store.db.execute(
            "INSERT OR REPLACE INTO ks_tests (experiment, scope, settings_id, metric, sample_a, sample_b, n_a, n_b, d, "
            "p, model, settings, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                experiment,
                scope,
                settings_id(settings),
                metric,
                sample_a,
                sample_b,
                n_a,
                n_b,
                d,
                p,
                model,
                settings_json(settings),
                _now(),
            ],
        )


def ks_tests(store: Store, experiment: str, scope: str | None = None) -> list[dict[str, Any]]:
    sql = "SELECT * FROM ks_tests WHERE experiment = ?"
    args: list[Any] = [experiment]
    if scope is not None:
        sql += " AND scope = ?"
        args.append(scope)
    return list(store.db.query(sql + " ORDER BY created DESC, id DESC", args))


# -- specificity -----------------------------------------------------------------------------------------
SPECIFICITY_COLUMNS = ("result_id", "category", "category_source", "kind", "seed", "layer", "unit", "iou")


def add_specificity(store: Store, run_id: str, settings: dict[str, Any], rows: Iterable[dict[str, Any]]) -> None:
    sid, sjson = settings_id(settings), settings_json(settings)
    values = []
    for r in rows:
        row = dict(r)
        row["seed"] = NO_SEED if row.get("seed") is None else int(row["seed"])
        values.append([run_id, sid, *[row[c] for c in SPECIFICITY_COLUMNS], sjson, _now()])
    with store.transaction():
        store.db.conn.executemany(
            "INSERT OR REPLACE INTO specificity (run_id, settings_id, result_id, category, category_source, kind, seed, "
            "layer, unit, iou, settings, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            values,
        )


def specificity_rows(store: Store, run_id: str, settings_id_: str | None = None) -> list[dict[str, Any]]:
    """IoU rows of a run; by default those of the most recently written settings."""
    if settings_id_ is None:
        row = store.db.execute(
            "SELECT settings_id FROM specificity WHERE run_id = ? ORDER BY created DESC, id DESC LIMIT 1", [run_id]
        ).fetchone()
        if row is None:
            return []
        settings_id_ = row[0]
    rows = list(
        store.db.query(
            "SELECT s.*, images.path AS image FROM specificity s JOIN results ON results.id = s.result_id "
            "JOIN images ON images.sha256 = results.image_sha256 WHERE s.run_id = ? AND s.settings_id = ? "
            "ORDER BY s.result_id, s.kind, s.seed, s.id",
            [run_id, settings_id_],
        )
    )
    for row in rows:
        row["seed"] = None if row["seed"] == NO_SEED else row["seed"]
    return rows


# -- agreement (Table 1) ---------------------------------------------------------------------------------
AGREEMENT_COLUMNS = ("result_id", "kind", "metric", "value", "model", "n_units", "best_text", "partner_result_id")


def add_agreement(store: Store, run_id: str, settings: dict[str, Any], rows: Iterable[dict[str, Any]]) -> None:
    sid, sjson = settings_id(settings), settings_json(settings)
    values = [[run_id, sid, *[r.get(c) for c in AGREEMENT_COLUMNS], sjson, _now()] for r in rows]
    with store.transaction():
        store.db.conn.executemany(
            "INSERT OR REPLACE INTO agreement (run_id, settings_id, result_id, kind, metric, value, model, n_units, "
            "best_text, partner_result_id, settings, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            values,
        )


def agreement_rows(store: Store, run_id: str, settings_id_: str | None = None) -> list[dict[str, Any]]:
    """Table 1 rows of a run; by default those of the most recently written settings."""
    if settings_id_ is None:
        row = store.db.execute(
            "SELECT settings_id FROM agreement WHERE run_id = ? ORDER BY created DESC, id DESC LIMIT 1", [run_id]
        ).fetchone()
        if row is None:
            return []
        settings_id_ = row[0]
    return list(
        store.db.query(
            "SELECT * FROM agreement WHERE run_id = ? AND settings_id = ? ORDER BY result_id, kind, metric",
            [run_id, settings_id_],
        )
    )
