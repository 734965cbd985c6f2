"""The attribute run: images -> stack -> store, resumable, one transaction per image.

`run_attribution` is the one orchestrator of a run: it opens the run, decodes the neurons once per LM, plans
the images (what is cached, duplicated or has no target), writes every result through the StoreWriter, and
yields Events (mmtui.run.events) so that both the CLI (rich) and the TUI (Textual) can show progress. Where the
model work happens is an Engine: `LocalEngine` (this process; `attribute_images`) or the Ray actors of
mmtui.run.distributed. A bad image, an image with no usable target or a caption file without that image each
become one ImageFailed event and the run goes on.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from queue import Full, Queue
from typing import Any, Protocol, TypeVar

import numpy as np
import torch

from mmtui.defaults import DEFAULT_KEEP
from mmtui.errors import ImageError, TargetError
from mmtui.run.attribution import Attribution, Target, caption_and_score
from mmtui.run.captions import human_target, read_captions
from mmtui.run.decoding import decode_units
from mmtui.run.events import Event, ImageDone, ImageFailed, ImageSkipped, Note, RunStarted, SkipReason
from mmtui.run.images import LoadedImage, RawImage, Skip, iter_images
from mmtui.run.writer import StoreWriter
from mmtui.stacks.base import DEFAULT_MAX_NEW_TOKENS, Stack
from mmtui.store import ResultRecord, StackIdentity, Store

__all__ = [
    "Engine",
    "Event",
    "LocalEngine",
    "Settings",
    "WorkItem",
    "attribute_images",
    "read_captions",
    "run_attribution",
]


# -- records -------------------------------------------------------------------------------------------
def to_record(
    stack: Stack, image: LoadedImage, spec: str, attr: Attribution, human: str | None, seconds: float
) -> ResultRecord:
    """Plain-data record of one attribution, for the store."""
    t: Target = attr.target
    return ResultRecord(
        image_sha256=image.sha256,
        image_path=str(image.path),
        width=image.size[0],
        height=image.size[1],
        target_spec=spec,
        target=t.word,
        target_token_id=t.token_id,
        target_token=t.token,
        target_source=t.source,
        target_split=t.split,
        caption=t.caption,
        context=t.context(stack),
        context_ids=list(t.context_ids),
        y_c=attr.y_c,
        p_target=attr.p_target,
        top_layer=attr.top_layer.numpy().astype(np.int16),
        top_unit=attr.top_unit.numpy().astype(np.int32),
        top_patch=attr.top_patch.numpy().astype(np.int16),
        top_score=attr.top_score.numpy().astype(np.float32),
        unit_max=attr.unit_max.numpy(),
        unit_sum=attr.unit_sum.numpy(),
        human_caption=human,
        seconds=seconds,
    )


@dataclass
class Settings:
    """What an attribute run does per image, beside the stack (plain data: it travels to Ray workers)."""

    target: str | None = None
    captions: dict[str, list[str]] | None = None
    batch_size: int = 4  # 0: as many as fit the device (see auto_batch_size)
    keep: int = DEFAULT_KEEP
    site: str = "post"
    y_kind: str = "prob"
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    convention: str = "raw"
    shard: tuple[int, int] | None = None

    def stored(self, load_args: dict[str, Any]) -> dict[str, Any]:
        """What the run row records of these settings (`Store.ensure_run`), with how to load the stack again."""
        return {"keep": self.keep, "max_new_tokens": self.max_new_tokens, "load": load_args}


@dataclass
class WorkItem:
    image: LoadedImage | RawImage
    spec: str  # the target asked for: auto | word:<w> | human:<w>; part of the resume key
    word: str | None
    human: str | None


def plan(
    paths: Iterable[Path], settings: Settings, done: set[tuple[str, str]], decode: bool = True
) -> Iterator[WorkItem | Event]:
    """Read the images and decide each one's target; yields work to do, or an Event for what is skipped or failed.

    decode=False leaves the images as bytes (RawImage), for workers elsewhere to decode.
    """
    for item in iter_images(paths, settings.shard, decode=decode):
        if isinstance(item, ImageError):
            yield ImageFailed(item.path, str(item))
            continue
        if isinstance(item, Skip):
            reason: SkipReason = "duplicate" if item.duplicate else "shard"
            yield ImageSkipped(str(item.path), reason, f"{item.path}: {item.reason}", item.sha256)
            continue
        word, human = settings.target, None
        if word is None and settings.captions is not None:
            found = settings.captions.get(item.path.name)
            picked = human_target(found) if found else None
            if picked is None:
                yield ImageFailed(
                    str(item.path),
                    f"{item.path}: no caption with a noun for this image in the caption file",
                    item.sha256,
                )
                continue
            word, human = picked
        spec = "auto" if word is None else (f"human:{word}" if human is not None else f"word:{word}")
        if (item.sha256, spec) in done:
            yield ImageSkipped(str(item.path), "cached", "already in the cache", item.sha256)
            continue
        done.add((item.sha256, spec))
        yield WorkItem(item, spec, word, human)


def _loaded(work: WorkItem) -> LoadedImage:
    """A work item's decoded image (plan decodes unless told not to; attribute_batch decodes the rest)."""
    if not isinstance(work.image, LoadedImage):
        raise TypeError(f"{work.image.path}: not decoded yet")
    return work.image


