"""Idefics3 and SmolVLM checkpoints as stacks (mmtui.stacks.idefics), on tiny random models saved to folders with
their processors (tiny SigLIP-style vision model + tiny Llama, built offline): the global image's tokens follow the
template, the stack's image features and logits equal the model's own, scores equal Captum's, decoding equals the
checkpoint's lm_head @ down_proj, the caption equals the model's own generate, image tokens map to the
pixel-shuffled grid, and attribute + neurons + ablate (then heatmap and caption) run from the CLI.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import coco_files

# the checkpoints' chat templates (Idefics3-8B-Llama3; SmolVLM's is transformers' DEFAULT_CHAT_TEMPLATE)
IDEFICS3_TEMPLATE = (
    "<|begin_of_text|>{% for message in messages %}{{message['role'].capitalize()}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
ROW_COL = [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]
# (image px, patch px, scale factor): Idefics3 8 x 8 patches -> 4 x 4 tokens; SmolVLM 12 x 12 patches -> 3 x 3
SHAPES = {"idefics3": (32, 4, 2), "smolvlm": (48, 4, 4)}


def save_tiny_idefics(folder: Path, kind: str) -> Path:
    """A random Idefics3 or SmolVLM (tiny vision model + tiny Llama) with its processor, saved with save_pretrained.
    The image processor splits images by default, as the real checkpoints' do."""
    import transformers

    from mmtui.stacks.tiny import tiny_tokenizer, tiny_vlm_text_config

    image_px, patch, scale = SHAPES[kind]
    tok = copy.deepcopy(tiny_tokenizer())
    start = "<|begin_of_text|>" if kind == "idefics3" else "<|im_start|>"
    specials = [start, "<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>", *ROW_COL]
    tok.add_special_tokens({"additional_special_tokens": specials})
    prefix = "Idefics3" if kind == "idefics3" else "SmolVLM"
    vision = getattr(transformers, f"{prefix}VisionConfig")(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_px,
        patch_size=patch,
    )
    text = tiny_vlm_text_config(tok, max_positions=128)
    config = getattr(transformers, f"{prefix}Config")(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        scale_factor=scale,
        pad_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0 if kind == "idefics3" else 1)
    model = getattr(transformers, f"{prefix}ForConditionalGeneration")(config)
    with torch.no_grad():  # image tokens of the word embeddings' scale, so the caption depends on the image
        model.model.connector.modality_projection.proj.weight.mul_(8.0)
    eou = tok.convert_tokens_to_ids("<end_of_utterance>")
    model.generation_config.eos_token_id = [tok.eos_token_id, eou]
    model.generation_config.pad_token_id = tok.eos_token_id
    image_processor = getattr(transformers, f"{prefix}ImageProcessor")(
        size={"longest_edge": 2 * image_px}, max_image_size={"longest_edge": image_px}, do_image_splitting=True
    )
    seq_len = (image_px // patch // scale) ** 2
    if kind == "idefics3":
        processor: Any = transformers.Idefics3Processor(
            image_processor=image_processor, tokenizer=tok, image_seq_len=seq_len, chat_template=IDEFICS3_TEMPLATE
        )
    else:
        from transformers.models.smolvlm.processing_smolvlm import DEFAULT_CHAT_TEMPLATE

        processor = transformers.SmolVLMProcessor(
            image_processor=image_processor,
            tokenizer=tok,
            video_processor=transformers.SmolVLMVideoProcessor(),
            image_seq_len=seq_len,
            chat_template=DEFAULT_CHAT_TEMPLATE,
        )
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=["idefics3", "smolvlm"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def model_dir(kind: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_idefics(tmp_path_factory.mktemp(kind) / f"tiny-{kind}", kind)


@pytest.fixture(scope="module")
def stack32(model_dir: Path):
    from mmtui.stacks import load_stack

    return load_stack(vlm=str(model_dir), device="cpu")


@pytest.fixture(scope="module")
def theirs(model_dir: Path) -> tuple[Any, Any]:
    """The checkpoint as transformers loads it: (model, processor)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    return AutoModelForImageTextToText.from_pretrained(model_dir).eval(), AutoProcessor.from_pretrained(model_dir)


def _inputs(processor: Any, stack: Any, images: list) -> Any:
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": stack.prompt}]}],
        add_generation_prompt=True,
    )
    return processor(images=images, text=text, do_image_splitting=False, return_tensors="pt")


def test_global_image_tokens_follow_the_template(stack32, kind: str) -> None:
    """One contiguous run of image_seq_len tokens between <fake_token_around_image><global-img> and
    <fake_token_around_image>, after the user header; the grid is the pixel-shuffled one."""
    image_px, patch, scale = SHAPES[kind]
    side = image_px // patch // scale
    stack = stack32
    assert stack.grid == (side, side) and stack.n_patches == side * side
    assert stack.cells == list(range(side * side))
    start = "<|begin_of_text|>" if kind == "idefics3" else "<|im_start|>"
    assert stack.tokenizer.decode(stack.before_ids) == f"{start}User:<fake_token_around_image><global-img>"
    assert stack.tokenizer.decode(stack.after_ids).startswith("<fake_token_around_image>Describe the image")
    assert stack.tokenizer.decode(stack.after_ids).endswith("<end_of_utterance>\nAssistant:")
    assert stack.adapter.family.name == "llama" and stack.n_layers == 2
    assert stack.fingerprint["vlm"].startswith("Idefics3" if kind == "idefics3" else "SmolVLM")
    added = stack.tokenizer.convert_tokens_to_ids(["<image>", "<global-img>", "<row_1_col_1>", "<|endoftext|>"])
    assert stack.real_vocab <= min(added[:3]) and added[3] < stack.real_vocab
    fp = stack.fingerprint
    assert len(fp["lm_sha256"]) == 64 and fp["vlm_image"] == f"global {image_px}px, no splitting"


def test_encode_equals_the_models_image_features(stack32, theirs, pil_images) -> None:
    model, processor = theirs
    inputs = processor.image_processor(images=[[im] for im in pil_images[:2]], do_image_splitting=False)
    pixels = torch.as_tensor(np.asarray(inputs["pixel_values"]))
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=pixels).pooler_output
    torch.testing.assert_close(stack32.encode(pil_images[:2]), torch.stack(features))


def test_logits_equal_the_models_own(stack32, theirs, pil_images) -> None:
    """build_inputs gives the input the model builds from the processor's ids and pixels: same length, same logits
    at every position."""
    model, processor = theirs
    inputs = _inputs(processor, stack32, pil_images[:1])
    with torch.no_grad():
        want = model(**inputs).logits[0]
        embeds, lengths = stack32.build_inputs(stack32.encode(pil_images[:1]), [[]])
        hidden = stack32.lm.base_model(inputs_embeds=embeds).last_hidden_state
    assert lengths[0] == inputs["input_ids"].shape[1]
    ids = inputs["input_ids"][0].tolist()
    image_id = processor.image_token_id
    assert [i for i, t in enumerate(ids) if t == image_id] == list(range(*stack32.image_slice.indices(len(ids))))
    torch.testing.assert_close(stack32.logits(hidden[0]), want, rtol=1e-5, atol=1e-5)


def test_caption_equals_generate(stack32, theirs, pil_images) -> None:
    model, processor = theirs
    stops = set(stack32.stop_token_ids)
    captions = set()
    for image in pil_images:
        inputs = _inputs(processor, stack32, [image])
        with torch.no_grad():
            out = model.generate(**inputs, do_sample=False, max_new_tokens=12)[0, inputs["input_ids"].shape[1] :]
        want = out.tolist()
        want = want[: next((i for i, t in enumerate(want) if t in stops), len(want))]
        assert stack32.generate(stack32.encode([image]), max_new_tokens=12)[0] == want
        assert stack32.caption([image], max_new_tokens=12)[0] == stack32.caption_text(want)
        captions.add(tuple(want))
    assert len(captions) > 1  # the caption depends on the image: the comparison can fail


def test_scores_equal_captum_in_float64(model_dir: Path, pil_images) -> None:
    from captum.attr import LayerGradientXActivation

    from mmtui.run.attribution import resolve_target, score_targets
    from mmtui.stacks import load_stack

    stack = load_stack(vlm=str(model_dir), device="cpu", dtype=torch.float64)
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


@pytest.mark.parametrize("convention", ["raw", "ln_f"])
def test_decoding_equals_the_checkpoints_matrices(stack32, theirs, convention: str) -> None:
    """A unit's decoding is the checkpoint's lm_head (words only) @ its text model's down_proj column (times the
    final norm's gain for ln_f)."""
    from mmtui.run.decoding import decode_layer

    model, _ = theirs
    text_model = model.model.text_model
    w_out = text_model.layers[1].mlp.down_proj.weight  # [d_model, d_mlp]
    if convention == "ln_f":
        w_out = w_out * text_model.norm.weight[:, None]
    logits = model.lm_head.weight[: stack32.real_vocab] @ w_out  # [words, d_mlp]
    ids, vals = decode_layer(stack32, 1, convention, k=10, chunk=7)
    expected = logits.topk(10, dim=0)
    torch.testing.assert_close(vals, expected.values.T, rtol=1e-5, atol=1e-6)
    assert torch.equal(ids, expected.indices.T)


def test_cells_follow_the_pixel_shuffle(stack32, theirs, kind: str) -> None:
    """A planted pattern through the model's own connector: patch (r, c) of the vision grid carries r * side + c;
    every value image token t receives must come from a patch of t's cell of the merged grid, and each cell
    receives all scale^2 of its patches."""
    model, _ = theirs
    image_px, patch, scale = SHAPES[kind]
    side = image_px // patch
    width = 3
    pattern = torch.arange(side * side, dtype=torch.float32)[None, :, None].expand(1, -1, width).contiguous()
    shuffled = model.model.connector.pixel_shuffle(pattern, scale)[0]  # [tokens, width * scale^2]
    grid_h, grid_w = stack32.grid
    assert shuffled.shape[0] == stack32.n_patches == grid_h * grid_w
    for token, cell in enumerate(stack32.cells):
        patches = {int(v) for v in shuffled[token].tolist()}
        row, col = divmod(cell, grid_w)
        want = {(row * scale + i) * side + col * scale + j for i in range(scale) for j in range(scale)}
        assert patches == want, (token, cell)
    # and the stack's encoder is that shuffle: its features are the vision model's output, shuffled
    pixels = torch.randn(1, 3, image_px, image_px)
    with torch.no_grad():
        hidden = model.model.vision_model(pixel_values=pixels).last_hidden_state
    torch.testing.assert_close(stack32.encoder(pixels), model.model.connector.pixel_shuffle(hidden, scale))


def test_heatmap_maps_image_tokens_to_the_grid(stack32) -> None:
    """A planted pattern in the LM: a hook writes each image token's index into a unit; the heatmap must read it
    back at row = i // grid_w, column = i % grid_w, and nothing from the header or the text."""
    from PIL import Image

    from mmtui.experiments import heatmap

    stack = stack32
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
    np.testing.assert_array_equal(maps[0, 0], np.arange(stack.n_patches, dtype=np.float32).reshape(stack.grid))


def test_a_processor_that_disagrees_is_one_clear_error(tmp_path: Path) -> None:
    """An image_seq_len that is not what the pixel shuffle gives is refused with one line."""
    from mmtui.errors import StackError
    from mmtui.stacks import load_stack

    folder = save_tiny_idefics(tmp_path / "bad", "idefics3")
    config = folder / "processor_config.json"
    data = json.loads(config.read_text())
    data["image_seq_len"] = 9
    config.write_text(json.dumps(data))
    with pytest.raises(StackError, match="image_seq_len is 9"):
        load_stack(vlm=str(folder), device="cpu")


def test_smolvlm2_without_num2words_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SmolVLM2's processor refuses to start without num2words: the load says so in one line."""
    from transformers.models.smolvlm import processing_smolvlm

    from mmtui.errors import StackError
    from mmtui.stacks import load_stack

    folder = save_tiny_idefics(tmp_path / "smol", "smolvlm")
    monkeypatch.setattr(processing_smolvlm, "num2words", None)
    with pytest.raises(StackError, match="num2words") as err:
        load_stack(vlm=str(folder), device="cpu")
    assert "\n" not in str(err.value)


def _mm(*args: str) -> tuple[int, str]:
    from typer.testing import CliRunner

    from commands import app

    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


def test_cli_attribute_neurons_ablate(model_dir: Path, tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for f in coco_files(2):
        shutil.copy(f, images / f.name)
    db = str(tmp_path / "vlm.db")
    code, out = _mm("attribute", str(images), "--vlm", str(model_dir), "--device", "cpu", "--db", db, "--json")
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
    code, out = _mm("caption", str(first), "--vlm", str(model_dir), "--device", "cpu", "--json")
    assert code == 0, out
    attributed = {Path(r["image"]).name: r["caption"] for r in done}
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert rows and rows[0]["caption"] == attributed[first.name], out
