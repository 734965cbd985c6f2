"""The cache: schema by migration, resume, interruption, locks, newer schemas, compact arrays."""

from __future__ import annotations

import shutil
import sqlite3
import threading
from pathlib import Path

import numpy as np
import pytest
from sqlite_utils import Database

from mmtui.errors import StoreError, StoreLockedError, StoreTooNewError
from mmtui.run.events import ImageDone, ImageSkipped
from mmtui.run.pipeline import attribute_images
from mmtui.store import StackIdentity, Store
from mmtui.store.arrays import pack_array, unpack_array
from mmtui.store.migrations import MIGRATION_SET, migrations

STACK = StackIdentity(id="s", name="x", fingerprint={}, shape={}, lm_id="l", prompt="p")


def test_migrate_blank_database():
    db = Database(memory=True)
    migrations.apply(db)
    assert {
        "stacks",
        "runs",
        "images",
        "results",
        "neuron_stats",
        "neuron_tokens",
        "neuron_images",
    } <= set(db.table_names())
    assert db["results"].columns_dict["unit_max"] is bytes
    assert db["results"].columns_dict["context_ids"] is str
    fks = {(fk.column, fk.other_table) for fk in db["results"].foreign_keys}
    assert fks == {("run_id", "runs"), ("image_sha256", "images")}
    indexes = {tuple(ix.columns) for ix in db["neuron_stats"].indexes}
    sorts = {("run_key", column) for column in ("max_score", "n_top", "mean_score", "n_images")}
    key = ("run_key", "layer", "unit")  # the primary key's
    assert indexes == sorts | {key, ("run_key", "unit", "layer")}  # m009 dropped the per-layer ones m003 made
    # m006: the top triples are one blob per result, not a row each
    assert "top_neurons" not in db.table_names()
    assert db["results"].columns_dict["top"] is bytes
    assert db.journal_mode == "memory"  # WAL is set on files (see next test)


def test_open_sets_wal_and_is_idempotent(tmp_path):
    path = tmp_path / "c.db"
    with Store.open(path) as store:
        assert store.db.journal_mode == "wal"
    with Store.open(path) as store:
        names = [m.name for m in migrations.applied(store.db)]
        assert names == [m.name for m in migrations._migrations]


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "c.db"
    Store.open(path).close()
    db = Database(path)
    db["_sqlite_migrations"].insert({"migration_set": MIGRATION_SET, "name": "m999_from_the_future", "applied_at": "x"})
    db.close()
    with pytest.raises(StoreTooNewError, match="newer mmtui"):
        Store.open(path)


def test_not_an_mmtui_database(tmp_path):
    path = tmp_path / "other.db"
    Database(path)["things"].insert({"a": 1})
    with pytest.raises(StoreError, match="not an mmtui cache"):
        Store.open(path)
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"hello, I am not SQLite" * 100)
    with pytest.raises(StoreError, match="not an mmtui cache"):
        Store.open(garbage)


def test_missing_store_for_reading(tmp_path):
    with pytest.raises(StoreError, match="no cache at"):
        Store.open(tmp_path / "none.db", create=False)
    assert not (tmp_path / "none.db").exists()


def test_locked_store_waits_then_says_so(tmp_path):
    path = tmp_path / "c.db"
    Store.open(path).close()
    holder = sqlite3.connect(path)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with Store.open(path, timeout=0.2) as store, pytest.raises(StoreLockedError, match="locked by another"):
            store.ensure_run(STACK, site="post", y_kind="prob")
    finally:
        holder.rollback()
        holder.close()


