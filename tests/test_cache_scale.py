"""The cache at scale: the array formats (and reading what earlier versions wrote), and neuron_images (each
unit's best results, kept by the writer and the m005 migration) against a brute-force reading."""

from __future__ import annotations

import sqlite3
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import synthetic_record

from mmtui.defaults import NEURON_IMAGES
from mmtui.run.events import ImageDone
from mmtui.run.writer import StoreWriter
from mmtui.store import ResultRecord, StackIdentity, Store
from mmtui.store.arrays import LOG8_STEPS, pack_array, pack_triples, unpack_array, unpack_triples, unpack_unit_images
from mmtui.store.fold import LAYER_BITS, UNIT_BITS, by_layer, by_unit, merge_best_images, split_key
from mmtui.store.migrations import migrations
from mmtui.store.queries import neuron_detail

N_LAYERS, D_MLP, N_PATCHES, KEEP = 2, 6, 9, 24


# -- arrays ---------------------------------------------------------------------------------------------------
def _old_float16_blob(a: np.ndarray) -> bytes:
    """As mmtui 0.1 packed small arrays: shuffled float16, zlib."""
    half = np.ascontiguousarray(a, dtype=np.float16).view(np.uint8).reshape(-1, 2)
    return zlib.compress(np.ascontiguousarray(half.T).tobytes(), 6)


def _old_log8_blob(a: np.ndarray) -> bytes:
    """As mmtui 0.1 packed large arrays: b"L8", 8-bit log codes, zlib."""
    scale = np.abs(a).max(axis=1).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        level = np.rint(127 + LOG8_STEPS * np.log2(np.abs(a) / scale[:, None]))
    level = np.where(np.isfinite(level) & (level >= 1), level, 0).astype(np.uint8)
    codes = level | (np.signbit(a) & (level > 0)).astype(np.uint8) << 7
    return b"L8" + np.uint32(a.shape[0]).tobytes() + scale.tobytes() + zlib.compress(codes.tobytes(), 1)


def test_arrays_written_by_earlier_versions_still_read():
    rng = np.random.default_rng(3)
    small = rng.normal(0, 1e-3, (4, 9)).astype(np.float32)
    np.testing.assert_array_equal(
        unpack_array(_old_float16_blob(small), small.shape), unpack_array(pack_array(small), small.shape)
    )
    large = rng.normal(0, 1e-4, (28, 16384)).astype(np.float32)
    new, old = pack_array(large), _old_log8_blob(large)
    assert new[:2] == b"Z8" and old[:2] == b"L8"
    np.testing.assert_array_equal(unpack_array(old, large.shape), unpack_array(new, large.shape))


def test_packing_a_packed_array_again_changes_nothing():
    """`mmtui merge` unpacks and packs again: the 8-bit codes must survive that unchanged."""
    large = np.random.default_rng(4).normal(0, 1e-4, (28, 16384)).astype(np.float32)
    once = unpack_array(pack_array(large), large.shape)
    np.testing.assert_array_equal(unpack_array(pack_array(once), large.shape), once)


def test_top_triples_pack_losslessly_and_small():
    rng = np.random.default_rng(5)
    n = 6400
    layer, unit, patch = rng.integers(0, 28, n), rng.integers(0, 16384, n), rng.integers(0, 196, n)
    score = np.sort(rng.lognormal(-9, 1, n).astype(np.float32))[::-1]
    score[-1] = -score[-1]  # negative scores survive (site pre, logit y)
    blob = pack_triples(layer, unit, patch, score)
    back = unpack_triples(blob)
    for got, want in zip(back, (layer, unit, patch, score), strict=True):
        np.testing.assert_array_equal(got, want)
    assert back[3].dtype == np.float32
    assert len(blob) < 8 * n  # ~30 bytes a triple as table rows
    assert all(len(a) == 0 for a in unpack_triples(pack_triples([], [], [], [])))
    assert all(len(a) == 0 for a in unpack_triples(None))  # a result row without triples
    with pytest.raises(ValueError, match="out of range"):
        pack_triples([0], [-1], [0], [1.0])
    with pytest.raises(ValueError, match="out of range"):
        pack_triples([70_000], [0], [0], [1.0])


