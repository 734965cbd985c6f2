"""Encoders (CLIP / SigLIP / DINOv2 through transformers, timm ViTs) and projections (linear, LLaVA's MLP, any
nn.Module), on tiny random models built from their configs, offline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from commands import app
from commands._app import ExitCode
from mmtui.errors import ProjectionError, StackError
from mmtui.stacks.projection import MLPProjection, Projection, load_projection, read_card
from mmtui.stacks.vision import EncoderSpec, HFVisionEncoder, TimmEncoder, parse_encoder_spec

runner = CliRunner()
SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4)


def _tiny_hf(kind: str):
    """(model, processor) of a tiny random vision model of `kind`: 32 x 32 px in 8 px patches (4 x 4), or for
    DINOv2 a 28 x 35 px crop in 7 px patches (a 4 x 5 grid: rows and columns cannot be swapped unnoticed)."""
    import transformers as T

    torch.manual_seed(0)
    if kind == "clip":
        model = T.CLIPVisionModel(T.CLIPVisionConfig(image_size=32, patch_size=8, **SMALL))
        proc = T.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    elif kind == "siglip":
        model = T.SiglipVisionModel(T.SiglipVisionConfig(image_size=32, patch_size=8, **SMALL))
        proc = T.SiglipImageProcessor(size={"height": 32, "width": 32})
    else:
        model = T.Dinov2Model(T.Dinov2Config(image_size=28, patch_size=7, **SMALL))
        proc = T.BitImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 35})
    return model.eval(), proc


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each tiny model saved with its processor, as a user's local folder (loaded by AutoImageProcessor)."""
    root = tmp_path_factory.mktemp("encoders")
    folders = {}
    for kind in ("clip", "siglip", "dinov2"):
        model, proc = _tiny_hf(kind)
        model.save_pretrained(root / kind)
        proc.save_pretrained(root / kind)
        folders[kind] = root / kind
    return folders


def _timm_vit(**kw):
    import timm

    torch.manual_seed(0)
    args = dict(img_size=32, patch_size=8, depth=3, embed_dim=32, num_heads=2, num_classes=0) | kw
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **args).eval()


def _timm_encoder(layer=None, cls=False, **kw) -> TimmEncoder:
    from mmtui.stacks.vision import timm_transform

    return TimmEncoder(_timm_vit(**kw), "tiny-vit", 32, timm_transform(32, 32, 0.5, 0.5), layer=layer, cls=cls)


# -- the --encoder spec ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("efficientnet-lite0", EncoderSpec("efficientnet-lite0")),
        ("beit:microsoft/beit-large-patch16-224-pt22k", EncoderSpec("beit", "microsoft/beit-large-patch16-224-pt22k")),
        ("hf:openai/clip-vit-large-patch14-336@-2", EncoderSpec("hf", "openai/clip-vit-large-patch14-336", -2)),
        ("hf:/models/dino v2@3+cls", EncoderSpec("hf", "/models/dino v2", 3, True)),
        ("hf:google/siglip-so400m-patch14-384", EncoderSpec("hf", "google/siglip-so400m-patch14-384")),
        ("timm:vit_base_patch16_224+cls", EncoderSpec("timm", "vit_base_patch16_224", None, True)),
    ],
)
def test_encoder_spec_parses_and_prints_back(text, want):
    assert parse_encoder_spec(text) == want
    assert str(want) == text


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("clip", "unknown encoder"),
        ("hf:", "names no model"),
        ("hf:openai/clip@penultimate", "layer number"),
        ("hf:openai/clip@-2@3", "layer number"),
        ("vit:foo", "unknown encoder"),
    ],
)
def test_bad_encoder_spec_is_one_line(text, message):
    with pytest.raises(StackError, match=message) as error:
        parse_encoder_spec(text)
    assert "\n" not in str(error.value)


