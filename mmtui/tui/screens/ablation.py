"""The ablation screen: zero (or mean) each image's top-k triples, measure P(target) again, against a random
baseline; a dose-response run in a worker thread with a progress bar, a results table and a plot.

Every point is written to the store as soon as it is computed (mmtui.experiments.ablation.dose_response), so a
cancelled run keeps what it did, and the same settings later read those points back instead of recomputing.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import replace
from typing import Any

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.content import Content
from textual.widgets import Button, Checkbox, DataTable, Footer, Input, Label, ProgressBar, Select, Static
from textual.worker import get_current_worker
from textual_plotext import PlotextPlot

from mmtui.defaults import DEFAULT_KS, parse_ks
from mmtui.errors import MmtuiError
from mmtui.store import Run, Store
from mmtui.tui.base import AppScreen
from mmtui.tui.messages import (
    AblationFailed,
    AblationFinished,
    AblationProgressed,
    AblationRequested,
    AblationStarted,
    StackLoading,
)
from mmtui.tui.state import AblationSpec
from mmtui.tui.text import image_name, printable, prob
from mmtui.tui.widgets.title import TitleBar

DEFAULT_RUN_IMAGES = 10  # ablation from the main screen: the first N images of the run
COLORS = {"top": "red", "interpretable": "orange", "random": "blue"}


def _all_result_ids(store: Store, run_id: str) -> list[int]:
    return [r["id"] for r in store.results(run_id)]


def percent(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{100 * value + 0.0:.1f}%" if abs(value) >= 0.0005 else "0.0%"


class Tick(Checkbox):
    """A checkbox whose off state is an empty box: a compact Checkbox draws its X in both states, only dimmer, so
    off looked checked."""

    @property
    def _button(self) -> Content:
        self.BUTTON_INNER = "X" if self.value else " "
        return super()._button


class AblationScreen(AppScreen):
    BINDINGS = [
        Binding("escape", "leave", "Back"),
        Binding("ctrl+r", "start", "Run"),
        Binding("c", "cancel", "Cancel run"),
    ]

    def __init__(self, run: Run, result_ids: list[int] | None, label: str) -> None:
        """result_ids None: the first N images of the run (N in the form)."""
        super().__init__()
        self.run = run
        self.result_ids = result_ids
        self.label = label
        self.cancel_event = threading.Event()
        self.running = False
        self.points: list[Any] = []
        self.summary: list[dict[str, Any]] = []
        self.last_drawn = 0.0

    def default_ks(self) -> tuple[int, ...]:
        """The paper's grid, up to the triples each image has stored."""
        shape = self.run.shape
        stored = shape["n_layers"] * shape["d_mlp"] * shape["n_patches"]
        most = min(int(self.run.settings.get("keep") or stored), stored)
        ks = [k for k in DEFAULT_KS if k <= most]
        return tuple(ks if most in ks else [*ks, most])

    def compose(self) -> ComposeResult:
        yield TitleBar(f"ablation · {self.label} · run {self.run.id}")
        with Vertical(id="ablation-form"):
            with Horizontal(classes="form-row"):
                yield Label("images", classes="form-label")
                if self.result_ids is None:
                    first = min(DEFAULT_RUN_IMAGES, self.run.n_results)
                    yield Input(str(first), id="n-images", type="integer", compact=True, classes="form-short")
                    yield Label(f"first of the run's {self.run.counts}", classes="form-note")
                else:
                    yield Label(f"{self.label} ({len(self.result_ids)})", classes="form-note")
            with Horizontal(classes="form-row"):
                yield Label("k values", classes="form-label")
                yield Input(",".join(map(str, self.default_ks())), id="ks", compact=True, classes="form-wide")
            with Horizontal(classes="form-row"):
                yield Label("baseline", classes="form-label")
                yield Select(
                    [("random units", "random"), ("none", "none")],
                    value="random",
                    allow_blank=False,
                    compact=True,
                    id="baseline",
                )
                yield Label("seeds", classes="form-label-short")
                yield Input("3", id="seeds", type="integer", compact=True, classes="form-short")
            with Horizontal(classes="form-row"):  # its own row: the four fields of one row did not fit 80 columns
                yield Label("mode", classes="form-label")
                yield Select(
                    [("zero", "zero"), ("mean", "mean")], value="zero", allow_blank=False, compact=True, id="mode"
                )
                yield Label("ablate", classes="form-label-short")
                yield Select(
                    [("triples", "triples"), ("units", "units")],
                    value="triples",
                    allow_blank=False,
                    compact=True,
                    id="unit-mode",
                )
            with Horizontal(classes="form-row"):
                yield Tick("regenerate captions (slower)", compact=True, id="captions")
                yield Button("Run (ctrl+r)", id="start", variant="primary", compact=True)
                yield Button("Cancel (c)", id="cancel", variant="error", compact=True, disabled=True)
        with Horizontal(id="ablation-progress"):
            yield ProgressBar(id="progress", show_eta=True)
            yield Static("", id="ablation-status")
        with Horizontal(id="ablation-results"):
            with Vertical(id="summary-pane"):
                yield DataTable(id="summary", cursor_type="row", zebra_stripes=True)
                yield Static("", id="last-point")
            yield PlotextPlot(id="plot")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#ablation-form").border_title = "Dose-response: ablate each image's top-k, measure P(target)"
        self.query_one("#summary-pane").border_title = "Mean drop of P(target), 95% interval"
        self.query_one("#plot").border_title = "Dose-response"
        table = self.query_one("#summary", DataTable)
        for header in ("condition", "k", "images", "mean drop", "interval", "P before", "P after", "BERTScore"):
            table.add_column(header, key=header)
        self.query_one("#progress", ProgressBar).display = False
        self.query_one("#ablation-status", Static).update(
            "ctrl+r runs · triples: each image's k best (layer, unit, patch) · units: its k best units, at every patch"
        )
        self.draw_plot()

    # -- the form ----------------------------------------------------------------------------------------
    def read_form(self) -> AblationSpec | None:
        most = int(self.run.settings.get("keep", 0)) or None
        try:
            ks = parse_ks(self.query_one("#ks", Input).value, most=most)
            seeds = int(self.query_one("#seeds", Input).value or "0")
            if seeds < 1:
                raise ValueError("seeds must be at least 1")
        except ValueError as error:
            self.notify(str(error), title="Ablation settings", severity="error", timeout=6)
            return None
        ids: tuple[int, ...] = tuple(self.result_ids or ())
        return AblationSpec(
            result_ids=ids,
            ks=ks,
            baseline=str(self.query_one("#baseline", Select).value),
            seeds=seeds,
            mode=str(self.query_one("#mode", Select).value),
            unit_mode=str(self.query_one("#unit-mode", Select).value),
            captions=self.query_one("#captions", Checkbox).value,
            label=self.label,
        )

    def n_images(self) -> int:
        if self.result_ids is not None:
            return len(self.result_ids)
        try:
            return max(1, int(self.query_one("#n-images", Input).value or "1"))
        except ValueError:
            return DEFAULT_RUN_IMAGES

    def set_running(self, running: bool) -> None:
        self.running = running
        for widget in self.query("#ablation-form Input, #ablation-form Select, #ablation-form Checkbox, #start"):
            widget.disabled = running
        self.query_one("#cancel", Button).disabled = not running
        if running:
            self.query_one("#summary", DataTable).focus()

    # -- starting, cancelling ------------------------------------------------------------------------------
    @on(Button.Pressed, "#start")
    def action_start(self) -> None:
        if self.running:
            return
        spec = self.read_form()
        if spec is not None:
            self.post_message(AblationRequested(spec))

    @on(AblationRequested)
    def start(self, message: AblationRequested) -> None:
        self.cancel_event = threading.Event()
        self.points, self.summary = [], []
        self.show_summary()
        self.set_running(True)
        self.query_one("#ablation-status", Static).update("starting …")
        self.ablate(message.spec, self.n_images())

    @on(Button.Pressed, "#cancel")
    def action_cancel(self) -> None:
        if self.running and not self.cancel_event.is_set():
            self.cancel_event.set()
            self.query_one("#ablation-status", Static).update(
                "cancelling after the current batch … (points so far are kept)"
            )

    def action_leave(self) -> None:
        self.cancel_event.set()
        self.app.pop_screen()

    def on_unmount(self) -> None:
        self.cancel_event.set()  # the model stops after its current batch; what it stored stays

    # -- the worker ----------------------------------------------------------------------------------------
    @work(thread=True, exclusive=True, group="ablation", exit_on_error=False)
    def ablate(self, spec: AblationSpec, n_images: int) -> None:
        from mmtui.experiments.ablation import dose_response, summarize
        from mmtui.tui.compute import ablation_total

        cancel = self.cancel_event
        points: list[Any] = []
        skipped: list[str] = []
        stacks = self.app.stacks
        try:
            # a connection of its own: the points are written from this thread while the browser reads
            with Store.open(self.run_path(), create=False) as store:
                ids = list(spec.result_ids) or _all_result_ids(store, self.run.id)[:n_images]
                spec = replace(spec, result_ids=tuple(ids))
                if not stacks.loaded(self.run):
                    self.post_message(StackLoading(self.run.stack.name))
                stack = stacks.get(self.run)
                bertscore = self.load_bertscore(spec, stack) if spec.captions else None
                total = ablation_total(store, self.run, ids, spec)
                self.post_message(AblationStarted(spec, total))
                for point in dose_response(
                    stack,
                    store,
                    self.run,
                    ids,
                    spec.ks,
                    baseline=spec.baseline,
                    seeds=spec.seeds,
                    mode=spec.mode,
                    unit_mode=spec.unit_mode,
                    captions=spec.captions,
                    bertscore=bertscore,
                    cancel=cancel,
                    on_error=lambda rid, msg: skipped.append(f"result {rid}: {msg}"),
                ):
                    points.append(point)
                    self.post_message(AblationProgressed(point, len(points), total))
                summary = summarize(points, shape=self.run.shape) if points else []
        except MmtuiError as error:
            self.post_message(AblationFailed(str(error), points))
            return
        except Exception as error:  # a model error (CUDA out of memory, ...) ends the run on screen, not silently
            self.post_message(AblationFailed(f"{type(error).__name__}: {error}", points))
            return
        for line in skipped:
            self.app.call_from_thread(self.notify, line, title="Image skipped", severity="warning", timeout=8)
        self.post_message(AblationFinished(points, summary, cancel.is_set() or get_current_worker().is_cancelled))

    def run_path(self) -> Any:
        return self.app.db_path

    def load_bertscore(self, spec: AblationSpec, stack: Any) -> Any:
        from mmtui.experiments.metrics import load_scorers

        bert, _, notes = load_scorers(bertscore=True, clipscore=False, device=str(stack.device))
        for note in notes:
            self.app.call_from_thread(self.notify, note, title="BERTScore", severity="warning", timeout=8)
        return bert

    # -- what the worker reports -----------------------------------------------------------------------
    @on(StackLoading)
    def stack_loading(self, message: StackLoading) -> None:
        self.query_one("#ablation-status", Static).update(f"loading the {message.name} model (first time only) …")

    @on(AblationStarted)
    def started(self, message: AblationStarted) -> None:
        bar = self.query_one("#progress", ProgressBar)
        bar.display = True
        bar.update(total=max(1, message.total), progress=0)
        n = len(message.spec.result_ids)
        self.query_one("#ablation-status", Static).update(f"0/{message.total} points · {n} image(s)")

    @on(AblationProgressed)
    def progressed(self, message: AblationProgressed) -> None:
        self.points.append(message.point)
        self.query_one("#progress", ProgressBar).update(progress=message.done)
        p = message.point
        cached = " (from the store)" if p.cached else ""
        self.query_one("#ablation-status", Static).update(f"{message.done}/{message.total} points{cached}")
        line = Text.assemble(
            (image_name(p.image), "bold"),
            f"  k={p.k} {p.condition}{'' if p.seed is None else f' seed {p.seed}'}: ",
            f"P {prob(p.p_before)} → {prob(p.p_after)} ({percent(p.relative_drop)} drop)",
        )
        if p.caption is not None and p.k > 0:
            line.append(f"\ncaption: {printable(p.caption)}", style="dim")
        self.query_one("#last-point", Static).update(line)
        now = time.monotonic()
        if now - self.last_drawn > 0.25 or message.done == message.total:
            self.last_drawn = now
            self.refresh_summary()

    @on(AblationFinished)
    def finished(self, message: AblationFinished) -> None:
        self.set_running(False)
        self.points = list(message.points)
        self.summary = message.summary
        self.show_summary()
        done = len(message.points)
        if message.cancelled:
            text = f"Cancelled: {done} point(s) computed and kept in the store."
        else:
            text = f"Done: {done} point(s), stored."
            bar = self.query_one("#progress", ProgressBar)
            if bar.total is not None:
                bar.update(progress=bar.total)
        self.query_one("#ablation-status", Static).update(text)

    @on(AblationFailed)
    def failed(self, message: AblationFailed) -> None:
        self.set_running(False)
        self.points = list(message.points)
        self.refresh_summary()
        self.query_one("#ablation-status", Static).update(Text(f"Failed: {message.message}", style="red"))

    # -- drawing -------------------------------------------------------------------------------------------
    def refresh_summary(self) -> None:
        from mmtui.experiments.ablation import summarize

        self.summary = summarize(self.points, shape=self.run.shape) if self.points else []
        self.show_summary()

    def show_summary(self) -> None:
        table = self.query_one("#summary", DataTable)
        table.clear()
        for row in self.summary:
            interval = f"[{percent(row['lo'])}, {percent(row['hi'])}]" if row["n"] > 1 else "-"
            table.add_row(
                Text(row["condition"], style=COLORS.get(row["condition"], "")),
                Text(str(row["k"]), justify="right"),
                Text(str(row["n"]), justify="right"),
                Text(percent(row["mean_drop"]), justify="right"),
                interval,
                Text(prob(row["p_before"]), justify="right"),
                Text(prob(row["p_after"]), justify="right"),
                Text(
                    "-" if row["bertscore"] is None or math.isnan(row["bertscore"]) else f"{row['bertscore']:.3f}",
                    justify="right",
                ),
            )
        self.draw_plot()

    def draw_plot(self) -> None:
        plot = self.query_one("#plot", PlotextPlot)
        plt = plot.plt
        plt.clear_data()
        plt.clear_figure()
        ks = sorted({row["k"] for row in self.summary})
        plt.title("relative drop of P(target) vs k")
        plt.xlabel("k (ablated)")
        plt.ylim(-0.1, 1.0)
        if ks:
            where = {k: i for i, k in enumerate(ks)}
            for condition in ("top", "interpretable", "random"):
                rows = [r for r in self.summary if r["condition"] == condition and not math.isnan(r["mean_drop"])]
                if rows:
                    xs = [where[r["k"]] for r in rows]
                    plt.plot(
                        xs, [r["mean_drop"] for r in rows], label=condition, marker="braille", color=COLORS[condition]
                    )
            plt.xticks(list(range(len(ks))), [str(k) for k in ks])
        plot.refresh()
