"""The attribute run: images -> stack -> store, resumable, one transaction per image.

`attribute_images` is a generator of Events so that both the CLI (rich) and the TUI (Textual) can show
progress; the caller decides what to print. A bad image, an image with no usable target or a caption
file without that image each become one `failed` event and the run goes on.
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmtui.attribution import DEFAULT_TOP, Attribution, Target, resolve_target, score_targets
from mmtui.decoding import decode_units
from mmtui.errors import ImageError, TargetError
from mmtui.images import LoadedImage, iter_images
from mmtui.stacks.base import DEFAULT_MAX_NEW_TOKENS, Stack
from mmtui.store import ResultRecord, Store


@dataclass
class Event:
    """kind: start | decoding | skipped | done | failed | warning."""

    kind: str
    path: str = ""
    message: str = ""
    record: ResultRecord | None = None
    result_id: int | None = None
    total: int = 0


# -- human captions ------------------------------------------------------------------------------------
def read_captions(path: Path | str) -> dict[str, list[str]]:
    """Captions per image file name from COCO captions JSON, JSON Lines or CSV (`image,caption`)."""
    path = Path(path)
    if not path.is_file():
        raise TargetError(f"{path}: caption file not found; pass --captions FILE (COCO JSON, JSONL or CSV)")
    captions: dict[str, list[str]] = {}
    try:
        if path.suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            names = {img["id"]: img["file_name"] for img in data["images"]}
            for ann in data["annotations"]:
                captions.setdefault(names[ann["image_id"]], []).append(ann["caption"])
        elif path.suffix in (".jsonl", ".ndjson"):
            for line in path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    row = json.loads(line)
                    captions.setdefault(Path(row["image"]).name, []).append(row["caption"])
        else:
            with path.open(newline="", encoding="utf-8") as fh:
                for row in csv.DictReader(fh, delimiter="\t" if path.suffix == ".tsv" else ","):
                    captions.setdefault(Path(row["image"]).name, []).append(row["caption"])
    except (KeyError, ValueError, TypeError) as err:
        raise TargetError(
            f"{path}: not a caption file this tool reads ({type(err).__name__}: {err}); "
            "use COCO captions JSON, JSONL with image and caption keys, or CSV with an image,caption header"
        ) from err
    if not captions:
        raise TargetError(f"{path}: holds no captions")
    return captions


def human_target(captions: list[str]) -> tuple[str, str] | None:
    """(first noun, caption) of the first of an image's human captions that has a noun."""
    from mmtui.nouns import first_noun

    for caption in captions:
        noun = first_noun(caption)
        if noun is not None:
            return noun.word, caption
    return None


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


def ensure_decoded(stack: Stack, store: Store, convention: str = "raw") -> Iterator[Event]:
    """Decode every unit once per LM and convention into the store."""
    if store.count_tokens(stack.lm_fingerprint_id, convention) == stack.n_layers * stack.d_mlp:
        return  # complete (an interrupted decoding is redone; rows are replaced)
    yield Event(
        "decoding", message=f"decoding {stack.n_layers * stack.d_mlp:,} units ({convention})", total=stack.n_layers
    )
    for rows in decode_units(stack, convention):
        store.add_tokens(stack.lm_fingerprint_id, convention, rows)
        yield Event("decoding", total=stack.n_layers)


def attribute_images(
    stack: Stack,
    store: Store,
    paths: Iterable[Path],
    *,
    target: str | None = None,
    captions: dict[str, list[str]] | None = None,
    batch_size: int = 4,
    keep: int = DEFAULT_TOP,
    site: str = "post",
    y_kind: str = "prob",
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    convention: str = "raw",
) -> Iterator[Event]:
    """Attribute every image not yet in the store; yields an Event per image (and a few for decoding).

    The target of each image: `target` for all, else the first noun of its human caption in `captions`,
    else the first noun of the model's greedy caption. Finished images are committed one by one, so an
    interruption loses at most the batch in flight and a rerun resumes.
    """
    paths = list(paths)
    run_id = store.ensure_run(
        stack_id=stack.fingerprint_id,
        stack_name=stack.name,
        fingerprint=stack.fingerprint,
        shape=stack.shape(),
        lm_id=stack.lm_fingerprint_id,
        prompt=stack.prompt,
        site=site,
        y_kind=y_kind,
        settings={"keep": keep, "max_new_tokens": max_new_tokens, "load": stack.load_args},
    )
    yield Event("start", message=run_id, total=len(paths))
    yield from ensure_decoded(stack, store, convention)
    done = store.done_keys(run_id)
    warned: set[str] = set()
    batch: list[tuple[LoadedImage, str, str | None, str | None]] = []  # image, spec, word, human caption

    def flush() -> Iterator[Event]:
        start = time.perf_counter()
        prefix = stack.encode([b[0].image for b in batch])  # [B, P, d_model]
        generated = stack.generate(prefix, max_new_tokens)
        keep_rows, targets, failed = [], [], []
        for i, ((image, _spec, word, human), ids) in enumerate(zip(batch, generated, strict=True)):
            try:
                source = "human-caption" if human is not None else None
                targets.append(resolve_target(stack, ids, word, source))
                keep_rows.append(i)
            except TargetError as err:
                failed.append(Event("failed", str(image.path), str(err)))
        yield from failed
        if targets:
            attrs = score_targets(stack, prefix[keep_rows], targets, y_kind=y_kind, site=site, top=keep)
            seconds = (time.perf_counter() - start) / len(batch)
            for i, attr in zip(keep_rows, attrs, strict=True):
                image, spec, _word, human = batch[i]
                if attr.target.split and attr.target.word not in warned:
                    warned.add(attr.target.word)
                    yield Event(
                        "warning",
                        str(image.path),
                        f"target {attr.target.word!r} is several tokens for this tokenizer; "
                        f"using its first, {attr.target.token!r}",
                    )
                record = to_record(stack, image, spec, attr, human, seconds)
                result_id = store.add_result(run_id, record)
                yield Event("done", str(image.path), record=record, result_id=result_id)
        batch.clear()

    for item in iter_images(paths):
        if isinstance(item, ImageError):
            kind = "skipped" if "computed once" in str(item) else "failed"
            yield Event(kind, item.path, str(item))
            continue
        word, human = target, None
        if word is None and captions is not None:
            found = captions.get(item.path.name)
            picked = human_target(found) if found else None
            if picked is None:
                yield Event(
                    "failed", str(item.path), f"{item.path}: no caption with a noun for this image in the caption file"
                )
                continue
            word, human = picked
        spec = "auto" if word is None else (f"human:{word}" if human is not None else f"word:{word}")
        if (item.sha256, spec) in done:
            yield Event("skipped", str(item.path), "already in the cache")
            continue
        done.add((item.sha256, spec))
        batch.append((item, spec, word, human))
        if len(batch) >= batch_size:
            yield from flush()
    if batch:
        yield from flush()
