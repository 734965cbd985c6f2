"""The main screen of a run: the layers pane (a bar chart that filters) and the neuron table (sort, filter, go to)."""

from __future__ import annotations

import time
from dataclasses import replace

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import DataTable, Footer, Input, OptionList, Static
from textual.worker import get_current_worker

from mmtui.errors import MmtuiError
from mmtui.store import Run, Store
from mmtui.store import prevalence as pv
from mmtui.store.labels import best_labels
from mmtui.store.queries import count_neurons, layer_counts, neuron_page
from mmtui.tui.base import AppScreen
from mmtui.tui.messages import LayersLoaded, NeuronRequested, NeuronsCounted, NeuronsLoaded, QueryFailed
from mmtui.tui.screens.runs import run_shape
from mmtui.tui.session import Interrupted
from mmtui.tui.state import COLUMNS, LABEL_FDR, NeuronQuery
from mmtui.tui.widgets.layers import LayerBars
from mmtui.tui.widgets.neuron_table import NeuronTable
from mmtui.tui.widgets.title import TitleBar


def run_title(run: Run) -> str:
    return f"run {run.id} · {run.stack.name} · {run.counts} · {run_shape(run)}"


class BrowseScreen(AppScreen):
    BINDINGS = [
        Binding("slash", "filter", "Filter", key_display="/"),
        Binding("s", "sort(1)", "Sort"),
        Binding("S", "sort(-1)", "Sort back", show=False),
        Binding("g", "go_to", "Go to L.K"),
        Binding("i", "images", "Images"),
        Binding("a", "ablate", "Ablate"),
        Binding("x", "specific", "Generic ↔ specific"),
        Binding("r", "runs", "Runs"),
        Binding("escape", "clear_filter", "Clear filter", show=False),
        *[
            Binding(str(i + 1), f"sort_column('{key}')", f"Sort by {header}", show=False)
            for i, (key, header, _) in enumerate(COLUMNS)
        ],
    ]

    def __init__(self, run: Run) -> None:
        super().__init__()
        self.run = run
        self.query_state = NeuronQuery()
        self.shown: NeuronsLoaded | None = None  # the first page of the current query
        self.asked_more: tuple[NeuronQuery, int] | None = None
        self.settled = False
        self.total: int | None = None
        self.n_results: int | None = None  # the run's size the shares are counted on (read once, by a worker)

    def compose(self) -> ComposeResult:
        yield TitleBar(run_title(self.run))
        with Horizontal(id="browse-body"):
            with Vertical(id="layers-pane"):
                yield LayerBars(id="layers")
            with Vertical(id="neurons-pane"):
                yield NeuronTable(id="neurons")
                yield Input(
                    placeholder="filter: a decoded token, e.g. horse; ~horse: tokens containing horse", id="filter"
                )
        yield Static("", id="status")
        yield Footer()

    def on_mount(self) -> None:
        self.query_state = NeuronQuery(limit=self.app.page, specific=self.app.specific)
        self.query_one("#layers-pane").border_title = "Layers · top-100 units"
        self.query_one("#neurons-pane").border_title = "Neurons"
        self.query_one("#filter", Input).display = False
        self.query_one("#neurons", NeuronTable).focus()
        self.load_neurons(self.query_state)  # then the layers: see show_neurons

    # -- workers: the store in a thread, results as messages -------------------------------------------------
    @work(thread=True, exclusive=True, group="layers", exit_on_error=False)
    def load_layers(self) -> None:
        try:
            counts = self.session.read(layer_counts, self.run)
        except MmtuiError as error:
            self.post_message(QueryFailed(str(error)))
            return
        self.post_message(LayersLoaded(counts))

    @work(thread=True, exclusive=True, group="neurons", exit_on_error=False)
    def load_neurons(self, query: NeuronQuery) -> None:
        if not self.settled:
            # results an interrupted fast attribute run left out of the aggregates are counted in first
            try:
                self.session.read(Store.fold_pending, self.run.id)
            except MmtuiError as error:
                self.post_message(QueryFailed(str(error)))
                return
            self.settled = True
        self.read_page(query, 0)

    @work(thread=True, exclusive=True, group="more", exit_on_error=False)
    def load_page(self, query: NeuronQuery, offset: int) -> None:
        self.read_page(query, offset)

    def filters(self, query: NeuronQuery) -> dict:
        """The store's filters for `query` (in a worker: the run's size is read once)."""
        if self.n_results is None:
            self.n_results = self.session.read(pv.run_size, self.run)
        above = pv.generic_above(self.n_results) if query.specific else None
        return {**query.filters(), "max_n_top": above}

    def read_page(self, query: NeuronQuery, offset: int) -> None:
        """In a worker thread: one page of the table from the store, with each unit's share of the run's
        images and its data label, posted as NeuronsLoaded."""
        start = time.perf_counter()
        try:
            filters = self.filters(query)
            rows = self.session.read(
                neuron_page,
                self.run,
                sort=query.sort,
                descending=query.descending,
                limit=query.limit,
                offset=offset,
                **filters,
            )
            rows = pv.annotate(rows, self.n_results or 0)
            units = [(r["layer"], r["unit"]) for r in rows]
            found = self.session.read(best_labels, self.run.key, units, LABEL_FDR)
            for r in rows:
                r["label"] = found.get((r["layer"], r["unit"]))
        except MmtuiError as error:
            self.post_message(QueryFailed(str(error)))
            return
        if not get_current_worker().is_cancelled:
            total = offset + len(rows) if len(rows) < query.limit else None
            self.post_message(NeuronsLoaded(query, rows, total, time.perf_counter() - start, offset))

    @work(thread=True, exclusive=True, group="count", exit_on_error=False)
    def count(self, query: NeuronQuery) -> None:
        try:
            filters = self.filters(query)
            total = self.session.read_in_background(count_neurons, self.run, **filters)
        except Interrupted:
            return  # a newer query's count replaced this one
        except MmtuiError as error:
            self.post_message(QueryFailed(str(error)))
            return
        if not get_current_worker().is_cancelled:
            self.post_message(NeuronsCounted(query, total))

    @on(LayersLoaded)
    def show_layers(self, message: LayersLoaded) -> None:
        self.query_one("#layers", LayerBars).set_counts(message.counts)

    @on(NeuronsLoaded)
    def show_neurons(self, message: NeuronsLoaded) -> None:
        if message.query != self.query_state:
            return  # an older query finished after a newer one was asked for
        table = self.query_one("#neurons", NeuronTable)
        if message.offset:
            if message.offset != table.row_count:
                return  # a page the table already has, or one it no longer follows
            table.append(message.rows)
            if message.total is not None:
                self.total = message.total
        else:
            if self.shown is None:
                self.load_layers()
            self.shown = message
            self.total = message.total
            table.show(message.rows, message.query)
            if message.total is None:
                self.count(message.query)
        self.update_status()

    @on(NeuronsCounted)
    def show_count(self, message: NeuronsCounted) -> None:
        if message.query == self.query_state:
            self.total = message.total
            self.update_status()

    @on(QueryFailed)
    def show_failure(self, message: QueryFailed) -> None:
        self.notify(message.message, title="Store error", severity="error", timeout=10)

    def update_status(self) -> None:
        shown = self.shown
        if shown is None:
            return
        q, n = shown.query, self.query_one("#neurons", NeuronTable).row_count
        header = next(h for key, h, _ in COLUMNS if key == q.sort)
        if self.total is None:
            count = f"{n:,}+ neurons (counting …)"
        elif self.total > n:
            count = f"{self.total:,} neurons ({n:,} loaded)"
        else:
            count = f"{self.total:,} neurons"
        parts = [
            count,
            f"layer {q.layer}" if q.layer is not None else "all layers",
            f"sorted by {header} {'▼' if q.descending else '▲'}",
        ]
        if q.specific:
            above = pv.generic_above(self.n_results or 0)
            parts.append(
                "generic units hidden"
                + (
                    f" (top 100 of over {pv.GENERIC_SHARE:.0%} of images)"
                    if above is not None
                    else f" (none yet: under {pv.MIN_GENERIC_RESULTS} images)"
                )
            )
        token, contains = q.token_filter
        if token:
            parts.append(f"tokens contain {token!r}" if contains else f"a token is {token!r}")
        self.query_one("#status", Static).update(" · ".join(parts))
        total = "…" if self.total is None else f"{self.total:,}"
        self.query_one("#neurons-pane").border_title = f"Neurons · {total}"

    def ask(self, query: NeuronQuery) -> None:
        if query != self.query_state:
            self.query_state = query
            self.load_neurons(query)

    # -- events ------------------------------------------------------------------------------------------
    @on(OptionList.OptionHighlighted, "#layers")
    def layer_highlighted(self, event: OptionList.OptionHighlighted) -> None:
        self.ask(replace(self.query_state, layer=LayerBars.layer_of(event.option.id)))

    @on(OptionList.OptionSelected, "#layers")
    def layer_selected(self, event: OptionList.OptionSelected) -> None:
        self.set_focus(self.query_one("#neurons", NeuronTable))

    @on(DataTable.HeaderSelected, "#neurons")
    def header_clicked(self, event: DataTable.HeaderSelected) -> None:
        key = str(event.column_key.value)
        if any(key == c[0] for c in COLUMNS):  # share and data label do not sort
            self.ask(self.query_state.sorted_by(key))

    @on(DataTable.RowHighlighted, "#neurons")
    def near_the_end(self, event: DataTable.RowHighlighted) -> None:
        """Load the next page when the cursor comes within a screenful of the last loaded row."""
        table = self.query_one("#neurons", NeuronTable)
        more = self.total is None or table.row_count < self.total
        if more and table.row_count and event.cursor_row >= table.row_count - table.size.height:
            self.load_more(self.query_state, table.row_count)

    def load_more(self, query: NeuronQuery, offset: int) -> None:
        if (query, offset) != self.asked_more:
            self.asked_more = (query, offset)
            self.load_page(query, offset)

    @on(DataTable.RowSelected, "#neurons")
    def row_chosen(self, event: DataTable.RowSelected) -> None:
        layer, unit = str(event.row_key.value).split(".")
        self.post_message(NeuronRequested(int(layer), int(unit)))

    @on(NeuronRequested)
    def open_neuron(self, message: NeuronRequested) -> None:
        from mmtui.tui.screens.neuron import NeuronScreen

        self.app.push_screen(NeuronScreen(self.run, message.layer, message.unit))

    @on(Input.Changed, "#filter")
    def filter_changed(self, event: Input.Changed) -> None:
        self.ask(replace(self.query_state, token=event.value.strip()))

    @on(Input.Submitted, "#filter")
    def filter_submitted(self, event: Input.Submitted) -> None:
        if not event.value.strip():
            event.input.display = False
        self.set_focus(self.query_one("#neurons", NeuronTable))

    # -- actions -----------------------------------------------------------------------------------------
    def action_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.display = True
        self.set_focus(box)  # now, not later (as box.focus() would): keys typed right after `/` go in the box

    def action_clear_filter(self) -> None:
        """escape: clear the filter; with no filter, back to the run chooser when it is below."""
        box = self.query_one("#filter", Input)
        if box.display or self.query_state.token:
            box.value = ""
            box.display = False
            self.ask(replace(self.query_state, token=""))
            self.set_focus(self.query_one("#neurons", NeuronTable))
        elif self.chooser_below():
            self.app.pop_screen()

    def chooser_below(self) -> bool:
        from mmtui.tui.screens.runs import RunsScreen

        stack = self.app.screen_stack
        return len(stack) >= 2 and isinstance(stack[-2], RunsScreen)

    def action_specific(self) -> None:
        """x: hide the run's generic units (in the top 100 of too many of its images), or show them again. The
        app keeps the choice: an image opened now ranks its units by lift (see ImageScreen)."""
        self.app.specific = not self.query_state.specific
        self.ask(replace(self.query_state, specific=self.app.specific))

    def on_screen_resume(self) -> None:
        """Back from a screen where `x` was pressed (an image's): show the table the toggle now asks for."""
        if self.shown is not None and self.query_state.specific != self.app.specific:
            self.ask(replace(self.query_state, specific=self.app.specific))

    def action_sort(self, step: int) -> None:
        self.ask(self.query_state.next_sort(step))

    def action_sort_column(self, column: str) -> None:
        self.ask(self.query_state.sorted_by(column))

    def action_go_to(self) -> None:
        from mmtui.tui.screens.jump import JumpScreen

        def jumped(unit: tuple[int, int] | None) -> None:
            if unit is not None:
                self.post_message(NeuronRequested(*unit))

        self.app.push_screen(JumpScreen(self.run.shape), jumped)

    def action_images(self) -> None:
        from mmtui.tui.screens.images import ImagesScreen

        self.app.push_screen(ImagesScreen(self.run))

    def action_ablate(self) -> None:
        from mmtui.tui.screens.ablation import AblationScreen

        self.app.push_screen(AblationScreen(self.run, None, "the run's images"))

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "runs":  # only a store of several runs has others to choose
            return len(self.app.runs) > 1
        return True

    def key_r(self) -> None:
        """`r` with one run: its binding is off (no other run to choose); say so rather than do nothing."""
        if len(self.app.runs) <= 1:
            self.notify(f"This store holds one run ({self.run.id}); there is no other to choose.", timeout=4)

    def action_runs(self) -> None:
        from mmtui.tui.screens.runs import RunsScreen

        if self.chooser_below():
            self.app.pop_screen()
        else:
            self.app.switch_screen(RunsScreen(self.app.runs))
