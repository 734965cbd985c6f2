"""Smoke test of the real default stack (SmolLM2-135M + EfficientNet-Lite0 + the shipped projection) on the
bundled sample photos, on the CPU, offline."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from mmtui import attribute
from mmtui.run.samples import sample_captions, sample_dir, sample_images
from mmtui.stacks.presets import SMOL_PROJECTION
from mmtui.stacks.projection import read_card

COCO_CAPTIONS = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco-mini" / "annotations"


def test_samples_are_bundled_with_their_captions_and_licences():
    import json

    images = sample_images()
    assert len(images) == 8 and sample_dir().is_dir()
    coco = json.loads(sample_captions().read_text())
    assert sorted(im["file_name"] for im in coco["images"]) == [p.name for p in images]
    assert len(coco["annotations"]) == 5 * len(images)
    assert {im["license"] for im in coco["images"]} <= {lic["id"] for lic in coco["licenses"]}
    readme = (sample_dir() / "README.md").read_text()
    assert all(p.name in readme for p in images) and "CC BY 4.0" in readme


def test_samples_were_held_out_of_the_shipped_projection():
    from mmtui.training.caption_data import read_coco

    card = read_card(SMOL_PROJECTION)
    (coco,) = [s for s in card["data"] if s["kind"] == "coco"]
    assert coco["heldout_images"] == 40
    annotations = COCO_CAPTIONS / "captions_train2017.json"
    if not annotations.is_file():
        pytest.skip(f"needs {annotations}")
    held = {im.path.name for im in read_coco(annotations, holdout=40).images if im.heldout}
    assert {p.name for p in sample_images()} <= held
    assert card["heldout"]["coco:captions_train2017.json"]["margin"] > 0.3  # the pilot's was 0.15


def test_smol_attributes_two_sample_photos(smol):
    from PIL import Image

    assert (smol.n_layers, smol.d_mlp, smol.grid, smol.projection.d_out) == (30, 1536, (7, 7), 576)
    images = [Image.open(p).convert("RGB") for p in sample_images()[:2]]
    results = attribute(smol, images, top=100, full=True, max_new_tokens=8)
    for result in results:
        assert result.scores.shape == (30, 49, 1536)  # layers x patches x units
        assert torch.allclose(result.unit_max, result.scores.amax(dim=1))
        assert result.unit_max.shape == (30, 1536) and result.unit_sum.shape == (30, 1536)
        assert len(result.top_score) == 100 and int(result.top_patch.max()) < 49
        assert int(result.top_layer.max()) < 30 and int(result.top_unit.max()) < 1536
        assert math.isfinite(result.p_target) and 0 < result.p_target <= 1
        assert torch.isfinite(result.unit_max).all()
        assert result.target.caption  # the greedy caption is not empty
