"""Find and load images: every bad file becomes one clear problem and the rest go on.

Images are identified by the sha256 of their bytes, so the same picture under two names is computed once.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import stat
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from mmtui.errors import ImageDirError, ImageError

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".jfif"}
)


@dataclass(frozen=True)
class LoadedImage:
    """A decoded RGB image and where it came from."""

    path: Path
    sha256: str
    image: Image.Image = field(repr=False, compare=False)

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size


@dataclass
class ImageScan:
    """What `find_images` saw: the image files to read, and what it skipped and why."""

    files: list[Path]
    skipped: list[Path]
    problems: list[ImageError]


def find_images(root: Path | str) -> ImageScan:
    """List the image files under `root` (a folder, searched recursively, or one file), sorted by path.

    Symlinks are followed, but a folder already visited (a symlink loop) is entered once.
    Raises ImageDirError when `root` is missing or holds no image file.
    """
    root = Path(root)
    if not root.exists():
        raise ImageDirError(f"{root}: no such file or folder; pass a folder of images")
    if root.is_file():
        return ImageScan(files=[root], skipped=[], problems=[])
    files: list[Path] = []
    skipped: list[Path] = []
    problems: list[ImageError] = []
    seen_dirs: set[str] = set()

    def on_error(err: OSError) -> None:
        problems.append(
            ImageError(str(err.filename), f"cannot list this folder ({err.strerror}); check its permissions")
        )

    for dirpath, dirnames, filenames in os.walk(root, followlinks=True, onerror=on_error):
        real = os.path.realpath(dirpath)
        if real in seen_dirs:
            problems.append(ImageError(dirpath, "symlink loop or repeated folder; entered once"))
            dirnames[:] = []
            continue
        seen_dirs.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = Path(dirpath) / name
            if path.suffix.lower() in IMAGE_SUFFIXES:
                files.append(path)
            else:
                skipped.append(path)
    if not files:
        raise ImageDirError(
            f"{root}: no image files found (looked for {', '.join(sorted(IMAGE_SUFFIXES))}); "
            "point to a folder of photos"
        )
    return ImageScan(files=sorted(files), skipped=skipped, problems=problems)


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB: 16-bit and float are rescaled, transparency is laid on white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        import numpy as np

        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        img = Image.fromarray(((arr - lo) * scale).astype("uint8"), mode="L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def decode_image(data: bytes, path: Path | str) -> Image.Image:
    """Decode image bytes into an upright RGB image (EXIF orientation applied; first frame of animations).

    Raises ImageError with a one-line reason for empty, truncated, unknown or oversized files.
    """
    if not data:
        raise ImageError(str(path), "empty file (0 bytes); remove it or replace it with the real image")
    cap = max_image_pixels()
    Image.MAX_IMAGE_PIXELS = cap  # PIL warns above it and refuses above twice it: both are refused here
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
        size = re.search(r"\((\d+) pixels\)", str(err))
        pixels = f"{int(size.group(1)) / 1e6:.0f} megapixels" if size else "too many pixels"
        raise ImageError(
            str(path),
            f"skipped: {pixels}, over the cap of {cap / 1e6:.0f} megapixels; "
            f"downscale it, or raise the cap with {MAX_IMAGE_MPIX_ENV}=N",
        ) from err
    except UnidentifiedImageError as err:
        raise ImageError(str(path), "not an image PIL can read; remove it or convert it to JPEG or PNG") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageError(str(path), f"corrupt or truncated image ({err}); re-export or remove it") from err
    try:
        with img:
            if getattr(img, "n_frames", 1) > 1:
                img.seek(0)
            img.load()
            upright: Image.Image = ImageOps.exif_transpose(img) or img
            return _to_rgb(upright)
    except UnidentifiedImageError as err:
        raise ImageError(str(path), "not an image PIL can read; remove it or convert it to JPEG or PNG") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageError(str(path), f"corrupt or truncated image ({err}); re-export or remove it") from err


MAX_IMAGE_MPIX_ENV = "MMTUI_MAX_IMAGE_MPIX"
DEFAULT_MAX_IMAGE_MPIX = 89.5  # PIL's own default warning line (89,478,485 pixels): a 144-megapixel PNG is over it


def max_image_pixels() -> int:
    """The most pixels an image may have: $MMTUI_MAX_IMAGE_MPIX megapixels (default 89.5, PIL's)."""
    text = os.environ.get(MAX_IMAGE_MPIX_ENV, "").strip()
    try:
        mpix = float(text) if text else DEFAULT_MAX_IMAGE_MPIX
    except ValueError:
        mpix = DEFAULT_MAX_IMAGE_MPIX
    return max(int(mpix * 1e6), 1)


MAX_IMAGE_MB_ENV = "MMTUI_MAX_IMAGE_MB"
DEFAULT_MAX_IMAGE_MB = 256  # far above any photo; bounds the memory one file can take


def max_image_bytes() -> int:
    """The largest image file read, in bytes: $MMTUI_MAX_IMAGE_MB MiB (default 256)."""
    text = os.environ.get(MAX_IMAGE_MB_ENV, "").strip()
    try:
        mib = float(text) if text else DEFAULT_MAX_IMAGE_MB
    except ValueError:
        mib = DEFAULT_MAX_IMAGE_MB
    return int(max(mib, 0) * 1024 * 1024)


_FILE_KINDS = (
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISDIR, "a folder"),
)


