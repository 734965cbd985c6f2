"""The browser's views of issue 20: the share (G: generic) and data-label columns of the neuron table, the
generic/specific toggle, an image's units ranked by lift under that toggle (the same order as `mmtui neurons
--specific --image X`), a neuron's labels, and the steer view (its grid on the tiny stack equals the core's
`steer`, the same function as `mmtui steer`).

The snapshots' store: 12 images (3 bundled photos and 9 plain pictures written here), 3 units in the top
triples of every image (generic: share 100% > 10%) and 3 of one image each, data labels planted with
store.labels.write_labels (two beat chance, one does not). Accept deliberate changes with
`pytest tests/test_tui_explain.py --snapshot-update` after reading the new SVGs.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import settle, synthetic_record
from PIL import Image
from test_tui import Recorder
from test_tui_queries import COCO, FIXED_TIME, IMAGE_DIR
from textual.pilot import Pilot
from textual.widgets import DataTable
from typer.testing import CliRunner

from mmtui.store import ResultRecord, StackIdentity, Store
from mmtui.store import experiments as xs
from mmtui.store import prevalence as pv
from mmtui.store.labels import write_labels
from mmtui.store.queries import count_neurons
from mmtui.tui import make_app
from mmtui.tui.screens.browse import BrowseScreen
from mmtui.tui.screens.image import ImageScreen
from mmtui.tui.screens.neuron import NeuronScreen
from mmtui.tui.screens.steer import SteerFinished, SteerImageDone, SteerScreen
from mmtui.tui.text import printable
from mmtui.tui.widgets.neuron_table import NeuronTable

SIZE = (120, 36)
N_LAYERS, D_MLP, GRID = 4, 32, 2
GENERIC = [(0, 0), (0, 1), (1, 2)]
N_IMAGES = 12


def _images() -> list[Path]:
    IMAGE_DIR.mkdir(exist_ok=True)
    out = []
    for f in sorted(COCO.glob("*.jpg"))[:3]:
        target = IMAGE_DIR / f.name
        if not target.exists():
            shutil.copy(f, target)
        out.append(target)
    for i in range(N_IMAGES - 3):
        target = IMAGE_DIR / f"plain-{i:02d}.png"
        if not target.exists():
            Image.new("RGB", (8, 8), (20 * i, 100, 200 - 20 * i)).save(target)
        out.append(target)
    return out


def _record(i: int, path: Path, rng: np.random.Generator) -> ResultRecord:
    units = [*GENERIC, (2, i), (3, i), (1, 10 + i)]
    triples = (
        np.array([u[0] for u in units]),
        np.array([u[1] for u in units]),
        np.arange(len(units)) % (GRID * GRID),
        np.linspace(0.03, 0.01, len(units)),
    )
    unit_max = rng.uniform(0, 0.001, (N_LAYERS, D_MLP)).astype(np.float32)
    return synthetic_record(
        hashlib.sha256(path.read_bytes()).hexdigest(),
        str(path),
        triples,
        unit_max,
        width=640,
        height=480,
        caption="a dog on a lawn",
    )


@pytest.fixture(scope="module")
def explained_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not COCO.is_dir():
        pytest.skip(f"needs the sample photos in {COCO}")
    path = tmp_path_factory.mktemp("tui-explain") / "explained.db"
    rng = np.random.default_rng(11)
    shape = {"n_layers": N_LAYERS, "d_mlp": D_MLP, "n_patches": GRID * GRID, "grid": [GRID, GRID]}
    stack = StackIdentity(
        id="synthetic-explain",
        name="synthetic",
        fingerprint={"synthetic": "explain"},
        shape={**shape, "d_model": 16, "family": "gptj"},
        lm_id="synthetic-lm",
        prompt="A picture of",
    )
    with Store.open(path) as store:
        run_id = store.ensure_run(stack, site="post", y_kind="prob", settings={"keep": 6})
        for i, image in enumerate(_images()):
            store.add_result(run_id, _record(i, image, rng))
        store.add_tokens(
            "synthetic-lm",
            "raw",
            [
                {
                    "layer": la,
                    "unit": u,
                    "tokens": [f" w{la}_{u}_{j}" for j in range(10)],
                    "token_ids": list(range(10)),
                    "logits": list(np.linspace(9, 5, 10)),
                    "interpretable": False,
                }
                for la in range(N_LAYERS)
                for u in range(D_MLP)
            ],
        )
        store.fold_pending(run_id)
        run = store.run(run_id)
        # (layer, unit, label, k, n, K, N, p, q, source, n_results, agreement)
        write_labels(
            store,
            run.key,
            "word",
            0,
            [
                (2, 0, "horse", 1, 1, 1, N_IMAGES, 0.0001, 0.001, "model", N_IMAGES, None),
                (3, 1, "bird", 1, 1, 1, N_IMAGES, 0.001, 0.01, "model", N_IMAGES, None),
                (2, 2, "pizza", 1, 1, 2, N_IMAGES, 0.1, 0.4, "model", N_IMAGES, None),
            ],
        )
        for table in ("runs", "results", "stacks"):
            store.db.execute(f"UPDATE {table} SET created = ?", [FIXED_TIME])
        store.db.conn.commit()
    return path


# -- snapshots -------------------------------------------------------------------------------------------------
def test_snapshot_share_and_label_columns(snap_compare, explained_db: Path) -> None:
    assert snap_compare(make_app(explained_db, graphics="halfblock"), run_before=settle, terminal_size=SIZE)


def test_snapshot_specific_toggle(snap_compare, explained_db: Path) -> None:
    async def run_before(pilot: Pilot) -> None:
        await settle(pilot)
        await pilot.press("x")
        await settle(pilot)

    assert snap_compare(make_app(explained_db, graphics="halfblock"), run_before=run_before, terminal_size=SIZE)


def test_snapshot_neuron_labels(snap_compare, explained_db: Path) -> None:
    async def run_before(pilot: Pilot) -> None:
        await settle(pilot)
        await pilot.press("g", *"2.0", "enter")
        await settle(pilot)

    assert snap_compare(make_app(explained_db, graphics="halfblock"), run_before=run_before, terminal_size=SIZE)


def test_snapshot_steer_view(snap_compare, explained_db: Path) -> None:
    async def run_before(pilot: Pilot) -> None:
        await settle(pilot)
        await pilot.press("g", *"2.0", "enter")
        await settle(pilot)
        await pilot.press("t")
        await settle(pilot)

    assert snap_compare(make_app(explained_db, graphics="halfblock"), run_before=run_before, terminal_size=SIZE)


def _by_lift_cli(db: Path, name: str) -> list[dict]:
    """`mmtui neurons --specific --image NAME --json --limit 100` on the store: the CLI's lift ranking."""
    from commands import app

    done = CliRunner().invoke(
        app, ["neurons", "--specific", "--image", name, "--json", "--limit", "100", "--db", str(db)]
    )
    assert done.exit_code == 0, done.output
    return [json.loads(line) for line in done.stdout.splitlines()]


