"""The neuron filters as SQL, for every listing of units (the CLI's `neurons`, the TUI's browser, prevalence):
a token filter (an escaped LIKE on the decoded text, a whole decoded token, the FTS5 trigram index), the layer,
interpretable and generic filters, and the plan that joins them (`neuron_query`)."""

from __future__ import annotations

import json
from typing import Any

from mmtui.store.core import Run, Store

TEXT_HITS_CAP = 5000  # fewer text-index hits than this: join them; more: walk the sort order and test each unit
_LOW_BITS = (1 << 20) - 1  # neuron_text rowid = token set << 40 | layer << 20 | unit (migration m003)


def _like(token: str) -> str:
    """A LIKE pattern (ESCAPE '\\') for text containing `token`."""
    return "%" + token.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def token_filter(token: str | None, contains: bool = False) -> str | None:
    """The text a token filter looks for, or None for no filter. A whole token ignores the whitespace around
    it (decoded tokens are matched stripped); an empty one filters nothing."""
    if token is None:
        return None
    text = token if contains else token.strip()
    return text or None


# A whole decoded token equal to the filter, ignoring case (ASCII, as LIKE) and whitespace around the token.
_WHOLE_TOKEN = (
    "EXISTS (SELECT 1 FROM json_each(t.tokens) WHERE lower(trim(json_each.value, ' ' || char(9, 10, 11, 12, 13)))"
    " = lower(?))"
)


def token_where(token: str, contains: bool, *, prefiltered: bool = False) -> tuple[list[str], list[Any]]:
    """The conditions on the decoded tokens (t) of a token filter and their arguments: the text contains
    `token` (LIKE, escaped), and for a whole token also one decoded token equal to it. `prefiltered`: the
    text index has already kept only the units whose text contains it."""
    where, args = ([], []) if prefiltered else (["t.text LIKE ? ESCAPE '\\'"], [_like(token)])
    if not contains:
        where.append(_WHOLE_TOKEN)
        args.append(token)
    return where, args


def _glob(token: str) -> str:
    """A GLOB pattern for lower-cased text containing `token` (SQLite's lower(): ASCII letters only). GLOB,
    not LIKE ... ESCAPE: SQLite hands only an escape-free LIKE or a GLOB to the FTS5 trigram index."""
    lowered = "".join(c.lower() if c.isascii() else c for c in token)
    return "*" + "".join(f"[{c}]" if c in "*?[" else c for c in lowered) + "*"


def _text_range(store: Store, lm_id: str, convention: str) -> tuple[int, int] | None:
    """The neuron_text rowid range of one LM and convention; None without the text index (no FTS5)."""
    if not store.db["neuron_text"].exists():
        return None
    row = store.db.execute(
        "SELECT id FROM token_sets WHERE lm_id = ? AND convention = ?", [lm_id, convention]
    ).fetchone()
    if row is None:
        return (0, -1)  # nothing decoded in this convention: an empty range
    return row[0] << 40, (row[0] << 40) | ((1 << 40) - 1)


def _text_hits(store: Store, run: Run, token: str, convention: str) -> list[int] | None:
    """Keys (neuron_text rowids) of the units whose decoded text contains `token`, when fewer than
    TEXT_HITS_CAP; None without the text index or for a commoner token (walking the sorted units finds a
    page sooner). One pass over the index (tokens of 3+ characters) or over its text (shorter ones)."""
    span = _text_range(store, run.lm_id, convention)
    if span is None:
        return None
    rows = store.db.execute(
        f"SELECT rowid FROM neuron_text WHERE text GLOB ? AND rowid BETWEEN ? AND ? LIMIT {TEXT_HITS_CAP}",
        [_glob(token), *span],
    ).fetchall()
    return [r[0] for r in rows] if len(rows) < TEXT_HITS_CAP else None


def neuron_query(
    store: Store,
    run: Run,
    select: str,
    *,
    tokens_select: str = "",
    layer: int | None,
    token: str | None,
    contains: bool = False,
    interpretable: bool | None,
    convention: str,
    by_text: bool = False,
    max_n_top: float | None = None,
) -> tuple[str, list[Any], bool]:
    """SELECT `select` FROM ... WHERE ... over the units of a run with these filters, planned for the filter:
    a token with few text-index hits -> the hits joined to neuron_stats; a commoner token, or a sort by text
    -> neuron_stats (or the tokens, by text) walked in sort order with each unit's tokens looked up.
    CROSS JOIN fixes SQLite's loop order to that plan. `tokens_select` is added to `select` when the plan joins
    the tokens (t); they are left out when nothing filters or sorts by them. Also says whether it joined them."""
    where: list[str] = ["s.run_key = ?"]
    args: list[Any] = [run.key]
    if layer is not None:
        where.append("s.layer = ?")
        args.append(layer)
    if max_n_top is not None:  # `+`: no index on it, so the sort's index is walked (SQLite took n_top's: 8 s)
        where.append("+s.n_top <= ?")
        args.append(max_n_top)
    if interpretable is not None:
        where.append("t.interpretable = ?")
        args.append(int(interpretable))
    tokens_args = [run.lm_id, convention]
    on_tokens = "t.lm_id = ? AND t.convention = ? AND t.layer = s.layer AND t.unit = s.unit"
    token = token_filter(token, contains)
    hits = _text_hits(store, run, token, convention) if token else None
    if hits is not None:
        source = (
            "json_each(?) hits CROSS JOIN neuron_stats s"
            f" ON s.layer = (hits.value >> 20) & {_LOW_BITS} AND s.unit = hits.value & {_LOW_BITS}"
        )
        if interpretable is None and not by_text and contains:
            return f"SELECT {select} FROM {source} WHERE {' AND '.join(where)}", [json.dumps(hits), *args], False
        assert token is not None  # hits come from a token
        exact, exact_args = token_where(token, contains, prefiltered=True)
        where, args = where + exact, args + exact_args
        source += f" LEFT JOIN neuron_tokens t ON {on_tokens}"
        return (
            f"SELECT {select}{tokens_select} FROM {source} WHERE {' AND '.join(where)}",
            [json.dumps(hits), *tokens_args, *args],
            True,
        )
    if token:
        exact, exact_args = token_where(token, contains)
        where, args = where + exact, args + exact_args
    if by_text:
        source = "neuron_tokens t CROSS JOIN neuron_stats s ON s.layer = t.layer AND s.unit = t.unit"
        where += ["t.lm_id = ?", "t.convention = ?"]
        return f"SELECT {select}{tokens_select} FROM {source} WHERE {' AND '.join(where)}", [*args, *tokens_args], True
    if not token and interpretable is None:
        return f"SELECT {select} FROM neuron_stats s WHERE {' AND '.join(where)}", args, False
    source = f"neuron_stats s CROSS JOIN neuron_tokens t ON {on_tokens}"
    return f"SELECT {select}{tokens_select} FROM {source} WHERE {' AND '.join(where)}", [*tokens_args, *args], True
