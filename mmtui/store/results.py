"""The Store's results: write one image's result, fold results into the per-unit tables (neuron_stats,
neuron_images, unit_moments), and read a result back (its triples, its units, its unit arrays)."""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from mmtui.defaults import NEURON_IMAGES
from mmtui.errors import NotFoundError
from mmtui.store.connection import Connection, _now
from mmtui.store.records import TARGET_MODE_SQL, Packed, ResultRecord, file_sha256, pack_result, storable_path

if TYPE_CHECKING:
    import numpy as np

COUNT_TOP = 100  # a unit "ranks among the top" of an image when it is in its first 100 triples (the paper's)


class ResultsMixin(Connection):
    """Results of a run: what is done, writing, folding, reading."""

    def fold_pending(self, run_id: str) -> int:
        """Fold the results a running (or interrupted) run has not yet counted into neuron_stats and
        neuron_images, so the per-unit tables count every finished image; returns how many (0: nothing to do,
        and nothing written). A read-only store folds nothing: its readers count what was folded before."""
        if self.readonly:
            return 0
        return self.refresh_stats(run_id) if self.pending_stats(run_id) else 0

    def done_keys(self, run_id: str) -> set[tuple[str, str]]:
        """(image sha256, target spec) of every result of a run: what a resumed run skips."""
        rows = self.db.execute("SELECT image_sha256, target_spec FROM results WHERE run_id = ?", [run_id])
        return {(r[0], r[1]) for r in rows}

    def add_result(
        self,
        run_id: str,
        rec: ResultRecord,
        count_top: int = COUNT_TOP,
        stats: bool = True,
        packed: Packed | None = None,
    ) -> int:
        """Write one image's result (its arrays and top triples as blobs) in one transaction.

        stats=True then folds it into neuron_stats and neuron_images (`refresh_stats`, a second transaction;
        an interruption between the two leaves it for the next refresh). stats=False leaves that to a later
        `refresh_stats`, which does it for many results at once (the fast path of a long run).
        `packed`: `pack_result(rec)` done already (the writer packs on worker threads).
        """
        if packed is None:
            packed = pack_result(rec)
        with self._write():
            self.db.table("images").upsert(
                {
                    "sha256": rec.image_sha256,
                    "path": storable_path(rec.image_path),
                    "width": rec.width,
                    "height": rec.height,
                    "added": _now(),
                },
                pk="sha256",
            )
            cur = self.db.execute(
                """INSERT INTO results (run_id, image_sha256, target_spec, target, target_token_id, target_token,
                       target_source, target_split, caption, context, context_ids, human_caption, y_c, p_target,
                       n_top, unit_max, unit_sum, top, seconds, created, in_stats)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0)
                   ON CONFLICT (run_id, image_sha256, target_spec) DO NOTHING""",
                [
                    run_id,
                    rec.image_sha256,
                    rec.target_spec,
                    rec.target,
                    rec.target_token_id,
                    rec.target_token,
                    rec.target_source,
                    int(rec.target_split),
                    rec.caption,
                    rec.context,
                    json.dumps(rec.context_ids),
                    rec.human_caption,
                    rec.y_c,
                    rec.p_target,
                    len(rec.top_score),
                    *packed,
                    rec.seconds,
                    _now(),
                ],
            )
            if cur.rowcount == 1:
                assert cur.lastrowid is not None
                result_id = int(cur.lastrowid)
            else:  # another process (a second run on the same images and cache) wrote it first: keep theirs
                row = self.db.execute(
                    "SELECT id FROM results WHERE run_id = ? AND image_sha256 = ? AND target_spec = ?",
                    [run_id, rec.image_sha256, rec.target_spec],
                ).fetchone()
                result_id = int(row[0])
        if stats:
            self.refresh_stats(run_id, count_top)
        return result_id

    def unfolded(self, run_id: str) -> int:
        """How many of the run's results the per-unit tables do not count yet (a run interrupted before its
        fold, read from a read-only cache)."""
        row = self.db.execute("SELECT count(*) FROM results WHERE run_id = ? AND in_stats = 0", [run_id]).fetchone()
        return int(row[0])

    def pending_stats(self, run_id: str) -> bool:
        row = self.db.execute("SELECT 1 FROM results WHERE run_id = ? AND in_stats = 0 LIMIT 1", [run_id]).fetchone()
        return row is not None

    def refresh_stats(self, run_id: str, count_top: int = COUNT_TOP) -> int:
        """Fold every result of the run not yet counted into neuron_stats and neuron_images, in one transaction;
        returns how many.

        Gives the same aggregates as adding them one by one: per unit, n_top (results where it is among the
        first `count_top` triples), n_images, max and sum of its best score per result, and the result of the
        max; each unit's best NEURON_IMAGES results (its best triple in each: score, rank, patch); and the sum
        and sum of squares of every unit's unit_max (unit_moments: mean and std for the lift). The
        folding is numpy (mmtui.store.fold); SQLite only takes the rows: one per unit touched in neuron_stats,
        and one per unit whose best results changed in neuron_images.
        """
        from mmtui.store import fold as unit_fold
        from mmtui.store.prevalence import fold_moments

        run_key = self.run_key(run_id)
        with self._write():
            pending = self.db.execute(
                "SELECT id, top FROM results WHERE run_id = ? AND in_stats = 0 ORDER BY id", [run_id]
            ).fetchall()
            if not pending:
                return 0
            best = unit_fold.best_per_unit(pending, count_top)
            order, starts = unit_fold.by_unit(best)
            stats = unit_fold.fold_units(best, order, starts)
            self.db.conn.executemany(
                """INSERT INTO neuron_stats
                       (run_key, layer, unit, n_top, n_images, max_score, sum_score, mean_score, best_result_id)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
                   ON CONFLICT (run_key, layer, unit) DO UPDATE SET
                       n_top = n_top + excluded.n_top,
                       best_result_id = CASE WHEN excluded.max_score > max_score
                                             THEN excluded.best_result_id ELSE best_result_id END,
                       max_score = max(max_score, excluded.max_score),
                       sum_score = sum_score + excluded.sum_score,
                       mean_score = (sum_score + excluded.sum_score) / (n_images + excluded.n_images),
                       n_images = n_images + excluded.n_images""",
                zip(
                    itertools.repeat(run_key),
                    *(stats[k].tolist() for k in ("layer", "unit", "n_top", "n_images", "max", "sum", "mean", "best")),
                ),
            )
            for layer, rows, unit_starts in unit_fold.by_layer(best, order, starts):  # a layer's lists at a time
                stored = self.db.execute(
                    "SELECT layer, unit, best FROM neuron_images WHERE run_key = ? AND layer = ? ORDER BY unit",
                    [run_key, layer],
                ).fetchall()
                changed, lists = unit_fold.merge_best_images(stored, best, rows, unit_starts, NEURON_IMAGES)
                self.db.conn.executemany(  # an upsert rewrites the row in place; REPLACE deleted it first (2x slower)
                    """INSERT INTO neuron_images (run_key, layer, unit, best) VALUES (?, ?, ?, ?)
                       ON CONFLICT (run_key, layer, unit) DO UPDATE SET best = excluded.best""",
                    zip(itertools.repeat(run_key), *(a.tolist() for a in unit_fold.split_key(changed)), lists),
                )
            fold_moments(self.db, run_id, run_key, [r[0] for r in pending])  # unit_max's sums (prevalence.py)
            self.db.execute(
                "UPDATE results SET in_stats = 1 WHERE id IN (SELECT value FROM json_each(?))",
                [json.dumps([r[0] for r in pending])],
            )
        return len(pending)

    def best_images(self, run_key: int, layer: int, unit: int) -> np.ndarray:
        """A unit's best results in a run (at most NEURON_IMAGES), best first: records of mmtui.store.arrays.UNIT_IMAGE
        (result, score, rank, patch)."""
        import numpy as np

        from mmtui.store.arrays import UNIT_IMAGE, unpack_unit_images

        row = self.db.execute(
            "SELECT best FROM neuron_images WHERE run_key = ? AND layer = ? AND unit = ?", [run_key, layer, unit]
        ).fetchone()
        return unpack_unit_images([row[0]])[0] if row else np.zeros(0, dtype=UNIT_IMAGE)

    def result(self, run_id: str, image: str, target_spec: str | None = None) -> dict[str, Any]:
        """A result by image sha256 (or its prefix) or by path (newest first when several targets); a file found under
        no stored path is looked up by the sha256 of its bytes (a copy of an attributed photo)."""
        sql = """SELECT results.*, images.path, images.width, images.height FROM results
                 JOIN images ON images.sha256 = results.image_sha256
                 WHERE results.run_id = ? AND (results.image_sha256 LIKE ? OR images.path = ? OR images.path LIKE ?)"""
        given, image = image, storable_path(image)
        args: list[Any] = [run_id, image.lower() + "%", image, "%/" + image]
        if target_spec is not None:
            sql += " AND target_spec = ?"
            args.append(target_spec)
        rows = list(self.db.query(sql + " ORDER BY results.id DESC", args))
        sha = _file_sha256(given) if not rows else None  # the same bytes attributed under another path
        if sha is not None:
            args[1:4] = [sha, None, None]
            rows = list(self.db.query(sql + " ORDER BY results.id DESC", args))
        if not rows:
            raise NotFoundError(
                f"no result for image {image!r} in run {run_id}; see `mmtui runs` or attribute it first"
            )
        return rows[0]

    def target_modes(self, run_id: str) -> dict[str, int]:
        """The run's target modes (see target_mode) with their result counts, most results first."""
        sql = f"""SELECT {TARGET_MODE_SQL} AS mode, count(*) AS n FROM results WHERE run_id = ?
                  GROUP BY mode ORDER BY n DESC, mode"""
        return {row["mode"]: int(row["n"]) for row in self.db.query(sql, [run_id])}

    def results(self, run_id: str, limit: int | None = None) -> Iterator[dict[str, Any]]:
        """The run's results in the order written; `target_mode` says how each one's target was chosen."""
        sql = f"""SELECT results.id, results.image_sha256, images.path, results.target, results.target_token_id,
                        results.target_token, results.target_source, results.caption, results.p_target, results.y_c,
                        {TARGET_MODE_SQL} AS target_mode
                 FROM results JOIN images ON images.sha256 = results.image_sha256
                 WHERE run_id = ? ORDER BY results.id"""
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        yield from self.db.query(sql, [run_id])

    def triples(self, result_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """A result's top triples by rank: (layer, unit, patch, score) arrays."""
        from mmtui.store.arrays import unpack_triples

        row = self.db.execute("SELECT top FROM results WHERE id = ?", [result_id]).fetchone()
        if row is None:
            raise NotFoundError(f"no result with id {result_id}")
        return unpack_triples(row[0])

    def top_triples(self, result_id: int, limit: int | None = None) -> list[dict[str, Any]]:
        layer, unit, patch, score = (a[:limit] for a in self.triples(result_id))
        return [
            {"rank": i, "layer": la, "unit": u, "patch": p, "score": sc}
            for i, (la, u, p, sc) in enumerate(
                zip(layer.tolist(), unit.tolist(), patch.tolist(), score.tolist(), strict=True)
            )
        ]

    def top_units(self, result_id: int, limit: int | None = None) -> list[tuple[int, int, float, int, int]]:
        """The distinct units among a result's first `limit` triples (all by default), in the order they first
        appear: (layer, unit, best score, best rank, patch of that triple)."""
        import numpy as np

        from mmtui.store.fold import best_per_unit_of

        layer, unit, patch, score = (a[:limit] for a in self.triples(result_id))
        best = best_per_unit_of(layer, unit, patch, score)
        order = np.argsort(best["rank"], kind="stable")
        return list(zip(*(best[k][order].tolist() for k in ("layer", "unit", "score", "rank", "patch")), strict=True))

    def unit_scores(self, result_id: int) -> tuple[np.ndarray, np.ndarray]:
        """(max, sum) of g over the image positions for every unit: two [n_layers, d_mlp] arrays."""
        from mmtui.store.arrays import unpack_array

        row = self.db.execute(
            """SELECT results.unit_max, results.unit_sum, stacks.shape FROM results
               JOIN runs ON runs.id = results.run_id JOIN stacks ON stacks.id = runs.stack_id
               WHERE results.id = ?""",
            [result_id],
        ).fetchone()
        if row is None:
            raise NotFoundError(f"no result with id {result_id}")
        shape = json.loads(row[2])
        dims = (shape["n_layers"], shape["d_mlp"])
        return unpack_array(row[0], dims), unpack_array(row[1], dims)


def _file_sha256(path: str) -> str | None:
    """The sha256 of a regular file's bytes (as the images table keys them), or None where `path` is not one."""
    try:
        return file_sha256(path) if os.path.isfile(path) else None
    except OSError:
        return None
