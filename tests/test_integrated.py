"""Integrated gradients on the tiny stack (mmtui.experiments.integrated): equal to Captum's IntegratedGradients on
the same entries; with one right-Riemann step IG is grad x act, the stored score; completeness at enough steps;
the agreement measures by hand; `explain --ig`."""

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
    fine = ig.image_ig(tiny_stack64, store, run, row["id"], top=12, steps=16, method="gausslegendre")
    assert fine.completeness < 1e-6  # sum of IG = y(x) - y(entries zeroed), per layer
    assert fine.completeness < coarse.completeness  # and the 1-step (grad x act) sum misses it: the test can fail


@pytest.mark.parametrize("method", ["gausslegendre", "riemann_trapezoid"])
def test_ig_equals_captums_integrated_gradients(tiny_stack64, store_run, method):
    """Captum's IntegratedGradients on a function of the chosen entries alone (the model run with a layer's
    chosen (unit, patch) activations set to z, baseline z = 0) gives mmtui's IG, in float64, for the top entries of
    layer 0 and for random entries of it (an entry of the last layer at an image position cannot reach y: its IG
    is 0). (Captum's LayerIntegratedGradients moves every entry of a layer's
    output from its value at a baseline input; IG on some of a layer's entries is IntegratedGradients on them.)
    Captum's riemann_trapezoid takes the same points but weights each step 1/n, not the rule's 1/(n - 1), so its
    sum is (n - 1)/n of ours: completeness fails there by a share 1/n whatever the steps."""
    import torch
    from captum.attr import IntegratedGradients

    store, run, row = _first(store_run)
    stack = tiny_stack64
    _, _, groups = _groups(store, row, stack)
    prefix = stack.encode([load_image(row["path"]).image])
    positions = stack.image_slice
    assert groups[0][0, 0] == groups[2][0, 0] == 0
    for entries in (groups[0], groups[2]):
        at = int(entries[0, 0])
        pos = torch.as_tensor(entries[:, 2], dtype=torch.long) + positions.start
        units = torch.as_tensor(entries[:, 1], dtype=torch.long)
        seen: list[torch.Tensor] = []

        def y_of(z: torch.Tensor | None, at=at, pos=pos, units=units, seen=seen) -> torch.Tensor:
            def hook(layer: int, act: torch.Tensor) -> torch.Tensor | None:
                if layer != at or act.shape[1] < positions.stop:
                    return None
                if z is None:  # the plain pass: read the entries' values
                    seen.append(act[0, pos, units].detach())
                    return None
                out = act.clone()
                out[:, pos, units] = z.to(act.dtype)
                return out

            rows = 1 if z is None else len(z)
            batch = prefix.expand(rows, -1, -1)
            return ig._forward_y(stack, batch, row["context_ids"], row["target_token_id"], run.y_kind, hook, run.site)

        y_of(None)
        a = seen[0][None]
        theirs = IntegratedGradients(y_of).attribute(a, baselines=torch.zeros_like(a), n_steps=9, method=method)
        ours, _ = ig.layer_ig(
            stack, prefix, row["context_ids"], row["target_token_id"], entries, y_kind=run.y_kind, site=run.site,
            steps=9, method=method,
        )  # fmt: skip
        scale = 9 / 8 if method == "riemann_trapezoid" else 1.0
        np.testing.assert_allclose(ours, scale * theirs[0].double().numpy(), rtol=1e-8, atol=1e-14)
        assert np.abs(ours).max() > 0


def test_agreement_and_rules_by_hand():
    rho, overlap = ig.agreement(np.array([4.0, 3.0, 2.0, 1.0]), np.array([3.0, 4.0, 1.0, 2.0]), 2)
    assert rho == pytest.approx(0.6) and overlap == 1.0
    assert ig.agreement(np.array([3.0, 2.0, 1.0]), np.array([1.0, 2.0, 3.0]), 1) == (pytest.approx(-1.0), 0.0)
    expected = {  # x^3 on [0, 1]
        "gausslegendre": 0.25,
        "riemann_right": sum(k**3 for k in range(1, 8)) / 7**4,
        "riemann_trapezoid": (sum(k**3 for k in range(7)) / 6**3 - 0.5) / 6,  # 7 points, 6 intervals
    }
    for method in ig.METHODS:
        alphas, weights = ig.nodes(method, 7)
        assert weights.sum() == pytest.approx(1.0) and ((alphas >= 0) & (alphas <= 1)).all()
        assert (weights * alphas**3).sum() == pytest.approx(expected[method], rel=1e-12)
    with pytest.raises(ig.IntegratedError, match="rule"):
        ig.nodes("trapezoid", 4)
    assert set(ig.nodes("riemann_trapezoid", 5)[0]) <= set(ig.nodes("riemann_trapezoid", 9)[0])  # they nest


