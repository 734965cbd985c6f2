"""The browser's screens on a small synthetic store (no model: written with Store.add_result + numpy, fixed
timestamps and image paths, so the snapshots are the same on every machine), the store-problem screens,
and the import hygiene of the browse path.

Snapshots: tests/__snapshots__/test_tui_screens/*.svg; after a deliberate change of a screen, look at the
new pictures and accept them with `pytest tests/test_tui_screens.py --snapshot-update`.
"""

from __future__ import annotations

import re
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import settle
from test_tui_queries import COCO, build_synthetic_store
from textual.pilot import Pilot

from mmtui.store import Store
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


# -- snapshots -------------------------------------------------------------------------------------------------
def test_snapshot_neuron_table(snap_compare, synthetic_db: Path) -> None:
    assert snap_compare(make_app(synthetic_db, graphics="halfblock"), run_before=settle, terminal_size=SIZE)


def test_snapshot_layer_sorted_filtered(snap_compare, synthetic_db: Path) -> None:
    async def run_before(pilot: Pilot) -> None:
        await settle(pilot)
        await pilot.press("shift+tab", "down", "down", "tab")  # layer 1
        await pilot.press("5")  # sort by top-100 count
        await pilot.press("slash", *"~ra")
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


@pytest.mark.anyio
async def test_quick_starts_and_quits_never_crash(synthetic_db: Path) -> None:
    """Open, wait for the table, quit at once: screens replaced or torn down while their widgets
    still mount must not raise (five times over). A smoke test of a race: a script doing this crashed in two of three runs on a
    loaded machine while the opening screen had a Header; this test did not reproduce that every time."""
    for start in range(1, 6):
        app = make_app(synthetic_db, graphics="halfblock")
        async with app.run_test(size=SIZE) as pilot:  # re-raises anything the app raised
            deadline = time.monotonic() + 60
            while not (isinstance(app.screen, BrowseScreen) and app.screen.shown is not None):
                assert time.monotonic() < deadline, f"start {start}: no neuron table after 60 s"
                await pilot.pause(0.001)
            assert app.screen.shown.rows, f"start {start}: the neuron table's first page is empty"
            await pilot.press("q")
        assert app.return_code == 0, f"start {start}: quit with exit code {app.return_code}"


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
        assert app.screen.run.prompt == app.runs[1].prompt
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


def _help_keys(keys: list[tuple[str, str]]) -> set[str]:
    """The keys a help section names: "s, S" is s and S, "1 ... 7" is 1 to 7, "g" is g."""
    found: set[str] = set()
    for listed, _ in keys:
        words = [w for w in re.split(r"[ ,]+", listed) if w]
        for i, word in enumerate(words):
            if word == "..." and words[i - 1].isdigit() and words[i + 1].isdigit():
                found.update(str(n) for n in range(int(words[i - 1]), int(words[i + 1]) + 1))
            else:
                found.add(word)
    return found


def test_help_lists_every_screen_binding() -> None:
    """Each key a screen (or the app) binds is in the help: in that screen's section, or under Everywhere."""
    from textual.binding import Binding

    from mmtui.tui.app import BrowseApp
    from mmtui.tui.screens.ablation import AblationScreen
    from mmtui.tui.screens.help import KEYS
    from mmtui.tui.screens.image import ImageScreen
    from mmtui.tui.screens.images import ImagesScreen
    from mmtui.tui.screens.neuron import NeuronScreen
    from mmtui.tui.screens.steer import SteerScreen

    sections = dict(KEYS)
    everywhere = _help_keys(sections["Everywhere"])
    owners = {
        "Everywhere": BrowseApp,
        "Layers and neurons": BrowseScreen,
        "A neuron": NeuronScreen,
        "An image": ImageScreen,
        "The run's images": ImagesScreen,
        "Ablation": AblationScreen,
        "Steering": SteerScreen,
    }
    assert set(owners) == set(sections), "a help section without a screen, or a screen without a section"
    missing = []
    for section, owner in owners.items():
        listed = _help_keys(sections[section]) | everywhere
        for binding in owner.BINDINGS:
            assert isinstance(binding, Binding)
            for key in binding.key.split(","):
                shown = {"slash": "/", "question_mark": "?"}.get(key.strip(), key.strip())
                if shown not in listed:
                    missing.append(f"{section}: {shown} ({binding.description})")
    assert not missing, "keys bound but not in the help: " + "; ".join(missing)


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


# -- issue 19 item 13: the ablation form's checkbox, `r` on one run, nothing cut off at 80 x 24 --------------------
@pytest.mark.anyio
async def test_regenerate_box_off_looks_empty_and_r_on_one_run_says_so(synthetic_db: Path) -> None:
    from mmtui.tui.screens.ablation import AblationScreen, Tick

    app = make_app(synthetic_db, graphics="halfblock")
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        said: list[str] = []
        app.screen.notify = lambda message, **kwargs: said.append(str(message))  # type: ignore[method-assign]
        await pilot.press("r")
        await pilot.pause()
        assert isinstance(app.screen, BrowseScreen)
        assert any("one run" in m for m in said), said
        await pilot.press("a")
        await settle(pilot)
        screen = app.screen
        assert isinstance(screen, AblationScreen)
        box = screen.query_one("#captions", Tick)
        assert box.value is False and "X" not in box._button.plain  # off by default, and it looks off
        box.value = True
        assert "X" in box._button.plain
        for button in ("#start", "#cancel"):  # the form's last row fits 80 columns
            region = screen.query_one(button).region
            assert region.right <= 80 and region.width > 0, (button, region)
        await pilot.press("escape", "q")
