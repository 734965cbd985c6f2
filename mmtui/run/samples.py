"""The sample photos bundled with mmtui: eight COCO images the `smol` projection never saw in training.

Light: importing this module loads no model code.
"""

from __future__ import annotations

from pathlib import Path

SAMPLES = Path(__file__).resolve().parent.parent / "data" / "samples"
CAPTIONS_FILE = "captions.json"  # COCO captions format: images, annotations (5 per image), licenses


def sample_dir() -> Path:
    """The folder of sample photos (also holds captions.json and README.md with each photo's licence)."""
    return SAMPLES


def sample_captions() -> Path:
    """The samples' human captions, a COCO captions JSON file (usable as `--captions`)."""
    return SAMPLES / CAPTIONS_FILE


def sample_images() -> list[Path]:
    """The sample photos, sorted by name."""
    return sorted(SAMPLES.glob("*.jpg"))