def _groups(store, row, stack):
    """The image's first 12 triples (all in layer 0 here) and 4 entries of the last layer, and as many random
    triples of the same layers."""
    layer, unit, patch, _ = store.triples(row["id"])
    triples = np.stack([layer, unit, patch], axis=1)[:12].astype(np.int64)
    last = stack.n_layers - 1
    triples = np.concatenate([triples, [[last, u, p] for u, p in ((0, 0), (1, 3), (5, 2), (7, 1))]])
    control = ig.random_triples(triples, stack.d_mlp, stack.n_patches, seed=1)
    return triples, control, [t[t[:, 0] == at] for t in (triples, control) for at in sorted(set(t[:, 0].tolist()))]


def test_random_triples_match_layers_and_avoid_the_top():
    triples = np.array([[0, 1, 2], [0, 3, 4], [2, 5, 6]])
    control = ig.random_triples(triples, d_mlp=8, n_patches=8, seed=0)
    assert sorted(control[:, 0].tolist()) == [0, 0, 2]
    assert not {tuple(t) for t in control.tolist()} & {tuple(t) for t in triples.tolist()}
    assert len({tuple(t) for t in control.tolist()}) == 3
    assert (control == ig.random_triples(triples, d_mlp=8, n_patches=8, seed=0)).all()  # seeded


