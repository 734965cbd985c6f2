"""Issue 19 item 9: one run holding several target modes (`--target dog`, `--captions`, the caption's noun) says
so in every count: "N results on M images, K target modes", with the mode as a column and a filter."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import CAPTIONS, coco_files, settle
from typer.testing import CliRunner

from mmtui.run.pipeline import attribute_images, read_captions
from mmtui.store import Store, target_mode

N = 2


@pytest.fixture
def mixed_db(tmp_path: Path, tiny_stack) -> Path:
    """A cache with one run of N photos attributed three ways: auto, --target dog, --captions."""
    files = coco_files(N)
    path = tmp_path / "mixed.db"
    with Store.open(path) as store:
        list(attribute_images(tiny_stack, store, files, keep=50))
        list(attribute_images(tiny_stack, store, files, target="dog", keep=50))
        if CAPTIONS.is_file():
            list(attribute_images(tiny_stack, store, files, captions=read_captions(CAPTIONS), keep=50))
    return path


def _modes(path: Path) -> int:
    return 3 if CAPTIONS.is_file() else 2


def test_target_mode_of_a_spec() -> None:
    assert target_mode("auto") == "auto"
    assert target_mode("word:dog") == "word:dog"
    assert target_mode("human:giraffe") == "human"


def test_run_counts_results_images_and_modes(mixed_db: Path) -> None:
    k = _modes(mixed_db)
    with Store.open(mixed_db, create=False) as store:
        [run] = store.runs()
        assert (run.n_results, run.n_images, run.n_modes) == (k * N, N, k)
        assert run.counts == f"{k * N} results on {N} images, {k} target modes"
        modes = store.target_modes(run.id)
        assert modes["auto"] == N and modes["word:dog"] == N and sum(modes.values()) == k * N
        assert {r["target_mode"] for r in store.results(run.id)} == set(modes)


def test_one_mode_reads_as_images(tmp_path: Path, tiny_stack) -> None:
    with Store.open(tmp_path / "one.db") as store:
        list(attribute_images(tiny_stack, store, coco_files(N), keep=50))
        assert store.run().counts == f"{N} images"


def test_cli_runs_and_neurons_say_the_counts(mixed_db: Path) -> None:
    from commands import app

    k = _modes(mixed_db)
    runner = CliRunner()
    shown = runner.invoke(app, ["runs", "--db", str(mixed_db), "--json"])
    assert shown.exit_code == 0, shown.output
    [row] = [json.loads(line) for line in shown.stdout.splitlines()]
    assert row["n_target_modes"] == k and row["target_modes"]["word:dog"] == N
    table = runner.invoke(app, ["runs", "--db", str(mixed_db)], env={"COLUMNS": "250"})
    assert "word:dog 2" in table.stdout and "target modes" in table.stdout
    neurons = runner.invoke(app, ["neurons", "--db", str(mixed_db), "--limit", "3"], env={"COLUMNS": "200"})
    assert neurons.exit_code == 0, neurons.output
    assert f"{k * N} results on {N} images, {k} target modes" in re.sub(r"\s+", " ", neurons.stdout)


@pytest.mark.anyio
async def test_tui_images_screen_has_the_mode_column_and_filter(mixed_db: Path) -> None:
    from textual.widgets import DataTable

    from mmtui.tui import make_app
    from mmtui.tui.screens.images import ImagesScreen
    from mmtui.tui.widgets.title import TitleBar

    k = _modes(mixed_db)
    app = make_app(mixed_db, graphics="halfblock")
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot)
        assert f"{k * N} results on {N} images, {k} target modes" in str(app.screen.query_one(TitleBar).content)
        await pilot.press("i")
        await settle(pilot)
        screen = app.screen
        assert isinstance(screen, ImagesScreen)
        table = screen.query_one("#images", DataTable)
        assert table.row_count == k * N
        assert {str(table.get_row_at(i)[1]) for i in range(table.row_count)} >= {"auto", "word:dog"}
        await pilot.press("m")
        await settle(pilot)
        assert table.row_count == N
        assert f"target mode {screen.mode}: {N} results on {N} images" in str(screen.query_one(TitleBar).content)
        await pilot.press("q")
