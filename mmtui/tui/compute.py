"""What the browser's worker threads compute. Plain functions, no textual; the model code (torch) is imported
inside them, through mmtui.experiments.heatmap and mmtui.experiments.ablation, so importing this module stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from PIL import Image

if TYPE_CHECKING:
    from mmtui.stacks.base import Stack
    from mmtui.store import Run


def heatmap_picture(
    stack: Stack, picture: Image.Image, layer: int, unit: int, site: str
) -> tuple[Image.Image, float, tuple[int, int]]:
    """A unit's activations over `picture` drawn over the picture as the encoder sees it.

    Returns (the drawing, the peak activation, the grid (h, w)).
    """
    from mmtui.experiments.heatmap import encoder_view, render_heatmap, unit_activation_maps, upsample

    grid_map = unit_activation_maps(stack, picture, [(layer, unit)], site=site)[0]  # [grid_h, grid_w]
    view = encoder_view(stack, picture)
    drawn = Image.fromarray(render_heatmap(view, upsample(grid_map, view.shape[:2])))
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
