"""The layers pane: every layer with how many of its units are among some image's top 100, as a bar chart.

Highlighting a row filters the neuron table to that layer; the first row ("all") clears the filter.
"""

from __future__ import annotations

from typing import Any

from textual.content import Content
from textual.widgets import OptionList
from textual.widgets.option_list import Option

BLOCKS = " ▏▎▍▌▋▊▉█"


def bar(value: float, most: float, width: int) -> str:
    """A horizontal bar of `width` cells at eighth-cell resolution."""
    if most <= 0 or value <= 0:
        return ""
    eighths = max(1, round(8 * width * value / most))
    full, part = divmod(eighths, 8)
    return "█" * full + (BLOCKS[part] if part else "")


class LayerBars(OptionList):
    """Option "all" and one option per layer: `L 7 ██████▍  1,234`."""

    DEFAULT_CSS = """
    LayerBars { width: 1fr; }
    """

    def __init__(self, bar_width: int = 14, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.bar_width = bar_width
        self.counts: list[dict[str, Any]] = []

    def set_counts(self, counts: list[dict[str, Any]]) -> None:
        """counts: rows of queries.layer_counts (layer, n_units, n_top_units)."""
        self.counts = counts
        most = max((c["n_top_units"] for c in counts), default=0)
        total = sum(c["n_top_units"] for c in counts)
        digits = len(f"{max(most, total):,}")
        width = 4 + self.bar_width + 1
        options = [Option(Content.assemble(("all layers".ljust(width), "bold"), f"{total:>{digits},}"), id="all")]
        for c in counts:
            label = Content.assemble(
                f"L{c['layer']:<3}",
                (f"{bar(c['n_top_units'], most, self.bar_width):<{self.bar_width}}", "$accent"),
                f" {c['n_top_units']:>{digits},}",
            )
            options.append(Option(label, id=str(c["layer"])))
        highlighted = self.highlighted
        self.clear_options()
        self.add_options(options)
        self.highlighted = highlighted if highlighted is not None and highlighted < len(options) else 0

    @staticmethod
    def layer_of(option_id: str | None) -> int | None:
        return None if option_id in (None, "all") else int(option_id)
