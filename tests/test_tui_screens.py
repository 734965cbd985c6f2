"""The browser's screens on a small synthetic store (no model: written with Store.add_result + numpy, fixed
timestamps and image paths, so the snapshots are the same on every machine), the store-problem screens,
and the import hygiene of the browse path.

Snapshots: tests/__snapshots__/test_tui_screens/*.svg; after a deliberate change of a screen, look at the
new pictures and accept them with `pytest tests/test_tui_screens.py --snapshot-update`.
"""

from __future__ import annotations

import contextlib
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from test_tui_queries import COCO, D_MLP, N_LAYERS, build_synthetic_store
from textual.pilot import Pilot
from textual.widgets import Input
from textual.worker import WorkerFailed

from mmtui.store import Store
from mmtui.store.arrays import unpack_triples
from mmtui.tui import make_app
from mmtui.tui.screens.browse import BrowseScreen
from mmtui.tui.screens.problem import ProblemScreen
from mmtui.tui.screens.runs import RunsScreen

ROOT = Path(__file__).resolve().parents[1]
SIZE = (120, 36)


@pytest.fixture(scope="module")
def synthetic_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not COCO.is_dir():
        pytest.skip(f"needs the sample photos in {COCO}")
    return build_synthetic_store(tmp_path_factory.mktemp("tui-synthetic") / "synthetic.db")


@pytest.fixture(scope="module")
def two_runs_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not COCO.is_dir():
        pytest.skip(f"needs the sample photos in {COCO}")
    return build_synthetic_store(tmp_path_factory.mktemp("tui-two-runs") / "two.db", runs=2)


async def settle(pilot: Pilot) -> None:
    """Let the workers finish and their messages land (a few rounds: a loaded screen starts more)."""
    for _ in range(6):
        # A worker that fails is the app's to report (a notification); waiting on it re-raises its error only
        # when it is still running as the wait begins, so waiting must go past it either way.
        with contextlib.suppress(WorkerFailed):
            await pilot.app.workers.wait_for_complete()
        await pilot.pause(0.05)
    for box in pilot.app.screen.query(Input):
        box.cursor_blink = False


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# -- snapshots -------------------------------------------------------------------------------------------------
def test_snapshot_neuron_table(snap_compare, synthetic_db: Path) -> None:
    assert snap_compare(make_app(synthetic_db, graphics="halfblock"), run_before=settle, terminal_size=SIZE)


def test_snapshot_layer_sorted_filtered(snap_compare, synthetic_db: Path) -> None:
    async def run_before(pilot: Pilot) -> None:
        await settle(pilot)
        await pilot.press("shift+tab", "down", "down", "tab")  # layer 1
        await pilot.press("5")  # sort by top-100 count
        await pilot.press("slash", *"ra")
        await settle(pilot)

    assert snap_compare(make_app(synthetic_db, graphics="halfblock"), run_before=run_before, terminal_size=SIZE)


def test_snapshot_neuron_detail(snap_compare, synthetic_db: Path) -> None:
    async def run_before(pilot: Pilot) -> None:
        await settle(pilot)
        await pilot.press("enter")
        await settle(pilot)

    assert snap_compare(make_app(synthetic_db, graphics="halfblock"), run_before=run_before, terminal_size=SIZE)


def test_snapshot_image_view(snap_compare, synthetic_db: Path) -> None:
    async def run_before(pilot: Pilot) -> None:
        await settle(pilot)
        await pilot.press("i")
        await settle(pilot)
        await pilot.press("down", "enter")
        await settle(pilot)

    assert snap_compare(make_app(synthetic_db, graphics="halfblock"), run_before=run_before, terminal_size=SIZE)


def test_snapshot_ablation_form(snap_compare, synthetic_db: Path) -> None:
    async def run_before(pilot: Pilot) -> None:
        await settle(pilot)
        await pilot.press("a")
        await settle(pilot)

    assert snap_compare(make_app(synthetic_db, graphics="halfblock"), run_before=run_before, terminal_size=SIZE)