def test_cli_refuses_a_bad_encoder_before_loading(tmp_path, monkeypatch):
    import mmtui.stacks.presets as presets

    monkeypatch.setattr(presets, "load_lm", lambda *a, **k: pytest.fail("a model was loaded"))
    result = runner.invoke(app, ["attribute", str(tmp_path), "--preset", "tiny", "--encoder", "hf:x@top"])
    assert result.exit_code == ExitCode.FAILED
    assert "layer number" in result.stderr and len(result.stderr.strip().splitlines()) == 1


# -- transformers encoders: layer choice, CLS, grid -------------------------------------------------------
@pytest.mark.parametrize("kind", ["clip", "siglip", "dinov2"])
def test_layer_and_cls_match_the_models_hidden_states(kind):
    model, proc = _tiny_hf(kind)
    pixels = torch.randn(
        2, 3, *proc(images=[Image.new("RGB", (40, 40))], return_tensors="pt")["pixel_values"].shape[-2:]
    )
    with torch.no_grad():
        ref = model(pixel_values=pixels, output_hidden_states=True)
    special = 0 if kind == "siglip" else 1
    grid = (4, 5) if kind == "dinov2" else (4, 4)
    for layer in (None, 0, 1, -2, -1, 3):
        want = ref.last_hidden_state if layer is None else ref.hidden_states[layer]
        enc = HFVisionEncoder(model, proc, kind, layer=layer)
        assert enc.grid == grid and enc.prefix_tokens == 0 and enc.n_patches == grid[0] * grid[1]
        torch.testing.assert_close(enc(pixels), want[:, special:], rtol=0, atol=0)
        if kind != "siglip":
            with_cls = HFVisionEncoder(model, proc, kind, layer=layer, cls=True)
            assert with_cls.prefix_tokens == 1 and with_cls.n_patches == 1 + grid[0] * grid[1]
            torch.testing.assert_close(with_cls(pixels), want, rtol=0, atol=0)  # CLS first, then the patches
    if kind == "clip":  # CLIP has no final norm on its tokens: the last layer is the model's output
        torch.testing.assert_close(ref.hidden_states[-1], ref.last_hidden_state)
    else:  # SigLIP and DINOv2 do: the default (their output) and @-1 (before it) differ
        assert not torch.allclose(ref.hidden_states[-1], ref.last_hidden_state)
    with pytest.raises(StackError, match="out of range"):
        HFVisionEncoder(model, proc, kind, layer=4)
    with pytest.raises(StackError, match="out of range"):
        HFVisionEncoder(model, proc, kind, layer=-5)
    if kind == "siglip":
        with pytest.raises(StackError, match="no CLS token"):
            HFVisionEncoder(model, proc, kind, cls=True)


def test_a_full_clip_checkpoint_gives_its_vision_tower(tmp_path):
    """LLaVA names openai/clip-vit-large-patch14-336, a whole CLIP model: hf: loads its vision tower's weights."""
    import transformers as T

    from mmtui.stacks.presets import load_encoder

    torch.manual_seed(0)
    vision = dict(image_size=32, patch_size=8, **SMALL)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=99)
    clip = T.CLIPModel(T.CLIPConfig(vision_config=vision, text_config=text)).eval()
    clip.save_pretrained(tmp_path / "clip")
    T.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        tmp_path / "clip"
    )
    enc, identity = load_encoder(f"hf:{tmp_path / 'clip'}@-2", torch.float32)
    assert identity["encoder"] == f"hf:{tmp_path / 'clip'}@-2" and enc.grid == (4, 4)
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        want = clip.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
    torch.testing.assert_close(enc(pixels), want, rtol=0, atol=0)


def test_dinov2_register_tokens_are_dropped_and_cls_kept():
    import transformers as T

    torch.manual_seed(0)
    model = T.Dinov2WithRegistersModel(
        T.Dinov2WithRegistersConfig(image_size=28, patch_size=7, num_register_tokens=4, **SMALL)
    ).eval()
    proc = T.BitImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    pixels = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        ref = model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]  # [1, 1 + 4 + 16, 32]
    enc = HFVisionEncoder(model, proc, "dinoreg", layer=-2, cls=True)
    assert enc.n_patches == 17
    torch.testing.assert_close(enc(pixels), torch.cat([ref[:, :1], ref[:, 5:]], dim=1), rtol=0, atol=0)
    torch.testing.assert_close(HFVisionEncoder(model, proc, "dinoreg", layer=-2)(pixels), ref[:, 5:])


