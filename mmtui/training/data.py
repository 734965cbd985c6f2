"""The projection's training data: encoder features of every image (cached on disk) and caption token ids, with the
held-out split; and the progress and error types the training loop shares with it."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mmtui.errors import ImageError, MmtuiError
from mmtui.stacks.base import Stack
from mmtui.training.caption_data import (
    CaptionSource,
    FeatureCache,
    compute_features,
    data_sha256,
    encoder_key,
    tidy_caption,
)
from mmtui.training.caption_loss import HeldOutImage


class TrainingError(MmtuiError):
    """Training cannot start or go on (no data, a checkpoint from other settings, ...)."""


class TrainingInterrupted(MmtuiError):
    """Ctrl-C during training; the checkpoint holds every finished step."""

    def __init__(self, step: int, checkpoint: Path) -> None:
        super().__init__(
            f"interrupted at step {step}; checkpoint saved to {checkpoint}; run the same command again to resume"
        )
        self.step = step
        self.checkpoint = checkpoint


@dataclass
class TrainProgress:
    """phase: features | train | eval; done of total (images, steps or batches); loss: running per-token NLL."""

    phase: str
    done: int
    total: int
    loss: float | None = None
    lr: float | None = None


ProgressFn = Callable[[TrainProgress], None]


@dataclass
class TrainImage:
    row: int
    tokens: list[list[int]]
    kind: str  # the source it came from (flickr8k, coco, classes)


@dataclass
class TrainingData:
    """Features [N, P, d] float16; training images (feature row + caption token ids); held-out images per source."""

    features: torch.Tensor
    train: list[TrainImage]
    heldout: dict[str, list[HeldOutImage]]
    sources: list[dict[str, Any]]
    problems: list[ImageError] = field(default_factory=list)

    @property
    def sha256(self) -> str:
        blob = json.dumps([s.get("sha256_train") for s in self.sources]).encode()
        return hashlib.sha256(blob).hexdigest()

    def only(self, kinds: Sequence[str]) -> TrainingData:
        """The same features and held-out sets, training on the sources of these kinds only."""
        train = [t for t in self.train if t.kind in kinds]
        sources = [s for s in self.sources if s["kind"] in kinds]
        return TrainingData(self.features, train, self.heldout, sources, self.problems)


def caption_tokens(stack: Stack, caption: str, max_tokens: int) -> list[int]:
    """Token ids of a caption as it follows the prompt, ending with EOS (cut to max_tokens)."""
    ids = stack.tokenize(tidy_caption(caption))[: max_tokens - 1]
    eos = stack.eos_token_id
    return ids + ([eos] if eos is not None else [])


def prepare_data(
    stack: Stack,
    sources: Sequence[CaptionSource],
    cache_dir: Path | str,
    *,
    exclude: Iterable[str] = (),
    max_tokens: int = 40,
    workers: int = 4,
    train_required: bool = True,
    on_progress: ProgressFn | None = None,
) -> TrainingData:
    """Encoder features of every image (cached) and caption tokens; excluded sha256s are held out.

    Raises TrainingError when no training image is left (unless train_required is False: evaluation only).
    """
    if not sources:
        raise TrainingError("no training data; pass --flickr8k, --coco or --classes")
    excluded = set(exclude)
    paths = [im.path for src in sources for im in src.images]
    cache = FeatureCache(cache_dir, encoder_key(stack.identity, stack.encoder.name, stack.dtype))

    def report(done: int, total: int) -> None:
        if on_progress is not None:
            on_progress(TrainProgress("features", done, total))

    feats = compute_features(stack.encoder, stack.device, paths, cache, workers=workers, on_progress=report)
    candidates: dict[str, TrainImage] = {}
    heldout: dict[str, list[HeldOutImage]] = {}
    held_shas: set[str] = set()
    described = []
    for src in sources:
        pairs: dict[bool, list[tuple[str, str]]] = {True: [], False: []}
        for im in src.images:
            sha = feats.sha_of.get(im.path)
            if sha is None:  # unreadable: named in problems
                continue
            held = im.heldout or sha in excluded
            pairs[held].extend((sha, c) for c in im.captions)
            tokens = [caption_tokens(stack, c, max_tokens) for c in im.captions]
            if held:
                held_shas.add(sha)
                heldout.setdefault(src.name, []).append(
                    HeldOutImage(feats.row[sha], im.path, list(im.captions), tokens)
                )
            elif sha in candidates:  # the same picture in two sources: one image, all its captions
                candidates[sha].tokens.extend(tokens)
            else:
                candidates[sha] = TrainImage(feats.row[sha], tokens, src.kind)
        described.append(
            {**src.describe(), "sha256_train": data_sha256(pairs[False]), "sha256_heldout": data_sha256(pairs[True])}
        )
    # an image held out anywhere (a duplicate across sources, an excluded sample) is never trained on
    train = [value for sha, value in candidates.items() if sha not in held_shas]
    if not train and train_required:
        raise TrainingError("no readable training images left after the held-out split")
    return TrainingData(feats.values, train, heldout, described, feats.problems)


def word_embedding_norm(stack: Stack) -> float:
    """Mean L2 norm of the LM's input embeddings of real tokens, as its body takes them (Gemma: scaled)."""
    weight = stack.adapter.embedding()[: stack.real_vocab]
    return float(weight.float().norm(dim=-1).mean())
