"""Explanations of units from the data: which caption word or COCO category is enriched among a unit's best
images, against the run's base rate, and which units' scores separate the images of a COCO category from the rest.
The statistics (enrichment, q-values, AUROC) are in mmtui.experiments.enrichment.

Pure computation: arrays and counts in, arrays out; the store reads and writes them (mmtui.store.labels).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np

from mmtui.experiments.enrichment import (
    DEFAULT_FDR,
    MIN_SUPPORT,
    Enrichment,
    auroc,
    enrichment,
    image_shares,
    shuffled,
    top_units,
)

if TYPE_CHECKING:
    from scipy import sparse

    from mmtui.experiments.metrics import BertScorer
    from mmtui.store import Run

CONTENT_POS = frozenset({"NOUN", "PROPN", "VERB", "ADJ"})
_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")


# -- words ---------------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _stop_words() -> frozenset[str]:
    from spacy.lang.en.stop_words import STOP_WORDS

    return frozenset(STOP_WORDS)


def content_words(texts: Sequence[str], drop: Sequence[str] = ()) -> list[set[str]]:
    """The content words of each text, lemmatised and lower-cased: nouns, proper nouns, verbs and adjectives that
    are not stop words, with at least 2 letters, less the words of `drop` (the prompt). With spaCy's English
    pipeline (mmtui.run.nouns); without it, the lower-cased words that are not stop words."""
    from mmtui.errors import TargetError
    from mmtui.run.nouns import lemmatizer

    stop = _stop_words()
    try:
        nlp = lemmatizer()
    except TargetError:
        nlp = None
    if nlp is None:
        dropped = {w for t in drop for w in _WORD.findall(t.lower())}
        return [{w for w in _WORD.findall(t.lower()) if len(w) > 1 and w not in stop} - dropped for t in texts]

    def words(doc: Any) -> set[str]:
        return {
            t.lemma_.lower()
            for t in doc
            if t.pos_ in CONTENT_POS and t.is_alpha and len(t.text) > 1 and t.lemma_.lower() not in stop
        }

    dropped = {t.lemma_.lower() for d in nlp.pipe(drop) for t in d} | {
        w for t in drop for w in _WORD.findall(t.lower())
    }
    return [words(doc) - dropped for doc in nlp.pipe(texts, batch_size=256)]


def term_table(carried: Sequence[set[str]]) -> tuple[list[str], sparse.csr_matrix]:
    """The terms (sorted) and the image-term table: [n_images, n_terms] 0/1, one row per image."""
    from scipy import sparse

    terms = sorted(set().union(*carried)) if carried else []
    index = {t: i for i, t in enumerate(terms)}
    rows = np.repeat(np.arange(len(carried)), [len(c) for c in carried])
    cols = np.array([index[t] for c in carried for t in sorted(c)], dtype=np.int64)
    table = sparse.csr_matrix((np.ones(len(cols), dtype=np.int32), (rows, cols)), shape=(len(carried), len(terms)))
    return terms, table


# -- agreement with the decoded tokens -----------------------------------------------------------------
def token_agreement(scorer: BertScorer, labels: Sequence[str], tokens: Sequence[Sequence[str]]) -> np.ndarray:
    """BERTScore F1 of each label against its unit's decoded tokens (joined by ", "); NaN where none."""
    texts = [", ".join(t.strip() for t in toks if t.strip()) for toks in tokens]
    out = np.full(len(labels), np.nan, dtype=np.float32)
    have = [i for i, t in enumerate(texts) if t]
    if have:
        out[have] = scorer.f1([texts[i] for i in have], [labels[i] for i in have])
    return out


# -- a run of the store ----------------------------------------------------------------------------------
AUROC_TOP = 10  # units kept per category (real and shuffled)


@dataclass
class KindSummary:
    """One kind of label over a run: what was tested and how many labels beat chance, real vs shuffled."""

    kind: str
    source: str
    N: int  # images that could carry a term
    n_units: int
    n_terms: int  # terms tested
    m: int  # tests
    labelled: int  # units with q < fdr
    shuffled: int  # the same, labels shuffled across images
    computed: bool  # False: read back from the store (the run has not grown since)
    best_p: float = 1.0  # the least p of any unit's label
    best_p_shuffled: float = 1.0  # the same with the labels shuffled


