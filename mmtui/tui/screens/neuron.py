"""One neuron: its decoded tokens under both conventions, the images where it ranks highest, and its
activations over the highlighted image (a forward pass: the model loads in a worker, the first time only).
"""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import DataTable, Footer, Static
from textual.worker import get_current_worker

from mmtui.defaults import CONVENTIONS, NEURON_IMAGES
from mmtui.errors import MmtuiError
from mmtui.store import Run
from mmtui.store.labels import unit_labels
from mmtui.store.prevalence import unit_prevalence
from mmtui.store.queries import neuron_detail
from mmtui.tui.base import AppScreen
from mmtui.tui.messages import ImageRequested, NeuronDetailLoaded, QueryFailed
from mmtui.tui.text import image_name, printable, prob, score, token
from mmtui.tui.widgets.heatmap_pane import HeatmapPane
from mmtui.tui.widgets.neuron_table import neuron_label
from mmtui.tui.widgets.title import TitleBar
from mmtui.words import is_word

TOP_IMAGES = NEURON_IMAGES  # all the cache keeps per unit
CONVENTION_NAMES = {"raw": "raw (paper)", "ln_f": "ln_f gain"}
STEER_IMAGES = 3  # the steer view: the highlighted image and the next of its top images
LABEL_FDR = 0.05


def labels_line(prevalence: dict[str, Any] | None, labels: list[dict[str, Any]]) -> Text:
    """Its share of the run's images (generic or not) and its data labels, each with its q (store.labels)."""
    text = Text()
    if prevalence and prevalence["prevalence"] is not None:
        text.append(f"share {prevalence['prevalence']:.0%} of the run's {prevalence['n_results']:,} images")
        text.append(
            " · generic" if prevalence["generic"] else " · not generic", style="yellow" if prevalence["generic"] else ""
        )
    if not labels:
        text.append("   no data label (mmtui explain)", style="dim")
    for found in labels:
        beats = found["q"] < LABEL_FDR
        text.append(f"   {found['kind']} label ")
        text.append(str(found["label"]), style="bold cyan" if beats else "dim")
        text.append(
            f" {found['k']}/{found['n']} of its best images, q {found['q']:.2g}"
            + ("" if beats else " (not above chance)"),
            style="" if beats else "dim",
        )
    return text