# -- neuron_images --------------------------------------------------------------------------------------------
def _records(n: int, seed: int = 0, units: int = D_MLP) -> list[ResultRecord]:
    """Synthetic results over few units, so each unit is in many more than NEURON_IMAGES results; some scores
    tie across results (the tie-break is the result id)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        score = np.sort(np.round(rng.uniform(0, 1, KEEP), 2))[::-1].astype(np.float32)
        unit_max = rng.uniform(0, 1, (N_LAYERS, D_MLP)).astype(np.float32)
        layer = rng.integers(0, N_LAYERS, KEEP)
        unit = rng.integers(0, units, KEEP)
        patch = rng.integers(0, N_PATCHES, KEEP)
        out.append(
            synthetic_record(
                f"{i:064x}",
                f"/photos/{i}.jpg",
                (layer, unit, patch, score),
                unit_max,
                width=64,
                height=48,
                target_token_id=5,
                context_ids=[1, 2],
                y_c=0.5,
                p_target=0.5,
                unit_sum=unit_max * 3,
            )
        )
    return out


STACK = StackIdentity(
    id="s",
    name="synthetic",
    fingerprint={},
    shape={"n_layers": N_LAYERS, "d_mlp": D_MLP, "n_patches": N_PATCHES},
    lm_id="lm",
    prompt="A picture of",
)


def _new_run(store: Store, site: str = "post", y_kind: str = "prob") -> str:
    return store.ensure_run(STACK, site=site, y_kind=y_kind)


def _brute(
    db: sqlite3.Connection, run_id: str, keep: int | None = NEURON_IMAGES
) -> dict[tuple[int, int], list[tuple[int, float, int, int]]]:
    """Each unit's best `keep` results (all with None), read from every stored triple: (result, score, rank, patch)."""
    best: dict[tuple[int, int, int], tuple[float, int, int]] = {}
    rows = (
        (result_id, rank, layer, unit, patch, score)
        for result_id, blob in db.execute("SELECT id, top FROM results WHERE run_id = ? ORDER BY id", [run_id])
        for rank, (layer, unit, patch, score) in enumerate(
            zip(*(a.tolist() for a in unpack_triples(blob)), strict=True)
        )
    )
    for result_id, rank, layer, unit, patch, score in rows:
        best.setdefault((layer, unit, result_id), (score, rank, patch))  # ranks ascend: the first is the best
    per_unit: dict[tuple[int, int], list[tuple[int, float, int, int]]] = {}
    for (layer, unit, result_id), (score, rank, patch) in best.items():
        per_unit.setdefault((layer, unit), []).append((result_id, score, rank, patch))
    return {k: sorted(v, key=lambda r: (-r[1], r[0]))[:keep] for k, v in per_unit.items()}


def _stored(db: sqlite3.Connection, run_id: str) -> dict[tuple[int, int], list[tuple[int, float, int, int]]]:
    rows = db.execute(
        "SELECT layer, unit, best FROM neuron_images WHERE run_key = (SELECT run_key FROM runs WHERE id = ?)",
        [run_id],
    )
    return {(layer, unit): unpack_unit_images([blob])[0].tolist() for layer, unit, blob in rows}


@pytest.mark.parametrize("refresh_every", [7, 1, 64])
def test_the_writer_keeps_each_units_best_results(tmp_path: Path, refresh_every: int) -> None:
    path = tmp_path / "c.db"
    with Store.open(path) as store:
        run_id = _new_run(store)
    writer = StoreWriter(path, run_id, timeout=5.0, refresh_every=refresh_every)
    for rec in _records(45):
        writer.put(ImageDone(rec.image_path, rec.image_sha256, None, rec))
    assert len(list(writer.finish())) == 45
    with Store.open(path) as store:
        expected = _brute(store.db.conn, run_id)
        assert _stored(store.db.conn, run_id) == expected  # the best 20 after every fold, exactly
        assert max(len(v) for v in expected.values()) == NEURON_IMAGES  # the cap was reached (test is meaningful)
        layer, unit = next(iter(expected))
        detail = neuron_detail(store, store.run(run_id), layer, unit, top_images=NEURON_IMAGES)
        assert [(d["result_id"], d["score"], d["rank"], d["patch"]) for d in detail["images"]] == expected[
            (layer, unit)
        ]
        few = neuron_detail(store, store.run(run_id), layer, unit, top_images=3)
        assert few["images"] == detail["images"][:3]


