"""Stress: N concurrent `mmtui attribute` processes (preset tiny, CPU) on one cache, round after round.

Each round starts N processes at once on one cache file, in one of six scenarios: a fresh or an existing cache,
and images that are the same for all, disjoint (each process its own images) or overlapping (each process shares
half its images with the next one). Distinct images are the bundled samples and copies of them with one pixel
changed, so no two files of a disjoint set have the same bytes. After a round it checks the cache: how many
processes crashed (non-zero exit or a traceback), duplicate result rows, `PRAGMA integrity_check`, and whether
every image was done exactly once. Prints one table row per scenario; the scenarios run in turn, whole cycles.

    python bench/stress_concurrent.py                    # 4 processes, cycles for ~2 minutes (a round of 4
                                                         # tiny processes takes 1-2 min on 2 busy cores)
    python bench/stress_concurrent.py --procs 6 --seconds 600
    python bench/stress_concurrent.py --procs 3 --images 2 --seconds 0   # one round of each scenario
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "mmtui" / "data" / "samples"
SCENARIOS = [(cache, images) for images in ("same", "disjoint", "overlapping") for cache in ("fresh", "existing")]


def _pool(work: Path, n: int) -> list[Path]:
    """n images with distinct bytes: the samples, then copies of them with one pixel changed."""
    from PIL import Image

    folder = work / "pool"
    folder.mkdir(exist_ok=True)
    photos = sorted(SAMPLES.glob("*.jpg"))
    pool = []
    for i in range(n):
        source = photos[i % len(photos)]
        path = folder / f"{i:03d}_{source.name}" if i < len(photos) else folder / f"{i:03d}_{source.stem}.png"
        if not path.exists():
            if i < len(photos):
                shutil.copy(source, path)
            else:
                with Image.open(source) as img:
                    rgb = img.convert("RGB")
                rgb.putpixel((i % rgb.width, 0), (i % 256, (i // 256) % 256, 7))
                rgb.save(path)
        pool.append(path)
    return pool


def _folders(work: Path, procs: int, per_folder: int, kind: str) -> list[Path]:
    """The folder each process attributes: one shared folder (same), or one each (disjoint, overlapping)."""
    half = max(per_folder // 2, 1)
    pool = _pool(work, procs * per_folder if kind != "overlapping" else half * (procs - 1) + per_folder)
    folders = []
    for i in range(1 if kind == "same" else procs):
        folder = work / f"{kind}{i}"
        start = {"same": 0, "disjoint": i * per_folder, "overlapping": i * half}[kind]
        if not folder.exists():
            folder.mkdir()
            for f in pool[start : start + per_folder]:
                shutil.copy(f, folder / f.name)
        folders.append(folder)
    return folders * procs if kind == "same" else folders


def _round(db: Path, folders: list[Path]) -> list[tuple[int, str]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", "from commands import main; main()", "attribute", str(folder)]
            + ["--preset", "tiny", "--device", "cpu", "--target", "dog", "--batch-size", "2", "--db", str(db)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=ROOT,
        )
        for folder in folders
    ]
    return [(p.wait(timeout=600), p.stderr.read() if p.stderr else "") for p in procs]


def _check(db: Path, folders: list[Path]) -> dict[str, int | str]:
    import hashlib

    expected = {hashlib.sha256(f.read_bytes()).hexdigest() for folder in set(folders) for f in folder.iterdir()}
    with contextlib.closing(sqlite3.connect(db, timeout=30)) as conn:
        integrity = conn.execute("PRAGMA integrity_check").fetchone()[0]
        dupes = conn.execute(
            "SELECT count(*) FROM (SELECT 1 FROM results GROUP BY run_id, image_sha256, target_spec HAVING count(*) > 1)"
        ).fetchone()[0]
        done = dict(conn.execute("SELECT image_sha256, count(*) FROM results GROUP BY image_sha256").fetchall())
        unfolded = conn.execute("SELECT count(*) FROM results WHERE in_stats = 0").fetchone()[0]
    missing = len(expected - done.keys())
    twice = sum(1 for sha in expected if done.get(sha, 0) > 1)
    return {"integrity": integrity, "dupes": dupes, "missing": missing, "twice": twice, "unfolded": unfolded}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--procs", type=int, default=4, help="concurrent processes a round (default 4)")
    parser.add_argument("--seconds", type=float, default=120, help="stop starting rounds after this (default 120)")
    parser.add_argument("--images", type=int, default=4, help="images a folder (default 4)")
    args = parser.parse_args()

    rows: dict[tuple[str, str], dict[str, int]] = defaultdict(lambda: defaultdict(int))
    crashes_seen: list[str] = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="mmtui-stress-") as tmp:
        work = Path(tmp)
        template = work / "existing.db"  # an existing cache: migrated, with a run of other images in it
        seed = work / "seed"
        seed.mkdir()
        _round(template, _folders(seed, 1, 2, "same"))
        for n, (cache, images) in enumerate(itertools.cycle(SCENARIOS)):
            if n > 0 and n % len(SCENARIOS) == 0 and time.monotonic() - started > args.seconds:  # whole cycles
                break
            db = work / f"{cache}{n}.db"
            if cache == "existing":
                shutil.copy(template, db)
            folders = _folders(work, args.procs, args.images, images)
            t0 = time.monotonic()
            outcomes = _round(db, folders)
            row = rows[(cache, images)]
            row["rounds"] += 1
            row["seconds"] += time.monotonic() - t0
            for code, stderr in outcomes:
                crashed = code != 0 or "Traceback" in stderr
                row["crashes"] += crashed
                if crashed and len(crashes_seen) < 5:
                    crashes_seen.append(stderr.strip().splitlines()[-1] if stderr.strip() else f"exit {code}")
            found = _check(db, folders)
            row["bad_integrity"] += found["integrity"] != "ok"
            for key in ("dupes", "missing", "twice", "unfolded"):
                row[key] += int(found[key])
            print(f"round {n + 1}: {cache} cache, {images} images: {found}", file=sys.stderr, flush=True)

    header = ["cache", "images", "rounds", "procs", "crashes", "dup rows", "integrity bad", "missing", "done twice"]
    header += ["unfolded", "s/round"]
    print(" | ".join(header))
    print(" | ".join("---" for _ in header))
    for (cache, images), row in rows.items():
        cells = [cache, images, row["rounds"], args.procs, row["crashes"], row["dupes"], row["bad_integrity"]]
        cells += [row["missing"], row["twice"], row["unfolded"], f"{row['seconds'] / row['rounds']:.1f}"]
        print(" | ".join(map(str, cells)))
    for line in crashes_seen:
        print(f"crash: {line}")


if __name__ == "__main__":
    main()
