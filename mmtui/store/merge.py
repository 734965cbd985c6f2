"""Combine caches written by shards of one attribute run (`--shard I/N`, e.g. SLURM array jobs).

Every result is re-added through `Store.add_result`, so the per-unit aggregates of the merged cache are
those of a single run over all images. Caches of different stack fingerprints are refused: their scores
are not comparable.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmtui.errors import MmtuiError
from mmtui.store import STATS_EVERY, ResultRecord, Store
from mmtui.store.arrays import unpack_array, unpack_triples


@dataclass
class MergeEvent:
    kind: str  # added | skipped
    source: str
    image: str


def _stacks(store: Store) -> set[str]:
    return {r[0] for r in store.db.execute("SELECT id FROM stacks")}


def check_same_stack(target: Store, sources: Sequence[Store]) -> None:
    """Raise when the caches hold results of more than one stack fingerprint."""
    by_store = {str(s.path): _stacks(s) for s in [target, *sources]}
    found = set().union(*by_store.values())
    if len(found) > 1:
        listing = "; ".join(f"{path}: {', '.join(sorted(ids)) or 'empty'}" for path, ids in by_store.items())
        raise MmtuiError(
            f"these caches hold different stacks ({listing}); merge only caches of the same stack fingerprint"
        )


def stored_records(source: Store, run_id: str) -> Iterator[ResultRecord]:
    """Every result of a run as a ResultRecord (arrays unpacked), in the order they were written."""
    shape = json.loads(
        source.db.execute(
            "SELECT stacks.shape FROM runs JOIN stacks ON stacks.id = runs.stack_id WHERE runs.id = ?", [run_id]
        ).fetchone()[0]
    )
    dims = (shape["n_layers"], shape["d_mlp"])
    rows = source.db.query(
        """SELECT results.*, images.path, images.width, images.height FROM results
           JOIN images ON images.sha256 = results.image_sha256 WHERE run_id = ? ORDER BY results.id""",
        [run_id],
    )
    for row in rows:
        layer, unit, patch, score = unpack_triples(row["top"])
        yield ResultRecord(
            image_sha256=row["image_sha256"],
            image_path=row["path"],
            width=row["width"],
            height=row["height"],
            target_spec=row["target_spec"],
            target=row["target"],
            target_token_id=row["target_token_id"],
            target_token=row["target_token"],
            target_source=row["target_source"],
            target_split=bool(row["target_split"]),
            caption=row["caption"],
            context=row["context"],
            context_ids=json.loads(row["context_ids"] or "[]"),
            y_c=row["y_c"],
            p_target=row["p_target"],
            top_layer=layer.astype(np.int16),
            top_unit=unit.astype(np.int32),
            top_patch=patch.astype(np.int16),
            top_score=score,
            unit_max=unpack_array(row["unit_max"], dims),
            unit_sum=unpack_array(row["unit_sum"], dims),
            human_caption=row["human_caption"],
            seconds=row["seconds"] or 0.0,
        )


def merge_stores(target: Store, sources: Sequence[Path]) -> Iterator[MergeEvent]:
    """Add every result of `sources` that `target` lacks; yields one MergeEvent per result."""
    opened = [Store.open(path, create=False) for path in sources]
    try:
        check_same_stack(target, opened)
        for source in opened:
            for run in source.runs():
                run_id = target.ensure_run(run.stack, site=run.site, y_kind=run.y_kind, settings=run.settings)
                _copy_tokens(target, source, run.lm_id)
                done = target.done_keys(run_id)
                added = 0
                try:
                    for record in stored_records(source, run.id):
                        key = (record.image_sha256, record.target_spec)
                        if key in done:
                            yield MergeEvent("skipped", str(source.path), record.image_path)
                            continue
                        done.add(key)
                        target.add_result(run_id, record, stats=False)
                        added += 1
                        if added % STATS_EVERY == 0:
                            target.refresh_stats(run_id)
                        yield MergeEvent("added", str(source.path), record.image_path)
                finally:  # also when interrupted: what was added is counted
                    if added:
                        target.refresh_stats(run_id)
    finally:
        for store in opened:
            store.close()


def _copy_tokens(target: Store, source: Store, lm_id: str) -> None:
    for convention in source.conventions(lm_id):
        if target.count_tokens(lm_id, convention) >= source.count_tokens(lm_id, convention):
            continue
        rows = source.db.execute(
            "SELECT layer, unit, tokens, token_ids, logits, interpretable FROM neuron_tokens "
            "WHERE lm_id = ? AND convention = ?",
            [lm_id, convention],
        )
        target.add_tokens(
            lm_id,
            convention,
            [
                {
                    "layer": r[0],
                    "unit": r[1],
                    "tokens": json.loads(r[2]),
                    "token_ids": json.loads(r[3]),
                    "logits": json.loads(r[4]),
                    "interpretable": bool(r[5]),
                }
                for r in rows
            ],
        )