def test_a_fold_rewrites_only_the_lists_it_changes(tmp_path: Path) -> None:
    """A result scoring below every full unit's 20th leaves those units' lists as they were (no write), starts
    the lists of units it is the first result of, and still counts in every unit's aggregates."""
    with Store.open(tmp_path / "c.db") as store:
        run_id = _new_run(store)
        records = _records(46, seed=3, units=D_MLP - 1)  # unit D_MLP - 1 of each layer in none of them
        for rec in records[:45]:
            store.add_result(run_id, rec, stats=False)
        store.refresh_stats(run_id)
        before = _stored(store.db.conn, run_id)
        full = {k for k, v in before.items() if len(v) == NEURON_IMAGES}
        assert full == before.keys()
        low = records[45]
        low.top_score = low.top_score * 0.0  # scores of 0: below every full unit's 20th
        low.top_unit[:3] = D_MLP - 1  # and a unit no result had yet
        writes: list[str] = []
        store.db.conn.set_trace_callback(writes.append)
        store.add_result(run_id, low, stats=True)
        store.db.conn.set_trace_callback(None)
        after = _stored(store.db.conn, run_id)
        assert {k: after[k] for k in full} == {k: before[k] for k in full}
        units = set(zip(low.top_layer.tolist(), low.top_unit.tolist(), strict=True))
        assert sum("INTO neuron_images" in w for w in writes) == len(units - full)
        assert after == _brute(store.db.conn, run_id)
        assert store.db.execute("SELECT sum(n_images) FROM neuron_stats").fetchone()[0] == (
            sum(len(set(zip(r.top_layer.tolist(), r.top_unit.tolist(), strict=True))) for r in records)
        )


def test_rows_order_by_unit_then_score_then_result() -> None:
    """by_unit's one-key sort equals a lexsort of (unit, -score, result): negative scores, 0.0 and -0.0 (equal),
    ties across results, and the largest layer and unit a key holds."""
    rng = np.random.default_rng(7)
    n = 5000
    best = {
        "result_id": np.repeat(np.arange(50), n // 50),
        "layer": rng.choice([0, 1, (1 << LAYER_BITS) - 1], n),
        "unit": rng.choice([0, 5, (1 << UNIT_BITS) - 1], n),
        "score": rng.choice([-0.5, -0.0, 0.0, 1e-3, 0.25, 3.0], n),
    }
    order, starts = by_unit(best)
    keys = (best["layer"] << UNIT_BITS) | best["unit"]
    np.testing.assert_array_equal(order, np.lexsort((best["result_id"], -(best["score"] + 0.0), keys)))
    np.testing.assert_array_equal(starts, np.flatnonzero(np.r_[True, np.diff(keys[order]) != 0]))


def test_by_layer_splits_the_rows_of_each_layer_with_their_units() -> None:
    """by_layer's parts, one per layer that has rows (gaps skipped), put back together are by_unit's order and
    unit starts."""
    best = {
        "layer": np.array([5, 0, 5, 2, 0, 5, 2]),
        "unit": np.array([1, 3, 1, 7, 3, 0, 8]),
        "score": np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]),
    }
    order, starts = by_unit(best)
    parts = list(by_layer(best, order, starts))
    assert [layer for layer, _, _ in parts] == [0, 2, 5]
    for layer, rows, unit_starts in parts:
        assert set(best["layer"][rows].tolist()) == {layer}
        np.testing.assert_array_equal(unit_starts, np.flatnonzero(np.r_[True, np.diff(best["unit"][rows]) != 0]))
    np.testing.assert_array_equal(np.concatenate([rows for _, rows, _ in parts]), order)


