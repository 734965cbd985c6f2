"""`--bos`: the LM's document-start token before the image prefix. The image positions shift by one, the new
first position is not scored, and the fingerprint keeps runs with and without it apart."""

from __future__ import annotations

import dataclasses

import pytest
import torch


@pytest.fixture(scope="module")
def bos64(tiny_stack64):
    stack = dataclasses.replace(tiny_stack64, bos=True)
    return stack


def test_image_slice_shifts_by_one(tiny_stack64, bos64) -> None:
    assert tiny_stack64.image_slice == slice(0, tiny_stack64.n_patches)
    assert bos64.image_slice == slice(1, 1 + bos64.n_patches)
    assert bos64.token_text(bos64.document_start_id) == "<|endoftext|>"
    embeds, lengths = bos64.build_inputs(torch.zeros(2, bos64.n_patches, 32, dtype=torch.float64), [[], [3]])
    plain, plain_lengths = tiny_stack64.build_inputs(torch.zeros(2, 16, 32, dtype=torch.float64), [[], [3]])
    assert [n - 1 for n in lengths] == plain_lengths
    torch.testing.assert_close(embeds[:, 0], bos64.embed_tokens(torch.tensor([bos64.document_start_id])).expand(2, -1))
    torch.testing.assert_close(embeds[:, 1:], plain)


def test_fingerprint_records_it(tiny_stack64, bos64) -> None:
    assert bos64.fingerprint["bos"] == "<|endoftext|>" and "bos" not in tiny_stack64.fingerprint
    assert bos64.fingerprint_id != tiny_stack64.fingerprint_id
    assert bos64.lm_fingerprint_id == tiny_stack64.lm_fingerprint_id  # decodings do not depend on it


def test_scores_equal_captum_at_the_shifted_positions(bos64, pil_images) -> None:
    from captum.attr import LayerGradientXActivation

    from mmtui.run.attribution import resolve_target, score_targets

    stack = bos64
    prefix = stack.encode(pil_images[:2])
    targets = [resolve_target(stack, ids, w) for ids, w in zip(stack.generate(prefix), [None, "dog"], strict=True)]
    ours = score_targets(stack, prefix, targets, full=True)
    embeds, lengths = stack.build_inputs(prefix, [t.context_ids for t in targets])
    token_ids = torch.tensor([t.token_id for t in targets])

    def y_of(e: torch.Tensor) -> torch.Tensor:
        hidden = stack.lm.base_model(inputs_embeds=e).last_hidden_state
        last = hidden[torch.arange(len(lengths)), torch.tensor(lengths) - 1]
        return torch.softmax(stack.logits(last), dim=-1)[torch.arange(len(lengths)), token_ids]

    layers = [stack.adapter.w_out_module(i) for i in range(stack.n_layers)]
    with torch.enable_grad():
        theirs = LayerGradientXActivation(y_of, layers).attribute(embeds, attribute_to_layer_input=True)
    for i, attr in enumerate(ours):
        expected = torch.stack([t[i, 1 : 1 + stack.n_patches] for t in theirs])
        torch.testing.assert_close(attr.scores.double(), expected.double(), rtol=1e-6, atol=1e-12)
        assert torch.stack([t[i, 0] for t in theirs]).abs().max() > 0  # position 0 has scores; they are not kept


def test_load_stack_and_cli_flag(tmp_path) -> None:
    from mmtui.stacks import load_stack

    stack = load_stack("tiny", device="cpu", bos=True)
    assert stack.bos and stack.load_args["bos"] is True
    assert "bos" not in load_stack("tiny", device="cpu").load_args


def test_cli_runs_with_and_without_bos_never_mix(image_dir, tmp_path) -> None:
    """Two attribute runs over the same photos, with and without --bos: two stacks, two runs, and the run made
    with --bos loads again with it (its load arguments carry the setting)."""
    from typer.testing import CliRunner

    from commands import app
    from mmtui.stacks.presets import load_stack_for_run
    from mmtui.store import Store

    db = str(tmp_path / "bos.db")
    for extra in ([], ["--bos"]):
        args = ["attribute", str(image_dir), "--preset", "tiny", "--device", "cpu", "--db", db, *extra]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
    with Store.open(tmp_path / "bos.db") as store:
        runs = store.runs()
        assert len(runs) == 2 and len({r.stack.id for r in runs}) == 2
        with_bos = next(r for r in runs if "bos" in r.stack.fingerprint)
        assert load_stack_for_run(with_bos, device="cpu").bos
