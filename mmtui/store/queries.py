"""Read-only views of the store shared by the CLI and the TUI: plain dicts with stable keys, streamed.

A neuron is (layer, unit), both 0-based, under the keys "layer" and "unit" in every row (and every --json line).
Never imports torch.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any

from mmtui.defaults import NEURON_IMAGES
from mmtui.errors import NotFoundError
from mmtui.store import Run, Store
from mmtui.store.filters import neuron_query, token_filter, token_where
from mmtui.store.records import check_neuron

SORTS = {"score": "max", "count": "top", "mean": "mean"}  # the CLI's sorts as columns of NEURON_COLUMNS


def _tokens(store: Store, lm_id: str, convention: str, layer: int, unit: int, n: int = 10) -> list[str]:
    found = store.tokens(lm_id, convention, layer, unit)
    return [t for t in found["tokens"][:n]] if found else []


def image_summary(store: Store, run: Run, result_id: int, top: int = 10, convention: str = "raw") -> dict[str, Any]:
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
    out["y_kind"] = run.y_kind
    out["run"] = run.id
    out["top"] = [
        {
            "layer": t["layer"],
            "unit": t["unit"],
            "patch": t["patch"],
            "score": t["score"],
            "tokens": _tokens(store, run.lm_id, convention, t["layer"], t["unit"]),
        }
        for t in store.top_triples(result_id, top)
    ]
    return out


def list_neurons(
    store: Store,
    run: Run,
    *,
    layer: int | None = None,
    image: str | None = None,
    sort: str = "score",
    token: str | None = None,
    contains: bool = False,
    interpretable: bool | None = None,
    limit: int | None = 50,
    convention: str = "raw",
    max_n_top: float | None = None,
) -> Iterator[dict[str, Any]]:
    """Units of a run with their aggregates and decoded tokens, best first: the browser's `neuron_page`
    sorted by `sort` (SORTS), one token filter for both.

    image: only the units among that image's stored triples (score = the unit's best triple there).
    token: only units with a decoded token equal to it (case-insensitive, whitespace around the token
    ignored); with `contains`, units whose decoded tokens' text contains it.
    max_n_top: only units in the top-N of at most this many images (the generic ones left out: prevalence.py).
    """
    if sort not in SORTS:
        raise NotFoundError(f"unknown sort {sort!r}; use one of {', '.join(SORTS)}")
    if image is None:
        rows = neuron_page(
            store,
            run,
            sort=SORTS[sort],
            layer=layer,
            token=token,
            contains=contains,
            interpretable=interpretable,
            limit=limit,
            convention=convention,
            max_n_top=max_n_top,
        )
        for row in rows:
            del row["text"]
            yield row
        return
    filters: list[str] = []
    filter_args: list[Any] = []
    if layer is not None:
        filters.append("s.layer = ?")
        filter_args.append(layer)
    token = token_filter(token, contains)
    if token:
        where, args = token_where(token, contains)
        filters += where
        filter_args += args
    if interpretable is not None:
        filters.append("t.interpretable = ?")
        filter_args.append(int(interpretable))
    if max_n_top is not None:  # `+`: no index on it, so the sort's index is walked (SQLite took n_top's: 8 s)
        filters.append("+s.n_top <= ?")
        filter_args.append(max_n_top)
    result = store.result(run.id, image)
    units = [u[:4] for u in store.top_units(result["id"])]  # (layer, unit, best score, best rank)
    sql = f"""
        SELECT s.layer, s.unit, json_extract(tn.value, '$[2]') AS image_score,
               json_extract(tn.value, '$[3]') AS image_rank, s.n_top, s.n_images,
               s.max_score, s.mean_score, t.tokens, t.interpretable
        FROM json_each(?) tn
        JOIN neuron_stats s ON s.run_key = ? AND s.layer = json_extract(tn.value, '$[0]')
                            AND s.unit = json_extract(tn.value, '$[1]')
        LEFT JOIN neuron_tokens t ON t.lm_id = ? AND t.convention = ? AND t.layer = s.layer AND t.unit = s.unit
        {"WHERE " + " AND ".join(filters) if filters else ""}
        ORDER BY image_score DESC, image_rank"""
    params = [json.dumps(units), run.key, run.lm_id, convention, *filter_args]
    if limit is not None:
        sql += f" LIMIT {int(limit)}"
    for row in store.db.query(sql, params):
        row["tokens"] = json.loads(row["tokens"]) if row["tokens"] else []
        row["interpretable"] = bool(row["interpretable"]) if row["interpretable"] is not None else None
        yield row


def neuron_detail(store: Store, run: Run, layer: int, unit: int, *, top_images: int = 10) -> dict[str, Any]:
    """One unit: decoded tokens (every stored convention), aggregates, and the images where it ranks highest
    (at most NEURON_IMAGES = 20: the cache keeps each unit's best 20 results)."""
    check_neuron(layer, unit, run.shape)
    stats = store.db.execute(
        "SELECT n_top, n_images, max_score, mean_score FROM neuron_stats WHERE run_key = ? AND layer = ? AND unit = ?",
        [run.key, layer, unit],
    ).fetchone()
    decoded = {c: store.tokens(run.lm_id, c, layer, unit) for c in store.conventions(run.lm_id)}
    best = store.best_images(run.key, layer, unit)[: min(top_images, NEURON_IMAGES)]
    listed = {
        row["result_id"]: row
        for row in store.db.query(
            """SELECT images.path AS image, results.image_sha256 AS sha256, results.id AS result_id, results.target,
                      results.caption, results.p_target
               FROM results JOIN images ON images.sha256 = results.image_sha256
               WHERE results.id IN (SELECT value FROM json_each(?))""",
            [json.dumps(best["result"].tolist())],
        )
    }
    images = [
        {**listed[result], "score": score, "rank": rank, "patch": patch}
        for result, score, rank, patch in best.tolist()
        if result in listed
    ]
    keys = ("n_top", "n_images", "max_score", "mean_score")
    return {
        "layer": layer,
        "unit": unit,
        "run": run.id,
        "stats": dict(zip(keys, stats, strict=True)) if stats else {k: 0 for k in keys},
        "decoded": decoded,
        "images": images,
    }


# -- the browser's queries (mmtui browse): any column, either direction, a page at a time -------------------
NEURON_COLUMNS = {
    "layer": "s.layer",
    "neuron": "s.unit",
    "max": "s.max_score",
    "mean": "s.mean_score",
    "top": "s.n_top",
    "images": "s.n_images",
    "tokens": "t.text",
}
_AGGREGATES = ("s.max_score", "s.mean_score", "s.n_top", "s.n_images")  # indexed over all layers only (m009)


def _by_layer_rows(column: str, layer: int | None) -> str:
    """The ORDER BY term for a sort by `column`. Within one layer, `+column`: SQLite then reads the layer's rows
    by the primary key and sorts them (a few ms at GPT-J scale), rather than walking the run's all-layers index
    on the column past every other layer's units (150 ms deep in a page); m009 dropped the per-layer indexes."""
    return f"+{column}" if layer is not None and column in _AGGREGATES else column


def neuron_page(
    store: Store,
    run: Run,
    *,
    sort: str = "max",
    descending: bool = True,
    layer: int | None = None,
    token: str | None = None,
    contains: bool = False,
    interpretable: bool | None = None,
    limit: int | None = 500,
    offset: int = 0,
    convention: str = "raw",
    max_n_top: float | None = None,
) -> list[dict[str, Any]]:
    """One page of a run's units sorted by any column of NEURON_COLUMNS, either direction (ties: layer, unit).

    Rows: layer, unit, max_score, mean_score, n_top, n_images, text (decoded tokens joined by ", ", or None),
    interpretable (None when not decoded), tokens (the decoded tokens, [] when not decoded). token: units with a
    decoded token equal to it (case-insensitive, whitespace around the token ignored); with `contains`, units
    whose decoded tokens' text contains it. Sorting by tokens lists the decoded units only. limit None: all.
    """
    if sort not in NEURON_COLUMNS:
        raise NotFoundError(f"unknown sort column {sort!r}; use one of {', '.join(NEURON_COLUMNS)}")
    stats = "s.layer, s.unit, s.max_score, s.mean_score, s.n_top, s.n_images"
    order = "DESC" if descending else "ASC"
    ties = {"layer": f", s.unit {order}", "neuron": f", s.layer {order}"}.get(sort, ", s.layer, s.unit")
    order_by = f" ORDER BY {_by_layer_rows(NEURON_COLUMNS[sort], layer)} {order}{ties}"
    sql, args, joined = neuron_query(
        store,
        run,
        stats,
        tokens_select=", t.text, t.interpretable, t.tokens",
        layer=layer,
        token=token,
        contains=contains,
        interpretable=interpretable,
        convention=convention,
        by_text=sort == "tokens",
        max_n_top=max_n_top,
    )
    page = f"{sql}{order_by} LIMIT ? OFFSET ?"
    if not joined:  # cut the page first, then look up the tokens of its rows only
        page = (
            f"SELECT {stats}, t.text, t.interpretable, t.tokens FROM ({page}) s LEFT JOIN neuron_tokens t"
            f" ON t.lm_id = ? AND t.convention = ? AND t.layer = s.layer AND t.unit = s.unit{order_by}"
        )
        args = [*args, -1 if limit is None else int(limit), int(offset), run.lm_id, convention]
    else:
        args = [*args, -1 if limit is None else int(limit), int(offset)]
    rows = store.db.execute(page, args).fetchall()
    keys = ("layer", "unit", "max_score", "mean_score", "n_top", "n_images", "text", "interpretable", "tokens")
    out = [dict(zip(keys, row, strict=True)) for row in rows]
    for row in out:
        row["interpretable"] = None if row["interpretable"] is None else bool(row["interpretable"])
        row["tokens"] = json.loads(row["tokens"]) if row["tokens"] else []
    return out


def count_neurons(
    store: Store,
    run: Run,
    *,
    layer: int | None = None,
    token: str | None = None,
    contains: bool = False,
    interpretable: bool | None = None,
    convention: str = "raw",
    max_n_top: float | None = None,
) -> int:
    """How many units `neuron_page` pages through with these filters. A token common to most units takes a
    few hundred ms at GPT-J scale (the browser counts in the background, after showing the page)."""
    sql, args, _ = neuron_query(
        store,
        run,
        "count(*)",
        layer=layer,
        token=token,
        contains=contains,
        interpretable=interpretable,
        convention=convention,
        max_n_top=max_n_top,
    )
    return int(store.db.execute(sql, args).fetchone()[0])


def layer_counts(store: Store, run: Run) -> list[dict[str, Any]]:
    """Every layer of the run's stack: units stored (n_units) and units among some image's top 100 (n_top_units)."""
    rows = store.db.execute(
        """SELECT layer, count(*), sum(n_top > 0) FROM neuron_stats WHERE run_key = ? GROUP BY layer""",
        [run.key],
    ).fetchall()
    found = {r[0]: (r[1], r[2] or 0) for r in rows}
    return [
        {"layer": layer, "n_units": found.get(layer, (0, 0))[0], "n_top_units": found.get(layer, (0, 0))[1]}
        for layer in range(run.shape["n_layers"])
    ]


# -- reads for the experiments (layers, agreement) -----------------------------------------------------------
def result_ids(store: Store, run_id: str) -> list[int]:
    """The ids of a run's results, in storing order."""
    return [r[0] for r in store.db.execute("SELECT id FROM results WHERE run_id = ? ORDER BY id", [run_id])]


def layer_top_counts(store: Store, run: Run, convention: str) -> list[tuple[int, int, int, int, int]] | None:
    """Per layer with some unit in an image's first COUNT_TOP triples, from the fold: (layer, distinct units,
    sum of their n_top, distinct interpretable units, their n_top summed), a unit being interpretable where its
    decoded tokens in `convention` pass the word filter. One grouped query (0.3 s at GPT-J scale; reading the
    60K units and their tokens into Python took 0.8 s). None where some result is not folded yet (a read-only
    cache of an interrupted run): the caller then counts from the results' triples."""
    if store.pending_stats(run.id):
        return None
    rows = store.db.execute(
        """SELECT s.layer, count(*), sum(s.n_top), sum(coalesce(t.interpretable, 0)),
                  sum(s.n_top * coalesce(t.interpretable, 0))
           FROM neuron_stats s
           LEFT JOIN neuron_tokens t ON t.lm_id = ? AND t.convention = ? AND t.layer = s.layer AND t.unit = s.unit
           WHERE s.run_key = ? AND s.n_top > 0
           GROUP BY s.layer""",
        [run.lm_id, convention, run.key],
    ).fetchall()
    return [(int(la), int(d), int(n), int(di), int(ni)) for la, d, n, di, ni in rows]


def decoded_texts(
    store: Store, lm_id: str, convention: str, units: Sequence[tuple[int, int]]
) -> list[tuple[str, bool] | None]:
    """Per (layer, unit), in order: its decoded tokens' text and whether it is interpretable, or None when the
    unit is not decoded in this convention. One query for all, the units as integer keys (layer << 20 | unit, as
    prevalence.py): json_extract per unit took a quarter of it (60K units: 3.1 -> 2.4 s under load)."""
    rows = store.db.execute(
        """SELECT t.text, t.interpretable FROM json_each(?) k
           LEFT JOIN neuron_tokens t ON t.lm_id = ? AND t.convention = ?
                AND t.layer = k.value >> 20 AND t.unit = k.value & 1048575
           ORDER BY k.key""",
        [json.dumps([int(la) << 20 | int(u) for la, u in units]), lm_id, convention],
    ).fetchall()
    return [None if text is None else (text, bool(good)) for text, good in rows]
