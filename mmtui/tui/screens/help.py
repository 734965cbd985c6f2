"""`?`: every key of the browser, screen by screen."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

from mmtui.defaults import INTERPRETABLE_MARK

INTRO = (
    "A neuron is (layer, unit), both 0-based, written L7.u12134. Its score for an image is activation x "
    "gradient of P(target) (method.md). 'top-100' counts the images where it is among the 100 best "
    "(layer, unit, patch) triples; 'stored' the images where it is among the stored triples; 'share' the "
    "share of the run's images whose top 100 hold it (G: generic, over 10%); 'data label' the caption word "
    "enriched among its best images beyond chance (mmtui explain, q < 0.05). "
    f"{INTERPRETABLE_MARK} marks an interpretable neuron: at least 7 of its top 10 decoded tokens are dictionary words "
    "(as in the CLI's tables)."
)
KEYS: list[tuple[str, list[tuple[str, str]]]] = [
    ("Everywhere", [("?", "this help"), ("q", "quit"), ("escape", "back"), ("tab, shift+tab", "next, previous pane")]),
    (
        "Layers and neurons",
        [
            ("up, down (Layers)", "show one layer's neurons; the first row shows all layers"),
            ("enter, click", "open the neuron"),
            ("s, S", "sort by the next, previous column"),
            ("1 ... 7, click a header", "sort by that column; again to reverse"),
            ("/", "filter by a decoded token: dog (whole token, any case); ~dog: tokens containing dog"),
            ("enter, escape (filter)", "keep the filter, clear it"),
            ("g", "go to a neuron: 7.12134 or L7.u12134"),
            ("i", "the run's images"),
            ("a", "ablation over the run's first images"),
            ("x", "hide the generic units (share over 10%, G), or show them again (images: rank by lift)"),
            ("r", "choose another run"),
        ],
    ),
    (
        "A neuron",
        [
            ("enter, click", "open the image"),
            ("h", "its activations over the highlighted image (loads the model the first time)"),
            ("a", "ablation over its top images"),
            ("t", "steer it: captions with its activations scaled, side by side"),
        ],
    ),
    (
        "An image",
        [
            ("enter, click", "open the neuron"),
            ("h", "the highlighted neuron's activations over the image; again for the plain image"),
            ("a", "ablation of this image's top neurons"),
            ("x", "its units by lift (z-score against the run), generic ones hidden; again: triples by score"),
        ],
    ),
    (
        "The run's images",
        [
            ("enter, click", "open the image"),
            ("a", "ablation of the highlighted image"),
            ("m", "one target mode at a time (auto: greedy caption, human: --captions, word:W: --target W)"),
        ],
    ),
    ("Ablation", [("ctrl+r", "run"), ("c", "cancel: the points computed so far stay in the store")]),
    ("Steering", [("ctrl+r, enter", "run the scales on its top images (the model loads the first time)")]),
]
OUTRO = (
    "Ablation (method.md, experiment 4): set each image's top-k triples to zero (or the unit's mean) and measure "
    "P(target) again; the baseline ablates, for each triple, a random unit of the same layer at the same patch. "
    "Relative drop = 1 - P after / P before."
)


def help_text() -> Text:
    text = Text()
    text.append("mmtui browse\n\n", style="bold")
    text.append(INTRO + "\n")
    for section, keys in KEYS:
        text.append(f"\n{section}\n", style="bold")
        for key, does in keys:
            text.append(f"  {key:<26}", style="bold")
            text.append(does + "\n")
    text.append("\n" + OUTRO, style="dim")
    return text


class HelpScreen(ModalScreen[None]):
    BINDINGS = [
        Binding("escape", "dismiss", "Close"),
        Binding("question_mark", "dismiss", "Close", show=False),
    ]

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help"):
            yield Static(help_text(), id="help-text")
