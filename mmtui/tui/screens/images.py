"""`i`: the run's images with their targets, P(target) and captions."""

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
    ]

    def __init__(self, run: Run) -> None:
        super().__init__()
        self.run = run

    def compose(self) -> ComposeResult:
        yield TitleBar(f"run {self.run.id} · images")
        yield DataTable(id="images", cursor_type="row", zebra_stripes=True)
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one("#images", DataTable)
        for header in ("image", "target", "P(target)", "caption"):
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
        table = self.query_one("#images", DataTable)
        table.clear()
        for r in message.rows:
            table.add_row(
                image_name(r["path"]),
                printable(r["target"]),
                Text(prob(r["p_target"]), justify="right"),
                Text(printable(r["caption"]), no_wrap=True, overflow="ellipsis"),
                key=str(r["id"]),
            )
        self.query_one(TitleBar).show(f"run {self.run.id} · {len(message.rows):,} images")

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