def test_grid_rounds_down_as_the_patch_embedding_does():
    """384 px in 14 px patches is 27 x 27 (SigLIP so400m): the strided conv leaves the remainder out."""
    import transformers as T

    model = T.SiglipVisionModel(T.SiglipVisionConfig(image_size=36, patch_size=8, **SMALL)).eval()
    enc = HFVisionEncoder(model, T.SiglipImageProcessor(size={"height": 36, "width": 36}), "siglip36")
    assert enc.grid == (4, 4) and enc(torch.zeros(1, 3, 36, 36)).shape == (1, 16, 32)


def test_stack_fingerprint_holds_the_encoder_spec_and_projection(hf_folders, tmp_path):
    from mmtui import load_stack
    from mmtui.stacks.projection import file_sha256

    path = tmp_path / "mlp.safetensors"
    MLPProjection(32, 32).save(path)
    folder = hf_folders["clip"]
    stack = load_stack("tiny", device="cpu", encoder=f"hf:{folder}@-2", projection=path)
    assert stack.identity["encoder"] == f"hf:{folder}@-2"
    assert stack.identity["projection_sha256"] == file_sha256(path)
    assert isinstance(stack.projection, MLPProjection) and stack.grid == (4, 4) and stack.n_patches == 16
    other = load_stack("tiny", device="cpu", encoder=f"hf:{folder}@-1+cls", projection=path)
    assert other.n_patches == 17 and other.fingerprint_id != stack.fingerprint_id
    assert load_stack("tiny", device="cpu").identity == {"preset": "tiny", "seed": 0}  # the plain preset as before
    with pytest.raises(StackError, match="needs --projection"):
        load_stack("tiny", device="cpu", encoder=f"hf:{folder}")
    with pytest.raises(StackError, match="'bert'.*clip, dinov2"):
        from transformers import BertConfig

        BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8).save_pretrained(
            tmp_path / "bert"
        )
        load_stack("tiny", device="cpu", encoder=f"hf:{tmp_path / 'bert'}", projection=path)


@pytest.mark.parametrize(("kind", "cls"), [("clip", False), ("clip", True), ("siglip", False), ("dinov2", True)])
def test_a_planted_patch_lights_its_own_position(kind, cls):
    """At layer 0 (patch embedding, before any attention) a change inside patch (row, col) changes that token
    alone: the encoder's position prefix + row * grid_w + col."""
    model, proc = _tiny_hf(kind)
    enc = HFVisionEncoder(model, proc, kind, layer=0, cls=cls)
    patch = model.config.patch_size
    (gh, gw), offset = enc.grid, int(cls)
    frame = enc.preprocess([Image.new("RGB", (64, 64))]).shape[-2:]
    for row, col in [(0, 0), (1, 3), (gh - 1, gw - 1), (gh - 1, 0)]:
        plain = torch.zeros(1, 3, *frame)
        planted = plain.clone()
        planted[..., row * patch : (row + 1) * patch, col * patch : (col + 1) * patch] = 1.0
        diff = (enc(planted) - enc(plain)).norm(dim=-1)[0]  # [n_patches]
        assert diff.shape[0] == enc.n_patches
        assert torch.nonzero(diff > 1e-6).flatten().tolist() == [offset + row * gw + col]


def _stack_with(encoder, seed: int = 1):
    """The tiny LM with `encoder` and a random MLP projection (float64: exact causal zeros stay zeros)."""
    from mmtui.stacks.base import Stack
    from mmtui.stacks.tiny import tiny_parts

    lm, _beit, _proc, _proj, tok = tiny_parts(0, torch.float64)
    torch.manual_seed(seed)
    proj = MLPProjection(encoder.dim, lm.config.n_embd).double()
    return Stack(
        name="test",
        encoder=encoder.double(),
        projection=proj,
        lm=lm,
        tokenizer=tok,
        real_vocab=len(tok),
        identity={"test": seed},
        dtype=torch.float64,
    )


