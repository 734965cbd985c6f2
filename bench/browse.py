"""How fast `mmtui browse` is on a store at the paper's scale: 1,000 images of GPT-J (28 x 16,384 units).

    python bench/browse.py [--images 1000] [--db /tmp/mmtui-bench/browse-1000.db] [--rebuild]

Builds a synthetic store once (written with Store.add_result, as `mmtui attribute` writes it; no model
needed) and caches it under /tmp, then prints a table: the app's start-up (process start to an interactive
neuron table), the store queries behind a re-sort and a filter, and the same actions end to end in the
app (key press to the table showing the new rows).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mmtui.store import STATS_EVERY, ResultRecord, StackIdentity, Store  # noqa: E402
from mmtui.words import dictionary, is_interpretable  # noqa: E402

N_LAYERS, D_MLP, GRID, KEEP = 28, 16_384, 14, 6_400
DEFAULT_DB = Path("/tmp/mmtui-bench")
CONVENTIONS = ("raw", "ln_f")
JUNK = ["ing", "ed", "s", " the", " of", ",", ".", "ation", " un", "ly", "er", " a", "\u00e2\u0122", "re", " (", "ies"]


# -- the synthetic store ------------------------------------------------------------------------------------
def _layer_weights() -> np.ndarray:
    """Where an image's top triples sit: mostly GPT-J layers 5-10 (0-based), as the paper reports."""
    layers = np.arange(N_LAYERS)
    w = np.exp(-0.5 * ((layers - 7.5) / 2.5) ** 2) + 0.05
    return w / w.sum()


def _record(rng: np.random.Generator, i: int, popular: np.ndarray, words: list[str]) -> ResultRecord:
    layer = rng.choice(N_LAYERS, size=KEEP, p=_layer_weights()).astype(np.int16)
    # half of the triples come from a pool of recurring units per layer, so units recur across images
    pooled = rng.random(KEEP) < 0.5
    unit = np.where(pooled, popular[layer, rng.integers(0, popular.shape[1], KEEP)], rng.integers(0, D_MLP, KEEP))
    score = np.sort(0.02 * np.exp(-np.arange(KEEP) / 900.0) * rng.uniform(0.5, 1.0, KEEP))[::-1]
    unit_max = np.abs(rng.standard_normal((N_LAYERS, D_MLP)).astype(np.float32)) * 1e-4
    unit_max[layer, unit] = np.maximum(unit_max[layer, unit], score)
    noun = words[i % len(words)]
    return ResultRecord(
        image_sha256=f"{i:064x}",
        image_path=f"/data/coco/val2014/COCO_val2014_{i:012d}.jpg",
        width=640,
        height=480,
        target_spec="auto",
        target=noun,
        target_token_id=1000 + i,
        target_token=" " + noun,
        target_source="caption-noun",
        target_split=False,
        caption=f"a {noun} on a table next to a window",
        context=f"A picture of a {noun}",
        context_ids=[32, 4286, 286, 257],
        y_c=float(rng.uniform(0.05, 0.6)),
        p_target=float(rng.uniform(0.05, 0.6)),
        top_layer=layer,
        top_unit=unit.astype(np.int32),
        top_patch=rng.integers(0, GRID * GRID, KEEP).astype(np.int16),
        top_score=score.astype(np.float32),
        unit_max=unit_max,
        unit_sum=unit_max * 3.0,
    )


def _token_rows(rng: np.random.Generator, layer: int, words: list[str]) -> list[dict]:
    rows = []
    for unit in range(D_MLP):
        n_words = int(rng.integers(3, 11))
        picked = [" " + words[j] for j in rng.integers(0, len(words), n_words)]
        picked += [JUNK[j] for j in rng.integers(0, len(JUNK), 10 - n_words)]
        rng.shuffle(picked)
        logits = np.sort(rng.uniform(2.0, 12.0, 10))[::-1]
        rows.append(
            {
                "layer": layer,
                "unit": unit,
                "tokens": picked,
                "token_ids": rng.integers(0, 50_257, 10).tolist(),
                "logits": logits.tolist(),
                "interpretable": is_interpretable(picked),
            }
        )
    return rows