def _lift_image(db: Path) -> tuple[int, str, list[dict]]:
    """The first of the run's images (its row in the images screen, its name, the CLI's rows) whose units rank
    differently by lift than by score: the lift ranking shows on screen only where it changes the order."""
    with Store.open(db, create=False) as store:
        paths = [r["path"] for r in store.results(store.run().id)]
    for row, path in enumerate(paths):
        rows = _by_lift_cli(db, Path(path).name)
        if [r["image_rank"] for r in rows] != sorted(r["image_rank"] for r in rows):
            return row, Path(path).name, rows
    raise AssertionError("no image whose lift order differs from its score order")


def test_snapshot_image_by_lift(snap_compare, explained_db: Path) -> None:
    row, _name, _rows = _lift_image(explained_db)

    async def run_before(pilot: Pilot) -> None:
        await settle(pilot)
        await pilot.press("x", "i")
        await settle(pilot)
        await pilot.press(*["down"] * row, "enter")
        await settle(pilot)

    assert snap_compare(make_app(explained_db, graphics="halfblock"), run_before=run_before, terminal_size=SIZE)


# -- behaviour -------------------------------------------------------------------------------------------------
@pytest.mark.anyio
async def test_image_units_by_lift_follow_the_toggle_and_the_cli(explained_db: Path) -> None:
    """x on the neuron table, then an image: its units that are not generic, in the CLI's lift order, with their
    lifts; x there goes back to the top triples by score, and the neuron table follows the toggle back."""
    row, name, expected = _lift_image(explained_db)
    assert expected and not {(r["layer"], r["unit"]) for r in expected} & set(GENERIC)
    app = make_app(explained_db, graphics="halfblock")
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("x", "i")
        await settle(pilot)
        await pilot.press(*["down"] * row, "enter")
        await settle(pilot)
        screen = app.screen
        assert isinstance(screen, ImageScreen) and screen.summary is not None
        assert Path(screen.summary["image"]).name == name
        table = screen.query_one("#image-neurons", DataTable)
        shown = [str(key.value).split(":")[1] for key in table.rows]
        assert shown == [f"{r['layer']}.{r['unit']}" for r in expected]
        lifts = [str(table.get_row(key)[0]) for key in table.rows]
        assert lifts == [f"{r['lift']:.3g}" for r in expected]
        status = str(screen.query_one("#status").render())
        assert "ranked by lift" in status and "generic units (share over 10%) hidden" in status
        assert screen.active_bindings["x"].binding.description == "Rank by score"
        await pilot.press("x")
        await settle(pilot)
        assert table.row_count == len(screen.summary["top"]) == len(GENERIC) + 3  # every stored triple, by score
        assert [str(table.get_row(key)[0]) for key in table.rows] == [str(i) for i in range(table.row_count)]
        assert "ranked by score" in str(screen.query_one("#status").render())
        assert screen.active_bindings["x"].binding.description == "Rank by lift"
        await pilot.press("escape", "escape")
        await settle(pilot)
        assert isinstance(app.screen, BrowseScreen) and not app.screen.query_state.specific
        assert set(GENERIC) <= {(r["layer"], r["unit"]) for r in app.screen.query_one(NeuronTable).rows_shown}


