"""The picture pane of the neuron and image screens: an image, and a unit's activations over it on demand.

The picture is read from disk in a worker (no model needed). A heatmap needs a forward pass: its worker
loads the run's stack the first time (seconds for small stacks, minutes for GPT-J) and keeps it.
`h` toggles heatmaps for the session; once on, moving to another image or unit redraws it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from PIL.Image import Image
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Static
from textual.worker import get_current_worker

from mmtui.errors import MmtuiError
from mmtui.run.images import load_image
from mmtui.store import Run
from mmtui.tui.compute import heatmap_picture
from mmtui.tui.failures import ShowsWorkerErrors
from mmtui.tui.messages import HeatmapComputed, HeatmapFailed, PictureLoaded, StackLoading
from mmtui.tui.text import image_name
from mmtui.tui.widgets.neuron_table import neuron_label
from mmtui.tui.widgets.picture import Picture, colorbar

if TYPE_CHECKING:
    from textual import getters

    from mmtui.tui.app import BrowseApp

if TYPE_CHECKING:
    pass


class HeatmapPane(ShowsWorkerErrors, Vertical):
    DEFAULT_CSS = """
    HeatmapPane { height: 1fr; }
    HeatmapPane > #picture-caption { height: auto; max-height: 3; }
    """

    if TYPE_CHECKING:
        app = getters.app(BrowseApp)

    def __init__(self, run: Run, graphics: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.run = run
        self.graphics = graphics
        self.result_id: int | None = None
        self.path = ""
        self.sha256 = ""
        self.unit: tuple[int, int] | None = None
        self.picture: Image | None = None
        self.drawn: tuple[int, tuple[int, int]] | None = None  # (result_id, unit) of the heatmap on screen

    def compose(self) -> ComposeResult:
        yield Picture(self.graphics, message="no image yet", id="picture")
        yield Static("", id="picture-caption")

    def on_mount(self) -> None:
        self.border_title = "Image"

    @property
    def heatmaps_on(self) -> bool:
        return bool(getattr(self.app, "show_heatmaps", False))

    def caption(self, text: Text | str) -> None:
        self.query_one("#picture-caption", Static).update(text)

    def show_message(self, text: str) -> None:
        self.query_one(Picture).show(None, text)
        self.caption("")

    # -- what to show --------------------------------------------------------------------------------------
    def show_image(self, result_id: int, path: str, sha256: str, unit: tuple[int, int] | None) -> None:
        """Show this result's image; with heatmaps on, `unit`'s activations over it."""
        if result_id != self.result_id:
            self.result_id, self.path, self.sha256, self.picture = result_id, path, sha256, None
            self.drawn = None
            self.query_one(Picture).show(None, f"reading {image_name(path)} …")
            self.load_picture(result_id, path, sha256)
        self.set_unit(unit)

    def set_unit(self, unit: tuple[int, int] | None) -> None:
        self.unit = unit
        if self.picture is None:
            return
        if self.heatmaps_on and unit is not None:
            if self.drawn != (self.result_id, unit):
                self.caption(Text(f"computing {neuron_label(*unit)} over {image_name(self.path)} …", style="yellow"))
                self.compute(self.result_id, unit, self.picture)
        else:
            self.show_plain()

    def toggle_heatmap(self) -> None:
        self.app.show_heatmaps = not self.heatmaps_on
        if self.heatmaps_on and self.unit is None:
            self.app.notify("Highlight a neuron first.", timeout=3)
        self.drawn = None
        self.set_unit(self.unit)

    def show_plain(self) -> None:
        if self.picture is None:
            return
        self.drawn = None
        self.border_title = f"Image · {image_name(self.path)}"
        self.query_one(Picture).show(self.picture)
        hint = f"{self.picture.width}×{self.picture.height}"
        if self.unit is not None:
            hint += f" · h: {neuron_label(*self.unit)}'s activations over it"
        self.caption(Text(hint, style="dim"))

    # -- workers ---------------------------------------------------------------------------------------------
    @work(thread=True, exclusive=True, group="picture", exit_on_error=False)
    def load_picture(self, result_id: int, path: str, sha256: str) -> None:
        try:
            picture, problem = load_image(path, sha256=sha256).image, None
        except MmtuiError as error:
            picture, problem = None, str(error)
        if not get_current_worker().is_cancelled:
            self.post_message(PictureLoaded(result_id, picture, problem))

    @on(PictureLoaded)
    def picture_loaded(self, message: PictureLoaded) -> None:
        message.stop()
        if message.result_id != self.result_id:
            return
        if message.picture is None:
            self.show_message(message.problem or "cannot read the image")
            self.caption(Text(self.path, style="dim"))
            return
        self.picture = message.picture
        self.set_unit(self.unit)

    @work(thread=True, exclusive=True, group="heatmap", exit_on_error=False)
    def compute(self, result_id: int, unit: tuple[int, int], picture: Image) -> None:
        stacks = self.app.stacks
        if not stacks.loaded(self.run):
            self.post_message(StackLoading(self.run.stack.name))
        try:
            stack = stacks.get(self.run)
            if get_current_worker().is_cancelled:
                return
            drawn, peak, grid = heatmap_picture(stack, picture, unit[0], unit[1], self.run.site)
        except MmtuiError as error:
            self.post_message(HeatmapFailed(str(error)))
            return
        except Exception as error:  # a model error (CUDA out of memory, ...) is shown, not lost in the worker
            self.post_message(HeatmapFailed(f"{type(error).__name__}: {error}"))
            return
        if not get_current_worker().is_cancelled:
            self.post_message(HeatmapComputed(result_id, unit[0], unit[1], drawn, peak, grid))

    @on(StackLoading)
    def stack_loading(self, message: StackLoading) -> None:
        message.stop()
        self.caption(Text(f"loading the {message.name} model for heatmaps (first time only) …", style="yellow"))

    @on(HeatmapComputed)
    def heatmap_computed(self, message: HeatmapComputed) -> None:
        message.stop()
        unit = (message.layer, message.unit)
        if message.result_id != self.result_id or unit != self.unit or not self.heatmaps_on:
            return
        self.drawn = (message.result_id, unit)
        self.border_title = f"Heatmap · {neuron_label(*unit)} over {image_name(self.path)} (as the encoder sees it)"
        self.query_one(Picture).show(message.picture)
        grid = f"{message.grid[0]}×{message.grid[1]}"
        line = Text(f"peak {message.peak:.3g} · {grid} grid · cyan: top 5%  ")
        self.caption(line + colorbar(12))

    @on(HeatmapFailed)
    def heatmap_failed(self, message: HeatmapFailed) -> None:
        message.stop()
        self.app.show_heatmaps = False
        self.show_plain()
        self.caption(Text(f"No heatmap: {message.message}", style="red"))