def test_snapshot_help(snap_compare, synthetic_db: Path) -> None:
    async def run_before(pilot: Pilot) -> None:
        await settle(pilot)
        await pilot.press("question_mark")
        await settle(pilot)

    assert snap_compare(make_app(synthetic_db, graphics="halfblock"), run_before=run_before, terminal_size=SIZE)


def test_snapshot_run_chooser(snap_compare, two_runs_db: Path) -> None:
    assert snap_compare(make_app(two_runs_db, graphics="halfblock"), run_before=settle, terminal_size=SIZE)


def test_snapshot_missing_store(snap_compare, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the message names the path: keep it relative, the same everywhere
    assert snap_compare(make_app(Path("no-such.db"), graphics="halfblock"), run_before=settle, terminal_size=SIZE)


# -- the store cannot be browsed: a screen that says why, never a traceback -------------------------------------
async def _problem(db: Path) -> ProblemScreen:
    app = make_app(db, graphics="halfblock")
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        screen = app.screen
        assert isinstance(screen, ProblemScreen), type(screen)
        await pilot.press("q")
    assert app.return_code in (0, None)
    return screen


@pytest.mark.anyio
async def test_missing_store(tmp_path: Path) -> None:
    screen = await _problem(tmp_path / "absent.db")
    assert screen.problem_title == "No store here"
    assert "mmtui attribute" in screen.message
    assert not (tmp_path / "absent.db").exists()  # browsing never creates a store


@pytest.mark.anyio
async def test_empty_store(tmp_path: Path) -> None:
    Store.open(tmp_path / "empty.db").close()
    screen = await _problem(tmp_path / "empty.db")
    assert screen.problem_title == "The store is empty"


@pytest.mark.anyio
async def test_store_from_a_newer_mmtui(tmp_path: Path, synthetic_db: Path) -> None:
    db = tmp_path / "newer.db"
    shutil.copy(synthetic_db, db)
    with sqlite3.connect(db) as conn:
        conn.execute(
            "INSERT INTO _sqlite_migrations (migration_set, name, applied_at) VALUES ('mmtui', 'm999_future', 'x')"
        )
    screen = await _problem(db)
    assert screen.problem_title == "Store from a newer mmtui"
    assert "m999_future" in screen.message


@pytest.mark.anyio
async def test_not_a_store(tmp_path: Path) -> None:
    (tmp_path / "notes.db").write_text("not a database at all\n" * 50)
    screen = await _problem(tmp_path / "notes.db")
    assert screen.problem_title == "Not an mmtui store"


def _schema(conn: sqlite3.Connection) -> set[tuple[str, str]]:
    rows = conn.execute("SELECT type, name FROM sqlite_master WHERE sql IS NOT NULL AND name NOT LIKE 'sqlite_%'")
    return {(r[0], r[1]) for r in rows}


@pytest.mark.anyio
async def test_store_from_the_first_release_is_migrated_and_browsed(tmp_path: Path, synthetic_db: Path) -> None:
    """A store as the first release wrote it (m001 only): opening it applies the later steps, then it browses."""
    from sqlite_utils import Database

    from mmtui.store.migrations import m001_create_tables

    first = Database(memory=True)
    m001_create_tables(first)
    first_schema = _schema(first.conn)
    db = tmp_path / "older.db"
    shutil.copy(synthetic_db, db)
    with sqlite3.connect(db) as conn:
        full_schema = _schema(conn)
        later = {(kind, name) for kind, name in full_schema - first_schema if "_sqlite_migrations" not in name}
        # what later steps dropped: the first release kept the top triples as rows (m006 packs them)
        for (sql,) in first.execute(
            "SELECT sql FROM sqlite_master WHERE tbl_name = 'top_neurons' AND sql IS NOT NULL ORDER BY type DESC"
        ):
            conn.execute(sql)
        for result_id, blob in conn.execute("SELECT id, top FROM results").fetchall():
            layer, unit, patch, score = unpack_triples(blob)
            conn.executemany(
                "INSERT INTO top_neurons VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (result_id, i, *t)
                    for i, t in enumerate(zip(*(a.tolist() for a in (layer, unit, patch, score)), strict=True))
                ],
            )
        # neuron_stats as the first release keyed it, by the run's text id (m008 keys it by run_key)
        stats = conn.execute(
            "SELECT runs.id, layer, unit, n_top, n_images, max_score, sum_score, mean_score, best_result_id"
            " FROM neuron_stats JOIN runs USING (run_key)"
        ).fetchall()
        conn.execute("DROP TABLE neuron_stats")
        for (sql,) in first.execute(
            "SELECT sql FROM sqlite_master WHERE tbl_name = 'neuron_stats' AND sql IS NOT NULL ORDER BY type DESC"
        ):
            conn.execute(sql)
        conn.executemany("INSERT INTO neuron_stats VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", stats)
        for kind, name in sorted(later):
            conn.execute(f"DROP {kind.upper()} IF EXISTS [{name}]")
        for table in first.table_names():  # and the columns later steps added
            for column in set(_columns(conn, table)) - set(_columns(first.conn, table)):
                conn.execute(f"ALTER TABLE [{table}] DROP COLUMN [{column}]")
        conn.execute("DELETE FROM _sqlite_migrations WHERE name != 'm001_create_tables'")
    app = make_app(db, graphics="halfblock")
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        assert isinstance(app.screen, BrowseScreen)
        assert app.screen.total == N_LAYERS * D_MLP - _unseen_units(synthetic_db)
    with sqlite3.connect(db) as conn:
        assert _schema(conn) == full_schema


