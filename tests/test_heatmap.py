"""Activation maps on the tiny stack: values and layout against a manual capture; frames; the command."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from commands import app
from commands._app import ExitCode
from mmtui.errors import NotFoundError
from mmtui.experiments.heatmap import (
    batch_activation_maps,
    draw_overlay,
    encoder_view,
    encoder_view_mask,
    frame_size,
    render_heatmap,
    unit_activation_maps,
    upsample,
)

runner = CliRunner()


def test_maps_equal_a_manual_capture_in_row_major_order(tiny_stack, pil_images):
    units = [(1, 5), (0, 3), (1, 60)]
    maps = unit_activation_maps(tiny_stack, pil_images[0], units)
    assert maps.shape == (3, 4, 4) and maps.dtype == np.float32
    captured = {}
    prefix = tiny_stack.encode([pil_images[0]])
    embeds, _ = tiny_stack.build_inputs(prefix, [[]])
    with torch.no_grad(), tiny_stack.hooks(lambda layer, act: captured.__setitem__(layer, act[0].clone())):
        tiny_stack.lm.base_model(inputs_embeds=embeds, use_cache=False)
    for (layer, unit), grid in zip(units, maps, strict=True):
        patches = captured[layer][:16, unit].numpy()  # [P]
        assert np.allclose(grid.reshape(-1), patches, atol=1e-6)
        assert grid[1, 2] == pytest.approx(float(patches[1 * 4 + 2]), abs=1e-6)  # row 1, column 2 = patch 6


def test_the_pass_stops_after_the_last_layer_read_with_the_same_maps(tiny_stack, pil_images):
    """Units of layer 0 only: the layers above are skipped (their MLP never runs), the maps equal a full pass's."""
    assert tiny_stack.n_layers > 1
    ran: list[int] = []
    handle = tiny_stack.adapter.site_hook(1, "post", lambda act: ran.append(1))
    try:
        maps = batch_activation_maps(tiny_stack, pil_images[:2], [(0, 3), (0, 9)])
    finally:
        handle.remove()
    assert ran == []
    captured = {}
    embeds, _ = tiny_stack.build_inputs(tiny_stack.encode(pil_images[:2]), [[], []])
    with torch.no_grad(), tiny_stack.hooks(lambda layer, act: captured.__setitem__(layer, act.clone())):
        tiny_stack.lm.base_model(inputs_embeds=embeds, use_cache=False)
    cells = [i for i, c in enumerate(tiny_stack.cells) if c >= 0]
    for j, unit in enumerate((3, 9)):
        full = captured[0][:, tiny_stack.image_slice][:, cells, unit].numpy()  # [B, P] in cell order
        assert np.array_equal(maps[:, j].reshape(2, -1)[:, [c for c in tiny_stack.cells if c >= 0]], full)


def test_batch_maps_match_single_and_are_deterministic(tiny_stack, pil_images):
    units = [(0, 1), (1, 2)]
    batch = batch_activation_maps(tiny_stack, pil_images[:2], units)
    assert batch.shape == (2, 2, 4, 4)
    for i in range(2):
        assert np.allclose(batch[i], unit_activation_maps(tiny_stack, pil_images[i], units), atol=1e-5)
    assert np.array_equal(
        unit_activation_maps(tiny_stack, pil_images[0], units), unit_activation_maps(tiny_stack, pil_images[0], units)
    )


def test_unknown_unit_is_one_clear_error(tiny_stack, pil_images):
    with pytest.raises(NotFoundError, match="no neuron L5.u1"):
        unit_activation_maps(tiny_stack, pil_images[0], [(5, 1)])


def test_upsample_is_bilinear():
    grid = np.array([[0.0, 1.0], [2.0, 3.0]], dtype=np.float32)
    up = upsample(grid, (4, 4))
    assert up.shape == (4, 4)
    # align_corners=False: the patch centres keep their values' order, the corners clamp to the corner patch
    assert up[0, 0] == pytest.approx(0.0) and up[3, 3] == pytest.approx(3.0)
    assert up[0, 1] == pytest.approx(0.25) and up[1, 0] == pytest.approx(0.5)
    assert np.allclose(upsample(np.full((3, 3), 2.0), (9, 9)), 2.0)


def test_frames_and_masks_follow_the_encoder(tiny_stack):
    assert frame_size(tiny_stack) == (64, 64)
    picture = Image.new("RGB", (120, 60), (255, 0, 0))
    view = encoder_view(tiny_stack, picture)
    assert view.shape == (64, 64, 3) and view.dtype == np.uint8
    assert abs(int(view[..., 0].mean()) - 255) <= 1 and view[..., 1].max() <= 1
    mask = np.zeros((60, 120), bool)
    mask[:, :60] = True  # left half of a wide picture -> left half of the squashed 64 x 64 frame (BEiT: no crop)
    framed = encoder_view_mask(tiny_stack, mask)
    assert framed.shape == (64, 64)
    assert framed[:, :31].all() and not framed[:, 33:].any()


