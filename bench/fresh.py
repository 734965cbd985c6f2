"""How long the query commands take as fresh processes (imports included) on a store at the paper's scale:
1,000 images of GPT-J (28 x 16,384 units), and what each one imports; optionally against an older tree.

    python bench/fresh.py [--images 1000] [--db /tmp/mmtui-bench/browse-1000.db] [--repeats 5]
    git archive COMMIT | tar -x -C /tmp/before && python bench/fresh.py --baseline /tmp/before

Reuses bench/browse.py's synthetic store (built once, cached under /tmp; a store is migrated and folded on its
first open, so that open is made here before anything is timed). Prints one table: `from commands import main`
alone, then each command end to end (`--json`, stdout read to the end): the median wall time and CPU time
(user + system) of --repeats fresh processes, each command run once first to warm the page cache, and the heavy
modules each one has imported when it ends. With --baseline the older tree's runs alternate with this tree's,
so that both see the same load. Bytecode caching is on (PYTHONDONTWRITEBYTECODE is dropped), as for an installed
mmtui. On a busy machine read the CPU columns: wall time there includes waiting for a core.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.browse import DEFAULT_DB, build_store  # noqa: E402

HEAVY = ("torch", "transformers", "timm", "scipy", "PIL", "textual", "matplotlib", "numpy")
# runs the command as `mmtui` would, then names the heavy modules it imported (on stderr, after its output)
_PROBE = f"""
import sys
from commands import main
try:
    main()
finally:
    sys.stderr.write("\\nIMPORTED " + ",".join(m for m in {HEAVY!r} if m in sys.modules) + "\\n")
"""


@dataclass
class Times:
    walls: list[float] = field(default_factory=list)
    cpus: list[float] = field(default_factory=list)
    imported: str = "?"

    def cell(self) -> str:
        return f"{statistics.median(self.walls) * 1e3:.0f} ms | {statistics.median(self.cpus) * 1e3:.0f} ms"


def _run(root: Path, code: str, args: list[str], times: Times | None) -> None:
    """`python -c code ARGS` in a fresh process with `root` on the path; its wall and CPU time go in `times`."""
    env = {**os.environ, "PYTHONPATH": str(root), "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code, *args], cwd=root, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"{root}: {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    if times is not None:
        times.walls.append(wall)
        times.cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
        found = [line[9:] for line in done.stderr.splitlines() if line.startswith("IMPORTED ")]
        times.imported = found[-1].replace(",", ", ") if found else ""


def _measure(roots: list[Path], code: str, args: list[str], repeats: int) -> list[Times]:
    """Each root once to warm up, then `repeats` rounds of each root in turn."""
    out = [Times() for _ in roots]
    for round_ in range(repeats + 1):
        for root, times in zip(roots, out, strict=True):
            _run(root, code, args, times if round_ else None)
    return out


def _unit(db: Path) -> tuple[int, int, str]:
    """The run's best unit and its first image, read from the store (no mmtui imports in this process)."""
    import sqlite3

    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    layer, unit = conn.execute("SELECT layer, unit FROM neuron_stats ORDER BY max_score DESC LIMIT 1").fetchone()
    image = conn.execute("SELECT images.path FROM images LIMIT 1").fetchone()[0]
    conn.close()
    return int(layer), int(unit), str(image)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--db", type=Path, default=None, help="cached store (default /tmp/mmtui-bench/browse-N.db)")
    parser.add_argument("--rebuild", action="store_true", help="build the store again")
    parser.add_argument("--repeats", type=int, default=5, help="fresh processes per command (the median is shown)")
    parser.add_argument("--baseline", type=Path, default=None, help="an older tree to time against (its root)")
    args = parser.parse_args()
    db = args.db or DEFAULT_DB / f"browse-{args.images}.db"
    if args.rebuild or not db.exists():
        print(f"building {db} ({args.images} images; minutes) ...", file=sys.stderr)
        build_store(db, args.images, progress=lambda m: print(m, file=sys.stderr))
    roots = [args.baseline.resolve(), ROOT] if args.baseline else [ROOT]
    _run(ROOT, "from commands import main; main()", ["runs", "--db", str(db)], None)  # migrate and fold, once
    layer, unit, image = _unit(db)
    print(f"store: {db} ({db.stat().st_size / 1e9:.2f} GB)")
    print(
        f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
        f"load {' '.join(f'{x:.1f}' for x in os.getloadavg())}, median of {args.repeats} fresh processes"
        + (f"; before: {roots[0]}, after: {ROOT}" if args.baseline else "")
        + "\n"
    )
    heads = ["before: wall | CPU", "after: wall | CPU"] if args.baseline else ["wall | CPU"]
    print(f"| fresh process | {' | '.join(heads)} | heavy modules imported |")
    print(f"| --- | {' | '.join('---: | ---:' for _ in heads)} | --- |")
    found = _measure(roots, "from commands import main", [], args.repeats)
    print(f"| `python -c 'from commands import main'` | {' | '.join(t.cell() for t in found)} | |")
    for name, cli in {
        "neurons --json": ["neurons", "--json"],
        "neurons --specific --image X --json": ["neurons", "--specific", "--image", Path(image).name, "--json"],
        f"neuron {layer} {unit} --json": ["neuron", str(layer), str(unit), "--json"],
        "explain --json": ["explain", "--json"],
        "runs --json": ["runs", "--json"],
        "layers --json": ["layers", "--json"],
    }.items():
        found = _measure(roots, _PROBE, [*cli, "--db", str(db)], args.repeats)
        imported = " → ".join(dict.fromkeys(t.imported for t in found)) if args.baseline else found[0].imported
        print(f"| `mmtui {name}` | {' | '.join(t.cell() for t in found)} | {imported} |", flush=True)


if __name__ == "__main__":
    main()
