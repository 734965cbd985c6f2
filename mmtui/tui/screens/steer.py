"""The steer view of a neuron: multiply its activations at the image positions by each scale of a grid and show
the regenerated captions side by side, with P(target) and the change of its data label's logit (of its first
decoded token where it has no label). The same core function as `mmtui steer` (mmtui.experiments.steer),
run in a worker thread with progress, image by image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.message import Message
from textual.widgets import Button, DataTable, Footer, Input, Label, ProgressBar, Static

from mmtui.errors import MmtuiError
from mmtui.store import Run, Store
from mmtui.tui.base import AppScreen
from mmtui.tui.messages import StackLoading
from mmtui.tui.text import image_name, printable, prob
from mmtui.tui.widgets.neuron_table import neuron_label
from mmtui.tui.widgets.title import TitleBar

DEFAULT_SCALES = "0,2,4,8"  # as the CLI's --scale
ROW_HEIGHT = 4  # a caption of up to three lines, then P(target) and the watched logit


@dataclass
class SteerImageDone(Message):
    """One image's rows (the unsteered reference first), and how many images are done of how many."""

    result_id: int
    rows: list[Any]
    done: int
    total: int


@dataclass
class SteerFinished(Message):
    rows: list[Any]
    skipped: list[str]


@dataclass
class SteerFailed(Message):
    message: str