def test_lock_released_in_time_is_waited_for(tmp_path):
    path = tmp_path / "c.db"
    Store.open(path).close()
    holder = sqlite3.connect(path, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    timer = threading.Timer(0.3, holder.rollback)
    timer.start()
    with Store.open(path, timeout=5) as store:
        run_id = store.ensure_run(STACK, site="post", y_kind="prob")
    timer.join()
    holder.close()
    assert run_id


def test_pack_roundtrip_is_float16_exact():
    a = np.random.default_rng(0).normal(0, 1e-3, (5, 7)).astype(np.float32)
    back = unpack_array(pack_array(a), a.shape)
    np.testing.assert_array_equal(back, a.astype(np.float16).astype(np.float32))


def _rows(store: Store, run_id: str):
    results = list(store.db.query("SELECT * FROM results WHERE run_id = ? ORDER BY image_sha256", [run_id]))
    for r in results:
        r["top_id"] = r["id"]
        for k in ("id", "created", "seconds"):
            r.pop(k)
    triples = [(r["image_sha256"], t) for r in results for t in store.top_triples(r.pop("top_id"))]
    stats = list(store.db.query("SELECT * FROM neuron_stats ORDER BY layer, unit"))
    for s in stats:
        s.pop("best_result_id")
    return results, triples, stats


def test_interrupted_run_keeps_finished_images_and_resume_gives_identical_rows(tiny_stack, image_dir, tmp_path):
    files = sorted(image_dir.iterdir())
    interrupted = Store.open(tmp_path / "a.db")
    done = 0
    with pytest.raises(KeyboardInterrupt):
        for event in attribute_images(tiny_stack, interrupted, files, batch_size=1, target="dog"):
            if isinstance(event, ImageDone):
                done += 1
                if done == 2:
                    raise KeyboardInterrupt  # Ctrl-C after two images
    run_id = interrupted.run().id
    kept = len(interrupted.done_keys(run_id))  # the two seen, and any finished while they were shown
    assert 2 <= kept < len(files)
    events = list(attribute_images(tiny_stack, interrupted, files, batch_size=1, target="dog"))
    assert (
        sum(isinstance(e, ImageSkipped) for e in events) == kept
        and sum(isinstance(e, ImageDone) for e in events) == 4 - kept
    )

    straight = Store.open(tmp_path / "b.db")
    list(attribute_images(tiny_stack, straight, files, batch_size=1, target="dog"))
    assert _rows(interrupted, run_id) == _rows(straight, run_id)


def test_unit_scores_and_neuron_stats(tiny_stack, image_dir, tmp_path):
    store = Store.open(tmp_path / "c.db")
    events = [
        e
        for e in attribute_images(tiny_stack, store, sorted(image_dir.iterdir())[:2], target="dog")
        if isinstance(e, ImageDone)
    ]
    rec = events[0].record
    umax, usum = store.unit_scores(events[0].result_id)
    np.testing.assert_allclose(umax, rec.unit_max.astype(np.float16).astype(np.float32))  # small: lossless float16
    assert umax.shape == (tiny_stack.n_layers, tiny_stack.d_mlp)
    layer, unit = int(rec.top_layer[0]), int(rec.top_unit[0])
    stat = store.db.execute(
        "SELECT n_images, max_score FROM neuron_stats WHERE layer = ? AND unit = ?", [layer, unit]
    ).fetchone()
    assert stat[0] >= 1 and stat[1] >= float(rec.top_score[0]) - 1e-12
    assert store.has_tokens(tiny_stack.lm_fingerprint_id, "raw")
    n_tokens = store.db.execute("SELECT count(*) FROM neuron_tokens").fetchone()[0]
    assert n_tokens == tiny_stack.n_layers * tiny_stack.d_mlp


def test_large_arrays_pack_to_8_bit_log_codes_within_4_4_percent():
    rng = np.random.default_rng(1)
    a = (rng.standard_normal((28, 16384)) * 1e-4).astype(np.float32)  # GPT-J's 458,752 units
    a[rng.random(a.shape) < 0.3] = 0.0
    a[3] = 0.0  # an all-zero layer
    blob = pack_array(a)
    back = unpack_array(blob, a.shape)
    assert len(blob) < a.size  # under a byte per unit
    big = np.abs(a) >= np.abs(a).max(axis=1, keepdims=True) * 2.0**-15
    np.testing.assert_allclose(back[big], a[big], rtol=2 ** (1 / 16) - 1 + 1e-6)  # half a step, and float32 rounding
    assert np.all(np.abs(back[~big]) <= np.abs(a).max(axis=1, keepdims=True).repeat(a.shape[1], 1)[~big] * 2.0**-15)
    assert not back[3].any() and np.array_equal(np.sign(back[big]), np.sign(a[big]))


def test_refresh_stats_equals_adding_one_by_one(tiny_stack, image_dir, tmp_path):
    """The bulk fold of results into neuron_stats gives the aggregates of the per-result upsert."""
    paths = sorted(image_dir.iterdir())
    one = Store.open(tmp_path / "one.db")
    records = [e for e in attribute_images(tiny_stack, one, paths, target="dog") if isinstance(e, ImageDone)]
    run_id = one.run().id
    bulk = Store.open(tmp_path / "bulk.db")
    eager = Store.open(tmp_path / "eager.db")
    for store in (bulk, eager):
        run = one.run(run_id)
        store.ensure_run(run.stack, site=run.site, y_kind=run.y_kind)
    for e in records:
        bulk.add_result(run_id, e.record, stats=False)
        eager.add_result(run_id, e.record, stats=True)
    assert bulk.pending_stats(run_id) and bulk.refresh_stats(run_id) == len(records)
    assert not bulk.pending_stats(run_id)
    query = "SELECT layer, unit, n_top, n_images, max_score, round(sum_score, 15), round(mean_score, 15) FROM neuron_stats ORDER BY layer, unit"
    assert list(bulk.db.execute(query)) == list(eager.db.execute(query))
    best = "SELECT s.layer, s.unit, r.image_sha256 FROM neuron_stats s JOIN results r ON r.id = s.best_result_id ORDER BY 1, 2"
    assert list(bulk.db.execute(best)) == list(eager.db.execute(best))


def test_result_found_by_the_bytes_of_a_copied_photo(db: Path, tmp_path: Path) -> None:
    """A photo attributed under one path and named by a copy elsewhere (steer, heatmap, neurons --image) is found
    by the sha256 of its bytes; a file with other bytes is still 'no result'."""
    from mmtui.errors import NotFoundError
    from mmtui.store import Store

    with Store.open(db) as store:
        run = store.run()
        stored = store.result(run.id, Path(next(iter(store.db.query("SELECT path FROM images")))["path"]).name)
        copy = tmp_path / "elsewhere" / "renamed.jpg"
        copy.parent.mkdir()
        shutil.copy(stored["path"], copy)
        assert store.result(run.id, str(copy))["id"] == stored["id"]
        other = tmp_path / "other.jpg"
        other.write_bytes(Path(stored["path"]).read_bytes() + b"\0")
        with pytest.raises(NotFoundError, match="no result for image"):
            store.result(run.id, str(other))
