"""The browser's store queries (queries.neuron_page, count_neurons, layer_counts) against a brute-force reading
of the same tables, through each of their plans: the text index's hits, the sorted walk for common tokens,
and no text index at all (an SQLite without FTS5); and migration m003's text index kept in step.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from conftest import synthetic_record

from mmtui.store import ResultRecord, Run, StackIdentity, Store, filters, queries
from mmtui.tui.state import COLUMNS
from mmtui.words import is_interpretable

KEYS = {"layer": "layer", "neuron": "unit", "max": "max_score", "mean": "mean_score", "top": "n_top"}
KEYS |= {"images": "n_images", "tokens": "text"}


# -- a small synthetic store (also the snapshots' store: see test_tui_screens) -----------------------------
ROOT = Path(__file__).resolve().parents[1]
COCO = ROOT / "mmtui" / "data" / "samples"  # bundled with mmtui: the same photos on every machine
N_LAYERS, D_MLP, GRID = 4, 32, 2
WORDS = [
    "horse", "horses", "racing", "pony", "stable", "saddle", "swimming", "water", "fishes", "pool",
    "bird", "birds", "cage", "wings", "nest", "feather", "aircraft", "flight", "pilot", "runway",
    "kitchen", "stove", "oven", "sink", "table", "plate", "dinner", "pizza", "cheese", "bread",
]  # fmt: skip
JUNK = [" the", "ing", " of", ",", "ed", "\x14", " (", "s"]
FIXED_TIME = "2024-05-01T12:00:00+00:00"
# a fixed place for the images, so that the paths on screen do not change from run to run
IMAGE_DIR = Path(tempfile.gettempdir()) / "mmtui-tui-snapshots"


def _tokens(rng: np.random.Generator, n_words: int) -> list[str]:
    words = [" " + WORDS[i] for i in rng.choice(len(WORDS), n_words, replace=False)]
    junk = [JUNK[i] for i in rng.integers(0, len(JUNK), 10 - n_words)]
    return words + junk


def _record(rng: np.random.Generator, path: Path, target: str, caption: str, keep: int = 48) -> ResultRecord:
    layer = rng.integers(0, N_LAYERS, keep)
    unit = rng.integers(0, D_MLP, keep)
    score = np.sort(rng.uniform(0.001, 0.03, keep))[::-1]
    unit_max = rng.uniform(0, 0.001, (N_LAYERS, D_MLP)).astype(np.float32)
    patch = rng.integers(0, GRID * GRID, keep)
    return synthetic_record(
        hashlib.sha256(path.read_bytes()).hexdigest(),
        str(path),
        (layer, unit, patch, score),
        unit_max,
        width=640,
        height=480,
        target=target,
        target_token=" " + target,
        caption=caption,
    )


def build_synthetic_store(db: Path, runs: int = 1) -> Path:
    """A store of `runs` runs over 3 real photos: 4 layers x 32 units, both decoding conventions."""
    rng = np.random.default_rng(7)
    IMAGE_DIR.mkdir(exist_ok=True)
    images = []
    for f in sorted(COCO.glob("*.jpg"))[:3]:
        target = IMAGE_DIR / f.name
        if not target.exists():
            shutil.copy(f, target)
        images.append(target)
    shape = {
        "n_layers": N_LAYERS,
        "d_mlp": D_MLP,
        "n_patches": GRID * GRID,
        "grid": [GRID, GRID],
        "d_model": 16,
        "family": "gptj",
    }
    with Store.open(db) as store:
        for r in range(runs):
            stack = StackIdentity(
                id=f"synthetic-{r}",
                name="synthetic",
                fingerprint={"synthetic": r},
                shape=shape,
                lm_id="synthetic-lm",
                prompt="A picture of" if r == 0 else "A photo of",
            )
            run_id = store.ensure_run(stack, site="post", y_kind="prob", settings={"keep": 48})
            captions = [
                ("horse", "a horse in a field"),
                ("bird", "a bird \x06on a cage"),
                ("pizza", "a pizza on a table"),
            ]
            for path, (target, caption) in zip(images, captions, strict=True):
                store.add_result(run_id, _record(rng, path, target, caption))
        for convention, scale in (("raw", 1.0), ("ln_f", 0.5)):
            rows = []
            for layer in range(N_LAYERS):
                for unit in range(D_MLP):
                    tokens = _tokens(rng, int(rng.integers(3, 10)))
                    rows.append(
                        {
                            "layer": layer,
                            "unit": unit,
                            "tokens": tokens,
                            "token_ids": list(range(10)),
                            "logits": list(np.linspace(9, 5, 10) * scale),
                            "interpretable": is_interpretable(tokens),
                        }
                    )
            store.add_tokens("synthetic-lm", convention, rows)
        for table in ("runs", "results", "stacks"):
            store.db.execute(f"UPDATE {table} SET created = ?", [FIXED_TIME])
        store.db.conn.commit()
    return db


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory):
    if not COCO.is_dir():
        pytest.skip(f"needs the sample photos in {COCO}")
    db = build_synthetic_store(tmp_path_factory.mktemp("tui-queries") / "q.db")
    with Store.open(db) as store:
        # odd characters, so the escaping of LIKE and GLOB is exercised
        rows = [
            {
                "layer": 0,
                "unit": unit,
                "tokens": [" 50%", " a_b", " *star", " [x]", " Café", " HORSE", "ing", "\\", " ?", " x"],
                "token_ids": list(range(10)),
                "logits": [1.0] * 10,
                "interpretable": False,
            }
            for unit in range(3)
        ]
        store.add_tokens("synthetic-lm", "raw", rows)
        yield store


def everything(store: Store, run: Run, convention: str = "raw") -> list[dict]:
    rows = store.db.execute(
        """SELECT s.layer, s.unit, s.max_score, s.mean_score, s.n_top, s.n_images, t.text, t.interpretable, t.tokens
           FROM neuron_stats s LEFT JOIN neuron_tokens t
             ON t.lm_id = ? AND t.convention = ? AND t.layer = s.layer AND t.unit = s.unit
           WHERE s.run_key = ?""",
        [run.lm_id, convention, run.key],
    ).fetchall()
    keys = ("layer", "unit", "max_score", "mean_score", "n_top", "n_images", "text", "interpretable", "tokens")
    out = [dict(zip(keys, r, strict=True)) for r in rows]
    for r in out:
        r["interpretable"] = None if r["interpretable"] is None else bool(r["interpretable"])
        r["tokens"] = json.loads(r["tokens"]) if r["tokens"] else []
    return out


def _strip_tokens(rows: list[dict]) -> list[dict]:
    """The rows without their token lists (a brute-force whole-token filter reads them)."""
    return [{k: v for k, v in r.items() if k != "tokens"} for r in rows]


def brute(
    rows: list[dict], *, sort: str, descending: bool, layer: int | None = None, token: str = "", contains: bool = True
) -> list[dict]:
    kept = [r for r in rows if (layer is None or r["layer"] == layer)]
    if contains and token:
        kept = [r for r in kept if r["text"] is not None and token.lower() in r["text"].lower()]
    elif token.strip():  # a whole decoded token, any case, whitespace around it ignored
        kept = [r for r in kept if any(t.strip().lower() == token.strip().lower() for t in r["tokens"])]
    key = KEYS[sort]
    if sort == "layer":
        kept.sort(key=lambda r: (r["layer"], r["unit"]), reverse=descending)
    elif sort == "neuron":
        kept.sort(key=lambda r: (r["unit"], r["layer"]), reverse=descending)
    else:
        kept.sort(key=lambda r: (r["layer"], r["unit"]))
        kept.sort(key=lambda r: r[key], reverse=descending)  # stable: ties stay by layer, unit
    return kept


TOKENS = ["", "horse", "HoRsE", "ing", "s", "zz", "50%", "a_b", "*star", "[x]", "?", "\\", "café", "qqq", ", "]


@pytest.mark.parametrize("token", TOKENS)
@pytest.mark.parametrize("cap", [filters.TEXT_HITS_CAP, 2])
@pytest.mark.parametrize("contains", [True, False])
def test_pages_match_a_brute_force_reading(
    store: Store, token: str, cap: int, contains: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(filters, "TEXT_HITS_CAP", cap)  # 2: every token takes the sorted-walk plan
    run = store.run()
    rows = everything(store, run)
    for key, _, _ in COLUMNS:
        for descending in (True, False):
            for layer in (None, 1):
                got = queries.neuron_page(
                    store, run, sort=key, descending=descending, layer=layer, token=token, contains=contains, limit=1000
                )
                want = brute(rows, sort=key, descending=descending, layer=layer, token=token, contains=contains)
                got, want = _strip_tokens(got), _strip_tokens(want)
                if key == "tokens":  # ties in text are ordered by the index, not by (layer, unit)
                    assert [r["text"] for r in got] == [r["text"] for r in want]
                    assert sorted(map(str, got)) == sorted(map(str, want))
                else:
                    assert got == want, (key, descending, layer, token)
                count = queries.count_neurons(store, run, layer=layer, token=token, contains=contains)
                assert count == len(want)


def test_a_sort_within_a_layer_reads_that_layer_by_the_primary_key(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No (layer, column) index since m009: the layer's rows are read by the key and sorted, not found by walking
    the all-layers index on the column past every other layer's units (150 ms deep in a GPT-J page)."""
    run = store.run()
    execute, query, sent = store.db.execute, store.db.query, []
    monkeypatch.setattr(store.db, "execute", lambda sql, args=(): sent.append((sql, args)) or execute(sql, args))
    monkeypatch.setattr(store.db, "query", lambda sql, args=(): sent.append((sql, args)) or query(sql, args))
    for sort in ("max", "mean", "top", "images"):
        queries.neuron_page(store, run, sort=sort, layer=1, offset=3)
    for sort in queries.SORTS:  # the CLI's `mmtui neurons --layer 1 --sort ...`
        list(queries.list_neurons(store, run, sort=sort, layer=1))
    plans = [" ".join(row[3] for row in execute(f"EXPLAIN QUERY PLAN {sql}", args)) for sql, args in sent]
    assert len(plans) == 7
    for plan in plans:
        assert "PRIMARY KEY (run_key=? AND layer=?)" in plan and "idx_neuron_stats" not in plan, plan


