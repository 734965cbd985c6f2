"""The sample photos bundled with mmtui: eight COCO images the `smol` projection never saw in training.

Light: importing this module loads no model code.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

SAMPLES = Path(__file__).resolve().parent.parent / "data" / "samples"
CAPTIONS_FILE = "captions.json"  # COCO captions format: images, annotations (5 per image), licenses
INSTANCES_FILE = "instances.json"  # COCO instances format: the objects' categories and masks
LICENCES_FILE = "README.md"  # each photo's licence and source
PHOTOS_FOLDER = "photos"
COPIED_LICENCES = "samples-README.md"


def sample_dir() -> Path:
    """The folder of sample photos (also holds captions.json, instances.json and README.md with each photo's
    licence)."""
    return SAMPLES


def sample_captions() -> Path:
    """The samples' human captions, a COCO captions JSON file (usable as `--captions`)."""
    return SAMPLES / CAPTIONS_FILE


def sample_instances() -> Path:
    """The samples' COCO instance annotations (categories and masks; usable as `--instances`)."""
    return SAMPLES / INSTANCES_FILE


def sample_images() -> list[Path]:
    """The sample photos, sorted by name."""
    return sorted(SAMPLES.glob("*.jpg"))


@dataclass(frozen=True)
class CopiedSamples:
    photos: Path  # the folder of the photos
    captions: Path
    instances: Path
    licences: Path
    written: int  # files written (an identical file already there is left as it is)


def copy_samples(dest: Path) -> CopiedSamples:
    """Copy the sample photos into `dest/photos/` and their captions, instances and licences beside that folder
    (`dest/captions.json`, `dest/instances.json`, `dest/samples-README.md`): the files the README's tour names.

    A file already there with the same bytes is kept; one with other bytes is refused (FileExistsError), so a
    user's own files are never overwritten.
    """
    photos = dest / PHOTOS_FOLDER
    plan = [(p, photos / p.name) for p in sample_images()]
    plan += [
        (sample_captions(), dest / CAPTIONS_FILE),
        (sample_instances(), dest / INSTANCES_FILE),
        (SAMPLES / LICENCES_FILE, dest / COPIED_LICENCES),
    ]
    clashes = [d for s, d in plan if d.exists() and (not d.is_file() or d.read_bytes() != s.read_bytes())]
    if clashes:
        raise FileExistsError(clashes[0])
    photos.mkdir(parents=True, exist_ok=True)
    written = 0
    for source, target in plan:
        if not target.exists():
            shutil.copyfile(source, target)
            written += 1
    return CopiedSamples(photos, dest / CAPTIONS_FILE, dest / INSTANCES_FILE, dest / COPIED_LICENCES, written)
