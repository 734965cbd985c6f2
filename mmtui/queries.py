"""Read-only views of the store shared by the CLI and the TUI: plain dicts with stable keys, streamed.

A neuron is (layer, unit), both 0-based; in JSON the unit's key is "neuron" (as `mmtui neuron LAYER INDEX`).
Never imports torch.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from mmtui.errors import NotFoundError
from mmtui.store import Store

SORTS = {"score": "max_score", "count": "n_top", "mean": "mean_score"}


def _tokens(store: Store, lm_id: str, convention: str, layer: int, unit: int, n: int = 10) -> list[str]:
    found = store.tokens(lm_id, convention, layer, unit)
    return [t for t in found["tokens"][:n]] if found else []


def image_summary(
    store: Store, run: dict[str, Any], result_id: int, top: int = 10, convention: str = "raw"
) -> dict[str, Any]:
    """One image's result: target, P(target), caption and its top triples with decoded tokens."""
    row = store.db.execute(
        """SELECT images.path, results.image_sha256, results.target, results.target_token_id, results.target_token,
                  results.target_source, results.caption, results.human_caption, results.p_target, results.y_c
           FROM results JOIN images ON images.sha256 = results.image_sha256 WHERE results.id = ?""",
        [result_id],
    ).fetchone()
    if row is None:
        raise NotFoundError(f"no result with id {result_id}")
    keys = (
        "image",
        "sha256",
        "target",
        "target_token_id",
        "target_token",
        "target_source",
        "caption",
        "human_caption",
        "p_target",
        "y_c",
    )
    out = dict(zip(keys, row, strict=True))
    out["y_kind"] = run["y_kind"]
    out["run"] = run["id"]
    out["top"] = [
        {
            "layer": t["layer"],
            "neuron": t["unit"],
            "patch": t["patch"],
            "score": t["score"],
            "tokens": _tokens(store, run["lm_id"], convention, t["layer"], t["unit"]),
        }
        for t in store.top_triples(result_id, top)
    ]
    return out


def list_neurons(
    store: Store,
    run: dict[str, Any],
    *,
    layer: int | None = None,
    image: str | None = None,
    sort: str = "score",
    token: str | None = None,
    interpretable: bool | None = None,
    limit: int | None = 50,
    convention: str = "raw",
) -> Iterator[dict[str, Any]]:
    """Units of a run with their aggregates and decoded tokens, best first.

    image: only the units among that image's stored triples (score = the unit's best triple there).
    token: only units whose decoded tokens contain this text (case-insensitive).
    """
    if sort not in SORTS:
        raise NotFoundError(f"unknown sort {sort!r}; use one of {', '.join(SORTS)}")
    filters, filter_args = [], []
    if layer is not None:
        filters.append("s.layer = ?")
        filter_args.append(layer)
    if token:
        filters.append("t.text LIKE ?")
        filter_args.append(f"%{token}%")
    if interpretable is not None:
        filters.append("t.interpretable = ?")
        filter_args.append(int(interpretable))
    tokens_join = (
        "LEFT JOIN neuron_tokens t ON t.lm_id = ? AND t.convention = ? AND t.layer = s.layer AND t.unit = s.unit"
    )
    if image is not None:
        result = store.result(run["id"], image)
        sql = f"""
            SELECT s.layer, s.unit, max(tn.score) AS image_score, min(tn.rank) AS image_rank, s.n_top, s.n_images,
                   s.max_score, s.mean_score, t.tokens, t.interpretable
            FROM top_neurons tn
            JOIN neuron_stats s ON s.run_id = ? AND s.layer = tn.layer AND s.unit = tn.unit
            {tokens_join}
            WHERE {" AND ".join(["tn.result_id = ?", *filters])}
            GROUP BY s.layer, s.unit ORDER BY image_score DESC"""
        params = [run["id"], run["lm_id"], convention, result["id"], *filter_args]
    else:
        sql = f"""
            SELECT s.layer, s.unit, s.n_top, s.n_images, s.max_score, s.mean_score, t.tokens, t.interpretable
            FROM neuron_stats s
            {tokens_join}
            WHERE {" AND ".join(["s.run_id = ?", *filters])}
            ORDER BY s.{SORTS[sort]} DESC, s.layer, s.unit"""
        params = [run["lm_id"], convention, run["id"], *filter_args]
    if limit is not None:
        sql += f" LIMIT {int(limit)}"
    for row in store.db.query(sql, params):
        row["neuron"] = row.pop("unit")
        row["tokens"] = json.loads(row["tokens"]) if row["tokens"] else []
        row["interpretable"] = bool(row["interpretable"]) if row["interpretable"] is not None else None
        yield row


def neuron_detail(store: Store, run: dict[str, Any], layer: int, unit: int, *, top_images: int = 10) -> dict[str, Any]:
    """One unit: decoded tokens (every stored convention), aggregates, and the images where it ranks highest."""
    shape = run["shape"]
    if not (0 <= layer < shape["n_layers"] and 0 <= unit < shape["d_mlp"]):
        raise NotFoundError(
            f"no neuron L{layer}.u{unit}: this stack has layers 0-{shape['n_layers'] - 1} and units 0-{shape['d_mlp'] - 1}"
        )
    stats = store.db.execute(
        "SELECT n_top, n_images, max_score, mean_score FROM neuron_stats WHERE run_id = ? AND layer = ? AND unit = ?",
        [run["id"], layer, unit],
    ).fetchone()
    decoded = {c: store.tokens(run["lm_id"], c, layer, unit) for c in store.conventions(run["lm_id"])}
    images = list(
        store.db.query(
            """SELECT images.path AS image, results.image_sha256 AS sha256, results.id AS result_id, results.target,
                      results.caption, results.p_target, max(tn.score) AS score, min(tn.rank) AS rank,
                      (SELECT patch FROM top_neurons p WHERE p.result_id = tn.result_id AND p.layer = tn.layer
                         AND p.unit = tn.unit ORDER BY p.rank LIMIT 1) AS patch
               FROM top_neurons tn
               JOIN results ON results.id = tn.result_id
               JOIN images ON images.sha256 = results.image_sha256
               WHERE tn.layer = ? AND tn.unit = ? AND results.run_id = ?
               GROUP BY tn.result_id ORDER BY score DESC LIMIT ?""",
            [layer, unit, run["id"], top_images],
        )
    )
    keys = ("n_top", "n_images", "max_score", "mean_score")
    return {
        "layer": layer,
        "neuron": unit,
        "run": run["id"],
        "stats": dict(zip(keys, stats, strict=True)) if stats else {k: 0 for k in keys},
        "decoded": decoded,
        "images": images,
    }
