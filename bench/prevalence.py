"""How fast the generic / image-specific views and `explain` answer on a store at the paper's scale: 1,000 images of GPT-J
(28 x 16,384 units), and what folding the unit_max moments costs.

    python bench/prevalence.py [--images 1000] [--db /tmp/mmtui-bench/browse-1000.db] [--rebuild]

Reuses bench/browse.py's synthetic store (built once, cached under /tmp). A store built before migration m010
gets its moments filled on first open (timed here: that is the migration's one-off cost). Prints a table: the
queries in process (median of repeats) and the commands end to end, a fresh process each (imports included).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.browse import DEFAULT_DB, build_store  # noqa: E402
from mmtui.store import Store  # noqa: E402
from mmtui.store import prevalence as pv  # noqa: E402
from mmtui.store.queries import list_neurons, neuron_detail  # noqa: E402


def _time(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    times, value = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), value


def _command(db: Path, args: list[str], repeats: int) -> float:
    code = "from commands import main; main()"
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "-c", code, *args, "--db", str(db)],
            cwd=ROOT,
            check=True,
            capture_output=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--db", type=Path, default=None, help="cached store (default /tmp/mmtui-bench/browse-N.db)")
    parser.add_argument("--rebuild", action="store_true", help="build the store again")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-commands", action="store_true", help="time the queries only")
    args = parser.parse_args()
    db = args.db or DEFAULT_DB / f"browse-{args.images}.db"
    if args.rebuild or not db.exists():
        print(f"building {db} ({args.images} images; minutes) ...", file=sys.stderr)
        build_store(db, args.images, progress=lambda m: print(m, file=sys.stderr))
    start = time.perf_counter()
    store = Store.open(db)
    opened = time.perf_counter() - start
    run = store.run()
    n = pv.run_size(store, run)
    image = next(store.results(run.id, limit=1))["path"]
    dims = (run.shape["n_layers"], run.shape["d_mlp"])
    blobs = [r[0] for r in store.db.execute("SELECT unit_max FROM results WHERE run_id = ? LIMIT 200", [run.id])]
    fold_s, _ = _time(lambda: pv.sum_moments(blobs, dims), 1)
    generic = store.db.execute(
        "SELECT count(*) FROM neuron_stats WHERE run_key = ? AND n_top > ?", [run.key, pv.generic_above(n)]
    ).fetchone()[0]
    top = next(iter(list_neurons(store, run, limit=1)))

    detail = neuron_detail(store, run, top["layer"], top["unit"])
    ids = [im["result_id"] for im in detail["images"]]

    queries = {
        "neurons --specific (30 rows)": lambda: pv.annotate(
            list_neurons(store, run, limit=30, max_n_top=pv.generic_above(pv.run_size(store, run))),
            pv.run_size(store, run),
        ),
        "neurons --specific --image X (30 rows)": lambda: pv.specific_units(store, run, image, limit=30),
        "neuron L K: what it adds (prevalence, lift on its 10 best images)": lambda: pv.unit_prevalence(
            store, run, detail["layer"], detail["unit"], detail["stats"]["n_top"], ids
        ),
        "neuron L K: neuron_detail (as before, for reference)": lambda: neuron_detail(
            store, run, top["layer"], top["unit"]
        ),
        "attribute's generic share of one image": lambda: pv.image_generic_share(
            store, run, next(store.results(run.id, limit=1))["id"]
        ),
    }
    print(f"store: {db} ({db.stat().st_size / 1e9:.2f} GB), {n:,} results, {dims[0]} x {dims[1]:,} units")
    print(
        f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load {' '.join(f'{x:.1f}' for x in os.getloadavg())}"
    )
    print(f"generic units (top 100 of over {pv.GENERIC_SHARE:.0%} of the images): {generic:,}\n")
    print(f"open (with m010's one-off fill where the store predates it): {opened:.2f} s")
    print(f"unit_max moments folded: {fold_s / len(blobs) * 1e3:.1f} ms a result ({len(blobs)} results)\n")
    print("| query (in process) | median | target |")
    print("| --- | ---: | ---: |")
    for name, fn in queries.items():
        seconds, _ = _time(fn, args.repeats)
        print(f"| {name} | {seconds * 1e3:.0f} ms | < 1 s |")
    store.close()
    if args.no_commands:
        return
    print()
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-c", "from commands import main; main()", "explain", "--recompute", "--db", str(db)],
        cwd=ROOT,
        check=True,
        capture_output=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    print(
        f"mmtui explain --recompute (labels computed for every unit, the shuffled control too): "
        f"{time.perf_counter() - start:.1f} s\n"
    )
    print("| command (fresh process, imports included) | median | target |")
    print("| --- | ---: | ---: |")
    layer, unit = top["layer"], top["unit"]
    for name, cli in {
        "mmtui neurons --specific": ["neurons", "--specific"],
        "mmtui neurons --specific --image X": ["neurons", "--specific", "--image", image],
        f"mmtui neuron {layer} {unit}": ["neuron", str(layer), str(unit)],
        "mmtui neurons (as before, for reference)": ["neurons"],
        "mmtui explain (labels stored: the listing)": ["explain"],
    }.items():
        print(f"| {name} | {_command(db, cli, max(1, args.repeats // 2)) * 1e3:.0f} ms | < 1 s |")


if __name__ == "__main__":
    main()
