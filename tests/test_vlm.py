"""Whole VLM checkpoints as stacks (mmtui.stacks.vlm), on a tiny random LlavaForConditionalGeneration saved to a
folder: the image tokens are not the first positions, scores equal Captum's, the caption equals the model's own
generate, image tokens map to the patch grid, and attribute + neurons + ablate run end to end from the CLI."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import coco_files

# LLaVA-1.5's chat template (llava-hf), as its processor ships it
LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
SIDE = 4  # the tiny tower's patch grid: 4 x 4 patches of 8 px on 32 px images


def save_tiny_llava(folder: Path, strategy: str = "default", dtype: torch.dtype = torch.float32) -> Path:
    """A random LLaVA (tiny CLIP tower + tiny Llama) with its processor, saved with save_pretrained."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    from mmtui.stacks.tiny import tiny_tokenizer

    tok = copy.deepcopy(tiny_tokenizer())
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_id = tok.convert_tokens_to_ids("<image>")
    vision = CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2, image_size=32, patch_size=8
    )
    text = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.eos_token_id,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=image_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy=strategy,
        image_seq_length=SIDE * SIDE,
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).to(dtype)
    with torch.no_grad():  # image tokens of the word embeddings' scale, so the caption depends on the image
        model.model.multi_modal_projector.linear_2.weight.mul_(8.0)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.eos_token_id
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tok,
        patch_size=8,
        vision_feature_select_strategy=strategy,
        chat_template=LLAVA_TEMPLATE,
        num_additional_image_tokens=1,
    )
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llava(tmp_path_factory.mktemp("llava") / "tiny-llava")


@pytest.fixture(scope="module")
def vlm64(llava_dir: Path):
    from mmtui.stacks import load_stack

    return load_stack(vlm=str(llava_dir), device="cpu", dtype=torch.float64)


@pytest.fixture(scope="module")
def vlm32(llava_dir: Path):
    from mmtui.stacks import load_stack

    return load_stack(vlm=str(llava_dir), device="cpu")


def test_image_positions_follow_the_template(vlm32) -> None:
    """The user header comes first: the 16 image tokens sit at a slice that does not start at 0."""
    stack = vlm32
    assert stack.n_patches == SIDE * SIDE and stack.grid == (SIDE, SIDE)
    assert stack.image_slice.start == len(stack.before_ids) > 0
    assert stack.tokenizer.decode(stack.before_ids) == "USER: "
    assert stack.tokenizer.decode(stack.after_ids).startswith("\nDescribe the image in one sentence.")
    assert stack.adapter.family.name == "llama" and stack.n_layers == 2


