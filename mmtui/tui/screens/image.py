"""One image: the picture, its caption and target, P(target), and its top (layer, unit, patch) triples."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import DataTable, Footer, Static
from textual.worker import get_current_worker

from mmtui.errors import MmtuiError
from mmtui.store import Run
from mmtui.store.queries import image_summary
from mmtui.tui.base import AppScreen
from mmtui.tui.messages import ImageSummaryLoaded, NeuronRequested, QueryFailed
from mmtui.tui.text import image_name, printable, prob, score, token
from mmtui.tui.widgets.heatmap_pane import HeatmapPane
from mmtui.tui.widgets.neuron_table import neuron_label
from mmtui.tui.widgets.title import TitleBar

TOP_TRIPLES = 100  # the paper studies each image's top 100


class ImageScreen(AppScreen):
    BINDINGS = [
        Binding("escape", "app.pop_screen", "Back"),
        Binding("h", "heatmap", "Heatmap"),
        Binding("a", "ablate", "Ablate this image"),
    ]

    def __init__(self, run: Run, result_id: int) -> None:
        super().__init__()
        self.run = run
        self.result_id = result_id
        self.summary: dict[str, Any] | None = None

    def compose(self) -> ComposeResult:
        yield TitleBar(f"image · run {self.run.id}")
        with Horizontal(id="image-body"):
            yield HeatmapPane(self.run, self.app.graphics, id="image-picture")
            with Vertical(id="image-side"):
                yield Static("", id="image-info")
                with Vertical(id="image-neurons-pane"):
                    yield DataTable(id="image-neurons", cursor_type="row", zebra_stripes=True)
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#image-neurons-pane").border_title = f"Top {TOP_TRIPLES} (layer, unit, patch) triples"
        table = self.query_one("#image-neurons", DataTable)
        for header in ("rank", "neuron", "patch", "score", "decoded tokens"):
            table.add_column(header, key=header)
        table.focus()
        self.load_summary()

    @work(thread=True, exclusive=True, group="summary", exit_on_error=False)
    def load_summary(self) -> None:
        try:
            summary = self.session.read(image_summary, self.run, self.result_id, top=TOP_TRIPLES)
        except MmtuiError as error:
            self.post_message(QueryFailed(str(error)))
            return
        if not get_current_worker().is_cancelled:
            self.post_message(ImageSummaryLoaded(self.result_id, summary))

    @on(ImageSummaryLoaded)
    def show_summary(self, message: ImageSummaryLoaded) -> None:
        self.summary = s = message.summary
        info = Text()
        info.append(image_name(s["image"]), style="bold")
        info.append(f"\n{printable(s['image'])}\n", style="dim")
        info.append("caption  ", style="bold")
        info.append(printable(s["caption"]) + "\n")
        if s["human_caption"]:
            info.append("human    ", style="bold")
            info.append(printable(s["human_caption"]) + "\n")
        info.append("target   ", style="bold")
        info.append(printable(s["target"]))
        info.append(
            f"   token {token(s['target_token'])!r}, from the {s['target_source'].replace('-', ' ')}\n", style="dim"
        )
        info.append("P(target) ", style="bold")
        info.append(prob(s["p_target"]))
        if s["y_kind"] != "prob":
            info.append(f"   y = {s['y_kind']} {score(s['y_c'])}")
        self.query_one("#image-info", Static).update(info)
        table = self.query_one("#image-neurons", DataTable)
        table.clear()
        for rank, t in enumerate(s["top"]):
            table.add_row(
                Text(str(rank), justify="right"),
                neuron_label(t["layer"], t["unit"]),
                Text(str(t["patch"]), justify="right"),
                Text(score(t["score"]), justify="right"),
                Text(", ".join(token(x) for x in t["tokens"]), no_wrap=True, overflow="ellipsis"),
                key=f"{rank}:{t['layer']}.{t['unit']}",
            )
        self.query_one(HeatmapPane).show_image(self.result_id, s["image"], s["sha256"], self.highlighted_unit())

    @on(QueryFailed)
    def show_failure(self, message: QueryFailed) -> None:
        self.notify(message.message, title="Store error", severity="error", timeout=10)

    def highlighted_unit(self) -> tuple[int, int] | None:
        table = self.query_one("#image-neurons", DataTable)
        if not table.row_count:
            return None
        key = str(table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value)
        layer, unit = key.split(":")[1].split(".")
        return int(layer), int(unit)

    @on(DataTable.RowHighlighted, "#image-neurons")
    def neuron_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if self.summary is not None:
            self.query_one(HeatmapPane).set_unit(self.highlighted_unit())

    @on(DataTable.RowSelected, "#image-neurons")
    def neuron_chosen(self, event: DataTable.RowSelected) -> None:
        unit = self.highlighted_unit()
        if unit is not None:
            self.post_message(NeuronRequested(*unit))

    @on(NeuronRequested)
    def open_neuron(self, message: NeuronRequested) -> None:
        from mmtui.tui.screens.neuron import NeuronScreen

        self.app.push_screen(NeuronScreen(self.run, message.layer, message.unit))

    def action_heatmap(self) -> None:
        self.query_one(HeatmapPane).toggle_heatmap()

    def action_ablate(self) -> None:
        from mmtui.tui.screens.ablation import AblationScreen

        name = image_name(self.summary["image"]) if self.summary else f"result {self.result_id}"
        self.app.push_screen(AblationScreen(self.run, [self.result_id], name))