@dataclass
class CategorySummary:
    category: str
    n_pos: int
    N: int
    best: tuple[int, int]  # (layer, unit)
    auroc: float
    shuffled: float  # the best AUROC of any unit with the category's labels shuffled across images
    above: int  # units whose AUROC beats that


@dataclass
class ExplainSummary:
    kinds: list[KindSummary]
    categories: list[CategorySummary]
    fdr: float
    notes: list[str]


def _label_rows(found: Enrichment, best: Any, terms: list[str], source: str, n_results: int) -> list[tuple]:
    layer, unit = best.layer[found.unit].tolist(), best.unit[found.unit].tolist()
    return list(
        zip(
            layer,
            unit,
            [terms[t] for t in found.term.tolist()],
            found.k.tolist(),
            found.n.tolist(),
            found.K.tolist(),
            [found.N] * len(layer),
            found.p.tolist(),
            found.q.tolist(),
            [source] * len(layer),
            [n_results] * len(layer),
            [None] * len(layer),
            strict=True,
        )
    )


def _label_kind(
    store: Any, run_key: int, kind: str, best: Any, carried: list[set[str]], covered: np.ndarray, source: str,
    n_results: int, fdr: float, seed: int,
) -> KindSummary:  # fmt: skip
    """Enrichment of one kind of term, and its shuffled control, over the covered results; stored."""
    from mmtui.store import labels as store_labels

    terms, table = term_table([c for c, keep in zip(carried, covered, strict=True) if keep])
    units = best.table[:, np.flatnonzero(covered)]
    real = enrichment(units, table)
    control = enrichment(units, shuffled(table, seed))
    store_labels.write_labels(store, run_key, kind, 0, _label_rows(real, best, terms, source, n_results))
    store_labels.write_labels(store, run_key, kind, 1, _label_rows(control, best, terms, source, n_results))
    n_terms = real.m // max(int((np.asarray(units.sum(axis=1)).ravel() > 0).sum()), 1)
    return KindSummary(
        kind, source, table.shape[0], len(real.unit), n_terms, real.m, int(real.passing(fdr).sum()),
        int(control.passing(fdr).sum()), True, float(real.p.min(initial=1.0)), float(control.p.min(initial=1.0)),
    )  # fmt: skip


def _stored_kind(store: Any, run_key: int, kind: str, fdr: float) -> KindSummary:
    """A kind's summary from its stored labels (the number of terms and tests are not stored: 0)."""
    from mmtui.store import labels as store_labels

    s = store_labels.kind_counts(store, run_key, kind, fdr)
    return KindSummary(
        kind, s["source"], s["N"], s["units"], 0, 0, s["labelled"], s["shuffled"], False, s["best_p"],
        s["best_p_shuffled"],
    )  # fmt: skip


