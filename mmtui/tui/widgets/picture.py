"""Pictures in the terminal: real pixels through textual-image where the terminal speaks Sixel or the kitty
graphics protocol, half blocks (two pixels per cell, `▀` with fore- and background colours) everywhere else.

Also the heatmap's colour bar (the heatmap itself is drawn by mmtui.experiments.heatmap.render_heatmap).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image
from rich.console import Console, ConsoleOptions, RenderResult
from rich.segment import Segment
from rich.style import Style
from rich.text import Text
from textual.app import ComposeResult
from textual.widget import Widget

from mmtui.experiments.heatmap import colormap

if TYPE_CHECKING:
    from textual_image.widget import BaseImage


def colorbar(width: int = 16) -> Text:
    """`low ████ high` in the overlay's colours."""
    text = Text("low ", style="dim")
    for rgb in colormap(np.linspace(0, 1, width)):
        text.append("█", style=Style(color=f"rgb({rgb[0]},{rgb[1]},{rgb[2]})"))
    text.append(" high", style="dim")
    return text


class HalfBlocks:
    """A rich renderable: `image` fitted into width x height cells, two stacked pixels per cell."""

    def __init__(self, image: Image.Image, width: int, height: int) -> None:
        self.image = image
        self.width = max(1, width)
        self.height = max(1, height)

    def fitted(self) -> Image.Image:
        # a cell is about twice as tall as wide, so one column and half a row make a square pixel
        w, h = self.image.size
        scale = min(self.width / w, 2 * self.height / h)
        size = (max(1, round(w * scale)), max(2, round(h * scale / 2) * 2))
        return self.image.convert("RGB").resize(size, Image.Resampling.BOX)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        pixels = np.asarray(self.fitted())
        rows, cols = pixels.shape[0] // 2, pixels.shape[1]
        pad = " " * max(0, (self.width - cols) // 2)
        styles: dict[tuple[int, ...], Style] = {}
        for y in range(rows):
            if pad:
                yield Segment(pad)
            for x in range(cols):
                key = (*pixels[2 * y, x], *pixels[2 * y + 1, x])
                style = styles.get(key)
                if style is None:
                    style = Style(color=f"rgb({key[0]},{key[1]},{key[2]})", bgcolor=f"rgb({key[3]},{key[4]},{key[5]})")
                    styles[key] = style
                yield Segment("▀", style)
            yield Segment.line()


def pixel_graphics_available() -> bool:
    """Whether textual-image found Sixel or the kitty protocol (it asks the terminal when first imported)."""
    renderable = sys.modules.get("textual_image.renderable")
    if renderable is None:
        return False
    return renderable.Image in (renderable.SixelImage, renderable.TGPImage)


class Picture(Widget):
    """Shows a PIL image (or a message while there is none). graphics: "pixels" (textual-image) or "halfblock"."""

    DEFAULT_CSS = """
    Picture { width: 1fr; height: 1fr; }
    Picture > .picture--pixels { width: 1fr; height: 1fr; }
    """

    def __init__(self, graphics: str = "halfblock", message: str = "", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.graphics = graphics
        self.image: Image.Image | None = None
        self.message = message
        self._pixels: BaseImage | None = None

    def compose(self) -> ComposeResult:
        if self.graphics == "pixels":
            from textual_image.widget import Image as PixelImage

            self._pixels = PixelImage(None, classes="picture--pixels")
            yield self._pixels

    def show(self, image: Image.Image | None, message: str = "") -> None:
        self.image, self.message = image, message
        if self._pixels is not None:
            self._pixels.image = image
            self._pixels.display = image is not None
        self.refresh()

    def render(self) -> Any:
        if self.image is None or self._pixels is not None:
            return Text(self.message, style="dim", justify="center")
        return HalfBlocks(self.image, self.content_size.width, self.content_size.height)
