"""Every LM family on a tiny random model from its transformers config (no network): the family found from the
modules, scores equal to Captum's, decoding equal to an explicit W_U @ W_out with the family's norm convention,
logits (soft-capped) and input embeddings (scaled) as the model's own forward has them, greedy captions equal to
transformers' generate, and the CLI end to end on one family that is not in the hand-written table."""

from __future__ import annotations

import shutil
from functools import cache

import pytest
import torch
from conftest import coco_files
from test_attribution import _targets, _transformers_greedy

from mmtui.errors import StackError
from mmtui.run.attribution import score_targets
from mmtui.run.decoding import decode_layer, unit_logits
from mmtui.stacks.base import Stack
from mmtui.stacks.lm import FAMILIES, MODEL_TYPES, TESTED, LMAdapter, discover
from mmtui.stacks.tiny import FAMILY_CONFIGS, tiny_parts

NEW = ["qwen2", "qwen3", "gemma2", "gemma3_text", "mistral", "phi3", "olmo2"]
ALL = sorted({*TESTED})
GEMMA = {"gemma2", "gemma3_text"}


@cache
def family_stack(family: str) -> Stack:
    """A float64 tiny stack (BEiT + projection) whose LM is a random `family` model."""
    from mmtui.stacks.vision import BeitEncoder

    torch.set_num_threads(1)
    lm, beit, processor, proj, tok = tiny_parts(0, torch.float64, family=family)
    return Stack(
        name=family,
        encoder=BeitEncoder(beit, processor, "tiny-beit"),
        projection=proj,
        lm=lm,
        tokenizer=tok,
        real_vocab=len(tok),
        identity={"family": family},
        dtype=torch.float64,
    )


def _explicit_w_out(lm, family: str, layer: int) -> torch.Tensor:
    """The output matrix [d_model, d_mlp] by the names transformers gives it, written out per family."""
    if family == "gptj":
        return lm.transformer.h[layer].mlp.fc_out.weight
    if family == "gpt2":
        return lm.transformer.h[layer].mlp.c_proj.weight.T  # Conv1D: stored [in, out]
    if family == "gpt_neox":
        return lm.gpt_neox.layers[layer].mlp.dense_4h_to_h.weight
    return lm.model.layers[layer].mlp.down_proj.weight


def _explicit_final_norm(lm, family: str) -> torch.nn.Module:
    if family in ("gptj", "gpt2"):
        return lm.transformer.ln_f
    if family == "gpt_neox":
        return lm.gpt_neox.final_layer_norm
    return lm.model.norm


def _explicit_gain(lm, family: str) -> torch.Tensor:
    """The final norm's gain: Gemma's RMSNorm multiplies by (1 + weight), every other one by its weight."""
    weight = _explicit_final_norm(lm, family).weight
    return 1 + weight if family in GEMMA else weight


def test_every_tested_family_has_a_tiny_config():
    assert set(TESTED) == set(FAMILY_CONFIGS) | {"gptj"}


@pytest.mark.parametrize("family", ALL)
def test_family_is_found_with_its_conventions(family):
    stack = family_stack(family)
    found = stack.adapter.family
    if family in MODEL_TYPES:  # the hand-written table, as before
        assert found == FAMILIES[MODEL_TYPES[family]]
    else:  # from the modules
        assert found.name == family
    assert found.norm_offset == (1.0 if family in GEMMA else 0.0)
    assert found.fused_gate == (family == "phi3")
    assert stack.n_layers == 2
    assert stack.d_mlp == _explicit_w_out(stack.lm, family, 0).shape[1]
    assert stack.adapter.final_norm() is _explicit_final_norm(stack.lm, family)
    # the table's layouts are what discovery finds too (where the table names a family by its layout)
    if family not in ("gptj", "gpt2", "gpt_neox"):
        assert (discover(stack.lm).w_in, discover(stack.lm).w_out) == (found.w_in, found.w_out)


@pytest.mark.parametrize("family", [f for f in ALL if f not in ("gptj", "gpt2", "gpt_neox")])
def test_gain_convention_is_the_norms_own(family):
    """The final norm's forward on a random x is x / rms(x) times the gain the family declares (RMSNorm)."""
    stack = family_stack(family)
    norm = _explicit_final_norm(stack.lm, family)
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    x = torch.randn(5, stack.lm.config.hidden_size, dtype=torch.float64)
    expected = x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt() * _explicit_gain(stack.lm, family)
    torch.testing.assert_close(norm(x), expected, rtol=1e-6, atol=1e-9)  # Gemma's norm computes in float32
    torch.testing.assert_close(stack.adapter.final_gain(), _explicit_gain(stack.lm, family).detach())
    assert not torch.allclose(stack.adapter.final_gain(), torch.ones_like(stack.adapter.final_gain()))


