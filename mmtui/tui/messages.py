"""The browser's messages: what workers report (past tense) and what widgets ask for (nouns).

Workers run in threads and post these to the screen that started them; `post_message` is thread-safe.
Tests watch them through `App.run_test(message_hook=...)`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from textual.message import Message

if TYPE_CHECKING:
    from PIL.Image import Image

    from mmtui.store import Run
    from mmtui.tui.state import AblationSpec, NeuronQuery


# -- the store ------------------------------------------------------------------------------------------------
@dataclass
class StoreOpened(Message):
    """The store opened and holds these runs (newest first)."""

    runs: list[Run]


@dataclass
class StoreFailed(Message):
    """The store cannot be browsed: missing, empty, not an mmtui cache, written by a newer mmtui, locked."""

    title: str
    message: str


@dataclass
class LayersLoaded(Message):
    """Per layer: units stored and units among some image's top 100."""

    counts: list[dict[str, Any]]


@dataclass
class NeuronsLoaded(Message):
    """A page of the neuron table for `query` and how long the store took. total: how many units match, when
    this page is the last; None when there may be more (NeuronsCounted follows the first page)."""

    query: NeuronQuery
    rows: list[dict[str, Any]]
    total: int | None
    seconds: float
    offset: int = 0  # > 0: a further page, to append


@dataclass
class NeuronsCounted(Message):
    """How many units match `query` (counted after its first page is on screen: a common token takes longer)."""

    query: NeuronQuery
    total: int


@dataclass
class NeuronDetailLoaded(Message):
    detail: dict[str, Any]


@dataclass
class ImageSummaryLoaded(Message):
    """An image's result: target, caption, P(target), top triples (see queries.image_summary)."""

    result_id: int
    summary: dict[str, Any]


@dataclass
class ImageLiftsLoaded(Message):
    """An image's units that are not generic, ranked by their lift on it (store.prevalence.result_specific_units,
    as `mmtui neurons --specific --image`), and the run's size the generic units are judged on."""

    result_id: int
    rows: list[dict[str, Any]]
    n_results: int


@dataclass
class PictureLoaded(Message):
    """An image read from disk, or why it could not be (moved, changed since it was attributed)."""

    result_id: int
    picture: Image | None = field(repr=False)
    problem: str | None = None


@dataclass
class ImagesListed(Message):
    """The run's results (one row per image and target), in the order they were attributed."""

    rows: list[dict[str, Any]]


@dataclass
class QueryFailed(Message):
    """A read of the store failed; `message` says what to do."""

    message: str


# -- requests from widgets ----------------------------------------------------------------------------------
@dataclass
class NeuronRequested(Message):
    """Open the detail of a unit."""

    layer: int
    unit: int


@dataclass
class ImageRequested(Message):
    """Open the image view of a result."""

    result_id: int


# -- the model: heatmaps and ablations ------------------------------------------------------------------------
@dataclass
class StackLoading(Message):
    """The run's model stack is being loaded (first use in this session)."""

    name: str


@dataclass
class HeatmapComputed(Message):
    """A unit's activations over an image's patch grid, drawn over the image."""

    result_id: int
    layer: int
    unit: int
    picture: Image = field(repr=False)
    peak: float
    grid: tuple[int, int]


@dataclass
class HeatmapFailed(Message):
    message: str


@dataclass
class AblationRequested(Message):
    spec: AblationSpec


@dataclass
class AblationStarted(Message):
    spec: AblationSpec
    total: int


@dataclass
class AblationProgressed(Message):
    """One point of the dose-response curve was computed and stored."""

    point: Any
    done: int
    total: int


@dataclass
class AblationFinished(Message):
    """The run ended: completed, or cancelled with the points computed so far (all of them stored)."""

    points: list[Any]
    summary: list[dict[str, Any]]
    cancelled: bool


@dataclass
class AblationFailed(Message):
    message: str
    points: list[Any] = field(default_factory=list)
