"""The browser driven through the Pilot on a store the tiny stack attributed (3 COCO photos): layers, sort,
filter, go to a neuron, open a neuron and an image, draw a heatmap, run an ablation to the end and cancel one.

Assertions are on the typed messages the workers post (NeuronsLoaded, HeatmapComputed, AblationFinished, ...)
and on what the store holds afterwards.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest
from conftest import settle
from textual.message import Message
from textual.pilot import Pilot
from textual.widgets import DataTable, Input

from mmtui.store import Store, prevalence, queries
from mmtui.tui import make_app
from mmtui.tui.messages import (
    AblationFinished,
    AblationProgressed,
    AblationStarted,
    HeatmapComputed,
    ImageSummaryLoaded,
    LayersLoaded,
    NeuronDetailLoaded,
    NeuronsCounted,
    NeuronsLoaded,
    PictureLoaded,
)
from mmtui.tui.screens.ablation import AblationScreen
from mmtui.tui.screens.browse import BrowseScreen
from mmtui.tui.screens.image import ImageScreen
from mmtui.tui.screens.neuron import NeuronScreen
from mmtui.tui.widgets.layers import LayerBars
from mmtui.tui.widgets.neuron_table import NeuronTable

SIZE = (140, 40)
QUERY_KEYS = ("layer", "unit", "max_score", "mean_score", "n_top", "n_images", "text", "interpretable", "tokens")


class Recorder:
    """The message hook: every message the app dispatched, once each (a bubbling message is dispatched at
    every node it passes), by type."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.seen: set[int] = set()

    def __call__(self, message: Message) -> None:
        if id(message) not in self.seen:
            self.seen.add(id(message))
            self.messages.append(message)

    def of(self, kind: type) -> list:
        return [m for m in self.messages if isinstance(m, kind)]

    def last(self, kind: type):
        found = self.of(kind)
        assert found, f"no {kind.__name__} yet"
        return found[-1]

    async def wait_for(self, pilot: Pilot, kind: type, count: int = 1, timeout: float = 60) -> None:
        for _ in range(int(timeout / 0.05)):
            if len(self.of(kind)) >= count:
                return
            await pilot.pause(0.05)
        raise AssertionError(f"timed out waiting for {kind.__name__}")


def open_store(db: Path) -> tuple[Store, dict]:
    store = Store.open(db, create=False)
    return store, store.run()


def plain(rows: list[dict]) -> list[dict]:
    """The table's rows as queries.neuron_page gives them (the browser adds prevalence, generic and label)."""
    return [{k: r[k] for k in QUERY_KEYS} for r in rows]


def check_sorted(rows: list[dict], key: str, descending: bool) -> None:
    values = [r[key] for r in rows]
    assert values == sorted(values, reverse=descending), values[:10]


# -- layers, sort, filter ------------------------------------------------------------------------------------
@pytest.mark.anyio
async def test_opens_on_all_neurons_best_first(db: Path) -> None:
    hook = Recorder()
    app = make_app(db, graphics="halfblock", page=1000)
    async with app.run_test(size=SIZE, message_hook=hook) as pilot:
        await hook.wait_for(pilot, NeuronsLoaded)
        await hook.wait_for(pilot, LayersLoaded)
        loaded = hook.last(NeuronsLoaded)
        store, run = open_store(db)
        with store:
            expected = queries.neuron_page(store, run, limit=1000)
            counts = queries.layer_counts(store, run)
            n = prevalence.run_size(store, run)
        assert isinstance(app.screen, BrowseScreen)
        assert loaded.query.sort == "max" and loaded.query.descending
        assert plain(loaded.rows) == expected
        assert all(r["prevalence"] == r["n_top"] / n and r["label"] is None for r in loaded.rows)  # no labels here
        assert loaded.total == len(expected)  # all on one page: no separate count
        check_sorted(loaded.rows, "max_score", descending=True)
        table = app.screen.query_one(NeuronTable)
        assert table.row_count == len(expected)
        assert hook.last(LayersLoaded).counts == counts
        assert sum(c["n_top_units"] for c in counts) > 0


