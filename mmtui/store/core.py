"""The SQLite cache: open (WAL, migrations, lock and version checks), write one image per transaction,
and the queries the commands and the TUI share. Never imports torch: arrays are numpy.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import sqlite3
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmtui.defaults import NEURON_IMAGES
from mmtui.errors import (
    NotFoundError,
    StoreCorruptError,
    StoreError,
    StoreLockedError,
    StoreTooNewError,
    is_corruption,
)
from mmtui.store._sqlite_utils import Database
from mmtui.store.migrations import migrations

if TYPE_CHECKING:
    import numpy as np

DEFAULT_TIMEOUT_S = 30.0
COUNT_TOP = 100  # a unit "ranks among the top" of an image when it is in its first 100 triples (the paper's)
STATS_EVERY = 1024  # results a long write folds into the per-unit tables at a time (Store.refresh_stats). A fold's
# cost grows with the units it touches, which level off: at GPT-J scale, units seldom recurring, 1,024 take 6.8 s
# and 512 take 5.6 s (bench/store_write.py --spread); its peak memory, 420 MB (225 MB for 512)
BULK_CACHE_MIB = 64  # page cache of a connection that folds many results at a time (SQLite's default: 2 MiB)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def target_mode(target_spec: str) -> str:
    """How a result's target was chosen, from its resume key: `auto` (first noun of the greedy caption), `human`
    (first noun of a human caption, --captions) or `word:<w>` (--target w). One run may hold several modes (one
    result per image and mode); counts name them ("24 results on 8 images, 3 target modes")."""
    return "human" if target_spec.startswith("human:") else target_spec


TARGET_MODE_SQL = "CASE WHEN target_spec LIKE 'human:%' THEN 'human' ELSE target_spec END"  # target_mode in SQL


def run_id_for(stack_id: str, prompt: str, site: str, y_kind: str) -> str:
    blob = json.dumps([stack_id, prompt, site, y_kind]).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


@dataclass
class ResultRecord:
    """One image's attribution, ready to store (plain data; see mmtui.run.attribution.Attribution)."""

    image_sha256: str
    image_path: str
    width: int
    height: int
    target_spec: str
    target: str
    target_token_id: int
    target_token: str
    target_source: str
    target_split: bool
    caption: str
    context: str
    context_ids: list[int]
    y_c: float
    p_target: float
    top_layer: np.ndarray
    top_unit: np.ndarray
    top_patch: np.ndarray
    top_score: np.ndarray
    unit_max: np.ndarray  # [n_layers, d_mlp]
    unit_sum: np.ndarray
    human_caption: str | None = None
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StackIdentity:
    """What a run records of its stack (`Stack.identify()`): fingerprint id and name, the fingerprint itself,
    the shape, the LM's own fingerprint id (its neuron decodings) and the prompt."""

    id: str
    name: str
    fingerprint: dict[str, Any]
    shape: dict[str, Any]
    lm_id: str
    prompt: str

    @property
    def units(self) -> int:
        """MLP units of the LM: n_layers x d_mlp."""
        return int(self.shape["n_layers"]) * int(self.shape["d_mlp"])


