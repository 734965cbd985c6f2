"""The run chooser: a store can hold runs of several stacks or settings, whose results never mix."""

from __future__ import annotations

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Static

from mmtui.store import Run
from mmtui.tui.text import printable
from mmtui.tui.widgets.title import TitleBar


def run_shape(run: Run) -> str:
    shape = run.shape
    return f"{shape['n_layers']} × {shape['d_mlp']:,} units, {shape['n_patches']} patches"


class RunsScreen(Screen[None]):
    BINDINGS = [Binding("enter", "choose", "Browse run", show=True)]

    def __init__(self, runs: list[Run]) -> None:
        super().__init__()
        self.runs = runs

    def compose(self) -> ComposeResult:
        yield TitleBar("choose a run")
        yield Static(f"This store holds {len(self.runs)} runs. Choose one to browse.", id="runs-intro")
        yield DataTable(id="runs", cursor_type="row", zebra_stripes=True)
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one("#runs", DataTable)
        for header in ("run", "stack", "images", "shape", "prompt", "site", "y", "last write"):
            table.add_column(header, key=header)
        for r in self.runs:
            table.add_row(
                r.id,
                r.stack.name,
                Text(f"{r.n_images:,}", justify="right"),
                run_shape(r),
                printable(repr(r.prompt)),
                r.site,
                r.y_kind,
                (r.last_write or r.created or "-")[:16].replace("T", " "),
                key=r.id,
            )
        table.focus()

    @on(DataTable.RowSelected, "#runs")
    def chosen(self, event: DataTable.RowSelected) -> None:
        self.open_run(str(event.row_key.value))

    def action_choose(self) -> None:
        table = self.query_one("#runs", DataTable)
        if table.row_count:
            self.open_run(str(table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value))

    def open_run(self, run_id: str) -> None:
        from mmtui.tui.screens.browse import BrowseScreen

        run = next(r for r in self.runs if r.id == run_id)
        self.app.push_screen(BrowseScreen(run))
