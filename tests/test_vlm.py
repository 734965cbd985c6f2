"""Whole VLM checkpoints as stacks (mmtui.stacks.vlm), on a tiny random LlavaForConditionalGeneration and a tiny
LlavaNextForConditionalGeneration saved to folders: the image tokens are not the first positions, the image
features and logits equal the model's own, scores equal Captum's, the caption equals the model's own generate,
image tokens map to the patch grid (NeXT: the high-res grid, base tile and newlines off it), and attribute +
neurons + ablate + heatmap run end to end from the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import coco_files

from mmtui.stacks.tiny import VLM_PATCH, VLM_TILE, save_tiny_vlm

KINDS = ("llava", "llava_next")
CLASSES = {"llava": "LlavaForConditionalGeneration", "llava_next": "LlavaNextForConditionalGeneration"}
SIDE = VLM_TILE // VLM_PATCH  # a tile's patch grid: 4 x 4 patches of 8 px on 32 px tiles
NEXT_SIDE = 2 * SIDE  # the tiny NeXT's high-res grid: 2 x 2 tiles at its largest pinpoint, 64 x 64


@pytest.fixture(scope="module", params=KINDS)
def vlm_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny LLaVA-1.5 or LLaVA-NeXT checkpoint folder: each test on it runs for both."""
    return save_tiny_vlm(tmp_path_factory.mktemp(request.param) / f"tiny-{request.param}", request.param)


@pytest.fixture(scope="module")
def vlm64(vlm_dir: Path):
    from mmtui.stacks import load_stack

    return load_stack(vlm=str(vlm_dir), device="cpu", dtype=torch.float64)


@pytest.fixture(scope="module")
def vlm32(vlm_dir: Path):
    from mmtui.stacks import load_stack

    return load_stack(vlm=str(vlm_dir), device="cpu")


def model_and_processor(folder: Path):
    """The checkpoint's own model class and processor, as a transformers user loads them."""
    import transformers
    from transformers import AutoConfig, AutoProcessor

    name = CLASSES[AutoConfig.from_pretrained(folder).model_type]
    return getattr(transformers, name).from_pretrained(folder), AutoProcessor.from_pretrained(folder)


def model_inputs(stack, processor, images, text: str | None = None):
    """What the model is given for `images` (NeXT: stretched to the stack's resolution, as the stack does):
    the processor's image inputs, or with `text` the whole input."""
    fit = getattr(stack.encoder, "fit", lambda image: image)
    fitted = [fit(image) for image in images]
    if text is None:
        return processor.image_processor(images=fitted, return_tensors="pt")
    return processor(images=fitted, text=[text] * len(images), return_tensors="pt")


def chat_text(stack, processor) -> str:
    return processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": stack.prompt}]}],
        add_generation_prompt=True,
    )


def test_image_positions_follow_the_template(vlm32) -> None:
    """The user header comes first: the image tokens (LLaVA: 16; NeXT: 16 base + 8 x 8 high-res + 8 newlines)
    sit at a slice that does not start at 0."""
    stack = vlm32
    if stack.fingerprint["vlm"] == CLASSES["llava"]:
        assert stack.n_patches == SIDE * SIDE and stack.grid == (SIDE, SIDE)
        assert stack.tokenizer.decode(stack.before_ids) == "USER: "
    else:
        assert stack.n_patches == SIDE * SIDE + NEXT_SIDE * NEXT_SIDE + NEXT_SIDE
        assert stack.grid == (NEXT_SIDE, NEXT_SIDE) and stack.fingerprint["vlm_anyres"] == [64, 64]
        assert stack.tokenizer.decode(stack.before_ids) == "[INST] "
    assert stack.image_slice.start == len(stack.before_ids) > 0
    assert stack.tokenizer.decode(stack.after_ids).startswith("\nDescribe the image in one sentence.")
    assert stack.adapter.family.name == "llama" and stack.n_layers == 2


def test_encode_equals_the_models_image_features(vlm32, vlm_dir: Path, pil_images) -> None:
    """The encoder and projection give the model's own image features (NeXT: packed, newlines included), the
    same number of image tokens for photos of any shape."""
    model, processor = model_and_processor(vlm_dir)
    photos = [*pil_images[:2], pil_images[2].crop((0, 0, 90, 230))]  # a tall one too
    with torch.no_grad():
        theirs = model.model.get_image_features(**model_inputs(vlm32, processor, photos)).pooler_output
    assert [len(t) for t in theirs] == [vlm32.n_patches] * 3
    torch.testing.assert_close(vlm32.encode(photos), torch.stack(list(theirs)))


def test_inputs_equal_the_models_own(vlm32, vlm_dir: Path, pil_images) -> None:
    """build_inputs gives the embeddings the model's forward builds from the processor's input ids and pixels
    (the image features at the image tokens, the template's tokens around them), and so its logits."""
    model, processor = model_and_processor(vlm_dir)
    inputs = model_inputs(vlm32, processor, pil_images[:1], chat_text(vlm32, processor))
    assert int((inputs["input_ids"] == processor.image_token_id).sum()) == vlm32.n_patches
    seen: list[torch.Tensor] = []
    handle = model.model.language_model.register_forward_pre_hook(
        lambda _m, args, kwargs: seen.append(kwargs["inputs_embeds"]), with_kwargs=True
    )
    with torch.no_grad():
        theirs = model(**inputs).logits[0, -1]
        embeds, lengths = vlm32.build_inputs(vlm32.encode(pil_images[:1]), [[]])
        hidden = vlm32.lm.base_model(inputs_embeds=embeds).last_hidden_state
    handle.remove()
    assert lengths[0] == inputs["input_ids"].shape[1]
    torch.testing.assert_close(embeds, seen[0])
    torch.testing.assert_close(vlm32.logits(hidden[0, -1]), theirs, rtol=1e-5, atol=1e-5)


