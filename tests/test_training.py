"""Training a projection on the tiny stack: data layouts, feature cache, loss, resume, Ctrl-C, card, CLI."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

from commands import app
from commands._app import ExitCode
from mmtui.run.images import read_image_bytes
from mmtui.stacks.projection import load_projection, read_card
from mmtui.training import caption_data as cd
from mmtui.training import train as tr
from mmtui.training.caption_loss import caption_nll
from mmtui.training.data import caption_tokens, prepare_data

runner = CliRunner()
COLORS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 40), (20, 20, 20), (240, 240, 240), (120, 60, 200)]


def _photo(path: Path, seed: int) -> Path:
    """A small JPEG of coloured rectangles, different for every seed."""
    rng = random.Random(seed)
    img = Image.new("RGB", (80, 64), COLORS[seed % len(COLORS)])
    for _ in range(4):
        x, y = rng.randrange(60), rng.randrange(44)
        img.paste(rng.choice(COLORS), (x, y, x + 20, y + 20))
    img.save(path, quality=90)
    return path


@pytest.fixture
def flickr(tmp_path: Path) -> Path:
    root = tmp_path / "flickr8k"
    (root / "images").mkdir(parents=True)
    rows = ["image\tcaption\tsplit"]
    for i, split in enumerate(["train", "train", "train", "dev", "none", "test", "test"]):
        name = f"{i}_photo.jpg"
        _photo(root / "images" / name, i)
        rows += [f"{name}\tA dog runs on the beach .\t{split}", f"{name}\tA man riding a horse .\t{split}"]
    (root / "captions.tsv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture
def coco(tmp_path: Path) -> Path:
    images = tmp_path / "coco" / "train2017"
    images.mkdir(parents=True)
    (tmp_path / "coco" / "annotations").mkdir()
    data = {"images": [], "annotations": []}
    for i in range(5):
        name = f"{i:012d}.jpg"
        _photo(images / name, 10 + i)
        data["images"].append({"id": i, "file_name": name})
        data["annotations"].append({"id": 100 + i, "image_id": i, "caption": "A bird sitting on a branch"})
    path = tmp_path / "coco" / "annotations" / "captions_train2017.json"
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def classes(tmp_path: Path) -> Path:
    root = tmp_path / "classes"
    root.mkdir()
    for i, name in enumerate(["n01_tench", "n02_great_white_shark", "n03_umbrella", "n04_unicycle"]):
        _photo(root / f"{name}.JPEG", 20 + i)
    return root


def test_tidy_caption_and_class_caption():
    assert cd.tidy_caption("A dog runs through the grass .") == " a dog runs through the grass."
    assert cd.tidy_caption("  Two  men , one bike") == " two men, one bike."
    assert cd.tidy_caption("I see NASA") == " I see NASA."
    assert cd.tidy_caption("   ") == ""
    assert cd.class_caption("great_white_shark") == "A great white shark."
    assert cd.class_caption("umbrella") == "An umbrella."
    assert cd.class_caption("unicycle") == "A unicycle."


def test_readers(flickr, coco, classes):
    f = cd.read_flickr8k(flickr)
    assert len(f.images) == 7 and sum(im.heldout for im in f.images) == 2
    assert all(len(im.captions) == 2 for im in f.images)
    c = cd.read_coco(coco, holdout=2)  # image folder found from the JSON's name
    assert c.images[0].path.parent == coco.parent.parent / "train2017"
    assert sum(im.heldout for im in c.images) == 2
    assert c.describe()["train_images"] == 3
    k = cd.read_class_folder(classes, holdout=1)
    assert sorted(im.captions[0] for im in k.images) == [
        "A great white shark.",
        "A tench.",
        "A unicycle.",
        "An umbrella.",
    ]
    # the held-out choice depends on the file names only, so it is the same on every machine
    assert [im.path.name for im in cd.read_class_folder(classes, holdout=1).images if im.heldout] == [
        im.path.name for im in k.images if im.heldout
    ]


def test_bad_data_is_one_clear_error(tmp_path, classes):
    with pytest.raises(cd.DataError, match="captions.tsv"):
        cd.read_flickr8k(tmp_path)
    bad = tmp_path / "captions.json"
    bad.write_text("{}")
    with pytest.raises(cd.DataError, match="not a COCO captions file"):
        cd.read_coco(bad, tmp_path)
    _photo(classes / "noclass.jpg", 1)
    with pytest.raises(cd.DataError, match="<id>_<class name>"):
        cd.read_class_folder(classes)


def test_features_cached_once_per_image(tiny_stack, flickr, tmp_path):
    paths = sorted((flickr / "images").iterdir())
    dup = tmp_path / "dup.jpg"
    dup.write_bytes(paths[0].read_bytes())
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    cache = cd.FeatureCache(tmp_path / "fc", "tiny")
    feats = cd.compute_features(tiny_stack.encoder, tiny_stack.device, [*paths, dup, broken], cache, batch_size=3)
    assert feats.values.shape == (7, tiny_stack.n_patches, tiny_stack.encoder.dim)
    assert feats.sha_of[dup] == feats.sha_of[paths[0]]
    assert len(feats.problems) == 1 and "broken.jpg" in str(feats.problems[0])
    assert len(list((tmp_path / "fc").rglob("*.npy"))) == 7
    direct = tiny_stack.encoder(tiny_stack.encoder.preprocess([Image.open(paths[2]).convert("RGB")]))[0]
    assert torch.allclose(feats.values[feats.row[feats.sha_of[paths[2]]]].float(), direct, atol=1e-2)

    class Exploding(torch.nn.Module):  # a second pass must read everything from the cache
        n_patches, dim = tiny_stack.n_patches, tiny_stack.encoder.dim
        preprocess = tiny_stack.encoder.preprocess

        def forward(self, pixels):
            raise AssertionError("encoder called although every feature is cached")

    again = cd.compute_features(Exploding(), tiny_stack.device, paths, cache)
    assert torch.equal(again.values, feats.values[: len(again.values)])


def test_caption_nll_equals_plain_cross_entropy(tiny_stack):
    torch.manual_seed(0)
    proj = tr.new_projection(tiny_stack, tr.TrainConfig(norm=None))
    feats = torch.randn(2, tiny_stack.n_patches, tiny_stack.encoder.dim)
    caps = [caption_tokens(tiny_stack, "A dog runs.", 40), caption_tokens(tiny_stack, "A man on a horse", 40)]
    nll, count = caption_nll(tiny_stack, proj, feats, caps)
    prompt = tiny_stack.tokenize(tiny_stack.prompt)
    expected, n = 0.0, 0
    for i, cap in enumerate(caps):  # one sequence at a time, through the full LM with its own head
        ids = torch.tensor([prompt + cap])
        embeds = torch.cat([proj(feats[i : i + 1]), tiny_stack.embed_tokens(ids)], 1)
        logits = tiny_stack.lm(inputs_embeds=embeds).logits[0]
        start = tiny_stack.n_patches + len(prompt) - 1
        expected += F.cross_entropy(logits[start : start + len(cap)], torch.tensor(cap), reduction="sum").item()
        n += len(cap)
    assert count == n and caps[0][-1] == tiny_stack.eos_token_id
    assert nll.item() == pytest.approx(expected, rel=1e-5)


def test_norm_auto_matches_word_embeddings(tiny_stack):
    proj = tr.new_projection(tiny_stack, tr.TrainConfig(norm="auto", learn_scale=True))
    out = proj(torch.randn(3, 5, tiny_stack.encoder.dim))
    want = tiny_stack.lm.get_input_embeddings().weight.norm(dim=-1).mean()
    assert torch.allclose(out.norm(dim=-1), want.expand(3, 5), rtol=1e-4)
    assert {n for n, p in proj.named_parameters() if p.requires_grad} == {"log_scale", "linear.weight", "linear.bias"}


def _data(tiny_stack, flickr, coco, tmp_path, exclude=()):
    sources = [cd.read_flickr8k(flickr), cd.read_coco(coco, holdout=2)]
    return prepare_data(tiny_stack, sources, tmp_path / "fc", exclude=exclude)


def test_prepare_data_holds_out_and_excludes(tiny_stack, flickr, coco, tmp_path):
    data = _data(tiny_stack, flickr, coco, tmp_path)
    assert len(data.train) == 5 + 3 and {t.kind for t in data.train} == {"flickr8k", "coco"}
    assert {k: len(v) for k, v in data.heldout.items()} == {"flickr8k:flickr8k": 2, "coco:captions_train2017.json": 2}
    train_image = flickr / "images" / "0_photo.jpg"
    sha = cd.image_sha256s([train_image.parent]) & {read_image_bytes(train_image)[1]}
    excluded = _data(tiny_stack, flickr, coco, tmp_path, exclude=sha)
    assert len(excluded.train) == 7 and len(excluded.heldout["flickr8k:flickr8k"]) == 3
    assert data.sources[0]["sha256_train"] != excluded.sources[0]["sha256_train"]
    assert len(data.only(["coco"]).train) == 3


def test_resume_after_ctrl_c_equals_a_straight_run(tiny_stack, flickr, coco, tmp_path):
    data = _data(tiny_stack, flickr, coco, tmp_path)
    config = tr.TrainConfig(epochs=2, batch_size=4, lr=1e-2, checkpoint_every=100)  # 4 steps per epoch: 8 steps
    straight, facts = tr.fit(tiny_stack, data, config, tmp_path / "a.ckpt")
    assert facts["steps"] == 8 and facts["steps_per_epoch"] == 4

    def stop_at_3(p: tr.TrainProgress) -> None:
        if p.phase == "train" and p.done == 3:
            raise KeyboardInterrupt

    with pytest.raises(tr.TrainingInterrupted, match="step 3") as stop:
        tr.fit(tiny_stack, data, config, tmp_path / "b.ckpt", on_progress=stop_at_3)
    assert stop.value.checkpoint.is_file()
    resumed, facts = tr.fit(tiny_stack, data, config, tmp_path / "b.ckpt")
    assert facts["resumed_at_step"] == 3
    assert torch.allclose(resumed.linear.weight, straight.linear.weight, atol=1e-6)
    assert not torch.equal(resumed.linear.weight, tr.new_projection(tiny_stack, config).linear.weight)
    with pytest.raises(tr.TrainingError, match="another run"):
        tr.fit(tiny_stack, data, tr.TrainConfig(epochs=2, batch_size=4, lr=5e-3), tmp_path / "b.ckpt")


def test_train_projection_writes_projection_and_card(tiny_stack, flickr, coco, classes, tmp_path):
    sources = [cd.read_flickr8k(flickr), cd.read_coco(coco, holdout=2), cd.read_class_folder(classes, holdout=1)]
    out = tmp_path / "proj.safetensors"
    config = tr.TrainConfig(epochs=1, batch_size=8, lr=1e-2)
    result = tr.train_projection(tiny_stack, sources, out, config, cache_dir=tmp_path / "fc", examples=2)
    card = read_card(out)
    assert card == json.loads((tmp_path / "proj.safetensors.json").read_text()) == result.card
    assert [s["kind"] for s in card["data"]] == ["flickr8k", "coco", "classes"]
    assert all(len(s["sha256_train"]) == 64 for s in card["data"])
    assert card["config"]["lr"] == 1e-2 and card["training"]["steps"] == 2  # (10 + 3 + 3) captions / 8
    for losses in card["heldout"].values():
        assert losses["matched"] > 0 and losses["shuffled"] > 0
        assert losses["margin"] == pytest.approx(losses["shuffled"] - losses["matched"])
    assert len(card["examples"]) == 2 + 2 + 1 and card["examples"][0]["human"]
    loaded = load_projection(out, tiny_stack.encoder.dim, tiny_stack.projection.d_out)
    assert loaded.norm == pytest.approx(card["training"]["norm_value"])
    assert torch.allclose(loaded.linear.weight, result.projection.linear.weight)


def test_cli_train_projection_then_caption(flickr, tmp_path):
    out = tmp_path / "p.safetensors"
    args = ["train-projection", "--preset", "tiny", "--device", "cpu", "--flickr8k", str(flickr), "--out", str(out)]
    args += ["--epochs", "1", "--batch-size", "4", "--cache-dir", str(tmp_path / "fc"), "--fixed-scale", "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == ExitCode.OK, result.output
    (card,) = [json.loads(line) for line in result.stdout.splitlines()]
    assert card["projection"] == str(out) and card["config"]["learn_scale"] is False
    assert "training" in result.stderr  # the progress bars are on stderr
    images = flickr / "images"
    (images / "broken.jpg").write_bytes(b"")
    result = runner.invoke(app, ["caption", str(images), "--preset", "tiny", "--device", "cpu", "--json"])
    assert result.exit_code == ExitCode.PARTIAL
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == 7 and {"image", "sha256", "caption", "prompt", "preset"} <= rows[0].keys()
    assert [line for line in result.stderr.splitlines() if "broken.jpg" in line][0].count("empty file") == 1


def test_cli_errors_are_one_line(tmp_path):
    result = runner.invoke(app, ["train-projection", "--preset", "tiny", "--device", "cpu"])
    assert result.exit_code == ExitCode.FAILED and "no training data" in result.stderr
    result = runner.invoke(app, ["train-projection", "--preset", "tiny", "--flickr8k", str(tmp_path)])
    assert result.exit_code == ExitCode.FAILED and "captions.tsv" in result.stderr
    result = runner.invoke(app, ["caption", str(tmp_path / "nowhere"), "--preset", "tiny", "--device", "cpu"])
    assert result.exit_code == ExitCode.FAILED and "no such file or folder" in result.stderr
