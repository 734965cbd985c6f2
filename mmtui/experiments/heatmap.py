"""A unit's receptive field (method.md, experiment 3): its activations A_k(p) at the image positions of the
captioning forward pass, laid out on the encoder's row-major patch grid, upsampled bilinearly to the encoder's
input size, thresholded at the 0.95 quantile (THRESHOLD_Q), and drawn over the image as the encoder sees it by
`render_heatmap`, the one drawing the CLI, the report and the TUI show.

"As the encoder sees it": the encoder's own preprocessing (resize, crop) applied to the picture, so that the
heatmap, the picture and any mask passed through `encoder_view_mask` share one frame (224 x 224 for BEiT,
the centre crop for timm encoders). torch loads inside the functions.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from mmtui.defaults import THRESHOLD_Q
from mmtui.experiments.stats import quantile_mask
from mmtui.store.records import check_neuron

if TYPE_CHECKING:
    from mmtui.stacks.base import Stack

OUTLINE_RGB = (0, 255, 255)  # cyan: the border of the receptive field
# inferno-like stops: dark (low activation) to bright yellow (high)
_STOPS = np.array(
    [[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66], [245, 125, 21], [250, 193, 39]]
    + [[252, 255, 164]],
    dtype=np.float32,
)


def check_units(stack: Stack, units: Sequence[tuple[int, int]]) -> None:
    """Raise NotFoundError (records.check_neuron) naming the first unit the stack does not have."""
    shape = {"n_layers": stack.n_layers, "d_mlp": stack.d_mlp}
    for layer, unit in units:
        check_neuron(layer, unit, shape)


def unit_activation_maps(
    stack: Stack, image: Image.Image, units: list[tuple[int, int]], site: str = "post"
) -> np.ndarray:
    """Activations of `units` (layer, unit) at the image positions: float32 [n_units, grid_h, grid_w].

    From the captioning forward pass ([prefix] + prompt; causal, so the prompt cannot change the image
    positions), at the given neuron site; patch p sits at row p // grid_w, column p % grid_w.
    """
    return batch_activation_maps(stack, [image], units, site)[0]


def batch_activation_maps(
    stack: Stack, images: Sequence[Image.Image], units: Sequence[tuple[int, int]], site: str = "post"
) -> np.ndarray:
    """Like unit_activation_maps for several images at once: float32 [n_images, n_units, grid_h, grid_w]."""
    import torch

    check_units(stack, units)
    positions = stack.image_slice
    grid_h, grid_w = stack.grid
    token_of = [i for i, c in enumerate(stack.cells) if c >= 0]  # the image positions that are patches
    cell_of = [c for c in stack.cells if c >= 0]  # and their grid cells
    by_layer: dict[int, list[int]] = {}
    for i, (layer, _unit) in enumerate(units):
        by_layer.setdefault(layer, []).append(i)
    out = np.zeros((len(images), len(units), grid_h, grid_w), dtype=np.float32)
    last = max(by_layer, default=-1)

    def capture(layer: int, act: torch.Tensor) -> None:  # act [B, T, d_mlp]
        if layer not in by_layer:
            return
        idx = by_layer[layer]
        cols = torch.tensor([units[i][1] for i in idx], device=act.device)
        vals = act[:, positions].index_select(2, cols).float().cpu().numpy()  # [B, P, n]
        flat = np.zeros((len(images), len(idx), grid_h * grid_w), dtype=np.float32)
        flat[:, :, cell_of] = vals.transpose(0, 2, 1)[:, :, token_of]
        out[:, idx] = flat.reshape(len(images), len(idx), grid_h, grid_w)
        if layer == last:
            raise _LastLayerRead  # the layers above cannot change what was read: skip them

    with torch.no_grad():
        prefix = stack.encode(list(images))  # [B, P, d_model]
        embeds, _ = stack.build_inputs(prefix, [[] for _ in images])
        with stack.hooks(capture, site=site), contextlib.suppress(_LastLayerRead):
            stack.lm.base_model(inputs_embeds=embeds, use_cache=False)
    return out


class _LastLayerRead(Exception):
    """Ends a forward pass once the last layer whose activations are wanted has been read."""


def upsample(grid: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling of a [grid_h, grid_w] (or [..., grid_h, grid_w]) map to size (height, width).

    torch's bilinear interpolation with align_corners=False (each patch value at its patch centre).
    """
    import torch
    import torch.nn.functional as F

    arr = torch.from_numpy(np.ascontiguousarray(grid, dtype=np.float32))
    lead = arr.shape[:-2]
    flat = arr.reshape(-1, 1, *arr.shape[-2:])
    up = F.interpolate(flat, size=size, mode="bilinear", align_corners=False)
    return up.reshape(*lead, *size).numpy()


