"""`i`: the run's images with their targets, how each target was chosen (its mode), P(target) and captions; `m`
shows one target mode at a time."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.widgets import DataTable, Footer

from mmtui.errors import MmtuiError
from mmtui.store import Run
from mmtui.tui.base import AppScreen
from mmtui.tui.messages import ImageRequested, ImagesListed, QueryFailed
from mmtui.tui.text import image_name, printable, prob
from mmtui.tui.widgets.title import TitleBar


def _results(store: Any, run_id: str) -> list[dict[str, Any]]:
    return list(store.results(run_id))


class ImagesScreen(AppScreen):
    BINDINGS = [
        Binding("escape", "app.pop_screen", "Back"),
        Binding("a", "ablate", "Ablate"),
        Binding("m", "next_mode", "Target mode"),
    ]

    def __init__(self, run: Run) -> None:
        super().__init__()
        self.run = run
        self.rows: list[dict[str, Any]] = []
        self.mode: str | None = None  # the target mode shown; None: all

    def compose(self) -> ComposeResult:
        yield TitleBar(f"run {self.run.id} · images")
        yield DataTable(id="images", cursor_type="row", zebra_stripes=True)
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one("#images", DataTable)
        for header in ("image", "mode", "target", "P(target)", "caption"):
            table.add_column(header, key=header)
        table.focus()
        self.list_images()

    @work(thread=True, exclusive=True, group="images", exit_on_error=False)
    def list_images(self) -> None:
        try:
            rows = self.session.read(_results, self.run.id)
        except MmtuiError as error:
            self.post_message(QueryFailed(str(error)))
            return
        self.post_message(ImagesListed(rows))

    @on(ImagesListed)
    def show_images(self, message: ImagesListed) -> None:
        self.rows = message.rows
        self.show_rows()

    def modes(self) -> list[str]:
        return list(dict.fromkeys(r["target_mode"] for r in self.rows))

    def show_rows(self) -> None:
        table = self.query_one("#images", DataTable)
        table.clear()
        shown = [r for r in self.rows if self.mode is None or r["target_mode"] == self.mode]
        for r in shown:
            table.add_row(
                image_name(r["path"]),
                printable(r["target_mode"]),
                printable(r["target"]),
                Text(prob(r["p_target"]), justify="right"),
                Text(printable(r["caption"]), no_wrap=True, overflow="ellipsis"),
                key=str(r["id"]),
            )
        images = len({r["image_sha256"] for r in shown})
        modes = len(self.modes())
        if self.mode is None:
            what = f"{len(shown):,} results on {images:,} images, {modes} target modes" if modes > 1 else ""
            what = what or f"{images:,} images"
        else:
            what = f"target mode {self.mode}: {len(shown):,} results on {images:,} images (m: next mode)"
        self.query_one(TitleBar).show(f"run {self.run.id} · {what}")

    def action_next_mode(self) -> None:
        """Cycle through the run's target modes, then all of them."""
        modes = [None, *self.modes()]
        if len(modes) <= 2:
            self.notify("the run has one target mode", timeout=3)
            return
        self.mode = modes[(modes.index(self.mode) + 1) % len(modes)]
        self.show_rows()

    @on(QueryFailed)
    def show_failure(self, message: QueryFailed) -> None:
        self.notify(message.message, title="Store error", severity="error", timeout=10)

    @on(DataTable.RowSelected, "#images")
    def chosen(self, event: DataTable.RowSelected) -> None:
        self.post_message(ImageRequested(int(str(event.row_key.value))))

    @on(ImageRequested)
    def open_image(self, message: ImageRequested) -> None:
        from mmtui.tui.screens.image import ImageScreen

        self.app.push_screen(ImageScreen(self.run, message.result_id))

    def action_ablate(self) -> None:
        from mmtui.tui.screens.ablation import AblationScreen

        table = self.query_one("#images", DataTable)
        if not table.row_count:
            return
        rid = int(str(table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value))
        self.app.push_screen(AblationScreen(self.run, [rid], image_name(str(table.get_row_at(table.cursor_row)[0]))))