def test_merging_lists_in_any_order_of_the_stored_rows() -> None:
    """merge_best_images over folds of rows with many tied scores equals each unit's best 20 by (score
    descending, result); the stored lists handed back in a shuffled order (not by key, as the store reads them)
    give the same lists: their order only makes the merge's sort cheaper."""
    rng = np.random.default_rng(11)
    everything: dict[tuple[int, int], list[tuple[int, float, int, int]]] = {}
    stored: dict[tuple[int, int], bytes] = {}
    result = 0
    for _fold in range(6):
        parts = []
        for _ in range(15):  # results, each with one row per unit it touches
            result += 1
            keys = np.unique(rng.integers(0, 3 * 40, 30))
            layer, unit = keys // 40, keys % 40
            parts.append(
                {
                    "result_id": np.full(len(keys), result),
                    "layer": layer,
                    "unit": unit,
                    "rank": rng.integers(0, 500, len(keys)),
                    "patch": rng.integers(0, 196, len(keys)),
                    "score": rng.choice([0.5, 0.25, 0.125, 0.0, -0.25], len(keys)),
                }
            )
        best = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        for i in range(len(best["layer"])):
            everything.setdefault((int(best["layer"][i]), int(best["unit"][i])), []).append(
                (int(best["result_id"][i]), float(best["score"][i]), int(best["rank"][i]), int(best["patch"][i]))
            )
        rows = [(layer, unit, blob) for (layer, unit), blob in stored.items()]
        rng.shuffle(rows)
        changed, lists = merge_best_images(rows, best, *by_unit(best), NEURON_IMAGES)
        for layer, unit, blob in zip(*(a.tolist() for a in split_key(changed)), lists, strict=True):
            stored[(layer, unit)] = blob
    want = {k: sorted(v, key=lambda r: (-r[1], r[0]))[:NEURON_IMAGES] for k, v in everything.items()}
    assert max(map(len, want.values())) == NEURON_IMAGES  # lists filled up: later folds had to drop entries
    assert {k: unpack_unit_images([b])[0].tolist() for k, b in stored.items()} == want


