"""Image-caption data for training a projection: three on-disk layouts, held-out splits, and a cache of
image-encoder features computed once per (encoder, image).

Layouts:
- Flickr8k: `captions.tsv` (image<TAB>caption<TAB>split, header line) + `images/`; the `test` split is held out.
- COCO: a captions JSON (`images`, `annotations` with `image_id` and `caption`) + its image folder.
- class folders: files named `<wnid>_<class name>.<ext>` (ImageNet style); the caption names the class.
COCO and class folders hold out a fixed number of images, chosen by the sha256 of their file names (stable
across machines and runs). Images whose bytes match an excluded image are held out wherever they appear.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mmtui.errors import ImageError, MmtuiError
from mmtui.run.images import decode_image, find_images, read_image_bytes

if TYPE_CHECKING:
    from mmtui.stacks.vision import VisionEncoder

DEFAULT_HOLDOUT = 30


class DataError(MmtuiError):
    """A caption file or image folder cannot be read as training data."""


@dataclass(frozen=True)
class CaptionedImage:
    """One image and its human captions. heldout: never trained on; used for the held-out losses."""

    path: Path
    captions: tuple[str, ...]
    heldout: bool


@dataclass
class CaptionSource:
    """One data set: its kind (flickr8k, coco, classes), where it was read from, and its images."""

    kind: str
    path: Path
    images: list[CaptionedImage]

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.path.name}"

    def describe(self) -> dict[str, Any]:
        train = [im for im in self.images if not im.heldout]
        held = [im for im in self.images if im.heldout]
        return {
            "kind": self.kind,
            "path": str(self.path),
            "train_images": len(train),
            "train_captions": sum(len(im.captions) for im in train),
            "heldout_images": len(held),
            "heldout_captions": sum(len(im.captions) for im in held),
        }


def tidy_caption(caption: str) -> str:
    """A caption as it follows the prompt ("A picture of"): leading space, first letter lowered, one final stop.

    "A dog runs through the grass ." -> " a dog runs through the grass."
    """
    text = " ".join(caption.split())
    text = re.sub(r"\s+([.,!?;:])", r"\1", text).strip()
    if not text:
        return ""
    first = text.split(" ", 1)[0]
    if first != "I" and not (len(first) > 1 and first.isupper()):
        text = text[0].lower() + text[1:]
    if text[-1] not in ".!?":
        text += "."
    return " " + text


def class_caption(name: str) -> str:
    """ "great_white_shark" -> "A great white shark." (the article chosen by the first letter)."""
    words = name.replace("_", " ").strip()
    low = words.lower()
    vowel = low[:1] in ("a", "e", "i", "o") or (low[:1] == "u" and not low.startswith(("uni", "use", "usu", "ur")))
    article = "An" if vowel else "A"
    return f"{article} {words}."


def _held_out_names(names: Iterable[str], n: int) -> set[str]:
    """The n names whose sha256 is smallest: a stable pseudo-random choice."""
    return set(sorted(names, key=lambda s: hashlib.sha256(s.encode()).hexdigest())[:n])


def read_flickr8k(root: Path | str) -> CaptionSource:
    """Flickr8k: train, dev and `none` images for training; `test` held out."""
    root = Path(root)
    tsv = root / "captions.tsv"
    if not tsv.is_file():
        raise DataError(f"{tsv}: missing; a Flickr8k folder holds captions.tsv (image, caption, split) and images/")
    by_image: dict[str, list[str]] = {}
    split_of: dict[str, str] = {}
    with open(tsv, newline="", encoding="utf-8") as fh:
        for row in csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE):
            if len(row) != 3 or row == ["image", "caption", "split"]:
                continue
            image, caption, split = row
            by_image.setdefault(image, []).append(caption)
            split_of[image] = split
    if not by_image:
        raise DataError(f"{tsv}: no rows of the form image<TAB>caption<TAB>split")
    images = [
        CaptionedImage(root / "images" / name, tuple(caps), split_of[name] == "test")
        for name, caps in sorted(by_image.items())
    ]
    return CaptionSource("flickr8k", root, images)


def read_coco(
    annotations: Path | str, image_dir: Path | str | None = None, holdout: int = DEFAULT_HOLDOUT
) -> CaptionSource:
    """COCO captions JSON; image_dir defaults to `<json folder>/../<split>` (captions_train2017.json -> train2017)."""
    annotations = Path(annotations)
    try:
        data = json.loads(annotations.read_text(encoding="utf-8"))
        files = {im["id"]: im["file_name"] for im in data["images"]}
        captions: dict[int, list[str]] = {}
        for ann in data["annotations"]:
            captions.setdefault(ann["image_id"], []).append(ann["caption"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(f"{annotations}: not a COCO captions file ({type(err).__name__}: {err})") from err
    if image_dir is None:
        image_dir = annotations.parent.parent / annotations.stem.removeprefix("captions_")
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise DataError(f"{image_dir}: image folder of {annotations.name} not found; pass it with --coco-images")
    names = [files[i] for i in sorted(captions) if i in files]
    held = _held_out_names(names, holdout)
    by_name = {files[i]: caps for i, caps in captions.items() if i in files}
    images = [CaptionedImage(image_dir / n, tuple(by_name[n]), n in held) for n in names]
    return CaptionSource("coco", annotations, images)


def read_class_folder(root: Path | str, holdout: int = DEFAULT_HOLDOUT) -> CaptionSource:
    """Images named `<id>_<class name>.<ext>`: one caption each, "A <class name>." (read after the prompt)."""
    root = Path(root)
    files = find_images(root).files
    images = []
    for path in files:
        _, sep, name = path.stem.partition("_")
        if not sep or not name:
            raise DataError(f"{path}: class-folder images are named <id>_<class name>.<ext>, like n01440764_tench.JPEG")
        images.append((path, class_caption(name)))
    held = _held_out_names([p.name for p, _ in images], holdout)
    return CaptionSource("classes", root, [CaptionedImage(p, (c,), p.name in held) for p, c in images])


def data_sha256(items: Iterable[tuple[str, str]]) -> str:
    """sha256 of sorted `image_sha256<TAB>caption` lines: the identity of a list of training pairs."""
    digest = hashlib.sha256()
    for sha, caption in sorted(items):
        digest.update(f"{sha}\t{caption}\n".encode())
    return digest.hexdigest()


@dataclass
class Features:
    """Encoder features of a set of images, one row per distinct image.

    values: [N, P, d_vision] float16 on the CPU; row: image sha256 -> row index; sha_of: path -> sha256.
    problems: images that could not be read (each one line).
    """

    values: torch.Tensor
    row: dict[str, int]
    sha_of: dict[Path, str]
    problems: list[ImageError] = field(default_factory=list)


class FeatureCache:
    """Encoder features on disk, one float16 .npy per image under `<root>/<encoder key>/<sha[:2]>/<sha>.npy`."""

    def __init__(self, root: Path | str, encoder_key: str) -> None:
        self.dir = Path(root) / encoder_key

    def path(self, sha: str) -> Path:
        return self.dir / sha[:2] / f"{sha}.npy"

    def get(self, sha: str) -> torch.Tensor | None:
        path = self.path(sha)
        if not path.is_file():
            return None
        try:
            return torch.from_numpy(np.load(path, allow_pickle=False))
        except (OSError, ValueError):  # a file cut short by an interrupted run: compute it again
            return None

    def put(self, sha: str, value: torch.Tensor) -> None:
        path = self.path(sha)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, value.numpy(), allow_pickle=False)
        tmp.replace(path)


def encoder_key(identity: dict[str, Any], encoder_name: str, dtype: torch.dtype) -> str:
    """What decides an encoder's features: its identity entries, its name and the dtype it runs in."""
    parts = {k: v for k, v in identity.items() if k.startswith("encoder") or k in ("preset", "seed")}
    if "encoder" in parts:
        parts.pop("preset", None)
        parts.pop("seed", None)
    blob = json.dumps({**parts, "name": encoder_name, "dtype": str(dtype)}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _read(path: Path, preprocess: Callable, cache: FeatureCache) -> tuple[Path, str, torch.Tensor, bool] | ImageError:
    """(path, sha256, cached features or preprocessed pixels, cached?) or the file's one-line error."""
    try:
        data, sha = read_image_bytes(path)
        cached = cache.get(sha)
        if cached is not None:
            return path, sha, cached, True
        image = decode_image(data, path)
    except ImageError as err:
        return err
    return path, sha, preprocess([image])[0], False


def compute_features(
    encoder: VisionEncoder,
    device: torch.device,
    paths: Sequence[Path],
    cache: FeatureCache,
    *,
    batch_size: int = 64,
    workers: int = 4,
    on_progress: Callable[[int, int], None] | None = None,
) -> Features:
    """Features [N, P, d] float16 of every readable image in `paths`, from the cache or the encoder.

    Images are read and preprocessed in a thread pool; each bad file becomes one ImageError in `problems`.
    """
    rows: list[torch.Tensor] = []
    row: dict[str, int] = {}
    sha_of: dict[Path, str] = {}
    problems: list[ImageError] = []
    pending: list[tuple[str, torch.Tensor]] = []

    def flush() -> None:
        if not pending:
            return
        pixels = torch.stack([px for _, px in pending]).to(device)  # [B, 3, H, W]
        feats = encoder(pixels).float().cpu().to(torch.float16)  # [B, P, d]
        for (sha, _), value in zip(pending, feats, strict=True):
            cache.put(sha, value)
            row[sha] = len(rows)
            rows.append(value)
        pending.clear()

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for done, result in enumerate(pool.map(lambda p: _read(p, encoder.preprocess, cache), paths), 1):
            if isinstance(result, ImageError):
                problems.append(result)
            else:
                path, sha, value, cached = result
                sha_of[path] = sha
                if sha in row or any(sha == s for s, _ in pending):
                    pass  # the same picture under another name: computed once
                elif cached:
                    row[sha] = len(rows)
                    rows.append(value)
                else:
                    pending.append((sha, value))
                    if len(pending) >= batch_size:
                        flush()
            if on_progress is not None:
                on_progress(done, len(paths))
        flush()
    values = torch.stack(rows) if rows else torch.zeros(0, encoder.n_patches, encoder.dim, dtype=torch.float16)
    return Features(values, row, sha_of, problems)


def image_sha256s(folders: Iterable[Path | str]) -> set[str]:
    """sha256 of every readable image file under these folders (to keep those pictures out of training)."""
    shas: set[str] = set()
    for folder in folders:
        for path in find_images(folder).files:
            try:
                shas.add(read_image_bytes(path)[1])
            except ImageError:
                continue
    return shas