@pytest.mark.parametrize(("kind", "cls"), [("clip", True), ("siglip", False), ("dinov2", False), ("timm", True)])
def test_heatmap_maps_a_planted_patch_to_its_row_and_column(kind, cls):
    """Two pictures differing only inside patch (row, col), through encoder @0 -> MLP projection -> causal LM:
    the heatmap code's grid is unchanged at every cell before (row, col) in row-major order and changed at it."""
    from mmtui.experiments.heatmap import batch_activation_maps

    if kind == "timm":
        enc = _timm_encoder(layer=0, cls=cls, reg_tokens=2)
        patch = 8
    else:
        model, proc = _tiny_hf(kind)
        enc = HFVisionEncoder(model, proc, kind, layer=0, cls=cls)
        patch = model.config.patch_size
    stack = _stack_with(enc)
    gh, gw = stack.grid
    size = (gw * patch, gh * patch)  # the processor's own frame: its resize and crop change nothing
    units = [(layer, u) for layer in range(stack.n_layers) for u in range(stack.d_mlp)]
    for row, col in [(0, 1), (2, 2), (gh - 1, gw - 1)]:
        plain = Image.new("RGB", size, (90, 90, 90))
        planted = plain.copy()
        planted.paste((250, 20, 20), (col * patch + 2, row * patch + 2, (col + 1) * patch - 2, (row + 1) * patch - 2))
        maps = batch_activation_maps(stack, [plain, planted], units)  # [2, n_units, gh, gw]
        changed = np.abs(maps[1] - maps[0]).max(axis=0).reshape(-1) > 1e-9
        assert changed.argmax() == row * gw + col and changed[row * gw + col]


def test_scores_equal_captum_with_a_clip_tower_with_cls_and_the_mlp_projector(pil_images):
    """grad x act of every MLP unit at every image position (the CLS position among them) equals Captum's
    LayerGradientXActivation on the same modules, float64."""
    from captum.attr import LayerGradientXActivation

    from mmtui.run.attribution import resolve_target, score_targets

    model, proc = _tiny_hf("clip")
    stack = _stack_with(HFVisionEncoder(model, proc, "clip", layer=-2, cls=True))
    prefix = stack.encode(pil_images[:2])
    assert prefix.shape[1] == 17 == stack.n_patches
    targets = [resolve_target(stack, ids, w) for ids, w in zip(stack.generate(prefix), ["dog", "horse"], strict=True)]
    ours = score_targets(stack, prefix, targets, full=True)
    embeds, lengths = stack.build_inputs(prefix, [t.context_ids for t in targets])
    token_ids = torch.tensor([t.token_id for t in targets])

    def y(e: torch.Tensor) -> torch.Tensor:
        hidden = stack.lm.base_model(inputs_embeds=e).last_hidden_state
        last = hidden[torch.arange(len(lengths)), torch.tensor(lengths) - 1]
        return torch.softmax(stack.lm.get_output_embeddings()(last), dim=-1)[torch.arange(len(lengths)), token_ids]

    layers = [stack.adapter.w_out_module(i) for i in range(stack.n_layers)]
    with torch.enable_grad():
        theirs = LayerGradientXActivation(y, layers).attribute(embeds, attribute_to_layer_input=True)
    for i, attr in enumerate(ours):
        expected = torch.stack([t[i, :17] for t in theirs])  # [L, P, d_mlp]
        torch.testing.assert_close(attr.scores.double(), expected.double(), rtol=1e-6, atol=1e-12)
        assert expected[:, 0].abs().max() > 0  # the CLS position is scored too