def test_caption_equals_generate(vlm32, vlm_dir: Path, pil_images) -> None:
    model, processor = model_and_processor(vlm_dir)
    text = chat_text(vlm32, processor)
    stops = set(vlm32.stop_token_ids)
    captions = set()
    for image in pil_images:
        inputs = model_inputs(vlm32, processor, [image], text)
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

    stack = load_stack(vlm=str(save_tiny_vlm(tmp_path / "full", "llava", "full")), device="cpu")
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
    its grid cell, and nothing from the header, the text, NeXT's base tile or its newline tokens. LLaVA: token
    i at row i // 4, column i % 4. NeXT (as its packing lays the tokens out): 16 base-tile tokens, then each
    high-res row of 8 followed by a newline, so cell (r, c) holds token 16 + 9 r + c."""
    from PIL import Image

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

    with stack.hooks(plant):
        maps = heatmap.batch_activation_maps(stack, [Image.new("RGB", (40, 30), (10, 200, 30))], [(0, 5)])
    rows, cols = np.mgrid[: stack.grid[0], : stack.grid[1]]
    if stack.fingerprint["vlm"] == CLASSES["llava"]:
        want = rows * SIDE + cols
    else:
        want = SIDE * SIDE + rows * (NEXT_SIDE + 1) + cols
    np.testing.assert_array_equal(maps[0, 0], want.astype(np.float32))


def test_next_heatmap_frame_is_the_high_res_picture(tmp_path: Path, pil_images) -> None:
    """NeXT's heatmap frame is its high-res tiles put back together: the photo stretched to 64 x 64 as the
    tower sees it (the base tile is another, coarser view and is not drawn)."""
    from mmtui.experiments import heatmap
    from mmtui.stacks import load_stack

    stack = load_stack(vlm=str(save_tiny_vlm(tmp_path / "next", "llava_next")), device="cpu")
    assert heatmap.frame_size(stack) == (64, 64)
    view = heatmap.encoder_view(stack, pil_images[0]).astype(int)
    stretched = np.asarray(stack.encoder.fit(pil_images[0])).astype(int)
    assert np.abs(view - stretched).mean() < 2.0


def test_next_resolution_is_the_largest_pinpoint() -> None:
    """Every image is stretched to the largest pinpoint, one NeXT's own selection maps onto itself: llava-v1.6's
    672 x 672 (2 x 2 tiles of 336)."""
    from mmtui.stacks.vlm import anyres_resolution

    v16 = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    assert anyres_resolution(v16) == (672, 672)
    assert anyres_resolution([[32, 64], [64, 32]]) == (32, 64)


def test_fingerprint_names_the_checkpoint(vlm32, vlm_dir: Path, tmp_path: Path) -> None:
    """The folder's contents are in the fingerprint: a copy with one weight changed is another stack."""
    from safetensors.torch import load_file, save_file

    from mmtui.stacks import load_stack

    fp = vlm32.fingerprint
    assert fp["vlm"] in CLASSES.values() and len(fp["lm_sha256"]) == 64
    other = tmp_path / vlm_dir.name
    shutil.copytree(vlm_dir, other)
    weights = other / "model.safetensors"
    state = load_file(weights)
    key = next(k for k in state if "language_model" in k and k.endswith("down_proj.weight"))
    state[key] = state[key] + 1e-3
    save_file(state, weights, metadata={"format": "pt"})
    changed = load_stack(vlm=str(other), device="cpu")
    assert changed.fingerprint_id != vlm32.fingerprint_id
    assert changed.lm_fingerprint_id != vlm32.lm_fingerprint_id
    assert load_stack(vlm=str(vlm_dir), device="cpu").fingerprint_id == vlm32.fingerprint_id


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


def test_cli_attribute_neurons_ablate(vlm_dir: Path, tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for f in coco_files(2):
        shutil.copy(f, images / f.name)
    db = str(tmp_path / "vlm.db")
    code, out = _mm("attribute", str(images), "--vlm", str(vlm_dir), "--device", "cpu", "--db", db, "--json")
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
    # ablate IMAGE_DIR with the same --vlm: the images are cached under that stack's run, so nothing is attributed
    args = ("--k", "4", "--seeds", "1", "--no-interpretable", "--db", db, "--device", "cpu", "--json")
    code, out = _mm("ablate", str(images), "--vlm", str(vlm_dir), *args)
    assert code == 0, out
    assert {json.loads(line)["n"] for line in out.splitlines() if '"type": "summary"' in line} == {2}, out
    code, out = _mm("ablate", "--from-store", "--vlm", str(vlm_dir), *args)
    assert code == 2 and "pass no stack option" in out, out
    first = sorted(images.iterdir())[0]
    png = tmp_path / "map.png"
    code, out = _mm("heatmap", "1", "3", str(first), "--out", str(png), "--db", db, "--device", "cpu")
    assert code == 0 and png.is_file(), out
    code, out = _mm("caption", str(first), "--vlm", str(vlm_dir), "--device", "cpu", "--json")
    assert code == 0, out
    attributed = {Path(r["image"]).name: r["caption"] for r in done}
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert rows and rows[0]["caption"] == attributed[first.name], out
