"""`g`: go to a neuron by typing `L.K`."""

from __future__ import annotations

from typing import Any

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, Static

from mmtui.tui.state import parse_neuron


class JumpScreen(ModalScreen[tuple[int, int] | None]):
    """Dismisses with (layer, unit), or None on escape."""

    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel")]

    def __init__(self, shape: dict[str, Any]) -> None:
        super().__init__()
        self.shape = shape

    def compose(self) -> ComposeResult:
        with Vertical(id="jump"):
            yield Static("Go to neuron (layer.unit, e.g. 7.12134 or L7.u12134)", id="jump-title")
            yield Input(placeholder="L.K", id="jump-input")
            yield Static("", id="jump-error")

    @on(Input.Submitted, "#jump-input")
    def submitted(self, event: Input.Submitted) -> None:
        unit = parse_neuron(event.value)
        n_layers, d_mlp = self.shape["n_layers"], self.shape["d_mlp"]
        error = self.query_one("#jump-error", Static)
        if unit is None:
            error.update(f"{event.value!r} is not L.K; type a layer and a unit, e.g. 7.12134")
        elif not (0 <= unit[0] < n_layers and 0 <= unit[1] < d_mlp):
            error.update(f"no L{unit[0]}.u{unit[1]}: layers are 0-{n_layers - 1}, units 0-{d_mlp - 1}")
        else:
            self.dismiss(unit)
