"""Steering on the tiny stack: scale 1 is no steering and scale 0 is zero ablation, bit for bit; steering moves
P(target) and the watched logits; the command."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from commands import app
from mmtui.experiments.ablation_ops import ablation_hook, generate_captions, target_probs
from mmtui.experiments.steer import SteerError, last_logits, p_of, parse_unit, steer, steer_hook
from mmtui.run.images import load_image
from mmtui.store import experiments as xs

runner = CliRunner()
UNITS = [(0, 3), (0, 7), (1, 11)]


def _setup(tiny_stack, store_run, batch: int):
    store, run = store_run
    row = xs.result_rows(store, run.id)[0]
    prefix = tiny_stack.encode([load_image(row["path"]).image]).expand(batch, -1, -1)
    return row, prefix


def test_scale_1_is_no_steering_bit_for_bit(tiny_stack, store_run):
    row, prefix = _setup(tiny_stack, store_run, 2)
    hook = steer_hook(UNITS, [1.0, 1.0], "scale", tiny_stack.image_slice)
    plain = last_logits(tiny_stack, prefix, row["context_ids"])
    steered = last_logits(tiny_stack, prefix, row["context_ids"], hook)
    assert torch.equal(plain, steered)
    added = steer_hook(UNITS, [0.0, 0.0], "add", tiny_stack.image_slice)
    assert torch.equal(plain, last_logits(tiny_stack, prefix, row["context_ids"], added))  # and adding 0
    assert generate_captions(tiny_stack, prefix, hook) == generate_captions(tiny_stack, prefix)


def test_scale_0_is_zero_ablation_bit_for_bit(tiny_stack, store_run):
    row, prefix = _setup(tiny_stack, store_run, 2)
    n_layers, n_patches, d_mlp = tiny_stack.n_layers, tiny_stack.n_patches, tiny_stack.d_mlp
    masks: list[torch.Tensor | None] = [None] * n_layers
    for layer, unit in UNITS:  # the units at every image position, in both rows
        if masks[layer] is None:
            masks[layer] = torch.zeros(2, n_patches, d_mlp, dtype=torch.bool)
        masks[layer][:, :, unit] = True
    ablated = target_probs(
        tiny_stack, prefix, row["context_ids"], row["target_token_id"], ablation_hook(masks, tiny_stack.image_slice)
    )
    hook = steer_hook(UNITS, [0.0, 0.0], "scale", tiny_stack.image_slice)
    steered = p_of(last_logits(tiny_stack, prefix, row["context_ids"], hook), row["target_token_id"])
    assert torch.equal(ablated, steered)
    plain = target_probs(tiny_stack, prefix, row["context_ids"], row["target_token_id"])
    assert not torch.equal(plain, steered)  # the units matter: the comparison can fail


def test_steer_rows_move_with_the_scale(tiny_stack, store_run):
    store, run = store_run
    row = xs.result_rows(store, run.id)[0]
    rows = steer(tiny_stack, store, run, UNITS[:1], [row["path"]], [0.0, 8.0])
    assert [r.value for r in rows] == [1.0, 0.0, 8.0]
    assert rows[0].p_target == pytest.approx(row["p_target"], rel=1e-4)  # the reference: as attributed
    watched = rows[2].tokens["L0.u3"]
    assert len(watched) == 10 and all(w["delta"] == 0.0 for w in rows[0].tokens["L0.u3"])
    assert any(w["delta"] != 0.0 for w in watched)
    assert rows[1].p_target != rows[0].p_target


def test_bad_units_are_named():
    assert parse_unit("L7.u1234") == (7, 1234) == parse_unit("7.1234")
    with pytest.raises(SteerError, match="LAYER.UNIT"):
        parse_unit("seven")


def test_steer_command(attributed_db, store_run, monkeypatch):
    store, run = store_run
    monkeypatch.setenv("MMTUI_DB", str(attributed_db))
    image = xs.result_rows(store, run.id)[0]["path"]
    result = runner.invoke(app, ["steer", "L0.u3", image, "--scale", "0,4", "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["value"] for line in lines] == [1.0, 0.0, 4.0]
    assert {"caption", "p_target", "tokens", "image", "mode"} <= lines[0].keys()
    table = runner.invoke(app, ["steer", "L0.u3", image, "--add", "2", "--device", "cpu"])
    assert table.exit_code == 0 and "P(target)" in table.stdout
    bad = runner.invoke(app, ["steer", "L99.u3", image, "--device", "cpu"])
    assert bad.exit_code == 2 and "no unit L99.u3" in bad.stderr
    missing = runner.invoke(app, ["steer", "L0.u3", "nope.jpg", image, "--device", "cpu", "--json"])  # 0,2,4,8
    assert missing.exit_code == 1 and "nope.jpg" in missing.stderr and len(missing.stdout.splitlines()) == 5