# -- timm ViTs --------------------------------------------------------------------------------------------
def test_timm_vit_prefix_tokens_and_layers_match_timm():
    model = _timm_vit(reg_tokens=2)  # [CLS, 2 registers, 16 patches]
    assert model.num_prefix_tokens == 3
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        final = model.forward_features(x)
        blocks = model.forward_intermediates(
            x, indices=[0, 1, 2], return_prefix_tokens=True, norm=False, output_fmt="NLC", intermediates_only=True
        )
    for layer, cls in [(None, False), (None, True), (1, False), (2, True), (-1, False), (-2, True)]:
        enc = TimmEncoder(model, "vit", 32, lambda ims: torch.zeros(len(ims), 3, 32, 32), layer=layer, cls=cls)
        if layer is None:
            want = final
        else:
            patches, prefix = blocks[layer % 4 - 1]
            want = torch.cat([prefix, patches], dim=1)
        expect = torch.cat([want[:, :1], want[:, 3:]], dim=1) if cls else want[:, 3:]
        assert enc.grid == (4, 4) and enc.n_patches == 16 + int(cls)
        torch.testing.assert_close(enc(x), expect, rtol=0, atol=1e-6)
    with pytest.raises(StackError, match="out of range"):
        _timm_encoder(layer=4)
    with pytest.raises(StackError, match="no CLS token"):
        _timm_encoder(cls=True, class_token=False, global_pool="avg")


def test_timm_layer_choice_needs_a_vit():
    import timm

    from mmtui.stacks.vision import timm_transform

    cnn = timm.create_model("resnet18", pretrained=False, num_classes=0)
    with pytest.raises(StackError, match="ViTs"):
        TimmEncoder(cnn, "resnet18", 64, timm_transform(64, 64, 0.5, 0.5), layer=-2)


# -- projections ------------------------------------------------------------------------------------------
def test_mlp_projection_is_llavas_projector_and_round_trips(tmp_path):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    torch.manual_seed(0)
    proj = MLPProjection(24, 16)
    x = torch.randn(2, 5, 24)
    lin1, lin2 = proj.linear_1, proj.linear_2
    by_hand = F.linear(F.gelu(F.linear(x, lin1.weight, lin1.bias)), lin2.weight, lin2.bias)
    torch.testing.assert_close(proj(x), by_hand, rtol=0, atol=0)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=24, num_attention_heads=2),
        text_config=LlamaConfig(hidden_size=16, num_attention_heads=2, num_key_value_heads=2),
        vision_feature_layer=-2,
    )
    llava = LlavaMultiModalProjector(config)
    llava.load_state_dict(proj.state_dict(), strict=True)  # LLaVA's own names: linear_1, linear_2
    torch.testing.assert_close(proj(x), llava(x), rtol=0, atol=0)

    path = tmp_path / "mlp.safetensors"
    proj.save(path)
    loaded = load_projection(path, 24, 16)
    assert isinstance(loaded, MLPProjection) and loaded.settings()["kind"] == "mlp"
    torch.testing.assert_close(loaded(x), proj(x), rtol=0, atol=0)
    scaled = MLPProjection(24, 16, norm=2.5, learn_scale=True, d_hidden=40)
    scaled.save(path, card={"note": "x"})
    again = load_projection(path, 24, 16)
    assert isinstance(again, MLPProjection) and again.d_hidden == 40 and again.learn_scale
    torch.testing.assert_close(again(x), scaled(x).detach(), rtol=0, atol=1e-6)
    assert again(x).norm(dim=-1).allclose(torch.full((2, 5), 2.5), atol=1e-4)
    assert read_card(path) == {"note": "x"}
    with pytest.raises(ProjectionError, match="linear_1.weight has shape"):
        load_projection(path, 32, 16)


