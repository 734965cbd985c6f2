"""`?`: every key of the browser, screen by screen."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Markdown

HELP = """\
# mmtui browse

A *neuron* is `(layer, unit)`, both 0-based, written `L7.u12134`. Its score for an image is
activation × gradient of P(target) (method.md); *top-100 in* counts the images where it is among the
100 best (layer, unit, patch) triples, *stored in* the images where it is among the stored ones.

## Everywhere
| key | does |
| --- | --- |
| `?` | this help |
| `q` | quit |
| `escape` | back |
| `tab` / `shift+tab` | move between panes |

## Layers and neurons
| key | does |
| --- | --- |
| `↑` `↓` in *Layers* | show one layer's neurons (first row: all layers) |
| `enter`, click | open the neuron |
| `s` / `S` | sort by the next / previous column (click a header to sort by it; again to reverse) |
| `1` … `7` | sort by that column; again to reverse |
| `/` | filter by decoded token text (`enter` keeps it, `escape` clears it) |
| `g` | go to a neuron: `7.12134`, `L7.u12134` |
| `i` | the run's images |
| `a` | ablation over the run's images |
| `r` | choose another run |

## A neuron
| key | does |
| --- | --- |
| `enter`, click | open the image |
| `h` | its activations over the highlighted image (loads the model the first time) |
| `a` | ablation over its top images |

## An image
| key | does |
| --- | --- |
| `enter`, click | open the neuron |
| `h` | the highlighted neuron's activations over this image; again for the plain image |
| `a` | ablation of this image's top neurons |

## Ablation
| key | does |
| --- | --- |
| `ctrl+r` | start |
| `c` | cancel (points already computed are kept in the store) |

The dose-response: zero (or mean) the image's top-k triples and measure P(target) again;
the baseline ablates random units of the same layers at the same patches. Relative drop = 1 − P after / P before.
"""


class HelpScreen(ModalScreen[None]):
    BINDINGS = [
        Binding("escape", "dismiss", "Close"),
        Binding("question_mark", "dismiss", "Close", show=False),
    ]

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help"):
            yield Markdown(HELP)