def build_store(path: Path, n_images: int, seed: int = 0, progress: Callable[[str], None] = print) -> None:
    """Write a synthetic GPT-J-scale store at `path` (removed first if present)."""
    for suffix in ("", "-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    rng = np.random.default_rng(seed)
    words = sorted(w for w in dictionary() if w.isalpha() and w.islower() and 3 <= len(w) <= 9)
    popular = rng.integers(0, D_MLP, (N_LAYERS, 1500))
    with Store.open(path) as store:
        stack = StackIdentity(
            id="synthetic-gptj-0001",
            name="synthetic-gptj",
            fingerprint={"lm": "EleutherAI/gpt-j-6b (synthetic)", "encoder": "beit-large (synthetic)"},
            shape={
                "n_layers": N_LAYERS,
                "d_mlp": D_MLP,
                "n_patches": GRID * GRID,
                "grid": [GRID, GRID],
                "d_model": 4096,
                "family": "gptj",
            },
            lm_id="synthetic-gptj-lm",
            prompt="A picture of",
        )
        run_id = store.ensure_run(stack, site="post", y_kind="prob", settings={"keep": KEEP, "synthetic": True})
        for convention in CONVENTIONS:
            for layer in range(N_LAYERS):
                store.add_tokens("synthetic-gptj-lm", convention, _token_rows(rng, layer, words))
            progress(f"tokens ({convention}) written")
        start = time.perf_counter()
        for i in range(n_images):  # as the writer thread does: stats folded in bulk
            store.add_result(run_id, _record(rng, i, popular, words), stats=False)
            if (i + 1) % STATS_EVERY == 0 or i + 1 == n_images:
                store.refresh_stats(run_id)
            if (i + 1) % 100 == 0:
                progress(f"{i + 1}/{n_images} images ({time.perf_counter() - start:.0f} s)")


# -- measuring ------------------------------------------------------------------------------------------------
STARTUP_SCRIPT = """
import asyncio, json, resource, sys, time
started = float(sys.argv[2])
import commands  # what `mmtui browse` imports before the app: typer, the command modules
from mmtui.tui import make_app
from mmtui.tui.screens.browse import BrowseScreen
imported = time.time()

async def main():
    app = make_app(sys.argv[1], graphics="halfblock")
    frames = []
    display = app._display
    def record(screen, renderable):
        frames.append(time.time())
        display(screen, renderable)
    app._display = record
    async with app.run_test(size=(160, 45)):
        while not (isinstance(app.screen, BrowseScreen) and app.screen.shown is not None):
            await asyncio.sleep(0.001)
        filled = time.time()
        while not (frames and frames[-1] > filled):
            await asyncio.sleep(0.001)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        heavy = [m for m in ("torch", "transformers", "timm") if m in sys.modules]
        print(json.dumps({"imports": imported - started, "filled": filled - started,
                          "interactive": frames[-1] - started, "cpu": usage.ru_utime + usage.ru_stime,
                          "heavy": heavy}))

asyncio.run(main())
"""


def measure_startup(db: Path, repeats: int) -> list[dict[str, Any]]:
    """A fresh process each time: process start to the neuron table filled (imports included)."""
    out = []
    for _ in range(repeats):
        started = time.time()
        done = subprocess.run(
            [sys.executable, "-c", STARTUP_SCRIPT, str(db), repr(started)],
            capture_output=True,
            text=True,
            cwd=ROOT,
            check=True,
        )
        out.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return out


FRAMES: list[float] = []  # when the app wrote each frame (App._display wrapped in measure_actions)


async def _answer(pilot: Any, act: Callable[[], Any], want: Callable[[Any], bool]) -> tuple[float, float]:
    """Seconds from an action to (the neuron table holding the rows it asked for, the next frame drawn)."""
    screen = pilot.app.screen
    start = time.perf_counter()
    act()
    while not (screen.shown is not None and want(screen.shown.query)):
        if time.perf_counter() - start > 30:
            raise RuntimeError("the table did not answer within 30 s")
        await asyncio.sleep(0)
    rows = time.perf_counter()
    while not (FRAMES and FRAMES[-1] > rows):
        await asyncio.sleep(0.001)
    return rows - start, FRAMES[-1] - start


async def measure_actions(db: Path, tokens: list[str], rounds: int) -> dict[str, list[tuple[float, float, float]]]:
    """Per kind of action: (seconds to the rows in the table, to the next frame, the store query), `rounds`
    times over in one session. Actions are called as their keys call them (a simulated key press would add
    the Pilot's wait for an idle CPU)."""
    from textual.widgets import Input
    from textual.worker import WorkerCancelled

    from mmtui.tui import make_app
    from mmtui.tui.screens.browse import BrowseScreen
    from mmtui.tui.state import COLUMNS
    from mmtui.tui.widgets.layers import LayerBars

    results: dict[str, list[tuple[float, float, float]]] = {}
    app = make_app(db, graphics="halfblock")
    display = app._display

    def record(screen: Any, renderable: Any) -> None:
        FRAMES.append(time.perf_counter())
        display(screen, renderable)

    app._display = record  # type: ignore[method-assign]
    async with app.run_test(size=(160, 45)) as pilot:
        while not (isinstance(app.screen, BrowseScreen) and app.screen.shown is not None):
            await pilot.pause(0.001)
        screen = app.screen
        box = screen.query_one("#filter", Input)
        layers = screen.query_one(LayerBars)

        async def run(name: str, act: Callable[[], Any], want: Callable[[Any], bool]) -> None:
            while True:  # counts of the previous query included; a query superseded by the next is cancelled
                try:
                    await app.workers.wait_for_complete()
                    break
                except WorkerCancelled:
                    continue
            await pilot.pause(0.05)
            rows, painted = await _answer(pilot, act, want)
            results.setdefault(name, []).append((rows, painted, screen.shown.seconds))

        async def resort_all(name: str) -> None:
            for key, _header, _ in COLUMNS:
                for _direction in range(2):
                    was = screen.query_state
                    await run(
                        name,
                        lambda key=key: screen.action_sort_column(key),
                        lambda q, key=key, was=was: q.sort == key and q != was,
                    )

        for _ in range(rounds):
            await resort_all("re-sort (7 columns, both ways)")
            screen.action_sort_column("max")
            screen.action_filter()
            for token in tokens:
                await run(
                    f"filter {token!r}",
                    lambda token=token: setattr(box, "value", token),
                    lambda q, token=token: q.token == token,
                )
            screen.action_clear_filter()
            for layer in (0, 7, 27):
                await run(
                    "layer (0, 7, 27)",
                    lambda layer=layer: setattr(layers, "highlighted", layer + 1),
                    lambda q, layer=layer: q.layer == layer,
                )
            await resort_all("re-sort in layer 27 (7 columns, both ways)")  # the layer's rows, sorted (m009)
            screen.action_sort_column("max")
            layers.highlighted = 0
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--db", type=Path, default=None, help="cached store (default /tmp/mmtui-bench/browse-N.db)")
    parser.add_argument("--rebuild", action="store_true", help="build the store again")
    parser.add_argument("--repeats", type=int, default=5, help="start-ups measured")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the actions measured")
    args = parser.parse_args()
    db = args.db or DEFAULT_DB / f"browse-{args.images}.db"
    if args.rebuild or not db.exists():
        db.parent.mkdir(parents=True, exist_ok=True)
        print(f"building {db} ({args.images} images; minutes) ...", file=sys.stderr)
        build_store(db, args.images, progress=lambda m: print(m, file=sys.stderr))
    start = time.perf_counter()
    with Store.open(db, create=False) as store:  # applies any pending migration once, before measuring
        opened = time.perf_counter() - start
        run = store.run()
        n_units = store.db.execute("SELECT count(*) FROM neuron_stats WHERE run_key = ?", [run.key])
        n_units = n_units.fetchone()[0]
    print(f"store: {db} ({db.stat().st_size / 1e9:.2f} GB), {run.n_images:,} images, {run.shape['n_layers']} x ")
    print(
        f"       {run.shape['d_mlp']:,} units; {n_units:,} units in some image's stored triples; opened in {opened:.2f} s"
    )
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs\n")

    startups = measure_startup(db, args.repeats)
    assert not any(s["heavy"] for s in startups), startups
    actions = asyncio.run(measure_actions(db, ["horse", "zebra", "ing", "qq"], args.rounds))

    def ms(values: list[float]) -> str:
        return f"{statistics.median(values) * 1000:.0f} ms | {max(values) * 1000:.0f} ms"

    print(f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())} (the CPUs are shared: medians matter)\n")
    print("| start-up (a fresh process each time) | runs | median | worst | target |")
    print("| --- | ---: | ---: | ---: | ---: |")
    print(f"| imports (process start -> app importable) | {len(startups)} | {ms([s['imports'] for s in startups])} | |")
    print(
        f"| process start -> first page of the table loaded | {len(startups)} | {ms([s['filled'] for s in startups])} | |"
    )
    print(
        f"| process start -> table drawn on screen (interactive) | {len(startups)} | {ms([s['interactive'] for s in startups])} | < 500 ms |"
    )
    print(
        f"| CPU time to that point, user + system (what it takes of an idle core) | {len(startups)} | {ms([s['cpu'] for s in startups])} | |"
    )
    print()
    print(
        "| action (one session) | runs | to rows in the table: median | worst | to the next frame: median | worst "
        "| store query: median | worst | target |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, values in actions.items():
        rows, frames, queries = (list(v) for v in zip(*values, strict=True))
        print(f"| {name} | {len(values)} | {ms(rows)} | {ms(frames)} | {ms(queries)} | < 100 ms |")


if __name__ == "__main__":
    main()