def test_projection_files_of_others_and_of_before(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    x = torch.randn(1, 3, 24)
    lin = nn.Linear(24, 16)
    old = tmp_path / "old.safetensors"  # written before `kind` existed: linear
    settings = {"format": "mmtui-projection/1", "d_in": 24, "d_out": 16, "norm": None, "learn_scale": False}
    save_file({"weight": lin.weight.detach(), "bias": lin.bias.detach()}, str(old), {"settings": json.dumps(settings)})
    loaded = load_projection(old, 24, 16)
    assert isinstance(loaded, Projection)
    torch.testing.assert_close(loaded(x), lin(x), rtol=0, atol=0)

    mlp = MLPProjection(24, 16)
    llava = tmp_path / "projector.safetensors"  # cut out of a LLaVA checkpoint: its key names, no settings
    save_file({f"multi_modal_projector.{k}": v.detach() for k, v in mlp.state_dict().items()}, str(llava))
    original = tmp_path / "mm_projector.bin"  # the LLaVA repo's nn.Sequential(Linear, GELU, Linear)
    seq = {"model.mm_projector.0.weight": mlp.linear_1.weight, "model.mm_projector.0.bias": mlp.linear_1.bias}
    seq |= {"model.mm_projector.2.weight": mlp.linear_2.weight, "model.mm_projector.2.bias": mlp.linear_2.bias}
    torch.save({k: v.detach().half() for k, v in seq.items()}, original)
    for path in (llava, original):
        got = load_projection(path, 24, 16)
        assert isinstance(got, MLPProjection)
        torch.testing.assert_close(got(x), mlp(x), rtol=0, atol=1e-2 if path == original else 0)
    with pytest.raises(ProjectionError, match="not 24 -> 16|maps"):
        load_projection(old, 16, 24)


def test_a_python_module_as_the_projection(tmp_path):
    from mmtui import load_stack

    tiny = load_stack("tiny", device="cpu")
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(32, 48), nn.Tanh(), nn.Linear(48, 32))
    stack = load_stack("tiny", device="cpu", projection=module)
    assert stack.projection.kind == "module" and stack.projection.module is module
    assert stack.identity["projection"] == "module:torch.nn.modules.container.Sequential"
    assert stack.fingerprint_id != tiny.fingerprint_id
    image = Image.new("RGB", (64, 64), (200, 40, 40))
    with torch.no_grad():
        want = module(tiny.encoder(tiny.pixels([image])))
    torch.testing.assert_close(stack.encode([image]), want)
    assert stack.caption([image])  # the whole stack runs
    with torch.no_grad():
        module[0].weight.add_(0.01)
    assert load_stack("tiny", device="cpu", projection=module).fingerprint_id != stack.fingerprint_id
    with pytest.raises(ProjectionError, match=r"not \[1, 2, 32\]"):
        load_stack("tiny", device="cpu", projection=nn.Linear(32, 7))
    with pytest.raises(ProjectionError, match="failed on"):
        load_stack("tiny", device="cpu", projection=nn.Linear(5, 32))


# -- training either kind ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_training_a_few_steps_of_each_kind(kind, tiny_stack, tmp_path):
    from mmtui.training import train as tr
    from mmtui.training.caption_loss import caption_nll
    from mmtui.training.data import TrainImage, TrainingData, caption_tokens

    torch.manual_seed(0)
    feats = torch.randn(6, tiny_stack.n_patches, tiny_stack.encoder.dim)
    caption = caption_tokens(tiny_stack, "A dog with a cat.", 40)
    train = [TrainImage(row=i, tokens=[caption], kind="flickr8k") for i in range(6)]
    data = TrainingData(feats, train, {}, [{"kind": "flickr8k", "sha256_train": "x"}])
    config = tr.TrainConfig(epochs=3, batch_size=2, lr=2e-2, norm=None, kind=kind, amp=False)
    before = tr.new_projection(tiny_stack, config)
    assert before.kind == kind
    trained, facts = tr.fit(tiny_stack, data, config, tmp_path / "c.ckpt")
    assert type(trained) is type(before) and facts["steps"] == 9
    with torch.no_grad():
        loss_before = caption_nll(tiny_stack, before, feats, [caption] * 6, False)[0]
        loss_after = caption_nll(tiny_stack, trained, feats, [caption] * 6, False)[0]
    assert loss_after < loss_before  # the nine steps trained it
    with pytest.raises(tr.TrainingError, match="kind"):
        tr.new_projection(tiny_stack, tr.TrainConfig(kind="conv"))


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    """Two real COCO photos (the bundled samples)."""
    import shutil

    from conftest import coco_files

    folder = tmp_path / "photos"
    folder.mkdir()
    for f in coco_files(2):
        shutil.copy(f, folder / f.name)
    return folder


