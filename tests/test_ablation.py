"""Ablation on the tiny stack: exactness of the hook, what it changes, selection, storage, summary, the command."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from commands import app
from commands._app import ExitCode
from mmtui.experiments.ablation import (
    AblationError,
    AblationPoint,
    ablation_hook,
    dose_response,
    generate_captions,
    select,
    summarize,
    target_probs,
    unit_means,
)
from mmtui.experiments.ablation_ops import AblationSet, masks_for
from mmtui.run.images import load_image
from mmtui.store import experiments as xs

runner = CliRunner()


def _prefix(stack, row):
    return stack.encode([load_image(row["path"]).image])


def test_empty_ablation_leaves_p_unchanged_exactly(tiny_stack, store_run):
    store, run = store_run
    row = xs.result_rows(store, run.id)[0]
    prefix = _prefix(tiny_stack, row)
    plain = target_probs(tiny_stack, prefix, row["context_ids"], row["target_token_id"])
    masks = [torch.zeros(1, tiny_stack.n_patches, tiny_stack.d_mlp, dtype=torch.bool)] * tiny_stack.n_layers
    hooked = target_probs(
        tiny_stack, prefix, row["context_ids"], row["target_token_id"], ablation_hook(masks, tiny_stack.image_slice)
    )
    assert torch.equal(plain, hooked)
    # the same probability attribution recorded, up to float32 batch noise
    assert float(plain[0]) == pytest.approx(row["p_target"], rel=1e-4)


def test_k0_point_is_the_unablated_pass(tiny_stack, store_run):
    store, run = store_run
    ids = [r["id"] for r in xs.result_rows(store, run.id)][:1]
    points = list(dose_response(tiny_stack, store, run, ids, [0], seeds=2, captions=False))
    assert {p.condition for p in points} == {"top", "interpretable", "random"}
    for p in points:
        assert p.p_after == p.p_before and p.relative_drop == 0.0 and p.n_ablated == 0


def test_zeroing_one_triple_changes_only_what_it_should(tiny_stack, store_run):
    """Against a manual forward with that one activation zeroed: same P; layer-0 activations differ only at the
    ablated (patch, unit); layer-1 activations before the patch are untouched (causal attention)."""
    store, run = store_run
    row = xs.result_rows(store, run.id)[0]
    prefix = _prefix(tiny_stack, row)
    layer, unit, patch = 0, 7, 5

    def manual(act_layer, act):
        if act_layer == layer and act.shape[1] >= tiny_stack.n_patches:
            act = act.clone()
            act[:, patch, unit] = 0.0
            return act
        return None

    def capture(store_to):
        def fn(act_layer, act):
            store_to[act_layer] = act.detach().clone()

        return fn

    cfg_entries = np.array([[layer, unit, patch]])
    masks = masks_for(
        [AblationSet(1, "top", None, cfg_entries)], tiny_stack.n_layers, tiny_stack.n_patches, tiny_stack.d_mlp, "cpu"
    )
    hook = ablation_hook(masks, tiny_stack.image_slice)
    ours = target_probs(tiny_stack, prefix, row["context_ids"], row["target_token_id"], hook)
    theirs = target_probs(tiny_stack, prefix, row["context_ids"], row["target_token_id"], manual)
    assert torch.equal(ours, theirs)

    base_acts, abl_acts = {}, {}
    embeds, _ = tiny_stack.build_inputs(prefix, [row["context_ids"]])
    with torch.no_grad():
        with tiny_stack.hooks(capture(base_acts)):
            tiny_stack.lm.base_model(inputs_embeds=embeds, use_cache=False)

        def both(act_layer, act):
            new = hook(act_layer, act)
            abl_acts[act_layer] = (act if new is None else new).detach().clone()
            return new

        with tiny_stack.hooks(both):
            tiny_stack.lm.base_model(inputs_embeds=embeds, use_cache=False)
    diff0 = base_acts[0] != abl_acts[0]
    assert diff0.sum() == 1 and diff0[0, patch, unit] and abl_acts[0][0, patch, unit] == 0
    assert torch.equal(base_acts[1][:, :patch], abl_acts[1][:, :patch])
    assert not torch.equal(base_acts[1][:, patch:], abl_acts[1][:, patch:])


def test_hook_leaves_cached_decoding_steps_alone(tiny_stack):
    masks = [torch.ones(1, tiny_stack.n_patches, tiny_stack.d_mlp, dtype=torch.bool)] * tiny_stack.n_layers
    hook = ablation_hook(masks, tiny_stack.image_slice)
    assert hook(0, torch.ones(1, 1, tiny_stack.d_mlp)) is None
    full = hook(0, torch.ones(1, tiny_stack.n_patches + 3, tiny_stack.d_mlp))
    assert full[:, : tiny_stack.n_patches].eq(0).all() and full[:, tiny_stack.n_patches :].eq(1).all()


def test_ablated_generation_differs_from_plain_only_through_the_prefix(tiny_stack, store_run):
    store, run = store_run
    row = xs.result_rows(store, run.id)[0]
    prefix = _prefix(tiny_stack, row)
    plain = generate_captions(tiny_stack, prefix, max_new_tokens=8)
    none = [None] * tiny_stack.n_layers
    assert generate_captions(tiny_stack, prefix, ablation_hook(none, tiny_stack.image_slice), max_new_tokens=8) == plain


def test_random_baseline_same_layer_same_patch_seeded_and_nested(store_run):
    store, run = store_run
    rid = xs.result_rows(store, run.id)[0]["id"]
    configs = select(store, run, rid, [10, 50], seeds=2)
    top50 = next(c for c in configs if c.condition == "top" and c.k == 50).entries
    rand = {(c.seed, c.k): c.entries for c in configs if c.condition == "random"}
    for seed in (0, 1):
        r50 = rand[(seed, 50)]
        assert np.array_equal(r50[:, 0], top50[:, 0]) and np.array_equal(r50[:, 2], top50[:, 2])
        assert np.array_equal(rand[(seed, 10)], r50[:10])
        assert len({tuple(e) for e in r50.tolist()}) == 50
    assert not np.array_equal(rand[(0, 50)], rand[(1, 50)])
    again = select(store, run, rid, [10, 50], seeds=2)
    assert all(np.array_equal(a.entries, b.entries) for a, b in zip(configs, again, strict=True))
    # the tiny LM decodes to no dictionary words: no interpretable units, so no interpretable config beyond k = 0
    assert not [c for c in configs if c.condition == "interpretable"]


def test_units_mode_ablates_every_image_position(tiny_stack, store_run):
    store, run = store_run
    ids = [xs.result_rows(store, run.id)[0]["id"]]
    points = list(
        dose_response(tiny_stack, store, run, ids, [3], seeds=1, unit_mode="units", captions=False, interpretable=False)
    )
    assert {p.condition for p in points} == {"top", "random"}
    for p in points:
        assert p.n_units == 3 and p.n_ablated == 3 * tiny_stack.n_patches and p.unit_mode == "units"
    unit_max, _ = store.unit_scores(ids[0])
    top3 = select(store, run, ids[0], [3], unit_mode="units", interpretable=False, baseline="none")[0].entries
    chosen = unit_max[top3[:, 0], top3[:, 1]]
    rest = np.ones_like(unit_max, dtype=bool)
    rest[top3[:, 0], top3[:, 1]] = False
    assert chosen.min() >= unit_max[rest].max()  # the best three by max score (ties in float16 either way)


def test_points_are_stored_and_reused(tiny_stack, store_run):
    store, run = store_run
    ids = [r["id"] for r in xs.result_rows(store, run.id)][:2]
    first = list(dose_response(tiny_stack, store, run, ids, [0, 5, 20], seeds=2, captions=False))
    rows = xs.ablation_points(store, run.id, mode="zero", unit_mode="triples")
    assert len(rows) == len(first) == 2 * 3 * (1 + 2) + 2  # top + 2 random per k, interpretable only at k = 0
    assert not any(p.cached for p in first)
    again = list(dose_response(tiny_stack, store, run, ids, [0, 5, 20], seeds=2, captions=False))
    assert all(p.cached for p in again)
    assert [(p.result_id, p.condition, p.k, p.seed, p.p_after) for p in again] == [
        (p.result_id, p.condition, p.k, p.seed, p.p_after) for p in first
    ]
    keys = set(first[0].to_json())
    assert {
        "result_id",
        "k",
        "condition",
        "seed",
        "p_before",
        "p_after",
        "relative_drop",
        "caption",
        "bertscore",
    } <= keys
    assert json.dumps(first[0].to_json())


def test_captions_regenerated_and_scored(tiny_stack, store_run, bert_scorer):
    store, run = store_run
    ids = [xs.result_rows(store, run.id)[0]["id"]]
    points = list(
        dose_response(tiny_stack, store, run, ids, [0, 200], seeds=1, bertscore=bert_scorer, interpretable=False)
    )
    k0 = [p for p in points if p.k == 0]
    assert all(p.caption == p.caption_before and p.bertscore == 1.0 for p in k0)
    for p in points:
        assert p.caption is not None and p.bertscore is not None
        if p.caption != p.caption_before:
            assert p.bertscore < 1.0 and p.bertscore_model == bert_scorer.name


def test_mean_ablation_uses_stored_unit_means(tiny_stack, store_run):
    store, run = store_run
    means = unit_means(tiny_stack, store, run)
    assert means.shape == (tiny_stack.n_layers, tiny_stack.d_mlp)
    stored, n = xs.get_unit_means(store, run.id, run.site, means.shape)
    assert n == 4 and np.allclose(stored, means.numpy())
    # by hand for one unit: mean over the images and their image positions
    acts = []
    for row in xs.result_rows(store, run.id):
        prefix = _prefix(tiny_stack, row)
        embeds, _ = tiny_stack.build_inputs(prefix, [[]])
        with torch.no_grad(), tiny_stack.hooks(lambda layer, act: acts.append(act[0, :16, 9]) if layer == 1 else None):
            tiny_stack.lm.base_model(inputs_embeds=embeds, use_cache=False)
    assert float(means[1, 9]) == pytest.approx(float(torch.cat(acts).mean()), abs=1e-5)
    ids = [xs.result_rows(store, run.id)[0]["id"]]
    points = list(dose_response(tiny_stack, store, run, ids, [0, 10], seeds=1, mode="mean", captions=False))
    assert {p.mode for p in points} == {"mean"}


def test_cancel_keeps_what_was_stored(tiny_stack, store_run):
    store, run = store_run
    ids = [r["id"] for r in xs.result_rows(store, run.id)]
    cancel = threading.Event()
    got = []
    for p in dose_response(tiny_stack, store, run, ids, [0, 5], seeds=1, captions=False, batch_size=2, cancel=cancel):
        got.append(p)
        cancel.set()
    assert 0 < len(got) < 4 * 2 * 2
    assert len(xs.ablation_points(store, run.id)) == len(got)


def test_bad_options(tiny_stack, store_run):
    store, run = store_run
    with pytest.raises(AblationError, match="unknown ablation mode"):
        list(dose_response(tiny_stack, store, run, [1], [0], mode="half"))
    with pytest.raises(AblationError, match="--k"):
        list(dose_response(tiny_stack, store, run, [1], [-1]))


def _pt(rid, condition, k, seed, drop, bert=None):
    return AblationPoint(
        rid, "x.jpg", k, condition, seed, 0.5, 0.5 * (1 - drop), drop, "a", "b", bert, None, k, k, "zero", "triples"
    )


def test_summarize_by_hand():
    points = [
        _pt(1, "top", 10, None, 0.2, 0.9),
        _pt(2, "top", 10, None, 0.4, 0.7),
        _pt(3, "top", 10, None, 0.6, None),
        _pt(1, "random", 10, 0, 0.0),
        _pt(1, "random", 10, 1, 0.2),  # image 1: mean 0.1 over seeds
        _pt(2, "random", 10, 0, 0.3),
    ]
    rows = {(r["condition"], r["k"]): r for r in summarize(points, shape={"n_layers": 2, "d_mlp": 5, "n_patches": 4})}
    top = rows[("top", 10)]
    assert top["n"] == 3 and top["mean_drop"] == pytest.approx(0.4)
    half = 4.302653 * 0.2 / np.sqrt(3)  # t_{0.975, 2} * s / sqrt(n), s = 0.2
    assert top["lo"] == pytest.approx(0.4 - half, abs=1e-5) and top["hi"] == pytest.approx(0.4 + half, abs=1e-5)
    assert top["bertscore"] == pytest.approx(0.8) and top["n_bertscore"] == 2
    assert top["frac_units"] == pytest.approx(10 / 10) and top["frac_triples"] == pytest.approx(10 / 40)
    rand = rows[("random", 10)]
    assert rand["n"] == 2 and rand["mean_drop"] == pytest.approx(0.2) and rand["seeds"] == 2
    with pytest.raises(AblationError, match="different ablation modes"):
        summarize(
            [*points, AblationPoint(1, "x", 1, "top", None, 1, 1, 0, None, None, None, None, 1, 1, "mean", "triples")]
        )


# -- the command ------------------------------------------------------------------------------------------
def test_ablate_command_json(attributed_db):
    result = runner.invoke(
        app,
        ["ablate", "--from-store", "--k", "0,4,16", "--seeds", "1", "--no-regenerate", "--limit", "2"]
        + ["--device", "cpu", "--db", str(attributed_db), "--json"],
    )
    assert result.exit_code == ExitCode.OK, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    points = [r for r in lines if r["type"] == "point"]
    summary = [r for r in lines if r["type"] == "summary"]
    assert len(points) == 2 * (3 * 2 + 1)
    assert {(r["condition"], r["k"]) for r in summary} >= {("top", 16), ("random", 16), ("top", 0)}
    assert {"mean_drop", "lo", "hi", "n", "frac_units"} <= summary[0].keys()
    assert "Ablating" in result.stderr


def test_ablate_command_table_and_bad_input(attributed_db, tmp_path):
    args = ["--device", "cpu", "--db", str(attributed_db)]
    result = runner.invoke(app, ["ablate", "--from-store", "--k", "0,4", "--seeds", "1", "--no-regenerate", *args])
    assert result.exit_code == 0 and "Dose-response" in result.stdout and "95% CI" in result.stdout
    bad_k = runner.invoke(app, ["ablate", "--from-store", "--k", "0,x", *args])
    assert bad_k.exit_code == ExitCode.FAILED and "--k" in bad_k.stderr
    both = runner.invoke(app, ["ablate", str(tmp_path), "--from-store", *args])
    assert both.exit_code == ExitCode.FAILED and "not both" in both.stderr
    missing = runner.invoke(app, ["ablate", "--from-store", "--db", str(tmp_path / "none.db")])
    assert missing.exit_code == ExitCode.FAILED and "no cache at" in missing.stderr
    no_dir = runner.invoke(app, ["ablate", str(tmp_path / "nowhere"), "--preset", "tiny", *args])
    assert no_dir.exit_code == ExitCode.FAILED and "no such file or folder" in no_dir.stderr


def test_ablate_command_from_a_folder(image_dir, tmp_path):
    (image_dir / "00-broken.jpg").write_bytes(b"not a jpeg")
    db = tmp_path / "fresh.db"
    result = runner.invoke(
        app,
        ["ablate", str(image_dir), "--preset", "tiny", "--k", "0,3", "--seeds", "1", "--no-regenerate", "--limit", "2"]
        + ["--device", "cpu", "--db", str(db), "--json"],
    )
    # 00-broken.jpg sorts first: one failure named, the other image ablated
    assert result.exit_code == ExitCode.PARTIAL, result.stderr
    assert "00-broken.jpg" in result.stderr
    points = [json.loads(line) for line in result.stdout.splitlines() if '"point"' in line]
    assert len({p["result_id"] for p in points}) == 1


def test_ablate_command_finds_cached_and_duplicate_images_again(image_dir, tmp_path):
    """A rerun attributes nothing new (every image is cached) and ablates the same results; a second copy of a
    photo is one image. The results are found by the sha256s the run's events carry."""
    folder = tmp_path / "two"
    folder.mkdir()
    first, second = sorted(image_dir.iterdir())[:2]
    for f in (first, second):
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "zz-copy.jpg").write_bytes(first.read_bytes())
    args = ["ablate", str(folder), "--preset", "tiny", "--k", "0,3", "--seeds", "1", "--no-regenerate"]
    args += ["--device", "cpu", "--db", str(tmp_path / "c.db"), "--json"]
    ids = []
    for _ in range(2):
        result = runner.invoke(app, args)
        assert result.exit_code == ExitCode.OK, result.stderr
        points = [json.loads(line) for line in result.stdout.splitlines() if '"point"' in line]
        ids.append([p["result_id"] for p in points])
    assert len(set(ids[0])) == 2 and ids[1] == ids[0]