def attribute_batch(
    stack: Stack, batch: list[WorkItem], settings: Settings, pixels: torch.Tensor | None = None
) -> list[Event]:
    """Attribute one batch: ImageDone events carry the record to store, ImageFailed ones name the image and why.

    pixels: the batch already preprocessed (`stack.pixels`), e.g. by a prefetch thread.
    """
    start = time.perf_counter()
    events: list[Event] = []
    if any(isinstance(w.image, RawImage) for w in batch):
        decoded = []
        for work in batch:
            try:
                if isinstance(work.image, RawImage):
                    work.image = work.image.decode()
                decoded.append(work)
            except ImageError as err:
                events.append(ImageFailed(str(work.image.path), str(err), work.image.sha256))
        batch = decoded
        if not batch:
            return events
    prefix = stack.encode(pixels if pixels is not None else [_loaded(w).image for w in batch])  # [B, P, d_model]
    scored = caption_and_score(
        stack,
        prefix,
        [w.word for w in batch],
        ["human-caption" if w.human else None for w in batch],
        y_kind=settings.y_kind,
        site=settings.site,
        top=settings.keep,
        max_new_tokens=settings.max_new_tokens,
    )
    rows, attrs = [], []
    for i, (work, result) in enumerate(zip(batch, scored, strict=True)):
        if isinstance(result, TargetError):
            events.append(ImageFailed(str(work.image.path), f"{work.image.path}: {result}", work.image.sha256))
        else:
            rows.append(i)
            attrs.append(result)
    seconds = (time.perf_counter() - start) / len(batch)
    for i, attr in zip(rows, attrs, strict=True):
        work = batch[i]
        if attr.target.split:
            events.append(
                Note(
                    "warning",
                    f"target {attr.target.word!r} is several tokens for this tokenizer; using its first, {attr.target.token!r}",
                    str(work.image.path),
                )
            )
        record = to_record(stack, _loaded(work), work.spec, attr, work.human, seconds)
        events.append(ImageDone(str(work.image.path), work.image.sha256, None, record))
    return events


def batches(items: Iterable[WorkItem | Event], size: int) -> Iterator[list[WorkItem] | Event]:
    """Group work items into lists of `size`; Events pass straight through."""
    batch: list[WorkItem] = []
    for item in items:
        if not isinstance(item, WorkItem):
            yield item
            continue
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def route(events: Iterable[Event], writer: StoreWriter, warned: set[str]) -> Iterator[Event]:
    """Send ImageDone events to the writer (they come back from `writer.ready()` once stored, with their result
    ids); pass the others on, a split-word warning once."""
    for event in events:
        if isinstance(event, Note) and event.kind == "warning":
            if event.message in warned:
                continue
            warned.add(event.message)
        if isinstance(event, ImageDone):
            writer.put(event)
        else:
            yield event
    yield from writer.ready()


class Engine(Protocol):
    """Where the model work of a run happens; `run_attribution` does the rest.

    identity: the stack's (every replica's). load_args: how to load it again (recorded with the run).
    decodes_images: whether the images are decoded here (LoadedImage) or travel as bytes (RawImage).
    decoding_steps: how many lists of rows `decodings` yields (the progress total).
    """

    identity: StackIdentity
    load_args: dict[str, Any]
    decodes_images: bool
    decoding_steps: int

    def decodings(self, convention: str) -> Iterator[list[dict[str, Any]]]:
        """Every unit's decoded tokens (mmtui.run.decoding rows), in `decoding_steps` lists."""
        ...

    def prepare(self, settings: Settings) -> Iterator[Event]:
        """Fix what depends on the engine (e.g. an automatic batch size) in `settings`, saying what it chose."""
        ...

    def results(self, work: Iterator[list[WorkItem] | Event], settings: Settings) -> Iterator[list[Event]]:
        """The Events of each batch of `work` (an Event in `work` comes back as it is, in its turn)."""
        ...