@pytest.mark.anyio
async def test_a_long_table_shows_its_first_page_then_the_count(db: Path) -> None:
    hook = Recorder()
    app = make_app(db, graphics="halfblock", page=20)
    async with app.run_test(size=SIZE, message_hook=hook) as pilot:
        await hook.wait_for(pilot, NeuronsCounted)
        loaded, counted = hook.last(NeuronsLoaded), hook.last(NeuronsCounted)
        store, run = open_store(db)
        with store:
            stored_units = store.db.execute("SELECT count(*) FROM neuron_stats").fetchone()[0]
            everything = queries.neuron_page(store, run, limit=1000)
        assert len(loaded.rows) == 20 and loaded.total is None
        assert counted.query == loaded.query and counted.total == stored_units
        await settle(pilot)
        table = app.screen.query_one(NeuronTable)
        status = str(app.screen.query_one("#status").render())
        assert f"{stored_units:,} neurons ({table.row_count} loaded)" in status
        while table.row_count < stored_units:  # the cursor near the end loads the next page
            rows = table.row_count
            await pilot.press("end")
            await settle(pilot)
            assert table.row_count > rows
        assert plain(table.rows_shown) == everything
        assert [m.offset for m in hook.of(NeuronsLoaded)] == list(range(0, stored_units, 20))


@pytest.mark.anyio
async def test_layers_pane_filters_the_table(db: Path) -> None:
    hook = Recorder()
    app = make_app(db, graphics="halfblock")
    async with app.run_test(size=SIZE, message_hook=hook) as pilot:
        await hook.wait_for(pilot, LayersLoaded)
        await settle(pilot)
        app.screen.query_one(LayerBars).focus()
        for layer in (0, 1):
            before = len(hook.of(NeuronsLoaded))
            await pilot.press("down")
            await hook.wait_for(pilot, NeuronsLoaded, before + 1)
            loaded = hook.last(NeuronsLoaded)
            assert loaded.query.layer == layer
            assert loaded.rows and {r["layer"] for r in loaded.rows} == {layer}
        await pilot.press("home")  # "all layers"
        await settle(pilot)
        assert hook.last(NeuronsLoaded).query.layer is None
        assert {r["layer"] for r in hook.last(NeuronsLoaded).rows} == {0, 1}


@pytest.mark.anyio
async def test_sort_by_keys_and_by_clicking_a_header(db: Path) -> None:
    hook = Recorder()
    app = make_app(db, graphics="halfblock")
    async with app.run_test(size=SIZE, message_hook=hook) as pilot:
        await settle(pilot)
        await pilot.press("s")  # next column after max: mean, best first
        await settle(pilot)
        loaded = hook.last(NeuronsLoaded)
        assert (loaded.query.sort, loaded.query.descending) == ("mean", True)
        check_sorted(loaded.rows, "mean_score", descending=True)
        await pilot.press("1")  # layer, ascending
        await settle(pilot)
        loaded = hook.last(NeuronsLoaded)
        assert (loaded.query.sort, loaded.query.descending) == ("layer", False)
        assert [(r["layer"], r["unit"]) for r in loaded.rows] == sorted((r["layer"], r["unit"]) for r in loaded.rows)
        await pilot.press("1")  # again: reversed
        await settle(pilot)
        assert hook.last(NeuronsLoaded).query.descending
        check_sorted(hook.last(NeuronsLoaded).rows, "layer", descending=True)
        table = app.screen.query_one(NeuronTable)
        x = 1 + sum(c.get_render_width(table) for c in table.ordered_columns[:4])  # the 5th column: top-100
        await pilot.click(NeuronTable, offset=(x + 2, 0))
        await settle(pilot)
        loaded = hook.last(NeuronsLoaded)
        assert (loaded.query.sort, loaded.query.descending) == ("top", True)
        check_sorted(loaded.rows, "n_top", descending=True)
        assert "top-100▼" in str(table.columns["top"].label)


