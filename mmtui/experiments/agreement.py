"""Do decoded multimodal units say what the image shows? (method.md, experiment 2; the paper's Table 1)

Per image: the distinct units among its first `top` stored triples, by default only the interpretable ones;
each unit's decoded tokens (stripped, joined with ", ") scored by BERTScore F1 against each human caption (mean
over the captions) and by CLIPScore against the image; the image's score is the max over its units. Baselines:
the same with the units of another image (a random pairing without fixed points), and the model's own caption.
Reported: the mean over images of each.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mmtui.errors import MmtuiError
from mmtui.experiments.stats import derangement, mean_interval
from mmtui.store import COUNT_TOP, Run, Store
from mmtui.store import experiments as xs
from mmtui.store.queries import decoded_texts

if TYPE_CHECKING:
    from mmtui.experiments.metrics import BertScorer, ClipScorer

KINDS = ("multimodal", "random", "caption")


class AgreementError(MmtuiError):
    """Table 1 cannot be computed as asked."""


@dataclass
class _Image:
    result_id: int
    path: str
    refs: list[str]
    caption: str
    texts: list[str]  # decoded unit texts


def unit_texts(
    store: Store, run: Run, result_id: int, top: int, convention: str, interpretable_only: bool
) -> list[str]:
    """Decoded token lists of the distinct units among a result's first `top` triples, in rank order."""
    units = [u[:2] for u in store.top_units(result_id, int(top))]  # in rank order
    rows = [d for d in decoded_texts(store, run.lm_id, convention, units) if d is not None]
    return [text for text, good in rows if good or not interpretable_only]


def score_agreement(
    store: Store,
    run: Run,
    captions: dict[str, list[str]],
    *,
    bertscore: BertScorer | None,
    clipscore: ClipScorer | None = None,
    top: int = COUNT_TOP,
    interpretable_only: bool = True,
    convention: str = "raw",
    seed: int = 0,
    progress: Callable[[str, int, int], None] | None = None,
) -> list[dict[str, Any]]:
    """Table 1 rows per image (kind, metric, value, model, n_units, best_text, partner_result_id), stored.

    captions: human captions per image file name; images without any are left out.
    """
    if bertscore is None and clipscore is None:
        raise AgreementError("no metric to score with (BERTScore and CLIPScore both unavailable)")
    report = progress or (lambda *_: None)
    images = []
    for row in xs.result_rows(store, run.id):
        refs = captions.get(Path(row["path"]).name, [])
        texts = unit_texts(store, run, row["id"], top, convention, interpretable_only)
        if refs:
            images.append(_Image(row["id"], row["path"], refs, row["caption"] or "", texts))
    if len(images) < 2:
        raise AgreementError(
            f"Table 1 needs at least two images of run {run.id} with human captions (found {len(images)}); "
            "check that --captions names the attributed files"
        )
    partner = derangement(len(images), seed)
    settings = {
        "top": top,
        "interpretable_only": interpretable_only,
        "convention": convention,
        "seed": seed,
        "bertscore_model": bertscore.name if bertscore else None,
        "clipscore_model": clipscore.name if clipscore else None,
    }
    rows: list[dict[str, Any]] = []
    for metric, scorer in (("bertscore", bertscore), ("clipscore", clipscore)):
        if scorer is None:
            continue
        for i, im in enumerate(images):
            other = images[partner[i]]
            for kind, texts, partner_id in (
                ("multimodal", im.texts, None),
                ("random", other.texts, other.result_id),
                ("caption", [im.caption], None),
            ):
                if not texts:
                    continue
                values = _scores(metric, scorer, texts, im)
                best = int(np.argmax(values))
                rows.append(
                    {
                        "result_id": im.result_id,
                        "kind": kind,
                        "metric": metric,
                        "value": float(values[best]),
                        "model": scorer.name,
                        "n_units": len(texts) if kind != "caption" else 0,
                        "best_text": texts[best],
                        "partner_result_id": partner_id,
                    }
                )
            report(metric, i + 1, len(images))
    xs.add_agreement(store, run.id, settings, rows)
    return rows


def _scores(metric: str, scorer: Any, texts: list[str], im: _Image) -> np.ndarray:
    if metric == "bertscore":
        return scorer.f1_mean(texts, [im.refs] * len(texts))
    from mmtui.run.images import load_image

    picture = load_image(im.path).image
    return scorer.score([picture] * len(texts), texts)


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per metric and kind: the mean over images with its 95% interval, n and the model."""
    out = []
    for metric in ("bertscore", "clipscore"):
        for kind in KINDS:
            sel = [r for r in rows if r["metric"] == metric and r["kind"] == kind]
            if sel:
                iv = mean_interval([r["value"] for r in sel])
                out.append(
                    {
                        "metric": metric,
                        "kind": kind,
                        "mean": iv.mean,
                        "lo": iv.lo,
                        "hi": iv.hi,
                        "n": iv.n,
                        "model": sel[0]["model"],
                    }
                )
    return out
