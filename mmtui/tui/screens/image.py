"""One image: the picture, its caption and target, P(target), and its top (layer, unit, patch) triples; with the
generic toggle on (`x`, shared with the neuron table), its units that are not generic ranked by lift instead, as
`mmtui neurons --specific --image X` lists them (the same core function)."""

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
from mmtui.store import prevalence as pv
from mmtui.store.queries import image_summary
from mmtui.tui.base import AppScreen
from mmtui.tui.messages import ImageLiftsLoaded, ImageSummaryLoaded, NeuronRequested, QueryFailed
from mmtui.tui.text import image_name, printable, prob, score, token
from mmtui.tui.widgets.heatmap_pane import HeatmapPane
from mmtui.tui.widgets.neuron_table import neuron_label, share_cell
from mmtui.tui.widgets.title import TitleBar

TOP_TRIPLES = 100  # the paper studies each image's top 100
TOP_LIFTS = 100  # units listed by lift (`mmtui neurons --specific --image X --limit 100`)
SCORE_COLUMNS = ("rank", "neuron", "patch", "score", "decoded tokens")
# by lift: rank and patch are those of the unit's best triple on the image (its place in the paper's ranking)
LIFT_COLUMNS = ("lift", "neuron", "rank", "patch", "score", "share", "decoded tokens")


class ImageScreen(AppScreen):
    BINDINGS = [
        Binding("escape", "app.pop_screen", "Back"),
        Binding("h", "heatmap", "Heatmap"),
        Binding("a", "ablate", "Ablate this image"),
        # one key, two footer labels: check_action shows the one that switches away from the ranking shown
        Binding("x", "rank('lift')", "Rank by lift"),
        Binding("x", "rank('score')", "Rank by score"),
    ]

    def __init__(self, run: Run, result_id: int) -> None:
        super().__init__()
        self.run = run
        self.result_id = result_id
        self.summary: dict[str, Any] | None = None
        self.lifts: ImageLiftsLoaded | None = None

    def compose(self) -> ComposeResult:
        yield TitleBar(f"image · run {self.run.id}")
        with Horizontal(id="image-body"):
            yield HeatmapPane(self.run, self.app.graphics, id="image-picture")
            with Vertical(id="image-side"):
                yield Static("", id="image-info")
                with Vertical(id="image-neurons-pane"):
                    yield DataTable(id="image-neurons", cursor_type="row", zebra_stripes=True)
        yield Static("", id="status")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#image-neurons", DataTable).focus()
        self.show_ranking()
        self.load_summary()

    @property
    def by_lift(self) -> bool:
        """The app's generic toggle (`x`): on, the image's units that are not generic, ranked by lift."""
        return self.app.specific

    @work(thread=True, exclusive=True, group="summary", exit_on_error=False)
    def load_summary(self) -> None:
        try:
            summary = self.session.read(image_summary, self.run, self.result_id, top=TOP_TRIPLES)
        except MmtuiError as error:
            self.post_message(QueryFailed(str(error)))
            return
        if not get_current_worker().is_cancelled:
            self.post_message(ImageSummaryLoaded(self.result_id, summary))

    @work(thread=True, exclusive=True, group="lifts", exit_on_error=False)
    def load_lifts(self) -> None:
        try:
            n_results = self.session.read(pv.run_size, self.run)
            rows = self.session.read(pv.result_specific_units, self.run, self.result_id, limit=TOP_LIFTS)
        except MmtuiError as error:
            self.post_message(QueryFailed(str(error)))
            return
        if not get_current_worker().is_cancelled:
            self.post_message(ImageLiftsLoaded(self.result_id, rows, n_results))

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
        if not self.by_lift:
            self.fill_scores(s["top"])
        self.query_one(HeatmapPane).show_image(self.result_id, s["image"], s["sha256"], self.highlighted_unit())

    @on(ImageLiftsLoaded)
    def show_lifts(self, message: ImageLiftsLoaded) -> None:
        if message.result_id != self.result_id or not self.by_lift:
            return  # toggled back to scores while the lifts were read
        self.lifts = message
        table = self.query_one("#image-neurons", DataTable)
        table.clear()
        for i, r in enumerate(message.rows):
            table.add_row(
                Text(score(r["lift"]), justify="right"),
                neuron_label(r["layer"], r["unit"]),
                Text(str(r["image_rank"]), justify="right"),
                Text(str(r["image_patch"]), justify="right"),
                Text(score(r["image_score"]), justify="right"),
                share_cell(r["prevalence"], r["generic"]),
                tokens_cell(r["tokens"]),
                key=f"{i}:{r['layer']}.{r['unit']}",
            )
        self.update_status()
        if self.summary is not None:
            self.query_one(HeatmapPane).set_unit(self.highlighted_unit())

    def fill_scores(self, top: list[dict[str, Any]]) -> None:
        """The image's top triples, by score (the paper's ranking)."""
        table = self.query_one("#image-neurons", DataTable)
        table.clear()
        for rank, t in enumerate(top):
            table.add_row(
                Text(str(rank), justify="right"),
                neuron_label(t["layer"], t["unit"]),
                Text(str(t["patch"]), justify="right"),
                Text(score(t["score"]), justify="right"),
                tokens_cell(t["tokens"]),
                key=f"{rank}:{t['layer']}.{t['unit']}",
            )

    def show_ranking(self) -> None:
        """The columns, rows, pane title and status line of the ranking the toggle asks for."""
        table = self.query_one("#image-neurons", DataTable)
        table.clear(columns=True)
        for header in LIFT_COLUMNS if self.by_lift else SCORE_COLUMNS:
            table.add_column(header, key=header)
        pane = self.query_one("#image-neurons-pane")
        if self.by_lift:
            pane.border_title = "Its units by lift · generic units hidden"
            self.lifts = None
            self.load_lifts()
        else:
            pane.border_title = f"Top {TOP_TRIPLES} (layer, unit, patch) triples by score"
            if self.summary is not None:
                self.fill_scores(self.summary["top"])
                self.query_one(HeatmapPane).set_unit(self.highlighted_unit())
        self.update_status()

    def update_status(self) -> None:
        """Which ranking the table shows (one line: under 100 characters)."""
        if not self.by_lift:
            text = (
                f"ranked by score (activation × gradient, the paper's): the top {TOP_TRIPLES} triples"
                " · x: units by lift"
            )
        elif self.lifts is None:
            text = "ranking by lift …"
        else:
            n = self.lifts.n_results
            hidden = (
                f"generic units (share over {pv.GENERIC_SHARE:.0%}) hidden"
                if pv.generic_above(n) is not None
                else f"none generic yet (under {pv.MIN_GENERIC_RESULTS} images)"
            )
            text = f"ranked by lift: z-score of its max here over the run's {n:,} images · {hidden}"
        self.query_one("#status", Static).update(text)

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "rank":  # the binding that switches to the other ranking
            return (parameters[0] == "lift") != self.by_lift
        return True

    def action_rank(self, ranking: str) -> None:
        """x: rank the image's units by lift (generic ones hidden), or its triples by score again; the neuron
        table follows the same toggle."""
        self.app.specific = ranking == "lift"
        self.refresh_bindings()
        self.show_ranking()

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


def tokens_cell(tokens: list[str]) -> Text:
    return Text(", ".join(token(x) for x in tokens), no_wrap=True, overflow="ellipsis")
