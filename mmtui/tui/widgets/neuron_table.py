"""The neuron table: one page of units from the store, sorted there (any column, either direction).

The table never sorts itself: 458,752 units do not fit in a widget, so every re-sort or filter is a query
(see queries.neuron_page) and the table shows its first page. Row keys are `layer.unit`.
"""

from __future__ import annotations

import re
from typing import Any

from rich.text import Text
from textual.binding import Binding
from textual.widgets import DataTable
from textual.widgets.data_table import ColumnKey

from mmtui.tui.state import COLUMNS, EXTRA_COLUMNS, NeuronQuery
from mmtui.tui.text import printable, score

WIDTHS = {"layer": 5, "neuron": 5, "max": 8, "mean": 8, "top": 7, "images": 6, "share": 6, "label": 10}
# fit 16,383, 0.000123 and "100% G"


def neuron_label(layer: int, unit: int) -> str:
    return f"L{layer}.u{unit}"


def share_cell(prevalence: float | None, generic: bool) -> Text:
    """The share of the run's images whose top 100 hold the unit, with G where that makes it generic."""
    if prevalence is None:
        return Text("-", justify="right")
    return Text.assemble(f"{prevalence:.0%}", (" G" if generic else "  ", "yellow bold"), justify="right")


def label_cell(found: dict[str, Any] | None) -> Text:
    """The unit's data label (q below the browser's FDR), or nothing."""
    if not found:
        return Text("")
    return Text(str(found["label"]), style="cyan", no_wrap=True, overflow="ellipsis")


class NeuronTable(DataTable):
    """Columns of state.COLUMNS; the sorted column's header carries ▼ or ▲."""

    BINDINGS = [
        Binding("j", "cursor_down", "Down", show=False),
        Binding("k", "cursor_up", "Up", show=False),
        Binding("home", "scroll_top", "First row", show=False),  # a row table has nothing to scroll sideways
        Binding("end", "scroll_bottom", "Last row", show=False),
    ]

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(cursor_type="row", zebra_stripes=True, **kwargs)
        self.rows_shown: list[dict[str, Any]] = []
        self.match: re.Pattern[str] | None = None  # the filter's text, picked out in the tokens column

    def on_mount(self) -> None:
        for key, header, _ in COLUMNS[:-1]:
            self.add_column(header, key=key, width=WIDTHS.get(key, len(header)) + 1)  # + room for the sort arrow
        for key, header in EXTRA_COLUMNS:
            self.add_column(header, key=key, width=WIDTHS.get(key, len(header)))
        key, header, _ = COLUMNS[-1]
        self.add_column(header, key=key, width=len(header) + 1)
        self.fit_tokens()

    def on_resize(self) -> None:
        self.fit_tokens()

    def fit_tokens(self) -> None:
        """The tokens column takes the width the others leave (its text ends in … when longer)."""
        if "tokens" not in self.columns:
            return
        others = sum(c.get_render_width(self) for key, c in self.columns.items() if key != "tokens")
        column = self.columns[ColumnKey("tokens")]
        column.width = max(20, self.scrollable_content_region.width - others - 2 * self.cell_padding - 1)
        self._require_update_dimensions = True
        self.refresh()

    def set_headers(self, query: NeuronQuery) -> None:
        for key, header, _ in COLUMNS:
            column = self.columns[ColumnKey(key)]
            arrow = ("▼" if query.descending else "▲") if key == query.sort else ""
            column.label = Text(header + arrow, style="bold" if key == query.sort else "")
        self._require_update_dimensions = True
        self.refresh()

    def show(self, rows: list[dict[str, Any]], query: NeuronQuery) -> None:
        """Replace the rows, keeping the cursor on the same unit when it is still shown."""
        keep = self.current_key()
        token, contains = query.token_filter
        if token is None:
            self.match = None
        else:  # a whole token: the token itself, not the same letters inside a longer one
            pattern = re.escape(token) if contains else rf"(?<![^\s,]){re.escape(token)}(?![^\s,])"
            self.match = re.compile(pattern, re.IGNORECASE)
        self.set_headers(query)
        self.clear()
        self.rows_shown = []
        self.append(rows)
        if keep is not None and keep in self.rows:
            self.move_cursor(row=self.get_row_index(keep))
        else:
            self.move_cursor(row=0)

    def append(self, rows: list[dict[str, Any]]) -> None:
        """Add a further page below the rows shown."""
        self.rows_shown += rows
        for r in rows:
            tokens = printable(r["text"]) if r["text"] is not None else "(not decoded)"
            mark = Text("● ", style="green") if r["interpretable"] else Text("  ")
            self.add_row(
                Text(str(r["layer"]), justify="right"),
                Text(str(r["unit"]), justify="right"),
                Text(score(r["max_score"]), justify="right"),
                Text(score(r["mean_score"]), justify="right"),
                Text(f"{r['n_top']:,}", justify="right"),
                Text(f"{r['n_images']:,}", justify="right"),
                share_cell(r.get("prevalence"), bool(r.get("generic"))),
                label_cell(r.get("label")),
                mark + self.tokens_cell(tokens),
                key=f"{r['layer']}.{r['unit']}",
            )

    def tokens_cell(self, tokens: str) -> Text:
        """The decoded tokens, with the filter's text picked out."""
        text = Text(tokens, no_wrap=True, overflow="ellipsis")
        if self.match is not None:
            text.highlight_regex(self.match, style="bold underline")
        return text

    def current_key(self) -> str | None:
        if not self.rows or self.cursor_row < 0:
            return None
        return self.coordinate_to_cell_key(self.cursor_coordinate).row_key.value

    def current_unit(self) -> tuple[int, int] | None:
        key = self.current_key()
        if key is None:
            return None
        layer, unit = key.split(".")
        return int(layer), int(unit)
