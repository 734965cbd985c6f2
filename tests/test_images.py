"""Every kind of bad image input gives one clear error for that file; good odd images are read right."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmtui.errors import ImageDirError, ImageError
from mmtui.run.images import Skip, find_images, in_shard, iter_images, load_image


def _save(img: Image.Image, path: Path, **kw) -> Path:
    img.save(path, **kw)
    return path


def test_missing_folder(tmp_path):
    with pytest.raises(ImageDirError, match="no such file or folder"):
        find_images(tmp_path / "nope")


def test_empty_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("not a picture")
    with pytest.raises(ImageDirError, match="no image files found"):
        find_images(tmp_path)


def test_non_image_names_are_skipped_and_listed(tmp_path):
    _save(Image.new("RGB", (8, 8)), tmp_path / "a.png")
    (tmp_path / "notes.txt").write_text("x")
    scan = find_images(tmp_path)
    assert [p.name for p in scan.files] == ["a.png"]
    assert [p.name for p in scan.skipped] == ["notes.txt"]


def test_file_with_image_name_that_is_not_an_image(tmp_path):
    path = tmp_path / "fake.jpg"
    path.write_text("this is text")
    with pytest.raises(ImageError, match=r"fake\.jpg: not an image"):
        load_image(path)


def test_zero_byte_image(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(ImageError, match="empty file"):
        load_image(path)


def test_truncated_image(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageError, match="truncated"):
        load_image(path)


def test_unreadable_file(tmp_path):
    path = tmp_path / "gone.jpg"
    path.symlink_to(tmp_path / "does-not-exist.jpg")  # a dangling link: listed, but cannot be read
    with pytest.raises(ImageError, match="file not found"):
        load_image(path)


@pytest.mark.parametrize(
    "mode,make",
    [
        ("CMYK", lambda: Image.new("CMYK", (10, 10), (0, 255, 0, 0))),
        ("I;16", lambda: Image.fromarray(np.full((10, 10), 40000, dtype=np.uint16))),
        ("P+transparency", lambda: _palette_with_transparency()),
        ("RGBA", lambda: Image.new("RGBA", (10, 10), (255, 0, 0, 0))),
        ("LA", lambda: Image.new("LA", (10, 10), (0, 255))),
    ],
)
def test_odd_modes_become_rgb(tmp_path, mode, make):
    suffix = ".tiff" if mode in ("CMYK", "I;16") else ".png"
    path = _save(make(), tmp_path / f"odd{suffix}")
    img = load_image(path).image
    assert img.mode == "RGB" and img.size == (10, 10)


def _palette_with_transparency() -> Image.Image:
    img = Image.new("P", (10, 10), 0)
    img.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    img.info["transparency"] = 0
    return img


def test_transparent_pixels_are_laid_on_white(tmp_path):
    path = _save(Image.new("RGBA", (4, 4), (255, 0, 0, 0)), tmp_path / "clear.png")
    assert load_image(path).image.getpixel((0, 0)) == (255, 255, 255)


def test_animated_gif_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    r, g, b = load_image(path).image.getpixel((0, 0))
    assert r > 200 and b < 50


def test_exif_rotation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = _save(img, tmp_path / "rot.jpg", exif=exif)
    assert load_image(path).image.size == (20, 40)


def test_decompression_bomb_guard_stays_on(tmp_path, monkeypatch):
    path = _save(Image.new("RGB", (100, 100)), tmp_path / "big.png")
    monkeypatch.setenv("MMTUI_MAX_IMAGE_MPIX", "0.001")  # 10,000 px > 2 x the cap: PIL's error, one line
    with pytest.raises(ImageError, match="over the cap of 0 megapixels; .*MMTUI_MAX_IMAGE_MPIX"):
        load_image(path)
    monkeypatch.setenv("MMTUI_MAX_IMAGE_MPIX", "0.01")  # raised to the image's size: it loads
    assert load_image(path).image.size == (100, 100)


def test_144_megapixel_png_is_one_line_not_a_warning(tmp_path, monkeypatch, recwarn):
    """Issue 19 item 6: between PIL's warning line and its error line (89.5 and 179 megapixels) PIL only warns
    (a raw DecompressionBombWarning on stderr) and decodes the whole thing; mmtui skips it with one line."""
    path = tmp_path / "huge.png"
    Image.new("1", (12_000, 12_000)).save(path)  # 144 megapixels, 1 bit: 18 MB in memory, a small file
    [problem] = [
        x
        for x in iter_images([path, _save(Image.new("RGB", (8, 8)), tmp_path / "ok.png")])
        if isinstance(x, ImageError)
    ]
    assert "144 megapixels, over the cap of 90 megapixels" in str(problem)
    assert "MMTUI_MAX_IMAGE_MPIX" in str(problem)
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]


def test_symlink_loop_is_entered_once(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    _save(Image.new("RGB", (8, 8)), root / "sub" / "a.png")
    os.symlink(root, root / "sub" / "loop")
    scan = find_images(root)
    assert [p.name for p in scan.files] == ["a.png"]
    assert any("symlink loop" in str(p) for p in scan.problems)


def test_duplicates_are_computed_once(tmp_path):
    a = _save(Image.new("RGB", (8, 8), (1, 2, 3)), tmp_path / "a.png")
    b = tmp_path / "b.png"
    b.write_bytes(a.read_bytes())
    out = list(iter_images([a, b]))
    assert out[0].sha256 and isinstance(out[1], Skip)
    assert "same image as" in out[1].reason and "computed once" in out[1].reason


def test_shards_partition_the_images(tmp_path):
    paths = [_save(Image.new("RGB", (8, 8), (i, 0, 0)), tmp_path / f"{i}.png") for i in range(20)]
    seen = []
    for i in range(3):
        got = [x for x in iter_images(paths, shard=(i, 3)) if not isinstance(x, Skip)]
        seen += [x.path for x in got]
        assert all(in_shard(x.sha256, (i, 3)) for x in got)
    assert sorted(seen) == sorted(paths)


def test_bad_file_does_not_stop_the_others(tmp_path):
    good = _save(Image.new("RGB", (8, 8)), tmp_path / "good.png")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG garbage")
    out = list(iter_images([bad, good]))
    assert isinstance(out[0], ImageError) and out[1].path == good
