"""Integrated gradients on the tiny stack (mmtui.experiments.integrated): with one right-Riemann step IG is grad x
act, the stored score; completeness at enough steps; the agreement measures by hand; `explain --ig`."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from commands import app
from mmtui.experiments import integrated as ig
from mmtui.run.images import load_image
from mmtui.store import experiments as xs

runner = CliRunner()


def _first(store_run):
    store, run = store_run
    return store, run, xs.result_rows(store, run.id)[0]


def test_one_right_step_is_grad_x_act(tiny_stack, store_run):
    store, run, row = _first(store_run)
    found = ig.image_ig(tiny_stack, store, run, row["id"], top=12, steps=1, method="riemann_right")
    assert len(found.triples) == 12
    np.testing.assert_allclose(found.ig, found.grad_x_act, rtol=2e-3, atol=0)
    assert found.spearman == pytest.approx(1.0, abs=1e-6) and found.overlap == 1.0
    layer, unit, patch, score = store.triples(row["id"])  # the image's top triples are all in layer 0 here:
    for at in sorted(set(layer.tolist()) - {0})[:2]:  # the later layers' entries, one layer at a time
        mine = np.nonzero(layer == at)[0][:10]
        entries = np.stack([layer[mine], unit[mine], patch[mine]], axis=1)
        prefix = tiny_stack.encode([load_image(row["path"]).image])
        values, _ = ig.layer_ig(
            tiny_stack, prefix, row["context_ids"], row["target_token_id"], entries, steps=1, method="riemann_right"
        )
        np.testing.assert_allclose(values, score[mine], rtol=2e-3, atol=0)


def test_completeness(tiny_stack64, store_run):  # float64: y(x) - y(zeroed) is small beside y
    store, run, row = _first(store_run)
    coarse = ig.image_ig(tiny_stack64, store, run, row["id"], top=12, steps=1, method="riemann_right")
    fine = ig.image_ig(tiny_stack64, store, run, row["id"], top=12, steps=16)
    assert fine.completeness < 1e-6  # sum of IG = y(x) - y(entries zeroed), per layer
    assert fine.completeness < coarse.completeness  # and the 1-step (grad x act) sum misses it: the test can fail


def test_agreement_and_rules_by_hand():
    rho, overlap = ig.agreement(np.array([4.0, 3.0, 2.0, 1.0]), np.array([3.0, 4.0, 1.0, 2.0]), 2)
    assert rho == pytest.approx(0.6) and overlap == 1.0
    assert ig.agreement(np.array([3.0, 2.0, 1.0]), np.array([1.0, 2.0, 3.0]), 1) == (pytest.approx(-1.0), 0.0)
    expected = {"gausslegendre": 0.25, "riemann_right": sum(k**3 for k in range(1, 8)) / 7**4}  # x^3 on [0, 1]
    for method in ig.METHODS:
        alphas, weights = ig.nodes(method, 7)
        assert weights.sum() == pytest.approx(1.0) and ((alphas > 0) & (alphas <= 1)).all()
        assert (weights * alphas**3).sum() == pytest.approx(expected[method], rel=1e-12)
    with pytest.raises(ig.IntegratedError, match="rule"):
        ig.nodes("trapezoid", 4)


def test_explain_ig_command(attributed_db, monkeypatch):
    monkeypatch.setenv("MMTUI_DB", str(attributed_db))
    result = runner.invoke(
        app, ["explain", "--ig", "1", "--ig-top", "8", "--ig-steps", "4", "--device", "cpu", "--json"]
    )
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    images = [x for x in lines if x.get("type") == "ig"]
    assert len(images) == 1 and len(images[0]["ig"]) == 8 and -1 <= images[0]["spearman"] <= 1
    table = runner.invoke(app, ["explain", "--ig", "1", "--ig-top", "8", "--ig-steps", "2", "--device", "cpu"])
    assert table.exit_code == 0 and "Spearman" in table.stdout