def test_cli_train_projection_mlp_on_a_clip_encoder(hf_folders, photos, tmp_path):
    """train-projection --kind mlp with the tiny LM and a CLIP tower (@-2, LLaVA's layer): the file and its card
    say mlp, and the stack loads it."""
    flickr = tmp_path / "flickr8k"
    (flickr / "images").mkdir(parents=True)
    rows = ["image\tcaption\tsplit"]
    for i, photo in enumerate(sorted(photos.iterdir())):
        (flickr / "images" / photo.name).write_bytes(photo.read_bytes())
        rows += [f"{photo.name}\tA dog runs on the beach .\t{'train' if i == 0 else 'test'}"]
    (flickr / "captions.tsv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "mlp.safetensors"
    encoder = f"hf:{hf_folders['clip']}@-2"
    args = ["train-projection", "--preset", "tiny", "--encoder", encoder, "--kind", "mlp", "--device", "cpu"]
    args += ["--flickr8k", str(flickr), "--out", str(out), "--epochs", "2", "--batch-size", "1"]
    args += ["--cache-dir", str(tmp_path / "fc"), "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == ExitCode.OK, result.output
    (card,) = [json.loads(line) for line in result.stdout.splitlines()]
    assert card["projection_kind"] == "mlp" and card["config"]["kind"] == "mlp"
    assert card["stack"]["encoder"] == encoder and card["training"]["steps"] == 2
    proj = load_projection(out, 32, 32)
    assert isinstance(proj, MLPProjection) and read_card(out) == {
        k: v for k, v in card.items() if k not in ("type", "projection")
    }


# -- end to end -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("kind", "suffix"), [("clip", "@-2"), ("dinov2", "+cls")])
def test_cli_attribute_neurons_ablate_with_a_new_encoder_and_the_mlp_projector(
    hf_folders, photos, tmp_path, kind, suffix
):
    torch.manual_seed(0)
    proj = MLPProjection(32, 32)
    with torch.no_grad():  # image prompts of roughly the word embeddings' scale (as the tiny preset's)
        proj.linear_2.weight.mul_(4.0)
    path = tmp_path / "mlp.safetensors"
    proj.save(path)
    db = str(tmp_path / "cache.db")
    encoder = f"hf:{hf_folders[kind]}{suffix}"
    stack_args = ["--preset", "tiny", "--encoder", encoder, "--projection", str(path), "--device", "cpu"]
    result = runner.invoke(app, ["attribute", str(photos), *stack_args, "--db", db, "--json"])
    assert result.exit_code == ExitCode.OK, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == 2 and all(r["top"] for r in rows)
    n_positions = 21 if kind == "dinov2" else 16
    assert all(0 <= t["patch"] < n_positions for r in rows for t in r["top"])

    result = runner.invoke(app, ["runs", "--json", "--db", db])
    run = json.loads(result.stdout)
    assert run["stack"] == "tiny"
    result = runner.invoke(app, ["neurons", "--json", "--limit", "5", "--db", db])
    assert result.exit_code == ExitCode.OK, result.output
    neurons = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(neurons) == 5 and all(n["tokens"] for n in neurons)

    args = ["ablate", "--from-store", "--k", "0,4", "--seeds", "1", "--no-regenerate", "--device", "cpu"]
    result = runner.invoke(app, [*args, "--db", db, "--json"])
    assert result.exit_code == ExitCode.OK, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len([r for r in lines if r["type"] == "point"]) == 2 * (2 * 2 + 1)
    assert {(r["condition"], r["k"]) for r in lines if r["type"] == "summary"} >= {("top", 4), ("random", 4)}
