"""Wall time of the experiment commands on a cached run, as a user runs them: `ablate --from-store` (its
defaults), `prompts` and `specificity`, each in a fresh process (imports and the model load count).

    python bench/experiments.py --db /tmp/perf/s.db --photos /tmp/perf/photos [--only ablate] [--out DIR]

The store must hold a run of the photos (`mmtui samples /tmp/perf/photos && mmtui attribute /tmp/perf/photos
--captions /tmp/perf/photos/captions.json --db /tmp/perf/s.db`). Each command runs on a fresh copy of the store
(ablate would otherwise read its points back from the cache). With --out, each command's JSON lines go to
DIR/NAME.jsonl, to compare two versions of the code (`--compare OTHER_DIR`: numbers equal to rtol 1e-5).
Prints the wall time, the process CPU time (user + sys of the command) and the load average before each row.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

CLI = "from commands import main; main()"


def commands(photos: Path) -> dict[str, list[str]]:
    return {
        "ablate": ["ablate", "--from-store"],
        "prompts": ["prompts", str(photos), "--captions", str(photos / "captions.json")],
        "specificity": ["specificity", "--instances", str(photos / "instances.json")],
    }


def run_one(args: list[str], db: Path, out: Path | None, name: str) -> tuple[float, float, int]:
    """(wall s, CPU s of the child, exit code) of one command on a fresh copy of the store."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(root)}
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "s.db"
        shutil.copy(db, copy)
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-c", CLI, *args, "--db", str(copy), "--json"],
            env=env,
            capture_output=True,
            text=True,
            cwd=root,
        )
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if out is not None:
        (out / f"{name}.jsonl").write_text(done.stdout, encoding="utf-8")
        (out / f"{name}.err").write_text(done.stderr, encoding="utf-8")
    if done.returncode not in (0, 1):
        print(done.stderr[-2000:], file=sys.stderr)
    return wall, cpu, done.returncode


def _close(a: Any, b: Any, rtol: float, path: str, diffs: list[str]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            diffs.append(f"{path}: keys {sorted(a)} != {sorted(b)}")
        for key in a.keys() & b.keys():
            _close(a[key], b[key], rtol, f"{path}.{key}", diffs)
    elif isinstance(a, float) and isinstance(b, float):
        if not (a == b or (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=rtol, abs_tol=1e-12)):
            diffs.append(f"{path}: {a!r} != {b!r}")
    elif a != b:
        diffs.append(f"{path}: {a!r} != {b!r}")


def compare(a_dir: Path, b_dir: Path, name: str, rtol: float = 1e-5) -> str:
    """'identical', 'equal to rtol 1e-05', or the first differences of two runs' JSON lines."""
    if not (a_dir / f"{name}.jsonl").is_file():
        return f"no {a_dir / name}.jsonl to compare with"
    a = (a_dir / f"{name}.jsonl").read_text(encoding="utf-8")
    b = (b_dir / f"{name}.jsonl").read_text(encoding="utf-8")
    if a == b:
        return "identical"
    rows_a = [json.loads(line) for line in a.splitlines() if line.strip()]
    rows_b = [json.loads(line) for line in b.splitlines() if line.strip()]
    key = lambda r: json.dumps({k: v for k, v in r.items() if not isinstance(v, float)}, sort_keys=True)  # noqa: E731
    rows_a.sort(key=key)
    rows_b.sort(key=key)
    if len(rows_a) != len(rows_b):
        return f"{len(rows_a)} rows != {len(rows_b)} rows"
    diffs: list[str] = []
    for i, (ra, rb) in enumerate(zip(rows_a, rows_b, strict=True)):
        _close(ra, rb, rtol, f"row {i}", diffs)
    return f"equal to rtol {rtol:g} (not bit-identical)" if not diffs else "; ".join(diffs[:5])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", type=Path, default=Path("/tmp/perf/s.db"))
    parser.add_argument("--photos", type=Path, default=Path("/tmp/perf/photos"))
    parser.add_argument("--only", action="append", choices=["ablate", "prompts", "specificity"])
    parser.add_argument("--out", type=Path, default=None, help="write each command's JSON lines here")
    parser.add_argument("--compare", type=Path, default=None, help="compare --out's JSON with this folder's")
    args = parser.parse_args()
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, cmd in commands(args.photos).items():
        if args.only and name not in args.only:
            continue
        load = os.getloadavg()[0]
        wall, cpu, rc = run_one(cmd, args.db, args.out, name)
        same = compare(args.compare, args.out, name) if args.compare and args.out else "-"
        rows.append((name, wall, cpu, load, rc, same))
        print(f"{name}: {wall:.1f} s wall, {cpu:.1f} s CPU, load {load:.2f}, exit {rc}", file=sys.stderr)
    print(f"{os.cpu_count()} CPUs; each command in a fresh process on a copy of {args.db}")
    print(f"{'command':<12} {'wall s':>8} {'CPU s':>8} {'load 1m':>8} {'exit':>5}  JSON vs --compare")
    for name, wall, cpu, load, rc, same in rows:
        print(f"{name:<12} {wall:>8.1f} {cpu:>8.1f} {load:>8.2f} {rc:>5}  {same}")


if __name__ == "__main__":
    main()