@pytest.mark.anyio
async def test_filter_by_token_text(db: Path) -> None:
    store, run = open_store(db)
    with store:
        texts = [r[0] for r in store.db.execute("SELECT text FROM neuron_tokens JOIN neuron_stats USING (layer, unit)")]
        words = sorted({w for text in texts for w in text.split(", ") if w.isalpha() and len(w) >= 3})
        word = words[len(words) // 2]
        expected = queries.neuron_page(store, run, token=word, limit=1000)
        contained = queries.neuron_page(store, run, token=word[1:], contains=True, limit=1000)
        total = queries.count_neurons(store, run)
    assert 0 < len(expected) < total
    hook = Recorder()
    app = make_app(db, graphics="halfblock")
    async with app.run_test(size=SIZE, message_hook=hook) as pilot:
        await settle(pilot)
        await pilot.press("slash", *word)
        await settle(pilot)
        loaded = hook.last(NeuronsLoaded)
        assert loaded.query.token == word
        assert plain(loaded.rows) == expected and loaded.total == len(expected)
        assert all(word.lower() in r["text"].lower() for r in loaded.rows)
        await pilot.press("enter")  # keep the filter, back to the table
        assert isinstance(app.focused, NeuronTable)
        await pilot.press("escape")  # clear it
        await settle(pilot)
        assert hook.last(NeuronsLoaded).query.token == ""
        assert hook.last(NeuronsCounted).total == total
        assert not app.screen.query_one("#filter", Input).display
        await pilot.press("slash", "~", *word[1:])  # the prefix ~: tokens containing the text
        await settle(pilot)
        loaded = hook.last(NeuronsLoaded)
        assert plain(loaded.rows) == contained and len(contained) >= len(expected)


@pytest.mark.anyio
async def test_go_to_a_neuron(db: Path) -> None:
    hook = Recorder()
    app = make_app(db, graphics="halfblock")
    async with app.run_test(size=SIZE, message_hook=hook) as pilot:
        await settle(pilot)
        await pilot.press("g", *"L9.u3", "enter")  # the tiny stack has 2 layers
        await settle(pilot)
        assert "no L9.u3" in str(app.screen.query_one("#jump-error").render())
        await pilot.press(*["backspace"] * 5, *"1.3", "enter")
        await hook.wait_for(pilot, NeuronDetailLoaded)
        assert isinstance(app.screen, NeuronScreen)
        detail = hook.last(NeuronDetailLoaded).detail
        assert (detail["layer"], detail["unit"]) == (1, 3)
        assert app.screen.query_one("#tokens", DataTable).row_count == 10


# -- a neuron, an image, a heatmap ------------------------------------------------------------------------------
@pytest.mark.anyio
async def test_open_a_neuron_then_its_best_image(db: Path) -> None:
    hook = Recorder()
    app = make_app(db, graphics="halfblock")
    async with app.run_test(size=SIZE, message_hook=hook) as pilot:
        await settle(pilot)
        best = hook.last(NeuronsLoaded).rows[0]
        await pilot.press("enter")
        await hook.wait_for(pilot, NeuronDetailLoaded)
        await hook.wait_for(pilot, PictureLoaded)
        detail = hook.last(NeuronDetailLoaded).detail
        assert (detail["layer"], detail["unit"]) == (best["layer"], best["unit"])
        assert detail["stats"]["max_score"] == pytest.approx(best["max_score"])
        assert detail["images"][0]["score"] == pytest.approx(best["max_score"])
        assert app.screen.query_one("#top-images", DataTable).row_count == len(detail["images"])
        picture = hook.last(PictureLoaded)
        assert picture.result_id == detail["images"][0]["result_id"] and picture.picture is not None
        await pilot.press("enter")  # open the highlighted (best) image
        await hook.wait_for(pilot, ImageSummaryLoaded)
        assert isinstance(app.screen, ImageScreen)
        summary = hook.last(ImageSummaryLoaded).summary
        store, _ = open_store(db)
        with store:
            stored = store.top_triples(detail["images"][0]["result_id"], 100)
        assert [(t["layer"], t["unit"], t["patch"]) for t in summary["top"]] == [
            (t["layer"], t["unit"], t["patch"]) for t in stored
        ]
        assert app.screen.query_one("#image-neurons", DataTable).row_count == len(stored)
        info = str(app.screen.query_one("#image-info").render())
        assert summary["target"] in info and f"{summary['p_target']:.4f}" in info
        await pilot.press("escape", "escape")
        assert isinstance(app.screen, BrowseScreen)


@pytest.mark.anyio
async def test_heatmap_is_the_units_activations_over_the_image(db: Path, tiny_stack) -> None:
    from mmtui.experiments.heatmap import unit_activation_maps
    from mmtui.run.images import load_image

    hook = Recorder()
    app = make_app(db, graphics="halfblock", device="cpu")
    async with app.run_test(size=SIZE, message_hook=hook) as pilot:
        await settle(pilot)
        await pilot.press("enter")
        await hook.wait_for(pilot, PictureLoaded)
        await pilot.press("h")
        await hook.wait_for(pilot, HeatmapComputed, timeout=90)
        computed = hook.last(HeatmapComputed)
        detail = hook.last(NeuronDetailLoaded).detail
        image = detail["images"][0]
        assert (computed.result_id, computed.layer, computed.unit) == (
            image["result_id"],
            detail["layer"],
            detail["unit"],
        )
        expected = unit_activation_maps(tiny_stack, load_image(image["image"]).image, [(computed.layer, computed.unit)])
        assert computed.grid == tuple(tiny_stack.grid)
        assert computed.peak == pytest.approx(float(expected[0].max()), rel=1e-4, abs=1e-6)
        assert "Heatmap" in app.screen.query_one("#heatmap-pane").border_title
        assert np.asarray(computed.picture).shape[2] == 3


# -- ablation -----------------------------------------------------------------------------------------------
async def _open_ablation(pilot: Pilot, hook: Recorder) -> None:
    await settle(pilot)
    await pilot.press("i")
    await settle(pilot)
    await pilot.press("enter")
    await hook.wait_for(pilot, ImageSummaryLoaded)
    await pilot.press("a")
    await settle(pilot)
    assert isinstance(pilot.app.screen, AblationScreen)


async def _set(pilot: Pilot, selector: str, value: str) -> None:
    box = pilot.app.screen.query_one(selector, Input)
    box.value = value
    await pilot.pause()


def _stored_points(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT count(*) FROM ablation_points").fetchone()[0]


@pytest.mark.anyio
async def test_ablation_runs_to_completion_and_stores_its_points(db: Path) -> None:
    hook = Recorder()
    app = make_app(db, graphics="halfblock", device="cpu")
    async with app.run_test(size=SIZE, message_hook=hook) as pilot:
        await _open_ablation(pilot, hook)
        await _set(pilot, "#ks", "0, 50, 200")
        await _set(pilot, "#seeds", "2")
        await pilot.press("ctrl+r")
        await hook.wait_for(pilot, AblationFinished, timeout=90)
        await settle(pilot)
        finished = hook.last(AblationFinished)
        started = hook.last(AblationStarted)
        assert not finished.cancelled
        assert len(finished.points) == started.total == len(hook.of(AblationProgressed))
        assert {p.k for p in finished.points} == {0, 50, 200}
        assert {p.condition for p in finished.points} >= {"top", "random"}
        assert {p.seed for p in finished.points if p.condition == "random"} == {0, 1}
        top_zero = [p for p in finished.points if p.k == 0]
        assert all(p.p_after == pytest.approx(p.p_before) for p in top_zero)
        assert app.screen.query_one("#summary", DataTable).row_count == len(finished.summary)
        assert "Done" in str(app.screen.query_one("#ablation-status").render())
    assert _stored_points(db) == len(finished.points)


@pytest.mark.anyio
async def test_ablation_can_be_cancelled_and_keeps_its_points(db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a cancel lands between forward passes; an image's settings now share one pass where memory allows, so
    # passes of 16 rows (a GPT-J-sized stack's) keep the cancel inside the run on the fast tiny stack
    monkeypatch.setattr("mmtui.experiments.ablation.ablation_batch_rows", lambda stack, n_rows: min(n_rows, 16))
    hook = Recorder()
    app = make_app(db, graphics="halfblock", device="cpu")
    async with app.run_test(size=SIZE, message_hook=hook) as pilot:
        await settle(pilot)
        await pilot.press("a")  # from the neuron table: the run's first images (all 3 here)
        await settle(pilot)
        assert app.screen.query_one("#n-images", Input).value == "3"
        # enough work (~1,500 points in ~100 passes) that the cancel lands long before the end
        await _set(pilot, "#ks", ",".join(str(k) for k in range(0, 2048, 16)))
        await _set(pilot, "#seeds", "3")
        await pilot.press("ctrl+r")
        await hook.wait_for(pilot, AblationProgressed, timeout=90)
        await pilot.press("c")
        await hook.wait_for(pilot, AblationFinished, timeout=90)
        await settle(pilot)
        finished = hook.last(AblationFinished)
        total = hook.last(AblationStarted).total
        assert finished.cancelled
        assert 0 < len(finished.points) < total
        assert "Cancelled" in str(app.screen.query_one("#ablation-status").render())
        assert not app.screen.query_one("#ks", Input).disabled  # the form is usable again
    assert _stored_points(db) == len(finished.points)