class NeuronScreen(AppScreen):
    BINDINGS = [
        Binding("escape", "app.pop_screen", "Back"),
        Binding("h", "heatmap", "Heatmap"),
        Binding("a", "ablate", "Ablate its images"),
        Binding("t", "steer", "Steer"),
    ]

    def __init__(self, run: Run, layer: int, unit: int) -> None:
        super().__init__()
        self.run = run
        self.neuron = (layer, unit)
        self.detail: dict[str, Any] | None = None

    def compose(self) -> ComposeResult:
        yield TitleBar(f"{neuron_label(*self.neuron)} · run {self.run.id}")
        yield Static("", id="neuron-stats")
        yield Static("", id="neuron-labels")
        with Horizontal(id="neuron-top"):
            with Vertical(id="tokens-pane"):
                yield DataTable(id="tokens", cursor_type="none", zebra_stripes=True)
                yield Static("", id="tokens-note")
            yield HeatmapPane(self.run, self.app.graphics, id="heatmap-pane")
        with Vertical(id="top-images-pane"):
            yield DataTable(id="top-images", cursor_type="row", zebra_stripes=True)
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#tokens-pane").border_title = "Decoded tokens (logit)"
        self.query_one("#top-images-pane").border_title = "Images where it ranks highest"
        tokens = self.query_one("#tokens", DataTable)
        tokens.add_column("#", key="rank")
        for convention in CONVENTIONS:
            tokens.add_column(CONVENTION_NAMES.get(convention, convention), key=convention)
            tokens.add_column("logit", key=f"{convention}-logit")
        images = self.query_one("#top-images", DataTable)
        for header in ("image", "score", "rank", "patch", "target", "P(target)", "caption"):
            images.add_column(header, key=header)
        images.focus()
        self.load_detail()

    @work(thread=True, exclusive=True, group="detail", exit_on_error=False)
    def load_detail(self) -> None:
        try:
            detail = self.session.read(neuron_detail, self.run, *self.neuron, top_images=TOP_IMAGES)
            detail["labels"] = self.session.read(unit_labels, self.run.key, *self.neuron)
            detail["prevalence"] = self.session.read(unit_prevalence, self.run, *self.neuron, detail["stats"]["n_top"])
        except MmtuiError as error:
            self.post_message(QueryFailed(str(error)))
            return
        for found in detail["decoded"].values():
            if found:  # the interpretability filter's count, shown beside its verdict
                found["words"] = sum(is_word(t) for t in found["tokens"][:10])
        if not get_current_worker().is_cancelled:
            self.post_message(NeuronDetailLoaded(detail))

    @on(NeuronDetailLoaded)
    def show_detail(self, message: NeuronDetailLoaded) -> None:
        self.detail = d = message.detail
        s = d["stats"]
        self.query_one("#neuron-stats", Static).update(
            Text.assemble(
                (neuron_label(*self.neuron), "bold"),
                f"   max score {score(s['max_score'])}   mean {score(s['mean_score'])}   ",
                f"in the top 100 of {s['n_top']:,} image(s)   stored for {s['n_images']:,} of {self.run.n_results:,}"
                + (" results" if self.run.n_results != self.run.n_images else ""),
            )
        )
        self.query_one("#neuron-labels", Static).update(labels_line(d.get("prevalence"), d.get("labels", [])))
        self.show_tokens(d["decoded"])
        images = self.query_one("#top-images", DataTable)
        images.clear()
        for im in d["images"]:
            images.add_row(
                image_name(im["image"]),
                Text(score(im["score"]), justify="right"),
                Text(str(im["rank"]), justify="right"),
                Text(str(im["patch"]), justify="right"),
                printable(im["target"]),
                Text(prob(im["p_target"]), justify="right"),
                Text(printable(im["caption"]), no_wrap=True, overflow="ellipsis"),
                key=str(im["result_id"]),
            )
        pane = self.query_one("#top-images-pane")
        pane.border_title = f"Images where it ranks highest · {len(d['images'])} shown"
        if not d["images"]:
            self.query_one(HeatmapPane).show_message("This neuron is in no image's stored triples.")

    def show_tokens(self, decoded: dict[str, Any]) -> None:
        table = self.query_one("#tokens", DataTable)
        table.clear()
        n = max((len(found["tokens"]) for found in decoded.values() if found), default=0)
        for i in range(n):
            cells: list[Any] = [Text(str(i + 1), justify="right")]
            for convention in CONVENTIONS:
                found = decoded.get(convention)
                if found and i < len(found["tokens"]):
                    cells += [token(found["tokens"][i]), Text(f"{found['logits'][i]:.3g}", justify="right")]
                else:
                    cells += ["", ""]
            table.add_row(*cells)
        notes = []
        for convention in CONVENTIONS:
            found = decoded.get(convention)
            if found is None:
                notes.append(f"{convention}: not decoded in this store (mmtui attribute --decode {convention})")
            else:
                verdict = "interpretable" if found["interpretable"] else "not interpretable"
                words = found.get("words")
                count = f"{words} of {len(found['tokens'][:10])} are words" if words is not None else ""
                notes.append(f"{convention}: {verdict} ({count}; 7 needed)")
        self.query_one("#tokens-note", Static).update("\n".join(notes))

    @on(QueryFailed)
    def show_failure(self, message: QueryFailed) -> None:
        self.notify(message.message, title="Store error", severity="error", timeout=10)

    # -- images and heatmaps -------------------------------------------------------------------------------
    def highlighted_image(self) -> dict[str, Any] | None:
        table = self.query_one("#top-images", DataTable)
        if self.detail is None or not table.row_count:
            return None
        key = str(table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value)
        return next(im for im in self.detail["images"] if str(im["result_id"]) == key)

    @on(DataTable.RowHighlighted, "#top-images")
    def image_highlighted(self, event: DataTable.RowHighlighted) -> None:
        im = self.highlighted_image()
        if im is not None:
            self.query_one(HeatmapPane).show_image(im["result_id"], im["image"], im["sha256"], self.neuron)

    @on(DataTable.RowSelected, "#top-images")
    def image_chosen(self, event: DataTable.RowSelected) -> None:
        self.post_message(ImageRequested(int(str(event.row_key.value))))

    @on(ImageRequested)
    def open_image(self, message: ImageRequested) -> None:
        from mmtui.tui.screens.image import ImageScreen

        self.app.push_screen(ImageScreen(self.run, message.result_id))

    def action_heatmap(self) -> None:
        self.query_one(HeatmapPane).toggle_heatmap()

    def action_steer(self) -> None:
        from mmtui.tui.screens.steer import SteerScreen

        if not self.detail or not self.detail["images"]:
            self.notify("This neuron is in no image's stored triples: no image to steer it on.", timeout=4)
            return
        images = [(im["result_id"], im["image"]) for im in self.detail["images"]]
        picked = self.highlighted_image()
        if picked is not None:  # the highlighted image first
            images.remove((picked["result_id"], picked["image"]))
            images.insert(0, (picked["result_id"], picked["image"]))
        self.app.push_screen(SteerScreen(self.run, self.neuron, images[:STEER_IMAGES], self.detail.get("labels", [])))

    def action_ablate(self) -> None:
        from mmtui.tui.screens.ablation import AblationScreen

        if not self.detail or not self.detail["images"]:
            self.notify("This neuron is in no image's stored triples: nothing to ablate.", timeout=4)
            return
        ids = [im["result_id"] for im in self.detail["images"]]
        label = f"the {len(ids)} top images of {neuron_label(*self.neuron)}"
        self.app.push_screen(AblationScreen(self.run, ids, label))