def _y_of_model(stack: Stack, embeds, lengths, token_ids) -> torch.Tensor:
    """P(c) at each item's last position, from the CausalLM's own forward (its own soft-capping)."""
    logits = stack.lm(inputs_embeds=embeds).logits
    last = logits[torch.arange(len(lengths)), torch.tensor(lengths) - 1]
    return torch.softmax(last, dim=-1)[torch.arange(len(lengths)), token_ids]


@pytest.mark.parametrize("site", ["post", "pre"])
@pytest.mark.parametrize("family", ALL)
def test_scores_equal_captum_in_float64(family, site, pil_images):
    from captum.attr import LayerGradientXActivation

    stack = family_stack(family)
    prefix = stack.encode(pil_images[:2])
    targets = _targets(stack, prefix, [None, "dog"])
    ours = score_targets(stack, prefix, targets, site=site, full=True)
    embeds, lengths = stack.build_inputs(prefix, [t.context_ids for t in targets])
    token_ids = torch.tensor([t.token_id for t in targets])
    if site == "post":
        layers = [stack.adapter.w_out_module(i) for i in range(stack.n_layers)]
    else:
        layers = [stack.adapter.w_in_module(i) for i in range(stack.n_layers)]
    lga = LayerGradientXActivation(lambda e: _y_of_model(stack, e, lengths, token_ids), layers)
    with torch.enable_grad():
        theirs = lga.attribute(embeds, attribute_to_layer_input=site == "post")
    n_patch, d_mlp = prefix.shape[1], stack.d_mlp
    for i, attr in enumerate(ours):
        # pre site: the first matrix's output; Phi-3's fused gate_up_proj gives [gate, up]: the gate half
        expected = torch.stack([t[i, :n_patch, :d_mlp] for t in theirs])  # [L, P, d_mlp]
        torch.testing.assert_close(attr.scores.double(), expected.double(), rtol=1e-6, atol=1e-12)
        assert expected.abs().max() > 0
        assert attr.p_target == pytest.approx(_y_of_model(stack, embeds, lengths, token_ids)[i].item(), rel=1e-9)


def test_phi3_pre_site_replaces_the_gate_half_only(pil_images):
    """A pre-site hook on Phi-3 sees gate_up_proj's first d_mlp outputs, and what it returns is the gate the MLP
    uses: zeroing it gives down(up * act(0)), computed here by hand from the module's weights."""
    stack = family_stack("phi3")
    mlp = stack.adapter.mlp(1)
    d = stack.d_mlp
    x = torch.randn(1, 3, stack.lm.config.hidden_size, dtype=torch.float64)
    seen = {}

    def zero(layer, act):
        seen[layer] = act.clone()
        return torch.zeros_like(act)

    handle = stack.adapter.site_hook(1, "pre", lambda act: zero(1, act))
    try:
        out = mlp(x)
    finally:
        handle.remove()
    w = mlp.gate_up_proj.weight
    torch.testing.assert_close(seen[1], x @ w[:d].T)
    up = x @ w[d:].T
    expected = (up * mlp.activation_fn(torch.zeros_like(up))) @ mlp.down_proj.weight.T
    torch.testing.assert_close(out, expected)
    assert not torch.allclose(out, mlp(x))