@pytest.mark.anyio
async def test_toggle_hides_the_generic_units_and_back(explained_db: Path) -> None:
    with Store.open(explained_db, create=False) as store:
        run = store.run()
        n = pv.run_size(store, run)
        every = count_neurons(store, run)
        specific = count_neurons(store, run, max_n_top=pv.generic_above(n))
    assert n == N_IMAGES and every - specific == len(GENERIC)
    app = make_app(explained_db, graphics="halfblock")
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        table = app.screen.query_one(NeuronTable)
        shown = {(r["layer"], r["unit"]) for r in table.rows_shown}
        assert set(GENERIC) <= shown and all(
            r["generic"] for r in table.rows_shown if (r["layer"], r["unit"]) in GENERIC
        )
        labelled = {(r["layer"], r["unit"]): r["label"]["label"] for r in table.rows_shown if r["label"]}
        assert labelled == {(2, 0): "horse", (3, 1): "bird"}  # pizza's q is 0.4: not shown
        await pilot.press("x")
        await settle(pilot)
        rows = table.rows_shown
        assert len(rows) == specific and not {(r["layer"], r["unit"]) for r in rows} & set(GENERIC)
        assert "generic units hidden" in str(app.screen.query_one("#status").render())
        await pilot.press("x")
        await settle(pilot)
        assert len(table.rows_shown) == every


@pytest.mark.anyio
async def test_steer_view_shows_the_cores_captions(db: Path, tiny_stack) -> None:  # noqa: F811 (db)
    from mmtui.experiments.steer import steer

    hook = Recorder()
    app = make_app(db, graphics="halfblock", device="cpu")
    async with app.run_test(size=(160, 40), message_hook=hook) as pilot:
        await settle(pilot)
        await pilot.press("enter")  # the best neuron
        await settle(pilot)
        screen = app.screen
        assert isinstance(screen, NeuronScreen)
        neuron, ids = screen.neuron, [im["result_id"] for im in screen.detail["images"]]
        await pilot.press("t")
        await settle(pilot)
        assert isinstance(app.screen, SteerScreen)
        await pilot.press("ctrl+r")
        await hook.wait_for(pilot, SteerFinished, timeout=90)
        await settle(pilot)
        steered = hook.last(SteerFinished).rows
        assert len(hook.of(SteerImageDone)) == len(app.screen.result_ids) == min(3, len(ids))
        grid = app.screen.query_one("#steer-grid", DataTable)
        shown = {key.value: [str(c).split("\n")[0] for c in grid.get_row(key)[1:]] for key in grid.rows}
        assert "Done" in str(app.screen.query_one("#steer-status").render())
        result_ids = list(app.screen.result_ids)
    with Store.open(db, create=False) as store:
        run = store.run()
        images = [r["image_sha256"] for r in xs.result_rows(store, run.id, result_ids)]
        expected = steer(tiny_stack, store, run, [neuron], images, [0.0, 2.0, 4.0, 8.0])
    assert [r.caption for r in steered] == [r.caption for r in expected]
    assert [r.p_target for r in steered] == [r.p_target for r in expected]
    for rid, row in zip(result_ids, (expected[i : i + 5] for i in range(0, len(expected), 5)), strict=True):
        assert shown[str(rid)] == [printable(r.caption) for r in row]  # ×1 (the reference), ×0, ×2, ×4, ×8