def test_pages_and_offsets(store: Store) -> None:
    run = store.run()
    whole = queries.neuron_page(store, run, limit=1000)
    pages = [queries.neuron_page(store, run, limit=10, offset=o) for o in range(0, len(whole), 10)]
    assert [r for page in pages for r in page] == whole


def test_without_the_text_index(tmp_path: Path, store: Store) -> None:
    """An SQLite without FTS5 skips neuron_text; the filter then reads neuron_tokens, with the same answers."""
    run = store.run()
    expected = {t: queries.neuron_page(store, run, token=t, limit=1000) for t in TOKENS}
    copy = tmp_path / "no-fts.db"
    store.db.execute(f"VACUUM INTO '{copy}'")
    with Store.open(copy) as bare:
        bare.db.execute("DROP TRIGGER neuron_tokens_text")
        bare.db.execute("DROP TRIGGER neuron_tokens_text_delete")
        bare.db.execute("DROP TABLE neuron_text")
        for token, rows in expected.items():
            assert queries.neuron_page(bare, run, token=token, limit=1000) == rows


def test_text_index_follows_the_tokens(tmp_path: Path) -> None:
    """Decoding again (INSERT OR REPLACE) replaces a unit's indexed text; deleting removes it; conventions and
    LMs keep apart."""
    with Store.open(tmp_path / "t.db") as store:
        row = {"layer": 2, "unit": 9, "token_ids": [1], "logits": [1.0], "interpretable": False}
        store.add_tokens("lm-a", "raw", [{**row, "tokens": [" Horse"]}])
        store.add_tokens("lm-a", "ln_f", [{**row, "tokens": [" pony"]}])
        store.add_tokens("lm-b", "raw", [{**row, "tokens": [" horse"]}])
        store.add_tokens("lm-a", "raw", [{**row, "tokens": [" zebra"]}])  # decoded again

        def indexed() -> list[tuple[str, str, int, int, str]]:
            return sorted(
                store.db.execute(
                    """SELECT ts.lm_id, ts.convention, (n.rowid >> 20) & 1048575, n.rowid & 1048575, n.text
                       FROM neuron_text n JOIN token_sets ts ON ts.id = n.rowid >> 40"""
                ).fetchall()
            )

        assert indexed() == [
            ("lm-a", "ln_f", 2, 9, "pony"),
            ("lm-a", "raw", 2, 9, "zebra"),
            ("lm-b", "raw", 2, 9, "horse"),
        ]
        store.db.execute("DELETE FROM neuron_tokens WHERE lm_id = 'lm-b'")
        assert [r[0] for r in indexed()] == ["lm-a", "lm-a"]


