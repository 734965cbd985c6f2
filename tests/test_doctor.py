"""`mmtui doctor` (issue 19 item 5): a healthy cache, a damaged page, an interrupted run with pending rows, and a
salvage that keeps the readable results without touching the damaged file. Caches are written through the Store
with synthetic results (no model), and damaged on disk as tests/test_faults.py does."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import synthetic_record
from typer.testing import CliRunner

from commands import app
from mmtui.errors import StoreCorruptError
from mmtui.store import StackIdentity, Store
from mmtui.store.core import ResultRecord
from mmtui.store.doctor import examine, salvage

N_LAYERS, D_MLP = 2, 256  # unit_max and unit_sum take 2 KiB each: the results span many pages
STACK = StackIdentity(
    id="s", name="synthetic", fingerprint={}, shape={"n_layers": N_LAYERS, "d_mlp": D_MLP}, lm_id="l", prompt="p"
)


def _record(i: int) -> ResultRecord:
    rng = np.random.default_rng(i)
    keep = 8
    unit_max = rng.uniform(0, 0.001, (N_LAYERS, D_MLP)).astype(np.float32)
    triples = (
        rng.integers(0, N_LAYERS, keep),
        rng.integers(0, D_MLP, keep),
        rng.integers(0, 4, keep),
        np.sort(rng.uniform(0.001, 0.03, keep))[::-1],
    )
    return synthetic_record(hashlib.sha256(f"image {i}".encode()).hexdigest(), f"/photos/{i}.jpg", triples, unit_max)


def _cache(db: Path, n: int, pending: int = 0) -> str:
    """A cache with one run of n results, the last `pending` of them not folded (an interrupted run)."""
    with Store.open(db) as store:
        run_id = store.ensure_run(STACK, site="mlp", y_kind="logit")
        for i in range(n):
            store.add_result(run_id, _record(i), stats=False)
            if i == n - pending - 1:
                store.refresh_stats(run_id)
    return run_id


def _damage(db: Path) -> None:
    """Overwrite pages in the middle of the file with garbage (the header and the schema page stay intact)."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        page = conn.execute("PRAGMA page_size").fetchone()[0]
    n_pages = db.stat().st_size // page
    with open(db, "r+b") as f:
        for p in range(max(2, n_pages // 3), max(3, n_pages // 2)):
            f.seek(p * page + 8)
            f.write(os.urandom(page - 16))


def _doctor(*args: str | Path) -> tuple[int, str, list[dict]]:
    result = CliRunner().invoke(app, ["doctor", *map(str, args)])
    plain = CliRunner().invoke(app, ["doctor", *map(str, args), "--json"]) if "--salvage" not in args else None
    rows = [json.loads(line) for line in plain.stdout.splitlines()] if plain else []
    return result.exit_code, result.stdout + result.stderr, rows


def test_healthy_cache(tmp_path):
    db = tmp_path / "c.db"
    run_id = _cache(db, 5)
    digest = hashlib.sha256(db.read_bytes()).hexdigest()
    code, text, rows = _doctor("--db", db)
    assert code == 0, text
    assert "PRAGMA integrity_check: ok" in text and "healthy" in text and "PROBLEM" not in text
    assert f"run {run_id} (synthetic): 5 results, 0 not folded" in text
    assert [r for r in rows if r["type"] == "run"] == [
        {"type": "run", "id": run_id, "stack": "synthetic", "n_results": 5, "n_pending": 0, "error": ""}
    ]
    assert all(r["ok"] for r in rows if r["type"] == "check")
    assert rows[-1] == {"type": "summary", "path": str(db), "opened": True, "problems": 0}
    assert hashlib.sha256(db.read_bytes()).hexdigest() == digest


def test_interrupted_run_with_pending_rows(tmp_path):
    db = tmp_path / "c.db"
    run_id = _cache(db, 6, pending=4)
    checkup = examine(db)
    assert [(r.n_results, r.n_pending) for r in checkup.runs] == [(6, 4)]
    assert [f.check for f in checkup.problems] == ["interrupted"]
    code, text, _ = _doctor("--db", db)
    assert code == 1, text
    assert f"run {run_id}: 4 of its 6 results are not folded" in text
    assert f"mmtui neurons --run {run_id}" in text  # what to do
    with Store.open(db) as store:  # what the fix line says folds them
        store.fold_pending(run_id)
    assert _doctor("--db", db)[0] == 0


def test_leftover_wal_and_orphans_are_named(tmp_path):
    db = tmp_path / "c.db"
    _cache(db, 3)
    with contextlib.closing(sqlite3.connect(db)) as conn:  # a result whose run is gone
        conn.execute("PRAGMA foreign_keys = OFF")
        conn.execute("UPDATE results SET run_id = 'gone' WHERE id = 1")
        conn.commit()
    shutil.copy(db, tmp_path / "copy.db")
    Path(f"{db}-wal").write_bytes(b"\0" * 100)  # left by a process that did not close the cache
    kinds = {f.check: f for f in examine(db).problems}
    assert set(kinds) == {"wal", "orphans"}
    assert "1 results -> runs" in kinds["orphans"].detail and "never delete it" in kinds["wal"].fix


def test_damaged_page_is_found_and_cannot_open_is_exit_2(tmp_path):
    db = tmp_path / "c.db"
    _cache(db, 200)
    _damage(db)
    code, text, rows = _doctor("--db", db)
    assert code == 1, text
    integrity = next(r for r in rows if r.get("check") == "integrity")
    assert not integrity["ok"] and "--salvage" in integrity["fix"]
    with pytest.raises(StoreCorruptError, match=r"damaged .*mmtui doctor --db .* --salvage"), Store.open(db) as store:
        store.check_integrity()  # the damaged-cache message of every command points to the doctor
    junk = tmp_path / "junk.db"
    junk.write_bytes(os.urandom(8192))
    code, text, _ = _doctor("--db", junk)
    assert code == 2 and "does not open" in text
    assert _doctor("--db", tmp_path / "missing.db")[0] == 2


def _readable_result_ids(db: Path) -> set[int]:
    """The results of `db` (a copy) that read one by one, with their image row (every reader joins it)."""
    ids = set()
    with contextlib.closing(sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)) as conn:
        for i in range(1, 201):
            with contextlib.suppress(sqlite3.DatabaseError):
                sql = "SELECT * FROM results JOIN images ON images.sha256 = results.image_sha256 WHERE results.id = ?"
                if conn.execute(sql, [i]).fetchone():
                    ids.add(i)
    return ids


def _recover_works(tmp_path: Path) -> bool:
    cli = shutil.which("sqlite3")
    if not cli:
        return False
    db = tmp_path / "plain.db"
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute("CREATE TABLE t (a)")
        conn.commit()
    return subprocess.run([cli, str(db), ".recover"], capture_output=True, check=False).returncode == 0


@pytest.mark.parametrize("recover", [True, False], ids=["sqlite3-recover", "row-by-row"])
def test_salvage_keeps_the_readable_results_and_never_touches_the_damaged_file(tmp_path, recover):
    if recover and not _recover_works(tmp_path):
        pytest.skip("needs a sqlite3 program whose .recover works (Debian's 3.40.1 answers 'SQL logic error')")
    db = tmp_path / "c.db"
    run_id = _cache(db, 200)
    with Store.open(db) as store:
        stats_before = store.db.execute("SELECT count(*) FROM neuron_stats").fetchone()[0]
    _damage(db)
    probe = tmp_path / "probe.db"
    shutil.copy(db, probe)
    readable = _readable_result_ids(probe)
    digest = hashlib.sha256(db.read_bytes()).hexdigest()
    out = tmp_path / "saved" / "recovered.db"
    saved = salvage(db, out, recover=recover)
    assert hashlib.sha256(db.read_bytes()).hexdigest() == digest
    assert not Path(f"{db}-wal").exists() and not Path(f"{db}-shm").exists()
    assert saved.method == ("sqlite3 .recover" if recover else "row by row")
    assert saved.integrity == "ok"
    with Store.open(out) as store:
        ids = {r[0] for r in store.db.execute("SELECT id FROM results").fetchall()}
        assert readable <= ids and len(ids) == saved.results_saved > 0
        assert store.unfolded(run_id) == 0 and saved.folded == saved.results_saved
        n_stats = store.db.execute("SELECT count(*) FROM neuron_stats").fetchone()[0]
        assert 0 < n_stats <= stats_before
        store.run(run_id)  # the run and its stack came along
    assert examine(out).problems == []


def test_salvage_of_a_healthy_cache_keeps_every_row(tmp_path):
    db = tmp_path / "c.db"
    run_id = _cache(db, 7, pending=2)
    out = tmp_path / "copy.db"
    code, text, _ = _doctor("--db", db, "--salvage", out)
    assert code == 1, text  # the check found the interrupted run; the salvage still ran
    assert "7 results of the 7 the damaged file counts" in text
    with Store.open(db) as a, Store.open(out) as b:
        assert a.fold_pending(run_id) == 2
        for table in ("runs", "stacks", "results", "images", "neuron_images"):
            sql = f"SELECT * FROM {table} ORDER BY 1, 2, 3"
            assert a.db.execute(sql).fetchall() == b.db.execute(sql).fetchall(), table
        sql = "SELECT * FROM neuron_stats ORDER BY 1, 2, 3"  # sums folded in another order: equal up to rounding
        assert np.allclose(a.db.execute(sql).fetchall(), b.db.execute(sql).fetchall(), rtol=1e-9, atol=0)
    code, text, _ = _doctor("--db", db, "--salvage", out)
    assert code == 2 and "already exists" in text


def test_an_older_schema_is_a_note_not_a_problem(tmp_path):
    """A cache of an earlier mmtui (here: before m004, which added results.in_stats) is read as it is."""
    from mmtui.store._sqlite_utils import Database
    from mmtui.store.migrations import migrations

    db = tmp_path / "old.db"
    with contextlib.closing(sqlite3.connect(db)) as conn:
        migrations.apply(Database(conn), stop_before="m004_track_results_in_stats")
        conn.execute("INSERT INTO stacks (id, name) VALUES ('s', 'old stack')")
        conn.execute("INSERT INTO runs (id, stack_id) VALUES ('r1', 's')")
        conn.execute("INSERT INTO images (sha256, path) VALUES ('abc', '/p.jpg')")
        conn.execute("INSERT INTO results (run_id, image_sha256, target_spec) VALUES ('r1', 'abc', 'auto')")
        conn.commit()
    checkup = examine(db)
    assert checkup.problems == []
    schema = next(f for f in checkup.findings if f.check == "schema")
    assert f"{len(migrations._migrations) - 3} behind this mmtui" in schema.detail
    assert [(r.id, r.n_results, r.n_pending) for r in checkup.runs] == [("r1", 1, None)]
    code, text, _ = _doctor("--db", db)
    assert code == 0 and "run r1 (old stack): 1 results, ? not folded" in text
