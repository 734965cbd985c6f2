"""Image-prompt decoding: nearest tokens by cosine, random vectors, nouns, scores, KS tests stored; the command."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import CAPTIONS
from typer.testing import CliRunner

from commands import app
from commands._app import ExitCode
from mmtui.experiments.prompts import (
    PromptsError,
    caption_nouns,
    decode_prompts,
    nearest_tokens,
    random_vectors,
    table,
    token_text,
)
from mmtui.run.images import load_image
from mmtui.run.pipeline import read_captions
from mmtui.store import experiments as xs

runner = CliRunner()


def test_nearest_tokens_by_cosine(tiny_stack):
    emb = tiny_stack.lm.get_input_embeddings().weight.detach()
    ids = torch.tensor([5, 77, 300])
    got = nearest_tokens(tiny_stack, emb[ids] * 3.0, k=4)  # scale does not matter for cosine
    assert got.shape == (3, 4) and got[:, 0].tolist() == ids.tolist()
    v = torch.randn(2, emb.shape[1], generator=torch.Generator().manual_seed(0))
    cos = (
        torch.nn.functional.normalize(v, dim=-1) @ torch.nn.functional.normalize(emb[: tiny_stack.real_vocab], dim=-1).T
    )
    assert nearest_tokens(tiny_stack, v, k=5).tolist() == cos.topk(5, dim=-1).indices.tolist()


def test_random_vectors_match_the_prompts_statistics():
    gen = torch.Generator().manual_seed(1)
    prompts = torch.randn(4000, 6, generator=gen) * torch.tensor([1, 2, 3, 1, 1, 1]) + 5
    rand = random_vectors(prompts, 4000, seed=3)
    assert torch.allclose(rand.mean(0), prompts.mean(0), atol=0.15)
    assert torch.allclose(rand.std(0), prompts.std(0), rtol=0.1)
    assert torch.equal(rand, random_vectors(prompts, 4000, seed=3))
    iso = random_vectors(prompts, 50, seed=0, kind="isotropic")
    assert torch.allclose(iso.norm(dim=-1), prompts.norm(dim=-1).mean().expand(50), rtol=1e-5)
    with pytest.raises(PromptsError):
        random_vectors(prompts, 5, kind="uniform")


def test_caption_nouns_and_token_text(tiny_stack):
    assert caption_nouns(["A dog with a cat on the sofa.", "Two cats and a dog."]) == ["dog", "cat", "sofa", "cats"]
    many = caption_nouns(["man horse beach dog cat bird tree"] * 1, n=3, seed=0)
    assert len(many) == 3 and many == caption_nouns(["man horse beach dog cat bird tree"], n=3, seed=0)
    ids = tiny_stack.tokenize(" dog cat")
    assert token_text(tiny_stack, ids) == ", ".join(tiny_stack.tokenizer.decode([i]).strip() for i in ids)


def test_decode_prompts_rows_scores_and_ks(tiny_stack, image_dir, bert_scorer, tmp_path):
    from mmtui.store import Store

    images = [load_image(p) for p in sorted(image_dir.glob("*.jpg"))[:2]]
    captions = read_captions(CAPTIONS)
    with Store.open(tmp_path / "p.db") as store:
        result = decode_prompts(tiny_stack, store, images, captions, n_random=20, bertscore=bert_scorer)
        kinds = [r["kind"] for r in result.rows]
        assert kinds.count("prompt") == 2 * 16 and kinds.count("random") == 20
        assert kinds.count("caption") == 2 and kinds.count("nouns") == 2
        assert all(r["bertscore"] is not None and r["clipscore"] is None for r in result.rows)
        assert {(t["sample_a"], t["sample_b"]) for t in result.tests} == {("prompt", "random"), ("nouns", "prompt")}
        assert all(0 <= t["d"] <= 1 and 0 <= t["p"] <= 1 for t in result.tests)
        stored = xs.prompt_texts(store)
        assert len(stored) == len(result.rows) and stored[0]["bertscore_model"] == bert_scorer.name
        assert len(xs.ks_tests(store, "prompts")) == 2
        means = {r["kind"]: r for r in table(result)}
        assert means["prompt"]["n_bertscore"] == 32
        assert means["prompt"]["bertscore"] == pytest.approx(np.mean(result.scores("prompt", "bertscore")))
        # the same seed gives the same random texts
        again = decode_prompts(tiny_stack, store, images, captions, n_random=20, bertscore=bert_scorer)
        assert [r["text"] for r in again.rows] == [r["text"] for r in result.rows]
        with pytest.raises(PromptsError, match="no metric"):
            decode_prompts(tiny_stack, store, images, captions)
        with pytest.raises(PromptsError, match="no image has human captions"):
            decode_prompts(tiny_stack, store, images, {"other.jpg": ["x"]}, bertscore=bert_scorer)


def test_prompts_command(image_dir, tmp_path):
    (image_dir / "00-broken.jpg").write_bytes(b"")
    args = ["--preset", "tiny", "--device", "cpu", "--db", str(tmp_path / "c.db"), "--random", "10", "--limit", "3"]
    result = runner.invoke(app, ["prompts", str(image_dir), "--captions", str(CAPTIONS), "--json", *args])
    assert result.exit_code == ExitCode.PARTIAL, result.stderr  # the empty file is named, the rest go on
    assert "00-broken.jpg" in result.stderr and "CLIPScore" in result.stderr  # no CLIP model offline: one line
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    tables = [r for r in lines if r["type"] == "table"]
    assert {r["kind"] for r in tables} == {"random", "prompt", "caption", "nouns"}
    assert {"bertscore", "clipscore", "n_bertscore"} <= tables[0].keys()
    ks = [r for r in lines if r["type"] == "ks"]
    assert ks and {"metric", "sample_a", "sample_b", "d", "p", "model"} <= ks[0].keys()
    no_caps = runner.invoke(app, ["prompts", str(image_dir), *args])
    assert no_caps.exit_code == ExitCode.FAILED and "no metric can score the prompts" in no_caps.stderr
    missing = runner.invoke(app, ["prompts", str(tmp_path / "nowhere"), *args])
    assert missing.exit_code == ExitCode.FAILED and "no such file or folder" in missing.stderr


def test_prompts_command_two_identical_photos(image_dir, tmp_path):
    """The same photo under two names is decoded once (a Skip, not an error, not a crash)."""
    first = sorted(image_dir.iterdir())[0]
    (image_dir / "zz-copy.jpg").write_bytes(first.read_bytes())
    args = ["--preset", "tiny", "--device", "cpu", "--db", str(tmp_path / "c.db"), "--random", "10"]
    result = runner.invoke(app, ["prompts", str(image_dir), "--captions", str(CAPTIONS), "--json", *args])
    assert result.exit_code == ExitCode.OK, result.stderr
    assert "Traceback" not in result.output and "zz-copy.jpg" not in result.stderr
    tables = [r for r in map(json.loads, result.stdout.splitlines()) if r["type"] == "table"]
    assert {r["kind"] for r in tables} == {"random", "prompt", "caption", "nouns"}