def test_encode_equals_the_models_image_features(vlm32, llava_dir: Path, pil_images) -> None:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(llava_dir)
    processor = AutoProcessor.from_pretrained(llava_dir)
    pixels = processor.image_processor(images=pil_images[:2], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        theirs = torch.stack(model.model.get_image_features(pixel_values=pixels).pooler_output)
    torch.testing.assert_close(vlm32.encode(pil_images[:2]), theirs)


def test_inputs_equal_the_models_own(vlm32, llava_dir: Path, pil_images) -> None:
    """build_inputs gives the embeddings LLaVA's forward builds from the processor's input ids and pixels."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(llava_dir)
    processor = AutoProcessor.from_pretrained(llava_dir)
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": vlm32.prompt}]}],
        add_generation_prompt=True,
    )
    inputs = processor(images=pil_images[:1], text=text, return_tensors="pt")
    with torch.no_grad():
        theirs = model(**inputs).logits[0, -1]
        embeds, lengths = vlm32.build_inputs(vlm32.encode(pil_images[:1]), [[]])
        hidden = vlm32.lm.base_model(inputs_embeds=embeds).last_hidden_state
    assert lengths[0] == inputs["input_ids"].shape[1]
    torch.testing.assert_close(vlm32.logits(hidden[0, -1]), theirs, rtol=1e-5, atol=1e-5)


def test_caption_equals_generate(vlm32, llava_dir: Path, pil_images) -> None:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(llava_dir)
    processor = AutoProcessor.from_pretrained(llava_dir)
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": vlm32.prompt}]}],
        add_generation_prompt=True,
    )
    stops = set(vlm32.stop_token_ids)
    captions = set()
    for image in pil_images:
        inputs = processor(images=[image], text=text, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, do_sample=False, max_new_tokens=12)[0, inputs["input_ids"].shape[1] :]
        want = out.tolist()
        want = want[: next((i for i, t in enumerate(want) if t in stops), len(want))]
        ours = vlm32.generate(vlm32.encode([image]), max_new_tokens=12)[0]
        assert ours == want
        assert vlm32.caption([image], max_new_tokens=12)[0] == vlm32.caption_text(want)
        captions.add(tuple(want))
    assert len(captions) > 1  # the caption depends on the image: the comparison can fail


def test_scores_equal_captum_in_float64(vlm64, pil_images) -> None:
    from captum.attr import LayerGradientXActivation

    from mmtui.run.attribution import resolve_target, score_targets

    stack = vlm64
    prefix = stack.encode(pil_images)
    targets = [
        resolve_target(stack, ids, w) for ids, w in zip(stack.generate(prefix), [None, "dog", "horse"], strict=True)
    ]
    targets[2].context_ids = targets[2].context_ids[:1] + [5, 7]
    ours = score_targets(stack, prefix, targets, full=True)
    embeds, lengths = stack.build_inputs(prefix, [t.context_ids for t in targets])
    token_ids = torch.tensor([t.token_id for t in targets])

    def y_of(e: torch.Tensor) -> torch.Tensor:
        hidden = stack.lm.base_model(inputs_embeds=e).last_hidden_state
        last = hidden[torch.arange(len(lengths)), torch.tensor(lengths) - 1]
        probs = torch.softmax(stack.lm.get_output_embeddings()(last), dim=-1)
        return probs[torch.arange(len(lengths)), token_ids]

    layers = [stack.adapter.w_out_module(i) for i in range(stack.n_layers)]
    with torch.enable_grad():
        theirs = LayerGradientXActivation(y_of, layers).attribute(embeds, attribute_to_layer_input=True)
    for i, attr in enumerate(ours):
        expected = torch.stack([t[i, stack.image_slice] for t in theirs])  # [L, P, d_mlp]
        torch.testing.assert_close(attr.scores.double(), expected.double(), rtol=1e-6, atol=1e-12)
        assert expected.abs().max() > 0
        lead = torch.stack([t[i, : stack.image_slice.start] for t in theirs])
        assert lead.abs().max() > 0  # the header positions have scores of their own, and they are not the image's


def test_full_strategy_keeps_cls_off_the_grid(tmp_path: Path, pil_images) -> None:
    """With "full" the CLS token is an image token too: 17 tokens, cells -1 then 0..15, and the heatmap of a unit
    reads the patch tokens only."""
    from mmtui.experiments.heatmap import batch_activation_maps
    from mmtui.stacks import load_stack

    stack = load_stack(vlm=str(save_tiny_llava(tmp_path / "full", "full")), device="cpu")
    assert stack.n_patches == SIDE * SIDE + 1
    assert stack.cells == [-1, *range(SIDE * SIDE)]
    seen: dict[int, torch.Tensor] = {}

    def grab(layer: int, act: torch.Tensor) -> None:
        seen[layer] = act[0, stack.image_slice, 3].clone()

    with torch.no_grad(), stack.hooks(grab):
        embeds, _ = stack.build_inputs(stack.encode(pil_images[:1]), [[]])
        stack.lm.base_model(inputs_embeds=embeds)
    maps = batch_activation_maps(stack, pil_images[:1], [(1, 3)])[0, 0]
    np.testing.assert_allclose(maps.reshape(-1), seen[1][1:].numpy(), rtol=1e-6)


def test_heatmap_maps_image_tokens_to_the_grid(vlm32) -> None:
    """A planted pattern: a hook writes each image token's index into a unit; the heatmap must read it back at
    row = i // 4, column = i % 4, and nothing from the header or the text."""
    from mmtui.experiments import heatmap

    stack = vlm32
    positions = stack.image_slice

    def plant(layer: int, act: torch.Tensor) -> torch.Tensor | None:
        if layer != 0 or act.shape[1] < positions.stop:
            return None
        act = act.clone()
        act[:, :, 5] = -1.0
        act[:, positions, 5] = torch.arange(stack.n_patches, dtype=act.dtype)
        return act

    from PIL import Image

    with stack.hooks(plant):
        maps = heatmap.batch_activation_maps(stack, [Image.new("RGB", (40, 40), (10, 200, 30))], [(0, 5)])
    want = np.arange(SIDE * SIDE, dtype=np.float32).reshape(SIDE, SIDE)
    np.testing.assert_array_equal(maps[0, 0], want)


def test_fingerprint_names_the_checkpoint(vlm32, llava_dir: Path, tmp_path: Path) -> None:
    """The folder's contents are in the fingerprint: a copy with one weight changed is another stack."""
    from safetensors.torch import load_file, save_file

    from mmtui.stacks import load_stack

    fp = vlm32.fingerprint
    assert fp["vlm"] == "LlavaForConditionalGeneration" and len(fp["lm_sha256"]) == 64
    other = tmp_path / "tiny-llava"
    shutil.copytree(llava_dir, other)
    weights = other / "model.safetensors"
    state = load_file(weights)
    key = next(k for k in state if "language_model" in k and k.endswith("down_proj.weight"))
    state[key] = state[key] + 1e-3
    save_file(state, weights, metadata={"format": "pt"})
    changed = load_stack(vlm=str(other), device="cpu")
    assert changed.fingerprint_id != vlm32.fingerprint_id
    assert changed.lm_fingerprint_id != vlm32.lm_fingerprint_id
    assert load_stack(vlm=str(llava_dir), device="cpu").fingerprint_id == vlm32.fingerprint_id


def test_not_a_llava_is_one_clear_error(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    from mmtui.errors import StackError
    from mmtui.stacks import load_stack

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=50)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(StackError, match="supported: LlavaForConditionalGeneration"):
        load_stack(vlm=str(tmp_path / "gpt2"), device="cpu")


def test_a_missing_folder_is_one_clear_error(tmp_path: Path) -> None:
    from mmtui.errors import StackError
    from mmtui.stacks import load_stack

    with pytest.raises(StackError, match="no such folder"):
        load_stack(vlm=str(tmp_path / "missing"), device="cpu")


def _mm(*args: str) -> tuple[int, str]:
    from typer.testing import CliRunner

    from commands import app

    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


def test_cli_attribute_neurons_ablate(llava_dir: Path, tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for f in coco_files(2):
        shutil.copy(f, images / f.name)
    db = str(tmp_path / "vlm.db")
    code, out = _mm("attribute", str(images), "--vlm", str(llava_dir), "--device", "cpu", "--db", db, "--json")
    assert code == 0, out
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    done = [r for r in rows if r.get("type") == "image" and "caption" in r]
    assert len(done) == 2, out
    code, out = _mm("neurons", "--db", db, "--json")
    assert code == 0, out
    neurons = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert neurons and all(0 <= n["layer"] < 2 for n in neurons)
    code, out = _mm("ablate", "--from-store", "--k", "4,16", "--seeds", "2", "--db", db, "--device", "cpu", "--json")
    assert code == 0, out
    summary = [json.loads(line) for line in out.splitlines() if '"type": "summary"' in line]
    assert {r["condition"] for r in summary} >= {"top", "random"}
    first = sorted(images.iterdir())[0]
    png = tmp_path / "map.png"
    code, out = _mm("heatmap", "1", "3", str(first), "--out", str(png), "--db", db, "--device", "cpu")
    assert code == 0 and png.is_file(), out
    code, out = _mm("caption", str(first), "--vlm", str(llava_dir), "--device", "cpu", "--json")
    assert code == 0, out
    attributed = {Path(r["image"]).name: r["caption"] for r in done}
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert rows and rows[0]["caption"] == attributed[first.name], out
