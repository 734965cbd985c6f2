"""Visual specificity: COCO masks by hand, category matching, IoU rows stored on the tiny stack, the command."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import INSTANCES
from typer.testing import CliRunner

from commands import app
from commands._app import ExitCode
from mmtui.experiments.specificity import (
    CocoInstances,
    SpecificityError,
    _rle_counts,
    annotation_mask,
    category_mask,
    choose_category,
    match_category,
    random_units,
    score_images,
    summarize,
    top_units,
)
from mmtui.store import experiments as xs

runner = CliRunner()


def _rle_string(counts: list[int]) -> str:
    """COCO's compressed RLE string (maskApi rleToString), written out here to test the decoder."""
    out = []
    for i, x in enumerate(counts):
        if i > 2:
            x -= counts[i - 2]
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = (x != -1) if (c & 0x10) else (x != 0)
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return "".join(out)


def test_polygon_and_rle_masks_by_hand():
    square = {"segmentation": [[2, 1, 5, 1, 5, 3, 2, 3]]}  # x 2..5, y 1..3 inclusive in PIL's polygon fill
    mask = annotation_mask(square, 6, 8)
    assert mask.shape == (6, 8) and mask.sum() == 4 * 3 and mask[1:4, 2:6].all()
    # column-major runs: 3 zeros, 2 ones, rest zeros, on a 3 x 2 image -> (0,1) and (1,1) are set
    rle = {"segmentation": {"size": [3, 2], "counts": [3, 2, 1]}}
    assert annotation_mask(rle, 3, 2).tolist() == [[False, True], [False, True], [False, False]]
    counts = [5, 3, 40, 7, 1, 200, 2]
    assert _rle_counts(_rle_string(counts)) == counts
    both = category_mask([square, {"segmentation": [[0, 0, 1, 0, 1, 1, 0, 1]]}], 6, 8)
    assert both.sum() == 12 + 4


def test_category_matching():
    assert match_category("dog", ["person", "dog"]) == "dog"
    assert match_category("dogs", ["dog"]) == "dog"
    assert match_category("men", ["bench", "person"]) == "person"
    assert match_category("table", ["dining table"]) == "dining table"
    assert match_category("cloud", ["person"]) is None
    anns = {"person": [{"area": 10.0}], "kite": [{"area": 50.0}, {"area": 5.0}]}
    assert choose_category("woman", anns) == ("person", "target")
    assert choose_category("sky", anns) == ("kite", "largest")
    assert choose_category("sky", anns, "target") is None
    with pytest.raises(SpecificityError):
        choose_category("sky", anns, "nearest")


def test_instances_file_errors(tmp_path):
    with pytest.raises(SpecificityError, match="instance file not found"):
        CocoInstances.load(tmp_path / "none.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": []}')
    with pytest.raises(SpecificityError, match="not a COCO instances file"):
        CocoInstances.load(bad)


def test_random_units_same_layers_distinct_seeded():
    units = [(0, 1), (1, 2), (1, 3)]
    a = random_units(units, 64, seed=0, result_id=1)
    assert [u[0] for u in a] == [0, 1, 1] and not set(a) & set(units) and len(set(a)) == 3
    assert a == random_units(units, 64, seed=0, result_id=1) != random_units(units, 64, seed=1, result_id=1)


