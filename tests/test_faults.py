"""Faults that used to lose work or crash (issue 19): odd file names, special files, concurrent runs on one
cache, concurrent first opens (migrations), and a cache damaged past its header. Real processes and real files."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import resource
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import synthetic_record

from mmtui.errors import ImageError, StoreCorruptError, StoreError
from mmtui.run.images import iter_images, read_image_bytes
from mmtui.store import StackIdentity, Store
from mmtui.store.core import ResultRecord

ROOT = Path(__file__).resolve().parents[1]
LATIN1_NAME = os.fsdecode(b"latin1_\xe9t\xe9.jpg")  # not valid UTF-8: str with lone surrogates


def _mm(*args: str | Path, db: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """`mmtui ARGS --db DB` as a real process (this checkout's code)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "MMTUI_DB": str(db)}
    cmd = [sys.executable, "-c", "from commands import main; main()", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def _popen_attribute(folder: Path, db: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-c", "from commands import main; main()", "attribute", str(folder)]
    cmd += ["--preset", "tiny", "--device", "cpu", "--batch-size", "2", "--target", "dog", "--db", str(db)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)


def _count(db: Path, sql: str) -> int:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return conn.execute(sql).fetchone()[0]


def _photos(folder: Path, n: int) -> Path:
    from conftest import coco_files

    folder.mkdir()
    for f in coco_files(n):
        shutil.copy(f, folder / f.name)
    return folder


# -- 1. a file name that is not valid UTF-8 --------------------------------------------------------------------
def test_latin1_file_name_is_attributed_and_rerun_resumes(tmp_path):
    folder = _photos(tmp_path / "photos", 3)
    first = sorted(folder.iterdir())[0]
    first.rename(folder / LATIN1_NAME)
    db = tmp_path / "c.db"
    run = _mm("attribute", folder, "--preset", "tiny", "--device", "cpu", "--target", "dog", db=db)
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr
    assert _count(db, "SELECT count(*) FROM results") == 3
    with Store.open(db) as store:
        paths = [r["path"] for r in store.db.query("SELECT path FROM images")]
        assert any(p.endswith("latin1_\\xe9t\\xe9.jpg") for p in paths), paths
        run_id = store.run().id
        assert store.result(run_id, str(folder / LATIN1_NAME))["image_sha256"]  # found by the name it was given
    again = _mm("attribute", folder, "--preset", "tiny", "--device", "cpu", "--target", "dog", db=db)
    assert again.returncode == 0, again.stderr
    assert "0 attributed, 3 skipped" in again.stderr


# -- 4. special files named like images ------------------------------------------------------------------------
def _limit_memory() -> None:  # a regression (reading /dev/zero to the end) fails fast instead of eating the machine
    resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))


@pytest.fixture
def special_files(tmp_path: Path) -> Path:
    folder = _photos(tmp_path / "mixed", 2)
    os.mkfifo(folder / "a_fifo.jpg")
    (folder / "b_zero.jpg").symlink_to("/dev/zero")
    return folder


def test_fifo_and_dev_zero_are_errors_not_hangs(special_files):
    code = (
        "import sys, json; from pathlib import Path; from mmtui.run.images import iter_images;"
        "print(json.dumps([type(x).__name__ + ':' + str(x) for x in iter_images(sorted(Path(sys.argv[1]).iterdir()))]))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", code, str(special_files)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        preexec_fn=_limit_memory,
    )
    assert proc.returncode == 0, proc.stderr
    items = json.loads(proc.stdout)
    assert sorted(i.split(":")[0] for i in items) == ["ImageError", "ImageError", "LoadedImage", "LoadedImage"]
    errors = " ".join(i for i in items if i.startswith("ImageError"))
    assert "named pipe" in errors and "character device" in errors


def test_size_cap_says_how_to_raise_it(tmp_path, monkeypatch):
    from conftest import coco_files

    photo = coco_files(1)[0]
    monkeypatch.setenv("MMTUI_MAX_IMAGE_MB", "0.01")
    with pytest.raises(ImageError) as err:
        read_image_bytes(photo)
    assert "MMTUI_MAX_IMAGE_MB" in str(err.value)
    monkeypatch.setenv("MMTUI_MAX_IMAGE_MB", "64")
    assert read_image_bytes(photo)[0] == photo.read_bytes()
    assert [type(x).__name__ for x in iter_images([photo])] == ["LoadedImage"]


def test_attribute_beside_special_files_keeps_the_photos(special_files, tmp_path):
    db = tmp_path / "c.db"
    args = ["attribute", special_files, "--preset", "tiny", "--device", "cpu", "--target", "dog"]
    run = _mm(*args, "--batch-size", "4", db=db, timeout=180)
    assert run.returncode == 1, run.stderr  # some items failed, named on stderr
    assert "named pipe" in run.stderr and "character device" in run.stderr
    assert _count(db, "SELECT count(*) FROM results") == 2


# -- 2. two runs on the same images and cache at once ----------------------------------------------------------
def _record(path: Path) -> ResultRecord:
    rng = np.random.default_rng(0)
    keep = 8
    unit_max = rng.uniform(0, 0.001, (2, 16)).astype(np.float32)
    triples = (
        rng.integers(0, 2, keep),
        rng.integers(0, 16, keep),
        rng.integers(0, 4, keep),
        np.sort(rng.uniform(0.001, 0.03, keep))[::-1],
    )
    return synthetic_record(hashlib.sha256(path.read_bytes()).hexdigest(), str(path), triples, unit_max)


def test_a_result_written_by_another_process_is_kept_not_a_crash(tmp_path):
    photo = tmp_path / "x.jpg"
    photo.write_bytes(b"not really decoded here")
    db = tmp_path / "c.db"
    with Store.open(db) as a, Store.open(db) as b:
        stack = StackIdentity(
            id="s", name="s", fingerprint={}, shape={"n_layers": 2, "d_mlp": 16}, lm_id="l", prompt="p"
        )
        run_id = a.ensure_run(stack, site="mlp", y_kind="logit")
        first = a.add_result(run_id, _record(photo), stats=False)
        second = b.add_result(run_id, _record(photo), stats=False)
        assert second == first
        assert b.refresh_stats(run_id) == 1 and a.refresh_stats(run_id) == 0
    assert _count(db, "SELECT count(*) FROM results") == 1


def test_two_runs_on_the_same_images_and_cache(tmp_path):
    folder = _photos(tmp_path / "photos", 6)
    db = tmp_path / "c.db"
    Store.open(db).close()  # an existing cache: the race is on the results, not the migrations
    procs = [_popen_attribute(folder, db) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for proc, (_, stderr) in zip(procs, outs, strict=True):
        assert proc.returncode == 0, stderr
        assert "Traceback" not in stderr
    assert _count(db, "SELECT count(*) FROM results") == 6
    assert _count(db, "SELECT count(*) FROM results WHERE in_stats = 0") == 0
    with contextlib.closing(sqlite3.connect(db)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


# -- 3. several processes opening a fresh cache at once --------------------------------------------------------
def test_the_switch_to_wal_is_tried_again_while_the_file_is_locked(tmp_path, monkeypatch):
    """SQLite may refuse the switch to WAL at once ("database is locked", no busy wait) while another process
    opens the same fresh cache (CI, under load): Store.open tries again until its timeout, then says it is
    locked; any other error goes up at once."""
    import mmtui.store.core as core
    from mmtui.errors import StoreLockedError
    from mmtui.store._sqlite_utils import Database

    real = Database.enable_wal
    refusals = {"left": 3}

    def refuse_a_few(self: Database) -> None:
        if refusals["left"] > 0:
            refusals["left"] -= 1
            raise sqlite3.OperationalError("database is locked")
        real(self)

    monkeypatch.setattr(core, "WAL_RETRY_S", 0.01)
    monkeypatch.setattr(Database, "enable_wal", refuse_a_few)
    with Store.open(tmp_path / "a.db", timeout=5) as store:
        assert store.db.journal_mode == "wal" and refusals["left"] == 0
    refusals["left"] = 10**6
    started = time.monotonic()
    with pytest.raises(StoreLockedError, match="is locked by another mmtui process"):
        Store.open(tmp_path / "b.db", timeout=0.3)
    assert 0.3 <= time.monotonic() - started < 5

    def broken(self: Database) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(Database, "enable_wal", broken)
    started = time.monotonic()
    with pytest.raises(StoreError, match="disk I/O error"):
        Store.open(tmp_path / "c.db", timeout=5)
    assert time.monotonic() - started < 1


def test_fresh_cache_opened_by_several_processes_at_once(tmp_path):
    db = tmp_path / "fresh.db"
    go = tmp_path / "go"
    code = (
        "import sys, time, os; from pathlib import Path\n"
        "from mmtui.store import Store\n"
        "while not os.path.exists(sys.argv[2]): time.sleep(0.001)\n"
        "Store.open(Path(sys.argv[1]), timeout=60).close()\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for _trial in range(3):
        for f in (db, Path(f"{db}-wal"), Path(f"{db}-shm"), go):
            f.unlink(missing_ok=True)
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", code, str(db), str(go)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
            )
            for _ in range(4)
        ]
        time.sleep(1.5)  # every process has imported and waits for the signal
        go.touch()
        for proc in procs:
            _, stderr = proc.communicate(timeout=120)
            assert proc.returncode == 0, stderr
    with Store.open(db) as store:
        from mmtui.store.migrations import migrations

        assert not migrations.pending(store.db)
        assert len(migrations.applied(store.db)) == len(migrations._migrations)


# -- 5. a cache damaged past its header ------------------------------------------------------------------------
def _damage(db: Path) -> None:
    """Overwrite pages in the middle of the file with garbage (the header and the schema page stay intact)."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        page = conn.execute("PRAGMA page_size").fetchone()[0]
    size = db.stat().st_size
    n_pages = size // page
    with open(db, "r+b") as f:
        for p in range(max(2, n_pages // 3), max(3, 2 * n_pages // 3)):
            f.seek(p * page + 8)
            f.write(os.urandom(page - 16))
    with contextlib.closing(sqlite3.connect(db)) as conn:
        try:
            verdict = conn.execute("PRAGMA quick_check").fetchone()[0]
        except sqlite3.DatabaseError as error:
            verdict = str(error)
        assert verdict != "ok"


@pytest.fixture
def damaged_db(tmp_path: Path) -> Path:
    folder = _photos(tmp_path / "photos", 4)
    db = tmp_path / "c.db"
    run = _mm("attribute", folder, "--preset", "tiny", "--device", "cpu", "--target", "dog", db=db)
    assert run.returncode == 0, run.stderr
    _damage(db)
    return db


def test_damaged_cache_commands_say_so_in_one_line(damaged_db, tmp_path):
    digest = hashlib.sha256(damaged_db.read_bytes()).hexdigest()
    other = tmp_path / "other.db"
    for args in (["neurons"], ["layers"], ["runs"], ["merge", damaged_db, "--db", other]):
        run = _mm(*args, db=damaged_db) if args[0] != "merge" else _mm(*args, db=other)
        assert "Traceback" not in run.stderr, (args, run.stderr)
        if run.returncode != 0:  # a command that never reads a damaged page may well succeed
            assert run.returncode == 2, (args, run.stderr)
            assert "damaged" in run.stderr and ".recover" in run.stderr, (args, run.stderr)
            assert "not an mmtui cache" not in run.stderr
    more = _photos(tmp_path / "more", 6)
    run = _mm("attribute", more, "--preset", "tiny", "--device", "cpu", "--target", "dog", db=damaged_db)
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr and "damaged" in run.stderr
    assert hashlib.sha256(damaged_db.read_bytes()).hexdigest() == digest  # nothing more was written
    wal = Path(f"{damaged_db}-wal")
    assert not wal.exists() or wal.stat().st_size == 0


def test_store_check_integrity_names_the_damage(damaged_db):
    with pytest.raises(StoreCorruptError, match=r"damaged .*\.recover"), Store.open(damaged_db) as store:
        store.check_integrity()  # when the open itself does not already meet the damage
