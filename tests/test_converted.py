"""The converted copy of a GGUF LM: where the cache lives, the hash memo, and the same model as the GGUF file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mmtui.stacks.converted import HASH_MEMO, gguf_sha256, user_cache_dir
from mmtui.stacks.projection import file_sha256


def test_cache_dir_prefers_mmtui_cache_then_xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MMTUI_CACHE", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert user_cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("MMTUI_CACHE")
    assert user_cache_dir() == tmp_path / "xdg" / "mmtui"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert user_cache_dir() == tmp_path / "home" / ".cache" / "mmtui"


def test_hash_is_memoized_by_path_size_and_mtime(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"first")
    first = gguf_sha256(path)
    assert first == file_sha256(path)
    assert (user_cache_dir() / HASH_MEMO).is_file()
    stat = path.stat()
    # same size and mtime: the memo answers without reading the file (so the stale hash proves it was used)
    path.write_bytes(b"other")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert gguf_sha256(path) == first
    # a new mtime: hashed again
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert gguf_sha256(path) == file_sha256(path) != first


def test_converted_smol_is_the_gguf_model(smol) -> None:
    """The smol stack (loaded from its converted copy) has the GGUF file's identity, tokens and logits."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mmtui.stacks import presets

    path = presets._package_file(presets.PRESETS["smol"].lm)
    assert smol.identity["lm_sha256"] == file_sha256(path)
    assert smol.identity["lm"] == f"gguf:{path.name}"
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    text = "A picture of a dog catching a frisbee on the beach."
    ids = tok(text, return_tensors="pt").input_ids
    assert torch.equal(ids, smol.tokenizer(text, return_tensors="pt").input_ids)
    assert len(tok) == len(smol.tokenizer)
    with torch.no_grad():
        want = model(ids).logits
        got = smol.lm(ids.to(smol.device)).logits.cpu()
    assert torch.equal(got, want)