def test_score_images_rows_are_stored_and_deterministic(tiny_stack, store_run):
    if not INSTANCES.is_file():
        pytest.skip(f"needs {INSTANCES}")
    store, run = store_run
    coco = CocoInstances.load(INSTANCES)
    skipped = []
    first = list(score_images(tiny_stack, store, run, coco, n_units=3, seeds=2, on_skip=lambda *a: skipped.append(a)))
    assert len(first) + len(skipped) == 4 and first
    for item in first:
        kinds = [r["kind"] for r in item.rows]
        assert kinds.count("top") == 3 and kinds.count("random") == 6
        assert kinds.count("top-mean") == 1 and kinds.count("random-mean") == 2
        assert all(0.0 <= r["iou"] <= 1.0 for r in item.rows)
        assert [(r["layer"], r["unit"]) for r in item.rows if r["kind"] == "top"] == top_units(store, item.result_id, 3)
    stored = xs.specificity_rows(store, run.id)
    assert len(stored) == sum(len(i.rows) for i in first)
    row = xs.result_rows(store, run.id, [first[0].result_id])[0]
    units = top_units(store, row["id"], 3)
    maps = xs.get_activation_maps(store, run.stack.id, row["image_sha256"], "post", units)
    assert set(maps) == set(units) and all(m.shape == (4, 4) for m in maps.values())
    again = list(score_images(tiny_stack, store, run, coco, n_units=3, seeds=2))
    assert [r["iou"] for i in again for r in i.rows] == [r["iou"] for i in first for r in i.rows]
    summary = summarize([r for i in first for r in i.rows])
    assert summary["n_categories"] == len(summary["categories"]) and 0 <= summary["wins"] <= summary["n_categories"]
    assert {"top", "random", "top_mean", "random_mean", "diff", "diff_lo", "diff_hi", "n_images"} <= summary[
        "overall"
    ].keys()


def test_summarize_by_hand():
    rows = [
        {"result_id": 1, "category": "dog", "kind": "top", "iou": 0.4},
        {"result_id": 1, "category": "dog", "kind": "top", "iou": 0.2},  # image 1: 0.3
        {"result_id": 1, "category": "dog", "kind": "random", "iou": 0.1},
        {"result_id": 2, "category": "dog", "kind": "top", "iou": 0.5},
        {"result_id": 2, "category": "dog", "kind": "random", "iou": 0.3},
        {"result_id": 3, "category": "cat", "kind": "top", "iou": 0.1},
        {"result_id": 3, "category": "cat", "kind": "random", "iou": 0.2},
    ]
    s = summarize(rows)
    dog = next(c for c in s["categories"] if c["category"] == "dog")
    assert dog["top"] == pytest.approx(0.4) and dog["random"] == pytest.approx(0.2) and dog["n_images"] == 2
    assert dog["diff"] == pytest.approx(0.2)
    assert s["wins"] == 1 and s["n_categories"] == 2
    assert s["overall"]["top"] == pytest.approx((0.3 + 0.5 + 0.1) / 3)


def test_specificity_command(attributed_db, tmp_path):
    if not INSTANCES.is_file():
        pytest.skip(f"needs {INSTANCES}")
    args = ["--device", "cpu", "--db", str(attributed_db)]
    result = runner.invoke(
        app, ["specificity", "--instances", str(INSTANCES), "--units", "2", "--seeds", "1", "--json", *args]
    )
    assert result.exit_code == ExitCode.OK, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert {r["type"] for r in lines} == {"iou", "category", "overall"}
    iou_row = next(r for r in lines if r["type"] == "iou")
    assert {"image", "category", "kind", "layer", "unit", "iou", "seed"} <= iou_row.keys()
    table = runner.invoke(app, ["specificity", "--instances", str(INSTANCES), "--units", "2", "--seeds", "1", *args])
    assert table.exit_code == 0 and "IoU of receptive fields" in table.stdout
    missing = runner.invoke(app, ["specificity", "--instances", str(tmp_path / "x.json"), *args])
    assert missing.exit_code == ExitCode.FAILED and "instance file not found" in missing.stderr
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    none = runner.invoke(app, ["specificity", "--instances", str(empty), *args])
    assert none.exit_code == ExitCode.FAILED and "no image of the run could be scored" in none.stderr
    no_store = runner.invoke(app, ["specificity", "--instances", str(INSTANCES), "--db", str(tmp_path / "no.db")])
    assert no_store.exit_code == ExitCode.FAILED and "no cache at" in no_store.stderr
    assert np.isfinite([r["iou"] for r in lines if r["type"] == "iou"]).all()
