"""What an attribute run reports as it goes (`pipeline.attribute_images`): one small dataclass per kind of
event, so that a consumer matches on the type and reads named fields (the run id, an image's sha256, its
stored result id) instead of parsing a message.

Plain data: the Ray engine's workers send ImageDone, ImageFailed and Note back to the driver.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mmtui.store import ResultRecord


@dataclass(frozen=True)
class RunStarted:
    """The run is open in the store: its id, and how many image files it was given."""

    run_id: str
    total: int


@dataclass(frozen=True)
class ImageDone:
    """An image attributed: its record, and once the writer has stored it (what the run yields), its result id."""

    path: str
    sha256: str
    result_id: int | None
    record: ResultRecord


SkipReason = Literal["cached", "duplicate", "shard"]


@dataclass(frozen=True)
class ImageSkipped:
    """An image passed over on purpose, and why (`reason`): already in the cache ("cached"), the same bytes as
    an earlier file of this run ("duplicate"), or in another shard ("shard"). message: for people."""

    path: str
    reason: SkipReason
    message: str
    sha256: str


@dataclass(frozen=True)
class ImageFailed:
    """An image that gave no result (unreadable, no usable target, no caption); the message names it and why.
    sha256: the image's, when it was read."""

    path: str
    message: str
    sha256: str | None = None


NoteKind = Literal["warning", "info", "decoding"]


@dataclass(frozen=True)
class Note:
    """Anything else the run says. warning / info: a line for people. decoding: the neuron decodings' progress,
    `total` steps in all; the first Note names the work, each later one is a step done."""

    kind: NoteKind
    message: str = ""
    path: str = ""
    total: int = 0


Event = RunStarted | ImageDone | ImageSkipped | ImageFailed | Note
ImageEvent = ImageDone | ImageSkipped | ImageFailed
