"""How fast the cache takes results, and how big they are, at the paper's scale (GPT-J: 28 x 16,384 units,
14 x 14 patches, 6,400 top triples per image).

    python bench/store_write.py --from /tmp/smol.db [--images 1000] [--run ID]

The records are real scores, resampled: each GPT-J-scale record takes one stored result of a real run
(any stack; the embedded default's is the one we have offline), maps every GPT-J layer to the source layer at
the same relative depth and fills its 16,384 units with that layer's units drawn at random (max and sum
together), and maps the source's top triples onto GPT-J units through one fixed random map per layer (so units
recur across images as the real ones do; `--spread`: a new map per image, so they seldom recur, which is the
costly end for folding the per-unit stats) and onto the 196 patches. Size and speed depend on how the values
are distributed, which this keeps; the numbers themselves are not GPT-J's.

Writes them twice. First step by step in this thread, timing each: packing the arrays and triples, Store.add_result
(one transaction per image) and Store.refresh_stats (every STATS_EVERY results, and at the end). Then through the real
StoreWriter (`mmtui attribute`'s writer thread with its packing pool) as fast as it takes them: its throughput is the most images per second a run can write. Prints milliseconds per
image for each, and bytes per image in the file (after a WAL checkpoint) by table and index.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mmtui.run.events import ImageDone  # noqa: E402
from mmtui.run.writer import StoreWriter  # noqa: E402
from mmtui.store import STATS_EVERY, ResultRecord, StackIdentity, Store, pack_result  # noqa: E402
from mmtui.store.merge import stored_records  # noqa: E402

N_LAYERS, D_MLP, N_PATCHES = 28, 16_384, 196


def sources(db: Path, run_id: str | None) -> list[ResultRecord]:
    """The stored results of a real run, as records (arrays unpacked)."""
    with Store.open(db, create=False) as store:
        return [r for r in stored_records(store, store.run(run_id).id) if len(r.top_score)]


def new_run(store: Store) -> str:
    shape = {"n_layers": N_LAYERS, "d_mlp": D_MLP, "n_patches": N_PATCHES}
    stack = StackIdentity(id="bench", name="gptj-scale", fingerprint={}, shape=shape, lm_id="bench", prompt="")
    return store.ensure_run(stack, site="post", y_kind="prob")


def scaled(
    src: ResultRecord, i: int, unit_maps: np.ndarray, src_patches: int, rng: np.random.Generator
) -> ResultRecord:
    """A GPT-J-scale record resampled from a real one (see the module docstring)."""
    n_src, d_src = src.unit_max.shape
    layer_of = np.rint(np.arange(N_LAYERS) * (n_src - 1) / (N_LAYERS - 1)).astype(int)
    pick = rng.integers(0, d_src, (N_LAYERS, D_MLP))
    unit_max = src.unit_max[layer_of[:, None], pick].astype(np.float32)
    unit_sum = src.unit_sum[layer_of[:, None], pick].astype(np.float32)
    layer = np.rint(src.top_layer * (N_LAYERS - 1) / (n_src - 1)).astype(np.int16)
    unit = unit_maps[layer, src.top_unit].astype(np.int32)
    per = max(1, N_PATCHES // src_patches)
    patch = np.minimum(src.top_patch.astype(np.int32) * per + rng.integers(0, per, len(layer)), N_PATCHES - 1)
    rec = ResultRecord(**{**src.__dict__})
    rec.image_sha256 = f"{i:064x}"
    rec.image_path = f"/data/coco/val2014/COCO_val2014_{i:012d}.jpg"
    rec.top_layer, rec.top_unit, rec.top_patch = layer, unit, patch.astype(np.int16)
    rec.unit_max, rec.unit_sum = unit_max, unit_sum
    return rec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="source", type=Path, required=True, help="a store with a real run")
    parser.add_argument("--run", default=None, help="the run to resample (default: the newest)")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--refresh-every", type=int, default=STATS_EVERY)
    parser.add_argument(
        "--spread",
        action="store_true",
        help="a new unit map per image: units seldom recur across images (the costly end for the stats fold)",
    )
    parser.add_argument("--src-patches", type=int, default=49, help="patches of the source stack (smol: 49)")
    parser.add_argument(
        "--memory",
        action="store_true",
        help="trace each fold's peak memory (tracemalloc; the folds then run slower, so the times are not comparable)",
    )
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    srcs = sources(args.source, args.run)
    d_src = max(int(s.top_unit.max()) for s in srcs) + 1

    def unit_maps() -> np.ndarray:
        return np.stack([rng.permutation(D_MLP)[: max(d_src, 1)] for _ in range(N_LAYERS)])

    fixed = unit_maps()
    records = [
        scaled(srcs[i % len(srcs)], i, unit_maps() if args.spread else fixed, args.src_patches, rng)
        for i in range(args.images)
    ]

    steps = dict.fromkeys(("pack", "add_result", "refresh_stats"), 0.0)
    fold_peak = 0
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.db"
        with Store.open(path).for_bulk_writes() as store:  # as the writer's connection
            run = new_run(store)
            for i, rec in enumerate(records):
                t0 = time.perf_counter()
                packed = pack_result(rec)
                t1 = time.perf_counter()
                store.add_result(run, rec, stats=False, packed=packed)
                t2 = time.perf_counter()
                if (i + 1) % args.refresh_every == 0 or i + 1 == len(records):
                    if args.memory:
                        tracemalloc.start()
                    store.refresh_stats(run)
                    if args.memory:
                        fold_peak = max(fold_peak, tracemalloc.get_traced_memory()[1])
                        tracemalloc.stop()
                t3 = time.perf_counter()
                for step, dt in zip(steps, (t1 - t0, t2 - t1, t3 - t2), strict=True):
                    steps[step] += dt
            store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            sizes = dict(store.db.execute("SELECT name, sum(pgsize) FROM dbstat GROUP BY name").fetchall())
        total = path.stat().st_size

        path = Path(tmp) / "writer.db"
        with Store.open(path) as store:
            run = new_run(store)
        t0 = time.perf_counter()
        writer = StoreWriter(
            path, run, timeout=30.0, refresh_every=args.refresh_every, refresh_seconds=1e9
        )  # by count, as the bench's first pass
        for rec in records:
            writer.put(ImageDone(rec.image_path, rec.image_sha256, None, rec))
        written = sum(1 for _ in writer.finish())
        writer_s = time.perf_counter() - t0
        assert written == len(records)

    n = args.images
    table = Table(title=f"cache writes at GPT-J scale: {n} images resampled from {len(srcs)} real results")
    table.add_column("step")
    table.add_column("ms / image", justify="right")
    for step, seconds in steps.items():
        table.add_row(step, f"{1e3 * seconds / n:.1f}")
    table.caption = f"neuron_stats and neuron_images folded every {args.refresh_every} results"
    table.add_row("sum of the steps (one thread)", f"{1e3 * sum(steps.values()) / n:.1f}")
    table.add_row("StoreWriter, wall time (packing on a pool)", f"{1e3 * writer_s / n:.1f}")
    if args.memory:
        table.caption += f"; a fold's peak memory: {fold_peak / 1e6:.0f} MB (tracemalloc: slower folds)"
    console = Console()
    console.print(table)
    sizes_table = Table(title=f"bytes per image in the file ({total / 1e6:.0f} MB in all)")
    sizes_table.add_column("table or index")
    sizes_table.add_column("kB / image", justify="right")
    for name, size in sorted(sizes.items(), key=lambda kv: -kv[1]):
        if size / n >= 100:
            sizes_table.add_row(name, f"{size / n / 1e3:.1f}")
    sizes_table.add_row("file (with free pages)", f"{total / n / 1e3:.1f}")
    console.print(sizes_table)


if __name__ == "__main__":
    main()