class LocalEngine:
    """The model work in this process: the next batches are read, decoded and preprocessed on a thread while
    the model works on the current one."""

    decodes_images = True

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.identity = stack.identify()
        self.load_args = stack.load_args
        self.decoding_steps = stack.n_layers

    def decodings(self, convention: str) -> Iterator[list[dict[str, Any]]]:
        return decode_units(self.stack, convention)

    def prepare(self, settings: Settings) -> Iterator[Event]:
        if settings.batch_size <= 0:
            settings.batch_size = auto_batch_size(self.stack, settings.max_new_tokens)
            yield Note("info", f"batch size {settings.batch_size} (chosen to fit {self.stack.device})")

    def results(self, work: Iterator[list[WorkItem] | Event], settings: Settings) -> Iterator[list[Event]]:
        def prepared() -> Iterator[tuple[list[WorkItem], torch.Tensor] | Event]:
            for batch in work:
                yield (
                    batch
                    if not isinstance(batch, list)
                    else (batch, self.stack.pixels([_loaded(w).image for w in batch]))
                )

        for item in prefetch(prepared(), depth=2):
            yield [item] if not isinstance(item, tuple) else attribute_batch(self.stack, item[0], settings, item[1])


def run_attribution(engine: Engine, store: Store, paths: Iterable[Path], settings: Settings) -> Iterator[Event]:
    """Attribute every image of `paths` not yet in the store on `engine`; yields RunStarted, then an Event per
    image (and Notes: decoding progress, warnings, the batch size chosen).

    Finished images are committed one by one, so an interruption loses at most the batches in flight and a
    rerun resumes.
    """
    paths = list(paths)
    settings = replace(settings)  # the engine may fix the batch size in it
    run_id = store.ensure_run(
        engine.identity, site=settings.site, y_kind=settings.y_kind, settings=settings.stored(engine.load_args)
    )
    yield RunStarted(run_id, len(paths))
    lm_id, convention = engine.identity.lm_id, settings.convention
    if store.count_tokens(lm_id, convention) != engine.identity.units:  # an interrupted decoding is redone
        steps = engine.decoding_steps
        yield Note("decoding", f"decoding {engine.identity.units:,} units ({convention})", total=steps)
        for rows in engine.decodings(convention):
            store.add_tokens(lm_id, convention, rows)  # rows are replaced
            yield Note("decoding", total=steps)
    yield from engine.prepare(settings)
    done = store.done_keys(run_id)  # read here: the store's connection belongs to this thread
    work = batches(plan(paths, settings, done, decode=engine.decodes_images), settings.batch_size)
    warned: set[str] = set()
    writer = StoreWriter(store.path, run_id, timeout=store.timeout)
    try:
        for events in engine.results(work, settings):
            yield from route(events, writer, warned)
        yield from writer.finish()
    finally:
        writer.close()  # on an interruption too: every finished image is written


def attribute_images(
    stack: Stack, store: Store, paths: Iterable[Path], settings: Settings | None = None, **kwargs: Any
) -> Iterator[Event]:
    """Attribute every image not yet in the store, in this process (`run_attribution` on a LocalEngine).

    The target of each image: `settings.target` for all, else the first noun of its human caption in
    `settings.captions`, else the first noun of the model's greedy caption. Keyword arguments override fields
    of `settings`.
    """
    settings = Settings(**{**(settings.__dict__ if settings else {}), **kwargs})
    yield from run_attribution(LocalEngine(stack), store, paths, settings)


T = TypeVar("T")
PREFETCH_JOIN_SECONDS = 60.0  # how long an interrupted run waits for the batch being prepared


def prefetch(items: Iterator[T], depth: int = 2) -> Iterator[T]:
    """Run `items` in a background thread, `depth` ahead of the consumer; its exceptions re-raise here."""
    queue: Queue = Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def put(item: object) -> bool:
        """Queue one item unless the consumer has stopped (then False): never blocks past a stop."""
        while not stop.is_set():
            try:
                queue.put(item, timeout=0.1)
                return True
            except Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(done)
        except BaseException as err:  # handed to the consumer, which re-raises it
            put(err)

    thread = threading.Thread(target=work, name="mmtui-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = queue.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        # wait for the item in hand: a daemon thread still inside torch or PIL when the interpreter exits (after
        # Ctrl-C) can abort the process ("terminate called without an active exception", exit -6, not 130)
        thread.join(timeout=PREFETCH_JOIN_SECONDS)


def auto_batch_size(stack: Stack, max_new_tokens: int, cap: int = 64) -> int:
    """Images per batch that fit the GPU's free memory (probed with one image), 4 on the CPU."""
    if stack.device.type != "cuda":
        return 4
    from PIL import Image

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    prefix = stack.encode([Image.new("RGB", (256, 256), (128, 128, 128))])
    caption_and_score(stack, prefix, ["dog"], [None], max_new_tokens=max_new_tokens)
    per_image = max(torch.cuda.max_memory_allocated() - base, 1)
    free, _ = torch.cuda.mem_get_info()
    return max(1, min(cap, int(0.8 * free / per_image)))