def test_m005_and_m006_convert_a_cache_written_before_them(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with Store.open(path) as store:
        run_id = _new_run(store)
        for rec in _records(30, seed=2):
            store.add_result(run_id, rec, stats=True)
        expected = _brute(store.db.conn, run_id)
        triples = {r["id"]: store.top_triples(r["id"]) for r in store.results(run_id)}
        # back to the schema of m004, which mmtui 0.1 wrote: a row per triple with an index on every triple,
        # no neuron_images, no results.top
        store.db.execute(
            """CREATE TABLE top_neurons (result_id INTEGER NOT NULL REFERENCES results(id), rank INTEGER NOT NULL,
                   layer INTEGER NOT NULL, unit INTEGER NOT NULL, patch INTEGER NOT NULL, score REAL NOT NULL,
                   PRIMARY KEY (result_id, rank)) WITHOUT ROWID"""
        )
        store.db.conn.executemany(
            "INSERT INTO top_neurons VALUES (?, ?, ?, ?, ?, ?)",
            [
                (rid, t["rank"], t["layer"], t["unit"], t["patch"], t["score"])
                for rid, ts in triples.items()
                for t in ts
            ],
        )
        store.db.execute("CREATE INDEX idx_top_neurons_layer_unit_score ON top_neurons (layer, unit, score)")
        _before_m008(store.db.conn)  # reads results.top
        store.db.execute("ALTER TABLE results DROP COLUMN top")
        store.db.execute("DROP TABLE neuron_images")
        store.db.execute(
            "DELETE FROM _sqlite_migrations WHERE name IN ('m005_neuron_images', 'm006_pack_top_triples', "
            "'m008_integer_run_keys_and_unit_lists')"
        )
        store.db.conn.commit()
    with Store.open(path) as store:  # applies m005, m006, then m008
        assert _stored(store.db.conn, run_id) == expected
        assert {rid: store.top_triples(rid) for rid in triples} == triples
        assert "top_neurons" not in store.db.table_names()
        assert {"m005_neuron_images", "m006_pack_top_triples"} <= {m.name for m in migrations.applied(store.db)}


def _before_m008(conn: sqlite3.Connection) -> None:
    """Back to the schema before m008: neuron_stats (with images_floor) and neuron_images keyed by the run's text
    id, neuron_images a row per (unit, result), not yet pruned (more than 20 rows a unit), no runs.run_key."""
    conn.execute(
        """CREATE TABLE old_stats (run_id TEXT NOT NULL REFERENCES runs(id), layer INTEGER NOT NULL,
               unit INTEGER NOT NULL, n_top INTEGER NOT NULL, n_images INTEGER NOT NULL, max_score REAL NOT NULL,
               sum_score REAL NOT NULL, mean_score REAL NOT NULL, best_result_id INTEGER, images_floor REAL,
               PRIMARY KEY (run_id, layer, unit)) WITHOUT ROWID"""
    )
    conn.execute(
        """INSERT INTO old_stats SELECT runs.id, layer, unit, n_top, n_images, max_score, sum_score, mean_score,
               best_result_id, NULL FROM neuron_stats JOIN runs USING (run_key)"""
    )
    conn.execute(
        """CREATE TABLE old_images (run_id TEXT NOT NULL REFERENCES runs(id), layer INTEGER NOT NULL,
               unit INTEGER NOT NULL, result_id INTEGER NOT NULL REFERENCES results(id), score REAL NOT NULL,
               rank INTEGER NOT NULL, patch INTEGER NOT NULL, PRIMARY KEY (run_id, layer, unit, result_id)) WITHOUT ROWID"""
    )
    for (run_id,) in conn.execute("SELECT id FROM runs").fetchall():
        conn.executemany(
            "INSERT INTO old_images VALUES (?, ?, ?, ?, ?, ?, ?)",
            [
                (run_id, layer, unit, *row)
                for (layer, unit), rows in _brute(conn, run_id, keep=None).items()
                for row in rows
            ],
        )
    conn.execute("DROP TABLE neuron_stats")
    conn.execute("DROP TABLE neuron_images")
    conn.execute("ALTER TABLE old_stats RENAME TO neuron_stats")
    conn.execute("ALTER TABLE old_images RENAME TO neuron_images")
    for columns in ("max_score", "n_top", "mean_score", "n_images", "unit, layer"):
        conn.execute(f"CREATE INDEX [idx_old_{columns}] ON neuron_stats (run_id, {columns})")
    conn.execute("DROP INDEX idx_runs_run_key")
    conn.execute("ALTER TABLE runs DROP COLUMN run_key")
    conn.execute("DELETE FROM _sqlite_migrations WHERE name = 'm008_integer_run_keys_and_unit_lists'")


def test_m008_keys_the_unit_tables_by_an_integer_per_run(tmp_path: Path) -> None:
    """A cache of two runs written before m008 converts: the same aggregates and each unit's best 20 results per
    run (from more rows than that: a cache between prunes), keyed by each run's run_key; a run made afterwards
    takes the next key."""
    path = tmp_path / "old.db"
    by_key = "runs.run_key = s.run_key"
    stats_sql = (
        "SELECT runs.id, layer, unit, n_top, n_images, max_score, sum_score, mean_score, best_result_id"
        " FROM neuron_stats s JOIN runs ON {} ORDER BY 1, 2, 3"
    )
    with Store.open(path) as store:
        runs = [_new_run(store), _new_run(store, y_kind="logit")]
        for i, rec in enumerate(_records(60, seed=4)):  # 30 a run: over 20 results a unit
            store.add_result(runs[i % 2], rec, stats=False)
        for run_id in runs:
            store.refresh_stats(run_id)
        stats = store.db.execute(stats_sql.format(by_key)).fetchall()
        images = {run_id: _stored(store.db.conn, run_id) for run_id in runs}
        _before_m008(store.db.conn)
        store.db.conn.commit()
        assert store.db.execute(stats_sql.format("runs.id = s.run_id")).fetchall() == stats
        assert store.db.execute("SELECT count(*) FROM neuron_images").fetchone()[0] > sum(
            len(v) for i in images.values() for v in i.values()
        )
    with Store.open(path) as store:  # applies m008
        assert "m008_integer_run_keys_and_unit_lists" in {m.name for m in migrations.applied(store.db)}
        assert sorted(store.run_key(r) for r in runs) == [1, 2]
        assert store.db.execute(stats_sql.format(by_key)).fetchall() == stats
        assert {run_id: _stored(store.db.conn, run_id) for run_id in runs} == images
        assert store.db["neuron_stats"].columns_dict["run_key"] is int
        assert {tuple(ix.columns)[0] for ix in store.db["neuron_stats"].indexes} == {"run_key"}
        third = _new_run(store, site="pre")
        assert store.run_key(third) == 3
        assert _new_run(store) == runs[0] and store.run_key(runs[0]) in (1, 2)  # unchanged
