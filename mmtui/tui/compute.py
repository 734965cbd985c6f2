"""What the browser's worker threads compute. Plain functions, no textual; the model code (torch) is imported
inside them, through mmtui.experiments.heatmap and mmtui.experiments.ablation, so importing this module stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from mmtui.errors import ImageError
from mmtui.run.images import load_image
from mmtui.tui.widgets.picture import overlay

if TYPE_CHECKING:
    from mmtui.stacks.base import Stack
    from mmtui.store import Run

OUTLINE_Q = 0.95  # the paper's threshold for a unit's receptive field (method.md, experiment 3)


def read_picture(path: str, sha256: str) -> Image.Image:
    """The image of a result, checked against the sha256 it was attributed with. Raises ImageError."""
    loaded = load_image(path)
    if loaded.sha256 != sha256:
        raise ImageError(path, "the file changed since it was attributed; attribute it again to browse it")
    return loaded.image


def outline(picture: Image.Image, grid_map: np.ndarray, q: float = OUTLINE_Q) -> Image.Image:
    """Mark in cyan the border of the pixels above the map's q-quantile (after bilinear upsampling)."""
    small = Image.fromarray(grid_map.astype(np.float32), mode="F")
    big = np.asarray(small.resize(picture.size, Image.Resampling.BILINEAR), dtype=np.float32)
    mask = big > np.quantile(big, q)
    inner = mask.copy()
    inner[1:] &= mask[:-1]
    inner[:-1] &= mask[1:]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    pixels = np.array(picture.convert("RGB"))
    pixels[mask & ~inner] = (0, 255, 255)
    return Image.fromarray(pixels, mode="RGB")


def heatmap_picture(
    stack: Stack, picture: Image.Image, layer: int, unit: int, site: str
) -> tuple[Image.Image, float, tuple[int, int]]:
    """A unit's activations over `picture` drawn over the picture as the encoder sees it.

    Returns (the drawing, the peak activation, the grid (h, w)).
    """
    from mmtui.experiments.heatmap import encoder_view, unit_activation_maps

    grid_map = unit_activation_maps(stack, picture, [(layer, unit)], site=site)[0]  # [grid_h, grid_w]
    view = Image.fromarray(encoder_view(stack, picture))
    drawn = outline(overlay(view, grid_map), grid_map)
    return drawn, float(grid_map.max()), (int(grid_map.shape[0]), int(grid_map.shape[1]))


def ablation_total(store: Any, run: Run, result_ids: list[int], spec: Any) -> int:
    """How many dose-response points `spec` asks for (conditions short of k triples are left out)."""
    from mmtui.experiments.ablation import select

    return sum(
        len(
            select(
                store,
                run,
                rid,
                spec.ks,
                baseline=spec.baseline,
                seeds=spec.seeds,
                unit_mode=spec.unit_mode,
            )
        )
        for rid in result_ids
    )