def _columns(conn: sqlite3.Connection, table: str) -> list[str]:
    return [r[1] for r in conn.execute(f"PRAGMA table_info([{table}])")]


def _unseen_units(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        return N_LAYERS * D_MLP - conn.execute("SELECT count(*) FROM neuron_stats").fetchone()[0]


@pytest.mark.anyio
async def test_quick_starts_and_quits_never_crash(synthetic_db: Path) -> None:
    """Open, wait for the table, quit at once: screens replaced or torn down while their widgets
    still mount must not raise (five times over). A smoke test of a race: a script doing this crashed in two of three runs on a
    loaded machine while the opening screen had a Header; this test did not reproduce that every time."""
    for _ in range(5):
        app = make_app(synthetic_db, graphics="halfblock")
        async with app.run_test(size=SIZE) as pilot:  # re-raises anything the app raised
            while not (isinstance(app.screen, BrowseScreen) and app.screen.shown is not None):
                await pilot.pause(0.001)


@pytest.mark.anyio
async def test_pictures_through_textual_image(synthetic_db: Path) -> None:
    """graphics="pixels": the picture goes to textual-image's widget (Sixel or kitty graphics in a terminal
    that has them; its own fallback here, with no terminal)."""
    from mmtui.tui.widgets.picture import Picture

    with pytest.raises(ValueError, match="graphics"):
        make_app(synthetic_db, graphics="sixels")
    assert make_app(synthetic_db).graphics == "halfblock"  # auto, and textual-image found no graphics
    app = make_app(synthetic_db, graphics="pixels")
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("enter")
        await settle(pilot)
        picture = app.screen.query_one(Picture)
        assert picture.image is not None
        assert picture._pixels is not None and picture._pixels.image is picture.image
        assert picture._pixels.display


@pytest.mark.anyio
async def test_an_unexpected_error_in_a_worker_is_shown(synthetic_db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Workers report the errors they expect as messages; anything else still reaches the screen as a
    notification instead of dying quietly in its thread."""
    import mmtui.tui.screens.browse as browse

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("the page query broke")

    monkeypatch.setattr(browse, "neuron_page", broken)
    app = make_app(synthetic_db, graphics="halfblock")
    async with app.run_test(size=SIZE, notifications=True) as pilot:
        await settle(pilot)
        assert isinstance(app.screen, BrowseScreen)
        messages = [n.message for n in app._notifications]
        assert "RuntimeError: the page query broke" in messages


@pytest.mark.anyio
async def test_several_runs_open_the_chooser_then_a_run(two_runs_db: Path) -> None:
    app = make_app(two_runs_db, graphics="halfblock")
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        assert isinstance(app.screen, RunsScreen)
        await pilot.press("down", "enter")
        await settle(pilot)
        assert isinstance(app.screen, BrowseScreen)
        assert app.screen.run["prompt"] == app.runs[1]["prompt"]
        await pilot.press("escape")  # back to the chooser
        assert isinstance(app.screen, RunsScreen)


@pytest.mark.anyio
async def test_unknown_run_id(synthetic_db: Path) -> None:
    app = make_app(synthetic_db, run_id="zzz", graphics="halfblock")
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        assert isinstance(app.screen, ProblemScreen)
        assert "zzz" in app.screen.message


# -- import hygiene ----------------------------------------------------------------------------------------------
HEAVY = ("torch", "transformers", "timm", "torchvision")
BROWSE_SCRIPT = """
import asyncio, sys
from mmtui.tui import make_app

async def main(db):
    app = make_app(db, graphics="halfblock")
    async with app.run_test(size=(120, 36)) as pilot:
        for keys in ([], ["enter"], ["escape", "i"], ["enter"], ["escape", "escape", "a"]):
            await pilot.press(*keys)
            for _ in range(4):
                await app.workers.wait_for_complete()
                await pilot.pause(0.05)
        print("SCREEN=" + type(app.screen).__name__)

asyncio.run(main(sys.argv[1]))
print("HEAVY=" + ",".join(m for m in HEAVY if m in sys.modules))
"""


def test_browsing_never_imports_torch(synthetic_db: Path) -> None:
    """Start-up, the neuron table, a neuron, the image list, an image and the ablation form: no torch."""
    code = f"HEAVY = {HEAVY!r}\n" + BROWSE_SCRIPT
    out = subprocess.run(
        [sys.executable, "-c", code, str(synthetic_db)], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "SCREEN=AblationScreen" in out.stdout
    assert "HEAVY=\n" in out.stdout, out.stdout


TUI_CONTRACT = """
[tool.importlinter]
root_packages = ["mmtui", "commands"]
include_external_packages = true

[[tool.importlinter.contracts]]
name = "The TUI never imports torch, transformers or timm itself (the model loads in workers, through the core)"
type = "forbidden"
source_modules = ["mmtui.tui"]
forbidden_modules = ["torch", "transformers", "timm", "torchvision"]
allow_indirect_imports = true
"""


def test_tui_import_contract(tmp_path: Path) -> None:
    """The static half of the guard (the subprocess test above is the run-time half): no module of mmtui.tui
    imports a heavy package itself, not even inside a function; the workers reach the model through the core."""
    lint = Path(sys.executable).parent / "lint-imports"
    if not lint.exists():
        pytest.skip("import-linter not installed")
    config = tmp_path / "tui-contract.toml"
    config.write_text(TUI_CONTRACT)
    out = subprocess.run([str(lint), "--config", str(config)], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 kept, 0 broken" in out.stdout


# -- the command ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["browse"], "mmtui browse needs a terminal"),
        (["browse", "--graphics", "sixels"], "'sixels' is not one of 'auto', 'pixels', 'halfblock'"),
    ],
)
def test_browse_command_errors(args: list[str], message: str) -> None:
    """Outside a terminal (a pipe, a script) or with a bad option: one line on stderr, exit 2, no UI."""
    from typer.testing import CliRunner

    from commands import app

    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert message in " ".join(result.output.replace("\u2502", " ").split())  # the lines of rich's error panel
