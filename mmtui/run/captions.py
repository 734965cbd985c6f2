"""Human captions of an attribute run (`--captions`): read a caption file, and pick an image's target from them."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from mmtui.errors import TargetError

__all__ = ["human_target", "read_captions"]


def read_captions(path: Path | str) -> dict[str, list[str]]:
    """Captions per image file name from COCO captions JSON, JSON Lines or CSV (`image,caption`)."""
    path = Path(path)
    if not path.is_file():
        raise TargetError(f"{path}: caption file not found; pass --captions FILE (COCO JSON, JSONL or CSV)")
    captions: dict[str, list[str]] = {}
    try:
        if path.suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            names = {img["id"]: img["file_name"] for img in data["images"]}
            for ann in data["annotations"]:
                captions.setdefault(names[ann["image_id"]], []).append(ann["caption"])
        elif path.suffix in (".jsonl", ".ndjson"):
            for line in path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    row = json.loads(line)
                    captions.setdefault(Path(row["image"]).name, []).append(row["caption"])
        else:
            with path.open(newline="", encoding="utf-8") as fh:
                for row in csv.DictReader(fh, delimiter="\t" if path.suffix == ".tsv" else ","):
                    captions.setdefault(Path(row["image"]).name, []).append(row["caption"])
    except (KeyError, ValueError, TypeError) as err:
        raise TargetError(
            f"{path}: not a caption file this tool reads ({type(err).__name__}: {err}); "
            "use COCO captions JSON, JSONL with image and caption keys, or CSV with an image,caption header"
        ) from err
    # a caption that is null, a number or blank is left out: an image with no other caption then fails alone
    captions = {name: texts for name, found in captions.items() if (texts := [t for t in found if _is_text(t)])}
    if not captions:
        raise TargetError(f"{path}: holds no captions (no caption is a non-empty text)")
    return captions


def _is_text(caption: object) -> bool:
    return isinstance(caption, str) and bool(caption.strip())


def human_target(captions: list[str]) -> tuple[str, str] | None:
    """(first noun, caption) of the first of an image's human captions that has a noun."""
    from mmtui.run.nouns import first_noun

    for caption in captions:
        noun = first_noun(caption)
        if noun is not None:
            return noun.word, caption
    return None