def test_batched_rows_equal_step_by_step(tiny_stack64, store_run):
    """All groups and alphas in chunks (here 40 rows per pass) give what one pass per row gives, in float64; the
    gradient at alpha = 1 times a is the stored grad x act, for the top triples of each layer."""
    store, run, row = _first(store_run)
    triples, _, groups = _groups(store, row, tiny_stack64)
    assert len(groups) >= 4  # two layers, top and random
    prefix = tiny_stack64.encode([load_image(row["path"]).image])
    args = (tiny_stack64, prefix, row["context_ids"], row["target_token_id"], groups)
    batched = ig.path_ig(*args, steps=[4, 6], chunk=40)
    single = ig.path_ig(*args, steps=[4, 6], chunk=1)
    for b, s in zip(batched, single, strict=True):
        for n in (4, 6):
            np.testing.assert_allclose(b.ig[n], s.ig[n], rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(b.grad_x_act, s.grad_x_act, rtol=1e-10, atol=1e-14)
        assert b.y == pytest.approx(s.y, rel=1e-12) and b.y_zero == pytest.approx(s.y_zero, rel=1e-12)
    alone = ig.path_ig(*args[:4], groups[:1], steps=4)[0]  # a group's result does not depend on the others
    np.testing.assert_allclose(alone.ig[4], batched[0].ig[4], rtol=1e-10)
    layer, unit, patch, score = store.triples(row["id"])
    stored = {(int(a), int(b), int(c)): float(s) for a, b, c, s in zip(layer, unit, patch, score, strict=True)}
    top_paths = batched[: len(set(triples[:, 0].tolist()))]
    assert top_paths[0].entries[0, 0] == 0 and all(tuple(t) in stored for t in top_paths[0].entries.tolist())
    want = [stored[tuple(t)] for t in top_paths[0].entries.tolist()]
    np.testing.assert_allclose(top_paths[0].grad_x_act, want, rtol=2e-3)  # the store holds float32 scores


def test_nested_sizes_share_passes_and_converge(tiny_stack64, store_run):
    store, run, row = _first(store_run)
    sizes = [3, 5, 9, 17]
    found = ig.image_ig_sizes(
        tiny_stack64, store, run, row["id"], top=12, sizes=sizes, method="riemann_trapezoid", control=True
    )
    assert [f.steps for f in found] == sizes
    gaps = [f.completeness for f in found]
    assert gaps[-1] < gaps[0] and gaps[-1] < 1e-3  # the trapezoid rule's error falls as h^2
    assert found[-1].control is not None and len(found[-1].control.triples) == 12
    assert found[-1].control.completeness < 1e-3  # completeness holds for the random entries too
    again = ig.image_ig(tiny_stack64, store, run, row["id"], top=12, steps=9, method="riemann_trapezoid")
    np.testing.assert_allclose(again.ig, found[2].ig, rtol=1e-10)  # alone, the same figures


def test_run_ig_checks_convergence_at_half_the_points(tiny_stack64, store_run):
    """The default rule (trapezoid) at 9 points also gives IG at 5 from the same passes: the check's gap and rho
    equal those of a separate 5-point run; without the check the IG is the same."""
    store, run, row = _first(store_run)
    assert ig.DEFAULT_METHOD == "riemann_trapezoid" and ig.check_size(9, ig.DEFAULT_METHOD) == 5
    assert ig.check_size(2, "riemann_trapezoid") is None and ig.check_size(16, "gausslegendre") == 8
    (found,) = ig.run_ig(tiny_stack64, store, run, n_images=1, top=12, steps=9)
    assert found.result_id == row["id"] and found.steps == 9 and found.check_steps == 5
    alone = ig.image_ig(tiny_stack64, store, run, row["id"], top=12, steps=5)
    assert found.check_gap == pytest.approx(alone.completeness, rel=1e-6)
    assert found.check_spearman == pytest.approx(ig.agreement(alone.ig, found.ig, found.k)[0])
    assert 0 <= found.completeness < found.check_gap  # more points, smaller gap
    (plain,) = ig.run_ig(tiny_stack64, store, run, n_images=1, top=12, steps=9, check=False)
    assert plain.check_steps is None and plain.check_gap is None
    np.testing.assert_allclose(plain.ig, found.ig, rtol=1e-10)
    summary = ig.summary([found])
    assert summary["check_steps"] == 5 and summary["median_check_gap"] == found.check_gap


def test_explain_ig_command(attributed_db, monkeypatch):
    monkeypatch.setenv("MMTUI_DB", str(attributed_db))
    result = runner.invoke(
        app, ["explain", "--ig", "1", "--ig-top", "8", "--ig-steps", "4", "--device", "cpu", "--json"]
    )
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    images = [x for x in lines if x.get("type") == "ig"]
    assert len(images) == 1 and len(images[0]["ig"]) == 8 and -1 <= images[0]["spearman"] <= 1
    assert images[0]["completeness_gap"] >= 0 and images[0]["y"] > 0
    assert images[0]["method"] == "riemann_trapezoid" and images[0]["steps"] == 4 and images[0]["check_steps"] == 2
    assert images[0]["check_gap"] >= 0 and -1 <= images[0]["check_spearman"] <= 1
    assert -1 <= images[0]["control_spearman"] <= 1 and 0 <= images[0]["control_overlap"] <= 1  # on by default
    (summary,) = [x for x in lines if x.get("type") == "ig-summary"]
    assert summary["worst_completeness_gap"] == images[0]["completeness_gap"]
    table = runner.invoke(app, ["explain", "--ig", "1", "--ig-top", "8", "--ig-steps", "2", "--device", "cpu"])
    assert table.exit_code == 0 and "Spearman's rho" in table.stdout and "random" in table.stdout
    assert "completeness" in table.stdout and "share of y" in table.stdout
    assert "gap at" not in table.stdout  # 2 points: no smaller size to check against
    gauss = ["explain", "--ig", "1", "--ig-top", "8", "--ig-steps", "4", "--ig-rule", "gausslegendre"]
    plain = runner.invoke(app, [*gauss, "--no-ig-control", "--device", "cpu", "--json"])
    assert plain.exit_code == 0, plain.output
    (row,) = [json.loads(line) for line in plain.stdout.splitlines() if '"type": "ig"' in line]
    assert row["method"] == "gausslegendre" and row["check_steps"] == 2 and row["control_spearman"] is None
    bad = runner.invoke(app, ["explain", "--ig", "1", "--ig-rule", "simpson"])
    assert bad.exit_code == 2 and "simpson" in bad.output
    args = ["explain", "--ig", "1", "--ig-top", "8", "--ig-steps", "4", "--device", "cpu"]
    for small, warned in ((0.0, True), (float("inf"), False)):  # the warning follows the gap and the bound
        monkeypatch.setattr(ig, "SMALL_GAP", small)
        assert ("1 of 1 image(s) have a completeness gap" in runner.invoke(app, args).output) == warned