def explain_run(
    store: Any,
    run: Run,
    *,
    instances: Any = None,
    fdr: float = DEFAULT_FDR,
    seed: int = 0,
    recompute: bool = False,
    scorer: BertScorer | None = None,
    convention: str = "raw",
) -> ExplainSummary:
    """Label the run's units from its captions' words (and COCO categories with `instances`, a
    mmtui.experiments.specificity.CocoInstances), each with its shuffled control; with `instances` also each
    category's most selective units by AUROC against shuffled labels. Word labels are read back when stored for
    as many results as the run has now; categories are recomputed whenever `instances` is given."""
    from pathlib import Path

    from mmtui.store import labels as store_labels

    run_id, run_key, lm_id, prompt, shape = run.id, run.key, run.lm_id, run.prompt, run.shape
    n_results = store_labels.n_results(store, run_id)
    stored = store_labels.computed_on(store, run_key)
    notes: list[str] = []
    kinds: list[KindSummary] = []
    categories: list[CategorySummary] = []
    best = texts = None
    if recompute or stored.get("word", (None,))[0] != n_results:
        best = store_labels.best_images(store, run_id)
        texts = store_labels.result_texts(store, run_id)
        human = [t["human_caption"] is not None for t in texts]
        source = "human" if all(human) else "model" if not any(human) else "human+model"
        carried = content_words([t["human_caption"] or t["caption"] or "" for t in texts], drop=[prompt])
        covered = np.ones(len(texts), dtype=bool)
        kinds.append(_label_kind(store, run_key, "word", best, carried, covered, source, n_results, fdr, seed))
    else:
        kinds.append(_stored_kind(store, run_key, "word", fdr))
    if instances is not None:
        if best is None:
            best, texts = store_labels.best_images(store, run_id), store_labels.result_texts(store, run_id)
        assert texts is not None
        names = [Path(t["path"]).name for t in texts]
        covered = np.array([n in instances.images for n in names], dtype=bool)
        if not covered.any():
            notes.append("no image of the run is in the instances file: no category labels")
        else:
            if not covered.all():
                notes.append(f"{int((~covered).sum())} of {len(names)} results are not in the instances file; left out")
            carried = [set(instances.categories_of(n)) for n in names]
            kinds.append(_label_kind(store, run_key, "category", best, carried, covered, "coco", n_results, fdr, seed))
            categories = _selectivity(
                store, run_id, run_key, shape, best.result_ids[covered], carried, covered, seed, n_results
            )
    elif "category" in stored:
        kinds.append(_stored_kind(store, run_key, "category", fdr))
    if scorer is not None:
        for kind in (k.kind for k in kinds):
            todo = store_labels.labels(store, run_key, kind=kind, fdr=fdr)
            units = [(r["layer"], r["unit"]) for r in todo]
            f1 = token_agreement(
                scorer, [r["label"] for r in todo], store_labels.decoded_tokens(store, lm_id, units, convention)
            )
            rows = [(la, u, None if np.isnan(f) else float(f)) for (la, u), f in zip(units, f1.tolist(), strict=True)]
            store_labels.set_agreement(store, run_key, kind, rows)
    return ExplainSummary(kinds, categories, fdr, notes)


def _selectivity(
    store: Any, run_id: str, run_key: int, shape: dict[str, int], result_ids: np.ndarray, carried: list[set[str]],
    covered: np.ndarray, seed: int, n_results: int,
) -> list[CategorySummary]:  # fmt: skip
    """AUROC of every unit for every category over the covered results, and the shuffled baseline; stored."""
    from mmtui.store import labels as store_labels

    dims = (shape["n_layers"], shape["d_mlp"])
    scores = store_labels.unit_max_matrix(store, run_id, result_ids.tolist(), dims)
    scores = image_shares(scores)
    present = [c for c, keep in zip(carried, covered, strict=True) if keep]
    names, table = term_table(present)
    y = table.toarray()
    n_pos = y.sum(axis=0)
    keep = (n_pos >= MIN_SUPPORT) & (n_pos <= len(y) - MIN_SUPPORT)
    names, y, n_pos = [n for n, k in zip(names, keep, strict=True) if k], y[:, keep], n_pos[keep]
    if not names:
        return []
    real = auroc(scores, y)
    control = auroc(scores, y[np.random.default_rng(seed).permutation(len(y))])
    out = []
    for flag, values in ((0, real), (1, control)):
        idx, top = top_units(values, AUROC_TOP)
        rows = [
            (
                names[c],
                r,
                int(idx[c, r]) // dims[1],
                int(idx[c, r]) % dims[1],
                float(top[c, r]),
                int(n_pos[c]),
                len(y),
                n_results,
            )
            for c in range(len(names))
            for r in range(idx.shape[1])
        ]
        store_labels.write_auroc(store, run_key, flag, rows)
    chance = np.nanmax(control, axis=1)
    for c, name in enumerate(names):
        b = int(np.nanargmax(real[c]))
        out.append(
            CategorySummary(
                name, int(n_pos[c]), len(y), (b // dims[1], b % dims[1]), float(real[c, b]), float(chance[c]),
                int((real[c] > chance[c]).sum()),
            )
        )  # fmt: skip
    return out
