"""Migration m002 (the experiment tables): a blank database, and an m001-only cache migrated forward."""

from __future__ import annotations

import numpy as np
from sqlite_utils import Database

from mmtui.store import Store
from mmtui.store import experiments as xs
from mmtui.store.migrations import m001_create_tables, migrations

TABLES = {"ablation_points", "unit_means", "activation_maps", "prompt_texts", "ks_tests", "specificity", "agreement"}


def test_blank_database_gets_the_experiment_tables():
    db = Database(memory=True)
    migrations.apply(db)
    assert set(db.table_names()) >= TABLES
    cols = db["ablation_points"].columns_dict
    assert cols["relative_drop"] is float and cols["bertscore_model"] is str and cols["k"] is int
    unique = [ix for ix in db["ablation_points"].indexes if ix.unique]
    assert [tuple(ix.columns) for ix in unique] == [("result_id", "mode", "unit_mode", "condition", "k", "seed")]
    fks = {(fk.column, fk.other_table) for fk in db["ablation_points"].foreign_keys}
    assert fks == {("run_id", "runs"), ("result_id", "results")}
    assert {(fk.column, fk.other_table) for fk in db["prompt_texts"].foreign_keys} == {
        ("stack_id", "stacks"),
        ("image_sha256", "images"),
    }


def test_an_m001_cache_is_migrated_forward_and_keeps_its_rows(tmp_path):
    path = tmp_path / "old.db"
    db = Database(path)
    m001_create_tables(db)  # the schema as the first release wrote it, recorded as applied
    db["_sqlite_migrations"].insert(
        {"migration_set": "mmtui", "name": "m001_create_tables", "applied_at": "2026-01-01"},
    )
    db["stacks"].insert({"id": "s", "name": "tiny", "fingerprint": "{}", "shape": "{}", "lm_id": "l", "created": "x"})
    run = {"id": "r", "stack_id": "s", "prompt": "A picture of", "site": "post", "y_kind": "prob", "settings": "{}"}
    db["runs"].insert({**run, "created": "x"})
    db.close()
    with Store.open(path) as store:
        assert set(store.db.table_names()) >= TABLES
        assert store.db["stacks"].count == 1
        xs.put_unit_means(store, "r", "post", np.arange(6, dtype=np.float32).reshape(2, 3), 5)
        means, n = xs.get_unit_means(store, "r", "post", (2, 3))
        assert n == 5 and means.tolist() == [[0, 1, 2], [3, 4, 5]]


def test_settings_id_is_stable():
    assert xs.settings_id({"a": 1, "b": [1, 2]}) == xs.settings_id({"b": [1, 2], "a": 1})
    assert xs.settings_id({"a": 1}) != xs.settings_id({"a": 2})