@pytest.mark.parametrize("family", ALL)
def test_logits_and_embeddings_are_the_models_own(family):
    """Stack.logits on the body's hidden states equals the CausalLM's logits (Gemma 2: soft-capped), and the
    text embeddings built for inputs_embeds give what the model gives from input_ids (Gemma: scaled)."""
    stack = family_stack(family)
    ids = torch.tensor([stack.tokenize("A picture of a dog with a cat")])
    own = stack.lm(input_ids=ids).logits
    text, _ = stack.text_embeds(ids.tolist())
    hidden = stack.lm.base_model(inputs_embeds=text).last_hidden_state
    torch.testing.assert_close(stack.logits(hidden), own, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(stack.adapter.embedding()[ids[0]], text[0])
    scale = stack.lm.config.hidden_size**0.5 if family in GEMMA else 1.0
    torch.testing.assert_close(text[0], stack.lm.get_input_embeddings().weight[ids[0]] * scale)
    raw = stack.lm.get_output_embeddings()(hidden)
    if family == "gemma2":  # the cap matters at this size, so a missing cap would fail the first check
        assert (raw - own).abs().max() > 1e-3
        assert stack.adapter.logit_softcap == 1.0
    else:
        assert stack.adapter.logit_softcap is None
        torch.testing.assert_close(raw, own)


def test_projection_norm_auto_is_that_of_the_embeddings_the_body_takes():
    """train-projection's --norm auto: the mean norm of the token embeddings as the LM's body receives them
    (Gemma: the embedding matrix times sqrt(d_model)), the space the image prompts join."""
    from mmtui.training.data import word_embedding_norm

    stack = family_stack("gemma2")
    text, _ = stack.text_embeds([list(range(stack.real_vocab))])
    expected = text[0].norm(dim=-1).mean().item()
    assert word_embedding_norm(stack) == pytest.approx(expected, rel=1e-6)  # it sums in float32
    assert word_embedding_norm(stack) > 5 * stack.lm.get_input_embeddings().weight.norm(dim=-1).mean().item()


@pytest.mark.parametrize("convention", ["raw", "ln_f"])
@pytest.mark.parametrize("family", ALL)
def test_decoding_equals_explicit_matrix_product(family, convention):
    stack = family_stack(family)
    ids, vals = decode_layer(stack, 1, convention, k=10, chunk=7)
    w_out = _explicit_w_out(stack.lm, family, 1)  # [d_model, d_mlp]
    if convention == "ln_f":
        w_out = w_out * _explicit_gain(stack.lm, family)[:, None]
    logits = stack.lm.get_output_embeddings().weight @ w_out  # [V, d_mlp], tied or not
    expected = logits.topk(10, dim=0)
    torch.testing.assert_close(vals, expected.values.T.float(), rtol=1e-5, atol=1e-6)
    assert torch.equal(ids, expected.indices.T)
    torch.testing.assert_close(unit_logits(stack, 1, [3], convention)[:, 0], logits[:, 3].float())
    if family == "gemma2":  # the soft cap is monotonic: capped products rank the tokens the same
        cap = stack.adapter.logit_softcap
        assert torch.equal((torch.tanh(logits / cap) * cap).topk(10, dim=0).indices.T, ids)


@pytest.mark.parametrize("family", ALL)
def test_greedy_captions_equal_transformers_generate(family, pil_images):
    stack = family_stack(family)
    prefix = stack.encode(pil_images)
    for n in (1, 12):
        ours = stack.generate(prefix, n)
        assert ours == _transformers_greedy(stack, prefix, n)
    assert any(ours)


def test_unsupported_architecture_is_one_line_naming_the_supported():
    from transformers import MixtralConfig, MixtralForCausalLM

    lm = MixtralForCausalLM(
        MixtralConfig(
            vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
            intermediate_size=16, num_local_experts=2, num_experts_per_tok=1,
        )
    )  # fmt: skip
    with pytest.raises(StackError) as caught:
        LMAdapter(lm)
    message = str(caught.value)
    assert "\n" not in message
    assert "'mixtral'" in message and "not supported" in message
    assert all(name in message for name in ("qwen3", "gemma2", "phi3", "olmo2"))


def test_cli_attribute_neurons_ablate_on_a_discovered_family(tmp_path):
    """A Qwen3 LM (found from its modules, not in the table) as a custom stack's LM, through the commands."""
    import json

    from typer.testing import CliRunner

    from commands import app
    from mmtui.stacks.tiny import save_tiny_limber

    paths = save_tiny_limber(tmp_path / "parts", family="qwen3")
    images = tmp_path / "images"
    images.mkdir()
    for f in coco_files(2):
        shutil.copy(f, images / f.name)
    db = str(tmp_path / "cache.db")
    parts = [
        "--lm",
        str(paths["lm"]),
        "--encoder",
        f"beit:{paths['encoder']}",
        "--projection",
        str(paths["projection"]),
    ]
    runner = CliRunner()
    common = ["--db", db, "--device", "cpu"]
    result = runner.invoke(app, ["attribute", str(images), "--preset", "tiny", *parts, "--json", *common])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == 2 and all(0 < r["p_target"] < 1 for r in rows)
    result = runner.invoke(app, ["neurons", "--json", "--db", db])
    assert result.exit_code == 0, result.output
    neurons = [json.loads(line) for line in result.stdout.splitlines()]
    assert neurons and {"layer", "unit"} <= neurons[0].keys()
    args = ["ablate", "--from-store", "--k", "0,4", "--seeds", "1", "--no-regenerate", "--json", *common]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip()