@dataclass(frozen=True)
class Run:
    """A stored run (`Store.run`, `Store.runs`): its id and integer key, its stack, what was attributed (site,
    y_kind), its settings, and how many results and images it holds."""

    id: str
    key: int
    stack: StackIdentity
    site: str
    y_kind: str
    settings: dict[str, Any]
    created: str
    n_results: int = 0
    n_images: int = 0
    last_write: str | None = None
    n_modes: int = 1  # target modes among its results (see target_mode)

    @property
    def counts(self) -> str:
        """Its results, images and target modes in words, the same in every view: "8 images" when each image has
        one result, else "24 results on 8 images, 3 target modes"."""
        if self.n_results == self.n_images and self.n_modes <= 1:
            return f"{self.n_images:,} image{'s' * (self.n_images != 1)}"
        modes = f", {self.n_modes} target modes" if self.n_modes > 1 else ""
        return f"{self.n_results:,} results on {self.n_images:,} image{'s' * (self.n_images != 1)}{modes}"

    @property
    def shape(self) -> dict[str, Any]:
        return self.stack.shape

    @property
    def lm_id(self) -> str:
        return self.stack.lm_id

    @property
    def prompt(self) -> str:
        return self.stack.prompt

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Run:
        """From a row of the query in `Store.runs` (JSON columns still text)."""
        stack = StackIdentity(
            id=row["stack_id"],
            name=row["stack"],
            fingerprint=json.loads(row["fingerprint"]),
            shape=json.loads(row["shape"]),
            lm_id=row["lm_id"],
            prompt=row["prompt"],
        )
        return cls(
            id=row["id"],
            key=int(row["run_key"]),
            stack=stack,
            site=row["site"],
            y_kind=row["y_kind"],
            settings=json.loads(row["settings"]),
            created=row["created"],
            n_results=int(row["n_results"]),
            n_images=int(row["n_images"]),
            last_write=row["last_write"],
            n_modes=int(row.get("n_modes") or 1),
        )

    def to_json(self) -> dict[str, Any]:
        """The run as `mmtui runs --json` prints it."""
        return {
            "id": self.id,
            "run_key": self.key,
            "stack_id": self.stack.id,
            "stack": self.stack.name,
            "prompt": self.stack.prompt,
            "site": self.site,
            "y_kind": self.y_kind,
            "settings": self.settings,
            "created": self.created,
            "shape": self.stack.shape,
            "fingerprint": self.stack.fingerprint,
            "lm_id": self.stack.lm_id,
            "n_results": self.n_results,
            "n_images": self.n_images,
            "n_target_modes": self.n_modes,
            "last_write": self.last_write,
        }


Packed = tuple[bytes, bytes, bytes]  # a result's unit_max, unit_sum and top triples, packed


def pack_result(rec: ResultRecord) -> Packed:
    """The blobs of a result: its two unit arrays and its top triples (mmtui.store.arrays; thread-safe)."""
    from mmtui.store.arrays import pack_array, pack_triples

    return (
        pack_array(rec.unit_max),
        pack_array(rec.unit_sum),
        pack_triples(rec.top_layer, rec.top_unit, rec.top_patch, rec.top_score),
    )


