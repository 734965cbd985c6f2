"""Defaults and choices shared by the core and the commands; importing this module is free (no torch).

Each choice is declared once, as a str Enum: the commands take it as the option's type (Typer then lists
the values in --help and rejects any other), and the core checks plain strings against its values.
"""

import re
from dataclasses import dataclass
from enum import Enum

from mmtui.errors import StackError

DEFAULT_PRESET = "smol"
DEFAULT_PROMPT = "A picture of"
DEFAULT_MAX_NEW_TOKENS = 20
DEFAULT_KEEP = 6400  # top (layer, unit, patch) triples stored per image: the ablation grid's largest k
DEFAULT_FDR = 0.05  # `explain`: a data label is shown where its Benjamini-Hochberg q is below this
NEURON_IMAGES = 20  # the cache keeps each unit's best 20 results per run (neuron_images; the TUI shows 20)
THRESHOLD_Q = 0.95  # a unit's receptive field: the pixels above this quantile of its upsampled map (method.md,
# experiment 3): the outline every heatmap draws and the mask the specificity IoU scores


class Site(str, Enum):
    """Where a unit's activation is read: the MLP's hidden activation (post) or before the nonlinearity (pre)."""

    POST = "post"
    PRE = "pre"


class YKind(str, Enum):
    """What is attributed: the target's probability, logit or log-probability."""

    PROB = "prob"
    LOGIT = "logit"
    LOGPROB = "logprob"


class Convention(str, Enum):
    """Token decoding: the paper's W_U @ W_out (raw), or with the final norm's gain first (ln_f)."""

    RAW = "raw"
    LN_F = "ln_f"


class AblationMode(str, Enum):
    """What an ablated activation becomes: 0, or the unit's mean over the run's images."""

    ZERO = "zero"
    MEAN = "mean"


class UnitMode(str, Enum):
    """What k counts in an ablation: (unit, patch) triples, or units at every image position."""

    TRIPLES = "triples"
    UNITS = "units"


class Baseline(str, Enum):
    """The ablation's control: random units (same layers, same patches), or none."""

    RANDOM = "random"
    NONE = "none"


class Engine(str, Enum):
    """Where attribution runs: in this process, or on Ray workers (one model replica each)."""

    LOCAL = "local"
    RAY = "ray"


class ProjectionKind(str, Enum):
    """The projection train-projection trains: LiMBeR's linear map, or LLaVA's MLP (Linear-GELU-Linear)."""

    LINEAR = "linear"
    MLP = "mlp"


class IgRule(str, Enum):
    """The integration rule of integrated gradients (`explain --ig`; mmtui.experiments.integrated)."""

    TRAPEZOID = "riemann_trapezoid"
    GAUSS_LEGENDRE = "gausslegendre"
    RIGHT = "riemann_right"


IG_STEPS = 65  # `explain --ig`: points of the rule (why: mmtui.experiments.integrated.DEFAULT_METHOD)


class Graphics(str, Enum):
    """How the TUI draws pictures: auto (pixels when the terminal can), pixels (Sixel/kitty), or half blocks."""

    AUTO = "auto"
    PIXELS = "pixels"
    HALFBLOCK = "halfblock"


SITES = tuple(m.value for m in Site)
Y_KINDS = tuple(m.value for m in YKind)
CONVENTIONS = tuple(m.value for m in Convention)
ABLATION_MODES = tuple(m.value for m in AblationMode)
UNIT_MODES = tuple(m.value for m in UnitMode)
BASELINES = tuple(m.value for m in Baseline)
GRAPHICS = tuple(m.value for m in Graphics)
PROJECTION_KINDS = tuple(m.value for m in ProjectionKind)
DEFAULT_KS = (0, 50, 100, 200, 400, 800, 1600, 3200, 6400)  # the ablation's k grid (method.md, experiment 4)


def parse_ks(text: str, most: int | None = None) -> tuple[int, ...]:
    """`0, 50 100;200` -> (0, 50, 100, 200), sorted and unique. Raises ValueError with a message a person can act on."""
    parts = [p for p in re.split(r"[\s,;]+", text.strip()) if p]
    if not parts:
        raise ValueError("give at least one k, e.g. 0,50,100,200")
    try:
        ks = sorted({int(p) for p in parts})
    except ValueError:
        raise ValueError(f"k values are whole numbers separated by commas, not {text!r}") from None
    if ks[0] < 0:
        raise ValueError("k values cannot be negative")
    if most is not None and ks[-1] > most:
        raise ValueError(f"k = {ks[-1]} is more than the {most} triples stored per image")
    return tuple(ks)


# -- the --encoder grammar (mmtui.stacks.vision describes the encoders; parsed here, free of torch, so the
# commands refuse a malformed spec before any model loads) ---------------------------------------------------
@dataclass(frozen=True)
class EncoderSpec:
    """A parsed --encoder value: kind (efficientnet-lite0, beit, hf, timm), the model, and for ViTs the layer
    (None: the model's own output) and whether the CLS token is kept. str() gives the canonical spec."""

    kind: str
    name: str = ""
    layer: int | None = None
    cls: bool = False

    def __str__(self) -> str:
        if self.kind == "efficientnet-lite0":
            return self.kind
        layer = f"@{self.layer}" if self.layer is not None else ""
        return f"{self.kind}:{self.name}{layer}{'+cls' if self.cls else ''}"


ENCODER_FORMS = "efficientnet-lite0, beit:<id|folder>, hf:<id|folder>[@LAYER][+cls] or timm:<name>[@LAYER][+cls]"
_VIT_SPEC = re.compile(r"(?P<name>.+?)(?:@(?P<layer>[+-]?\d+))?(?P<cls>\+cls)?")


def parse_encoder_spec(text: str) -> EncoderSpec:
    """`hf:openai/clip-vit-large-patch14-336@-2` -> EncoderSpec("hf", "openai/...", -2, False).

    Raises StackError with one line naming the problem; nothing is loaded.
    """
    text = text.strip()
    if text == "efficientnet-lite0":
        return EncoderSpec(text)
    kind, sep, rest = text.partition(":")
    if not sep or kind not in ("beit", "hf", "timm"):
        raise StackError(f"unknown encoder {text!r}; use {ENCODER_FORMS}")
    if kind == "beit":
        if not rest:
            raise StackError(f"encoder {text!r} names no model; write beit:<hub id or folder>")
        return EncoderSpec(kind, rest)
    m = _VIT_SPEC.fullmatch(rest)
    if m is None or not m.group("name"):
        raise StackError(f"encoder {text!r} names no model; write {kind}:<{'id|folder' if kind == 'hf' else 'name'}>")
    name = m.group("name")
    if "@" in name:
        raise StackError(
            f"encoder {text!r}: after @ comes a layer number (an index into the hidden states, -2 as LLaVA), "
            f"e.g. {kind}:{name.split('@')[0]}@-2"
        )
    layer = int(m.group("layer")) if m.group("layer") is not None else None
    return EncoderSpec(kind, name, layer, m.group("cls") is not None)


INTERPRETABLE_MARK = "●"  # marks an interpretable unit (words.is_interpretable) in the CLI's tables and the TUI's
