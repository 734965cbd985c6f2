"""Fixtures of the experiment tests: a cache with a few real COCO photos attributed by the tiny stack (built once
per session, copied per test), the COCO annotation files, and a BERTScore scorer loaded once."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import ANNOTATIONS, coco_files

# The toy models gain nothing from a second thread, and on a busy 2-core machine OpenMP's waiting for a
# descheduled thread costs ~0.8 s per forward pass (measured: MiniLM 0.8 s with 2 threads, 0.02 s with 1).
torch.set_num_threads(1)

CAPTIONS = ANNOTATIONS / "captions_train2017.json"
INSTANCES = ANNOTATIONS / "instances_train2017.json"
__all__ = ["attributed_db", "attributed_master", "bert_scorer", "store_run"]
N_IMAGES = 4
KEEP = 400


@pytest.fixture(scope="session")
def attributed_master(tmp_path_factory: pytest.TempPathFactory, tiny_stack) -> Path:
    """A cache with N_IMAGES COCO photos attributed by the tiny stack (targets: the human captions' first nouns)."""
    from mmtui.run.events import ImageDone
    from mmtui.run.pipeline import attribute_images, read_captions
    from mmtui.store import Store

    if not CAPTIONS.is_file():
        pytest.skip(f"needs {CAPTIONS}")
    folder = tmp_path_factory.mktemp("coco")
    for f in coco_files(N_IMAGES):
        shutil.copy(f, folder / f.name)
    path = folder / "master.db"
    with Store.open(path) as store:
        events = list(
            attribute_images(
                tiny_stack, store, sorted(folder.glob("*.jpg")), captions=read_captions(CAPTIONS), keep=KEEP
            )
        )
    assert sum(isinstance(e, ImageDone) for e in events) == N_IMAGES
    return path


@pytest.fixture
def attributed_db(attributed_master: Path, tmp_path: Path) -> Path:
    """A private copy of the attributed cache for one test."""
    path = tmp_path / "cache.db"
    shutil.copy(attributed_master, path)
    return path


@pytest.fixture
def store_run(attributed_db: Path):
    """(store, run) opened on the private copy; closed after the test."""
    from mmtui.store import Store

    store = Store.open(attributed_db)
    yield store, store.run()
    store.close()


@pytest.fixture(scope="session")
def bert_scorer():
    from mmtui.experiments.metrics import BertScorer

    return BertScorer.load()
