"""Issue 19 item 6: read-only queries on a cache left by an interrupted run, when the cache cannot be written.

How it is tested: these tests run as root here, and chmod a-w does not stop root writing, so the cache is made
read-only for mmtui by its check (os.access answering "not writable", as it does for any other user after
chmod a-w); mmtui then opens it with SQLite's mode=ro URI, which refuses every write whoever runs it. That the
file is never written is checked on its bytes.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
from conftest import coco_files
from typer.testing import CliRunner

from mmtui.run.pipeline import attribute_images
from mmtui.store import Store

N = 3


def _digest(path: Path) -> str:
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(path.parent.glob(path.name + "*")))).hexdigest()


@pytest.fixture
def interrupted_db(tmp_path: Path, tiny_stack, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cache whose run wrote N results and was killed before folding them into the per-unit tables."""
    path = tmp_path / "interrupted.db"
    with monkeypatch.context() as m:
        m.setattr(Store, "refresh_stats", lambda self, run_id, count_top=100: 0)  # killed before any fold
        with Store.open(path) as store:
            list(attribute_images(tiny_stack, store, coco_files(N), keep=50))
    with Store.open(path, readonly=True) as store:
        assert store.unfolded(store.run().id) == N
    return path


@pytest.fixture
def not_writable(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    real = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: mode != os.W_OK and real(path, mode, **kw))


def test_readonly_store_folds_nothing_and_says_what_is_pending(interrupted_db: Path) -> None:
    with Store.open(interrupted_db, readonly=True) as store:
        run = store.run()
        assert store.readonly and store.fold_pending(run.id) == 0
        assert store.unfolded(run.id) == N
        with pytest.raises(Exception, match="readonly"):  # SQLite itself refuses: mode=ro
            store.db.execute("DELETE FROM results")


@pytest.mark.parametrize(
    "args", [["neurons", "--limit", "3"], ["neuron", "0", "1"], ["layers"], ["runs"]], ids=lambda a: a[0]
)
def test_queries_on_a_readonly_interrupted_cache(interrupted_db: Path, not_writable: None, args: list[str]) -> None:
    from commands import app

    before = _digest(interrupted_db)
    done = CliRunner().invoke(app, [*args, "--db", str(interrupted_db)], env={"COLUMNS": "200"})
    assert done.exit_code == 0, done.output
    assert "Traceback" not in done.output and "readonly database" not in done.output
    if args[0].startswith("neuron"):
        assert f"read-only: {N} result(s) written after the last fold" in " ".join(done.stderr.split())
    assert _digest(interrupted_db) == before  # not a byte written


def test_a_writable_copy_counts_them(interrupted_db: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy.db"
    shutil.copy(interrupted_db, copy)
    with Store.open(copy) as store:
        run = store.run()
        assert store.fold_pending(run.id) == N and store.unfolded(run.id) == 0