def test_layer_counts(store: Store) -> None:
    run = store.run()
    rows = everything(store, run)
    counts = queries.layer_counts(store, run)
    assert [c["layer"] for c in counts] == list(range(run.shape["n_layers"]))
    for c in counts:
        assert c["n_units"] == sum(r["layer"] == c["layer"] for r in rows)
        assert c["n_top_units"] == sum(r["layer"] == c["layer"] and r["n_top"] > 0 for r in rows)


def test_random_sorts_are_stable_under_many_queries(store: Store) -> None:
    """The same query twice gives the same page (the table keeps its cursor across refreshes)."""
    run = store.run()
    rng = random.Random(3)
    for _ in range(20):
        key = rng.choice([c[0] for c in COLUMNS])
        args = {"sort": key, "descending": rng.random() < 0.5, "token": rng.choice(TOKENS), "limit": 7}
        assert queries.neuron_page(store, run, **args) == queries.neuron_page(store, run, **args)


def test_a_token_is_a_whole_token_unless_asked_to_contain(tmp_path: Path) -> None:
    """`dog` finds the unit decoding ` Dog`, not the one decoding `endogenous` (which `contains` finds); `%` and
    `_` are text, not LIKE wildcards; the CLI's list and the browser's page agree, on every plan."""
    db = build_synthetic_store(tmp_path / "w.db")
    with Store.open(db) as store:
        run = store.run()
        units = [(r["layer"], r["unit"]) for r in queries.neuron_page(store, run, limit=3)]
        decoded = dict(zip(units, [[" Dog", " cat"], ["endogenous", " bone"], [" 5%", " a_b"]], strict=True))
        dog, endogenous, odd = units
        rows = [
            {"layer": la, "unit": u, "tokens": t, "token_ids": [1, 2], "logits": [1.0, 0.5], "interpretable": False}
            for (la, u), t in decoded.items()
        ]
        store.add_tokens("synthetic-lm", "raw", rows)
        for cap in (filters.TEXT_HITS_CAP, 2):
            filters.TEXT_HITS_CAP, saved = cap, filters.TEXT_HITS_CAP
            try:
                for token, contains, want in [
                    ("dog", False, {dog}),
                    (" DOG ", False, {dog}),
                    ("dog", True, {dog, endogenous}),
                    ("%", False, set()),
                    ("_", False, set()),
                    ("%", True, {odd}),
                    ("_", True, {odd}),
                    ("5%", False, {odd}),
                    ("a_b", False, {odd}),
                    ("a%b", True, set()),
                ]:
                    page = queries.neuron_page(store, run, token=token, contains=contains, limit=None)
                    listed = queries.list_neurons(store, run, token=token, contains=contains, limit=None)
                    found = {(r["layer"], r["unit"]) for r in page}
                    assert found == {(r["layer"], r["unit"]) for r in listed}
                    assert found & set(decoded) == want, (token, contains, cap)
                    assert found <= set(decoded)
                    assert queries.count_neurons(store, run, token=token, contains=contains) == len(found)
            finally:
                filters.TEXT_HITS_CAP = saved