def _calibration(stack: Stack, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """The preprocessed values of an all-black and an all-white picture of `size` (per channel), and the
    frame size: the encoder's normalisation is affine per channel, so these two invert it."""
    black = stack.encoder.view([Image.new("RGB", size, (0, 0, 0))])[0].float().numpy()  # [3, H, W]
    white = stack.encoder.view([Image.new("RGB", size, (255, 255, 255))])[0].float().numpy()
    return black.mean(axis=(1, 2)), white.mean(axis=(1, 2)), (black.shape[1], black.shape[2])


def encoder_view(stack: Stack, image: Image.Image) -> np.ndarray:
    """The picture as the encoder sees it (after its resize and crop), uint8 [H, W, 3] in the encoder frame."""
    lo, hi, _ = _calibration(stack, image.size)
    pixels = stack.encoder.view([image.convert("RGB")])[0].float().numpy()  # [3, H, W]
    scaled = (pixels - lo[:, None, None]) / (hi - lo)[:, None, None]
    return (np.clip(scaled, 0, 1) * 255).round().astype(np.uint8).transpose(1, 2, 0)


def encoder_view_mask(stack: Stack, mask: np.ndarray) -> np.ndarray:
    """A boolean mask [h, w] of the original picture mapped into the encoder frame by the encoder's own
    preprocessing (the same resize and crop as the picture): bool [H, W]."""
    picture = Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)).convert("RGB")
    lo, hi, _ = _calibration(stack, picture.size)
    pixels = stack.encoder.view([picture])[0].float().numpy()
    scaled = (pixels - lo[:, None, None]) / (hi - lo)[:, None, None]
    return scaled.mean(axis=0) > 0.5


def frame_size(stack: Stack) -> tuple[int, int]:
    """(height, width) of the encoder's input frame."""
    return _calibration(stack, (32, 32))[2]


def colormap(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> RGB uint8 [..., 3] along the inferno-like stops."""
    pos = np.clip(values, 0.0, 1.0) * (len(_STOPS) - 1)
    low = np.floor(pos).astype(int).clip(0, len(_STOPS) - 2)
    frac = (pos - low)[..., None]
    return (_STOPS[low] * (1 - frac) + _STOPS[low + 1] * frac).astype(np.uint8)


def render_heatmap(
    view: np.ndarray, heat: np.ndarray, q: float = THRESHOLD_Q, low: float = 0.2, high: float = 0.8
) -> np.ndarray:
    """The one heatmap drawing, for the CLI, the report and the TUI: `heat` (a unit's map upsampled to the
    view's frame, `upsample`) coloured over `view` (uint8 [H, W, 3], `encoder_view`), with in cyan the border of
    the pixels above its q-quantile (the receptive field: `quantile_mask`, as the specificity IoU). Negatives
    count as 0 and the peak as 1; the colour covers the picture in proportion to the activation (from `low` to
    `high`), so the photo stays readable where the unit is quiet. Returns uint8 [H, W, 3]."""
    heat = np.asarray(heat, dtype=np.float32)
    peak = float(heat.max())
    norm = np.clip(heat, 0.0, None) / peak if peak > 0 else np.zeros_like(heat)
    alpha = (low + (high - low) * norm)[..., None]
    mixed = view.astype(np.float32) * (1 - alpha) + colormap(norm).astype(np.float32) * alpha
    drawn = mixed.clip(0, 255).astype(np.uint8)
    mask = quantile_mask(heat, q)
    inner = mask.copy()
    inner[1:] &= mask[:-1]
    inner[:-1] &= mask[1:]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    drawn[mask & ~inner] = OUTLINE_RGB
    return drawn


def draw_overlay(
    view: np.ndarray,
    maps: Sequence[np.ndarray],
    titles: Sequence[str],
    out: Path | str,
    *,
    columns: int = 4,
    q: float = THRESHOLD_Q,
    suptitle: str | None = None,
) -> Path:
    """Write a PNG: the encoder view with each upsampled map drawn over it (`render_heatmap`), titled.

    view: uint8 [H, W, 3]; maps: [H, W] each, already in the encoder frame.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(len(maps), 1)
    cols = min(columns, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, heat, title in zip(axes.flat, maps, titles, strict=False):
        ax.imshow(render_heatmap(view, heat, q))
        ax.set_title(title, fontsize=9)
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