def _too_large(path: Path, cap: int) -> ImageError:
    return ImageError(
        str(path),
        f"file larger than the {cap / 2**20:g} MiB cap on an image file; "
        f"downscale it, or raise the cap with {MAX_IMAGE_MB_ENV}=N (MiB)",
    )


def read_image_bytes(path: Path | str) -> tuple[bytes, str]:
    """(bytes, sha256) of a file. Raises ImageError when it cannot be read.

    Only regular files are read (a FIFO, device or socket named like an image is an error, without waiting on
    it), and at most `max_image_bytes()` of them (a larger file is an error, before it is read).
    """
    path = Path(path)
    cap = max_image_bytes()
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO opens without waiting for a writer
    except FileNotFoundError as err:
        raise ImageError(str(path), "file not found (moved, deleted, or a broken link); check the path") from err
    except OSError as err:
        raise ImageError(str(path), f"cannot read this file ({err.strerror or err}); check its permissions") from err
    with os.fdopen(fd, "rb") as file:
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                kind = next((name for test, name in _FILE_KINDS if test(info.st_mode)), "not a regular file")
                raise ImageError(str(path), f"{kind}, not an image file; only regular files are read, remove it")
            if info.st_size > cap:
                raise _too_large(path, cap)
            data = file.read(cap + 1)
        except OSError as err:
            raise ImageError(str(path), f"cannot read this file ({err.strerror or err}); check it") from err
    if len(data) > cap:  # grew while read
        raise _too_large(path, cap)
    return data, hashlib.sha256(data).hexdigest()


def load_image(path: Path | str, sha256: str | None = None) -> LoadedImage:
    """Read, hash and decode one image file. Raises ImageError on any problem with this file, and with `sha256`
    (the image a result was attributed with) when the file no longer hashes to it."""
    data, sha = read_image_bytes(path)
    if sha256 is not None and sha != sha256:
        raise ImageError(str(path), "the file changed since it was attributed; attribute it again")
    return LoadedImage(path=Path(path), sha256=sha, image=decode_image(data, path))


@dataclass(frozen=True)
class Skip:
    """A file passed over on purpose (not an error): a duplicate, or one that belongs to another shard."""

    path: Path
    reason: str
    sha256: str
    duplicate: bool  # the same bytes as an earlier file (else: in another shard)


def in_shard(sha256: str, shard: tuple[int, int] | None) -> bool:
    """Whether an image belongs to shard I of N (by its content hash, so duplicates share a shard)."""
    return shard is None or int(sha256[:16], 16) % shard[1] == shard[0]


@dataclass(frozen=True)
class RawImage:
    """An image file's bytes, read and hashed but not decoded (decoded where it is used, e.g. a Ray worker)."""

    path: Path
    sha256: str
    data: bytes = field(repr=False, compare=False)

    def decode(self) -> LoadedImage:
        """Raises ImageError when the bytes are not a readable image."""
        return LoadedImage(path=self.path, sha256=self.sha256, image=decode_image(self.data, self.path))


def iter_images(
    paths: Iterable[Path], shard: tuple[int, int] | None = None, decode: bool = True
) -> Iterator[LoadedImage | RawImage | ImageError | Skip]:
    """Load each path in turn, yielding the image, its error, or a Skip; duplicates (same bytes) come once.

    shard: (I, N) keeps only the images whose content hash falls in shard I of N; the others are not decoded.
    decode=False yields RawImage (bytes only); decoding errors then surface where it is decoded.
    """
    first_path: dict[str, Path] = {}
    for path in paths:
        try:
            data, sha = read_image_bytes(path)
            if shard is not None and not in_shard(sha, shard):
                yield Skip(Path(path), f"in another shard than {shard[0]}/{shard[1]}", sha, duplicate=False)
                continue
            if sha in first_path:
                yield Skip(Path(path), f"same image as {first_path[sha]}; computed once", sha, duplicate=True)
                continue
            first_path[sha] = Path(path)
            raw = RawImage(Path(path), sha, data)
            yield raw.decode() if decode else raw
        except ImageError as err:
            yield err