def test_draw_overlay_writes_a_png(tiny_stack, pil_images, tmp_path):
    maps = unit_activation_maps(tiny_stack, pil_images[0], [(0, 1), (1, 2)])
    out = draw_overlay(
        encoder_view(tiny_stack, pil_images[0]), [upsample(m, (64, 64)) for m in maps], ["a", "b"], tmp_path / "x.png"
    )
    assert Image.open(out).size[0] > 100


def test_one_renderer_outlines_the_receptive_field():
    view = np.full((40, 40, 3), 100, dtype=np.uint8)
    heat = np.zeros((40, 40), dtype=np.float32)
    heat[10:18, 10:18] = 1.0  # 64 of 1,600 pixels (4%): the 0.95 quantile is 0, so the region is exactly them
    drawn = render_heatmap(view, heat)
    cyan = (drawn == (0, 255, 255)).all(axis=-1)
    ring = np.zeros_like(cyan)
    ring[10:18, 10:18] = True
    ring[11:17, 11:17] = False
    assert (cyan == ring).all()  # the border of the region above the 0.95 quantile, nothing else
    inside, outside = drawn[15, 15].astype(int), drawn[30, 30].astype(int)
    assert (inside != 100).any() and abs(outside - 100).max() <= 100 * 0.2 + 1  # quiet: 80% photo
    assert not (render_heatmap(view, -heat) == (0, 255, 255)).all(axis=-1).any()  # nothing above 0: no region


def test_the_tui_draws_the_cli_heatmap(tiny_stack, pil_images):
    from mmtui.tui.compute import heatmap_picture

    picture = pil_images[0]
    drawn, peak, grid = heatmap_picture(tiny_stack, picture, 1, 7, "post")
    maps = unit_activation_maps(tiny_stack, picture, [(1, 7)])
    expected = render_heatmap(encoder_view(tiny_stack, picture), upsample(maps[0], frame_size(tiny_stack)))
    assert np.array_equal(np.asarray(drawn), expected) and peak == pytest.approx(float(maps[0].max()))
    assert grid == maps[0].shape


def test_heatmap_command(image_dir, tmp_path):
    image = sorted(image_dir.glob("*.jpg"))[0]
    png = tmp_path / "h.png"
    args = ["--preset", "tiny", "--device", "cpu", "--db", str(tmp_path / "none.db")]
    result = runner.invoke(app, ["heatmap", "1", "7", str(image), "--out", str(png), "--json", *args])
    assert result.exit_code == ExitCode.OK, result.stderr
    row = json.loads(result.stdout)
    assert {"layer", "unit", "image", "grid", "max", "argmax_patch", "png", "site"} <= row.keys()
    assert np.asarray(row["grid"]).shape == (4, 4) and png.is_file()
    table = runner.invoke(app, ["heatmap", "1", "7", str(image), "--out", str(png), *args])
    assert table.exit_code == 0 and "patch grid" in table.stdout
    bad = runner.invoke(app, ["heatmap", "9", "7", str(image), "--out", str(png), *args])
    assert bad.exit_code == ExitCode.FAILED and "no neuron L9.u7" in bad.stderr
    missing = runner.invoke(app, ["heatmap", "1", "7", str(tmp_path / "gone.jpg"), *args])
    assert missing.exit_code == ExitCode.FAILED and "gone.jpg" in missing.stderr
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff garbage")
    corrupt = runner.invoke(app, ["heatmap", "1", "7", str(broken), *args])
    assert corrupt.exit_code == ExitCode.FAILED and "broken.jpg" in corrupt.stderr


def test_heatmap_command_uses_the_run_stack(attributed_db, image_dir, tmp_path):
    image = sorted(image_dir.glob("*.jpg"))[0]
    result = runner.invoke(
        app, ["heatmap", "0", "3", str(image), "--out", str(tmp_path / "h.png"), "--db", str(attributed_db), "--json"]
    )
    assert result.exit_code == ExitCode.OK, result.stderr
    assert "stack of run" in result.stderr or json.loads(result.stdout)["site"] == "post"
    unknown = runner.invoke(app, ["heatmap", "0", "3", str(image), "--run", "zzz", "--db", str(attributed_db)])
    assert unknown.exit_code == ExitCode.FAILED and "no run with id 'zzz'" in unknown.stderr