def parse_scales(text: str) -> list[float]:
    """'0, 2, 4, 8' -> [0.0, 2.0, 4.0, 8.0]. Raises ValueError naming the problem."""
    try:
        values = [float(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise ValueError(f"scales {text!r}: give numbers separated by commas, such as {DEFAULT_SCALES}") from None
    if not values:
        raise ValueError(f"give one or more scales, such as {DEFAULT_SCALES}")
    return values


def setting_header(value: float) -> str:
    return "×1 (none)" if value == 1.0 else f"×{value:g}"


def watched_change(row: Any) -> str:
    """The change of the data label's logit (else the first decoded token's) against the unsteered row."""
    for watched in row.tokens.values():
        if watched:
            w = watched[0]
            return f"{printable(w['token'].strip() or repr(w['token']))} {w['delta']:+.2f}"
    return ""


class SteerScreen(AppScreen):
    BINDINGS = [
        Binding("escape", "app.pop_screen", "Back"),
        Binding("ctrl+r", "start", "Run"),
    ]

    def __init__(
        self, run: Run, neuron: tuple[int, int], images: list[tuple[int, str]], labels: list[dict[str, Any]]
    ) -> None:
        """images: (result id, path) of the images to steer it on."""
        super().__init__()
        self.run = run
        self.neuron = neuron
        self.images = images
        self.result_ids = [rid for rid, _ in images]
        self.labels = labels
        self.running = False
        self.settings: list[float] = []
        self.rows: list[Any] = []

    def compose(self) -> ComposeResult:
        yield TitleBar(
            f"steer {neuron_label(*self.neuron)} · {len(self.result_ids)} of its top images · run {self.run.id}"
        )
        with Horizontal(id="steer-form"):
            yield Label("scales ")
            yield Input(DEFAULT_SCALES, id="steer-scales", compact=True)
            yield Button("Run (ctrl+r)", id="steer-start", variant="primary", compact=True)
        with Horizontal(id="steer-progress-row"):
            yield ProgressBar(id="steer-progress", show_eta=False)
            yield Static("", id="steer-status")
        yield DataTable(id="steer-grid", cursor_type="row", zebra_stripes=True)
        yield Static("", id="steer-note")
        yield Footer()

    DEFAULT_CSS = """
    #steer-form { height: 1; padding: 0 1; }
    #steer-scales { width: 24; }
    #steer-progress-row { height: 1; padding: 0 1; }
    #steer-progress { width: 40; }
    #steer-grid { height: 1fr; }
    #steer-note { height: auto; padding: 0 1; color: $text-muted; }
    """

    def on_mount(self) -> None:
        self.query_one("#steer-progress", ProgressBar).display = False
        labelled = [f["label"] for f in self.labels if f["q"] < 0.05]
        watched = f"its data label {', '.join(map(str, labelled))!r}" if labelled else "its first decoded token"
        self.query_one("#steer-note", Static).update(
            "Each cell: the greedy caption with the unit's activations at every image position multiplied by the "
            f"scale, P(target) of the stored caption, and the change of the logit of {watched} against ×1. "
            "×0 is zero ablation. ctrl+r runs (the model loads the first time)."
        )
        self.query_one("#steer-status", Static).update("not run yet")
        self.lay_out(parse_scales(DEFAULT_SCALES))
        self.query_one("#steer-scales", Input).focus()

    def lay_out(self, values: list[float]) -> None:
        """The grid's columns (the unsteered reference first) and one row per image, empty until it is done."""
        self.settings = [1.0, *[v for v in values if v != 1.0]]
        table = self.query_one("#steer-grid", DataTable)
        table.clear(columns=True)
        table.add_column("image", key="image", width=18)
        width = max(16, (self.app.size.width - 26) // len(self.settings) - 2)
        for value in self.settings:
            table.add_column(setting_header(value), key=str(value), width=width)
        for rid, path in self.images:
            table.add_row(image_name(path), *["…" for _ in self.settings], key=str(rid), height=ROW_HEIGHT)

    @on(Input.Submitted, "#steer-scales")
    @on(Button.Pressed, "#steer-start")
    def action_start(self) -> None:
        if self.running:
            return
        try:
            values = parse_scales(self.query_one("#steer-scales", Input).value)
        except ValueError as error:
            self.notify(str(error), title="Steering", severity="error", timeout=6)
            return
        self.lay_out(values)
        self.running = True
        self.rows = []
        bar = self.query_one("#steer-progress", ProgressBar)
        bar.display = True
        bar.update(total=len(self.result_ids), progress=0)
        self.query_one("#steer-status", Static).update(f"0/{len(self.result_ids)} images")
        self.steer([v for v in self.settings if v != 1.0])

    @work(thread=True, exclusive=True, group="steer", exit_on_error=False)
    def steer(self, values: list[float]) -> None:
        from mmtui.experiments.steer import data_label_tokens, steer
        from mmtui.store import experiments as xs

        skipped: list[str] = []
        done: list[Any] = []
        try:
            with Store.open(self.app.db_path, create=False) as store:
                found = xs.result_rows(store, self.run.id, self.result_ids)
                images = [r["image_sha256"] for r in found]
                by_path = {r["path"]: r["id"] for r in found}
                if not self.app.stacks.loaded(self.run):
                    self.post_message(StackLoading(self.run.stack.name))
                stack = self.app.stacks.get(self.run)
                labels = data_label_tokens(stack, store, self.run, [self.neuron])

                def image_done(rows: list[Any]) -> None:
                    done.append(rows)
                    self.post_message(SteerImageDone(by_path[rows[0].image], rows, len(done), len(images)))

                rows = steer(
                    stack,
                    store,
                    self.run,
                    [self.neuron],
                    images,
                    values,
                    label_tokens=labels,
                    on_error=lambda image, message: skipped.append(message),
                    on_image=image_done,
                )
        except MmtuiError as error:
            self.post_message(SteerFailed(str(error)))
            return
        except Exception as error:  # a model error ends the run on screen, not silently
            self.post_message(SteerFailed(f"{type(error).__name__}: {error}"))
            return
        self.post_message(SteerFinished(rows, skipped))

    @on(StackLoading)
    def stack_loading(self, message: StackLoading) -> None:
        self.query_one("#steer-status", Static).update(f"loading the {message.name} model (first time only) …")

    @on(SteerImageDone)
    def image_done(self, message: SteerImageDone) -> None:
        table = self.query_one("#steer-grid", DataTable)
        rid = str(message.result_id)
        self.rows += message.rows
        if rid in table.rows:
            for row in message.rows:
                cell = Text(printable(row.caption) + "\n", overflow="fold")
                cell.append(f"P {prob(row.p_target)}", style="dim")
                change = watched_change(row)
                if change and row.value != 1.0:
                    cell.append(f" · {change}", style="cyan")
                table.update_cell(rid, str(row.value), cell, update_width=False)
        self.query_one("#steer-progress", ProgressBar).update(progress=message.done)
        self.query_one("#steer-status", Static).update(f"{message.done}/{message.total} images")

    @on(SteerFinished)
    def finished(self, message: SteerFinished) -> None:
        self.running = False
        for line in message.skipped:
            self.notify(line, title="Image skipped", severity="warning", timeout=8)
        n = len({r.image for r in message.rows})
        self.query_one("#steer-status", Static).update(f"Done: {n} image(s) × {len(self.settings)} settings.")

    @on(SteerFailed)
    def failed(self, message: SteerFailed) -> None:
        self.running = False
        self.query_one("#steer-status", Static).update(Text(f"Failed: {message.message}", style="red"))