def storable_path(path: str | Path) -> str:
    """A path as text SQLite can store: a name that is not valid UTF-8 (os.fsdecode gives it lone surrogates,
    which sqlite3 refuses) keeps its undecodable bytes as backslash escapes (`\\xe9`); valid names are unchanged.
    The image's key is the sha256 of its bytes, so this text is for display and lookup only."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def corrupt_error(path: Path, error: BaseException | str) -> StoreCorruptError:
    return StoreCorruptError(
        f"{path} is damaged ({error}); nothing more is written to it. Salvage what is readable with "
        f"`sqlite3 {path} .recover | sqlite3 recovered.db` and pass --db recovered.db, or move it aside"
    )


def _translate(error: sqlite3.OperationalError, path: Path, waited: float) -> StoreError:
    if is_corruption(error):
        return corrupt_error(path, error)
    text = str(error)
    if "locked" in text or "busy" in text:
        return StoreLockedError(
            f"{path} is locked by another mmtui process (waited {waited:.0f} s); "
            "wait for it to finish, or pass --db to use another cache file"
        )
    return StoreError(f"{path}: {text}; check the file, or pass --db to use another cache file")


class Store:
    """The cache database. Open with `Store.open(path)`; use as a context manager to close it."""

    def __init__(self, db: Database, path: Path, timeout: float) -> None:
        self.db = db
        self.path = path
        self.timeout = timeout
        self._run_keys: dict[str, int] = {}  # a run's key never changes
        self.readonly = False  # opened read-only (Store.open): nothing is folded or written

    # -- opening -----------------------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        path: Path | str,
        *,
        create: bool = True,
        timeout: float = DEFAULT_TIMEOUT_S,
        threads: bool = False,
        readonly: bool | None = None,
    ) -> Store:
        """Open (and migrate) the cache at `path`.

        create=False: a missing file is an error (read-only commands never make an empty cache).
        readonly: open it read-only (SQLite's mode=ro): no migration, no fold (`fold_pending` does nothing;
        `pending_stats` says what the per-unit tables do not count yet). None: read-only when the file or its
        folder is not writable (chmod a-w, a read-only mount), else read-write.
        Raises StoreTooNewError for a cache written by a newer mmtui, StoreLockedError when another
        process holds the lock longer than `timeout` seconds.
        """
        path = Path(path)
        if path.is_dir():
            raise StoreError(f"{path} is a folder; pass a file name such as {path / 'mmtui.db'}")
        if not path.exists():
            if not create:
                raise StoreError(f"no cache at {path}; run `mmtui attribute IMAGE_DIR` first, or pass --db")
            path.parent.mkdir(parents=True, exist_ok=True)
        # a WAL file left beside the cache: the last process did not close it (a crash, a kill, a power cut)
        unclean = os.path.getsize(f"{path}-wal") > 0 if os.path.exists(f"{path}-wal") else False
        if readonly is None:
            readonly = path.exists() and not (os.access(path, os.W_OK) and os.access(path.parent, os.W_OK))
        started = time.monotonic()
        try:
            if readonly:
                uri = f"{path.resolve().as_uri()}?mode=ro"
                conn = sqlite3.connect(uri, uri=True, timeout=timeout, check_same_thread=not threads)
            else:
                conn = sqlite3.connect(str(path), timeout=timeout, check_same_thread=not threads)
            db = Database(conn)
            db.execute("PRAGMA foreign_keys = ON")
            store = cls(db, path, timeout)
            store.readonly = readonly
            store._check_version()
            if readonly:
                if unclean:
                    store.check_integrity()
                if migrations.pending(db):
                    raise StoreError(
                        f"{path} is read-only and was written by an earlier mmtui: it must be converted once; make "
                        "it writable for one command (or copy it) and run again"
                    )
                return store
            if db.journal_mode != "wal":
                db.enable_wal()
            # in WAL mode, NORMAL never corrupts the file; a power cut may lose the last commits, not a crash
            db.execute("PRAGMA synchronous = NORMAL")
            if unclean:
                store.check_integrity()
            store._migrate()
        except sqlite3.DatabaseError as error:
            if is_corruption(error):
                raise corrupt_error(path, error) from error
            if isinstance(error, sqlite3.OperationalError):
                raise _translate(error, path, time.monotonic() - started) from error
            raise StoreError(f"{path} is not an mmtui cache ({error}); pass --db to use another file") from error
        return store

    def _migrate(self) -> None:
        """Apply the pending migrations under one write lock: of several processes opening a fresh cache at once,
        one upgrades it and the others wait, then find nothing left to do."""
        if not migrations.pending(self.db):
            return
        with self._write():  # BEGIN IMMEDIATE; each migration is a savepoint inside it
            migrations.apply(self.db)  # reads what is pending again, now under the lock

    def check_integrity(self) -> None:
        """`PRAGMA quick_check` (reads every page once); raises StoreCorruptError when the file is damaged."""
        try:
            rows = [r[0] for r in self.db.execute("PRAGMA quick_check(3)").fetchall()]
        except sqlite3.DatabaseError as error:
            if not is_corruption(error):
                raise
            rows = [str(error)]
        if rows != ["ok"]:
            raise corrupt_error(self.path, "; ".join(rows))

    def _check_version(self) -> None:
        applied = {m.name for m in migrations.applied(self.db)}
        known = {m.name for m in migrations._migrations}
        unknown = sorted(applied - known)
        if unknown:
            raise StoreTooNewError(
                f"{self.path} was written by a newer mmtui (schema step {unknown[-1]}); "
                "upgrade mmtui (pip install -U mmtui) or pass --db to use another cache file"
            )
        names = set(self.db.table_names())
        if names and "_sqlite_migrations" not in names:
            raise StoreError(f"{self.path} is an SQLite file but not an mmtui cache; pass --db to use another file")

    def for_bulk_writes(self) -> Store:
        """Give this connection a page cache of BULK_CACHE_MIB, for the writer of a run or a merge: a fold of
        the stats updates rows all over neuron_stats' six B-trees and neuron_images, which outgrow SQLite's
        2 MiB default at GPT-J scale (bench/store_write.py --spread: refresh_stats twice as fast). Returns self."""
        self.db.execute(f"PRAGMA cache_size = -{BULK_CACHE_MIB * 1024}")
        return self

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _write(self):
        """A write transaction that reports a held lock as StoreLockedError."""
        return _WriteTxn(self)

    # -- stacks and runs ---------------------------------------------------------------------------------
    def ensure_run(
        self, stack: StackIdentity, *, site: str, y_kind: str, settings: dict[str, Any] | None = None
    ) -> str:
        """Record the stack and run if new; returns the run id."""
        run_id = run_id_for(stack.id, stack.prompt, site, y_kind)
        with self._write():
            self.ensure_stack(stack)
            self.db.execute(
                """INSERT OR IGNORE INTO runs (id, stack_id, prompt, site, y_kind, settings, created, run_key)
                   VALUES (?, ?, ?, ?, ?, ?, ?, (SELECT coalesce(max(run_key), 0) + 1 FROM runs))""",
                [run_id, stack.id, stack.prompt, site, y_kind, json.dumps(settings or {}, sort_keys=True), _now()],
            )
        return run_id

    def run_key(self, run_id: str) -> int:
        """The run's integer key, which neuron_stats and neuron_images use (m008)."""
        key = self._run_keys.get(run_id)
        if key is None:
            row = self.db.execute("SELECT run_key FROM runs WHERE id = ?", [run_id]).fetchone()
            if row is None:
                raise NotFoundError(f"no run {run_id!r} in {self.path}; see `mmtui runs`")
            key = self._run_keys[run_id] = int(row[0])
        return key

    def ensure_stack(self, stack: StackIdentity) -> None:
        """Record a stack if new (inside the caller's write transaction, or in its own)."""
        with self.db.atomic():
            self.db.table("stacks").insert(
                {
                    "id": stack.id,
                    "name": stack.name,
                    "fingerprint": json.dumps(stack.fingerprint, sort_keys=True),
                    "shape": json.dumps(stack.shape),
                    "lm_id": stack.lm_id,
                    "created": _now(),
                },
                ignore=True,
            )

    def runs(self) -> list[Run]:
        """Every run with its stack and counts, newest first."""
        sql = f"""
            SELECT runs.id, runs.run_key, runs.stack_id, stacks.name AS stack, runs.prompt, runs.site, runs.y_kind,
                   runs.settings, runs.created, stacks.shape, stacks.fingerprint, stacks.lm_id,
                   (SELECT count(*) FROM results WHERE results.run_id = runs.id) AS n_results,
                   (SELECT count(DISTINCT image_sha256) FROM results WHERE results.run_id = runs.id) AS n_images,
                   (SELECT count(DISTINCT {TARGET_MODE_SQL}) FROM results WHERE results.run_id = runs.id) AS n_modes,
                   (SELECT max(created) FROM results WHERE results.run_id = runs.id) AS last_write
            FROM runs JOIN stacks ON stacks.id = runs.stack_id
            ORDER BY coalesce(last_write, runs.created) DESC
        """
        return [Run.from_row(row) for row in self.db.query(sql)]

    def run(self, run_id: str | None = None) -> Run:
        """The run whose id starts with `run_id`, or the most recently written one. Reads only: a reader of the
        per-unit tables calls `fold_pending` first."""
        runs = self.runs()
        if not runs:
            raise NotFoundError(f"{self.path} holds no runs yet; run `mmtui attribute IMAGE_DIR` first")
        if run_id is None:
            return runs[0]
        matches = [r for r in runs if r.id.startswith(run_id)]
        if len(matches) != 1:
            ids = ", ".join(r.id for r in runs)
            what = "no run" if not matches else "several runs"
            raise NotFoundError(f"{what} with id {run_id!r} in {self.path} (runs: {ids}); see `mmtui runs`")
        return matches[0]

    def fold_pending(self, run_id: str) -> int:
        """Fold the results a running (or interrupted) run has not yet counted into neuron_stats and
        neuron_images, so the per-unit tables count every finished image; returns how many (0: nothing to do,
        and nothing written). A read-only store folds nothing: its readers count what was folded before."""
        if self.readonly:
            return 0
        return self.refresh_stats(run_id) if self.pending_stats(run_id) else 0

    # -- results -----------------------------------------------------------------------------------------
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
        """A result by image sha256 (or its prefix) or by path (newest first when several targets)."""
        sql = """SELECT results.*, images.path, images.width, images.height FROM results
                 JOIN images ON images.sha256 = results.image_sha256
                 WHERE results.run_id = ? AND (results.image_sha256 LIKE ? OR images.path = ? OR images.path LIKE ?)"""
        image = storable_path(image)
        args: list[Any] = [run_id, image.lower() + "%", image, "%/" + image]
        if target_spec is not None:
            sql += " AND target_spec = ?"
            args.append(target_spec)
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

    # -- neuron tokens -----------------------------------------------------------------------------------
    def count_tokens(self, lm_id: str, convention: str) -> int:
        """How many units of this LM have decoded tokens in this convention (all of them once complete)."""
        row = self.db.execute(
            "SELECT count(*) FROM neuron_tokens WHERE lm_id = ? AND convention = ?", [lm_id, convention]
        ).fetchone()
        return int(row[0])

    def has_tokens(self, lm_id: str, convention: str) -> bool:
        return self.count_tokens(lm_id, convention) > 0

    def add_tokens(self, lm_id: str, convention: str, rows: Sequence[dict[str, Any]]) -> None:
        """Store decoded tokens: rows of layer, unit, tokens, token_ids, logits, interpretable."""
        with self._write():
            self.db.conn.executemany(
                """INSERT OR REPLACE INTO neuron_tokens
                       (lm_id, convention, layer, unit, tokens, token_ids, logits, text, interpretable)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                [
                    (
                        lm_id,
                        convention,
                        r["layer"],
                        r["unit"],
                        json.dumps(r["tokens"], ensure_ascii=False),
                        json.dumps(r["token_ids"]),
                        json.dumps([round(float(x), 4) for x in r["logits"]]),
                        ", ".join(t.strip() for t in r["tokens"]),
                        int(r["interpretable"]),
                    )
                    for r in rows
                ],
            )

    def tokens(self, lm_id: str, convention: str, layer: int, unit: int) -> dict[str, Any] | None:
        row = self.db.execute(
            "SELECT tokens, token_ids, logits, interpretable FROM neuron_tokens "
            "WHERE lm_id = ? AND convention = ? AND layer = ? AND unit = ?",
            [lm_id, convention, layer, unit],
        ).fetchone()
        if row is None:
            return None
        return {
            "tokens": json.loads(row[0]),
            "token_ids": json.loads(row[1]),
            "logits": json.loads(row[2]),
            "interpretable": bool(row[3]),
        }

    def conventions(self, lm_id: str) -> list[str]:
        rows = self.db.execute("SELECT DISTINCT convention FROM neuron_tokens WHERE lm_id = ?", [lm_id])
        return [r[0] for r in rows]

    def transaction(self) -> _WriteTxn:
        """`with store.transaction():` one write transaction (BEGIN IMMEDIATE, committed at the end, rolled back
        on an error); a lock held too long raises StoreLockedError. For the store package's writers."""
        return _WriteTxn(self)


class _WriteTxn:
    def __init__(self, store: Store) -> None:
        self.store = store

    def __enter__(self) -> None:
        self.started = time.monotonic()
        try:
            self.store.db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as error:
            raise _translate(error, self.store.path, time.monotonic() - self.started) from error

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        conn = self.store.db.conn
        if exc_type is None:
            try:
                conn.commit()
            except sqlite3.OperationalError as error:
                conn.rollback()
                raise _translate(error, self.store.path, time.monotonic() - self.started) from error
        else:
            conn.rollback()
            if isinstance(exc, sqlite3.DatabaseError) and is_corruption(exc):
                raise corrupt_error(self.store.path, exc) from exc
            if isinstance(exc, sqlite3.OperationalError):
                raise _translate(exc, self.store.path, time.monotonic() - self.started) from exc
