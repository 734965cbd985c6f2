"""Decodings are computed once per LM and kept in a file; the shipped smol file equals a fresh computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmtui.run.decoding import SHIPPED, cache_dir, decode_layer, decoded_layers, decoding_name


def test_computed_once_then_read_from_the_cache(tiny_stack, monkeypatch):
    first = [(layer, ids.copy(), logits.copy()) for layer, ids, logits in decoded_layers(tiny_stack)]
    path = cache_dir() / decoding_name(tiny_stack, "raw", 10)
    assert path.is_file()
    monkeypatch.setattr("mmtui.run.decoding.decode_layer", lambda *a, **k: pytest.fail("recomputed"))
    again = list(decoded_layers(tiny_stack))
    for (la, ia, va), (lb, ib, vb) in zip(first, again, strict=True):
        assert la == lb and np.array_equal(ia, ib)
        np.testing.assert_allclose(va, vb, rtol=1e-3, atol=1e-3)  # logits are kept as float16


def test_cache_of_another_shape_is_not_used(tiny_stack):
    path = cache_dir() / decoding_name(tiny_stack, "raw", 10)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, ids=np.zeros((1, 1, 10), np.int32), logits=np.zeros((1, 1, 10), np.float16))
    layers = list(decoded_layers(tiny_stack))
    assert len(layers) == tiny_stack.n_layers and layers[0][1].shape == (tiny_stack.d_mlp, 10)


def test_shipped_smol_decodings_equal_a_fresh_computation():
    try:
        from mmtui import load_stack

        stack = load_stack("smol", device="cpu")
    except Exception as err:  # the real stack's weights are optional packages
        pytest.skip(f"smol stack not installed: {err}")
    path = SHIPPED / decoding_name(stack, "raw", 10)
    assert path.is_file(), "the shipped smol decodings do not match this LM's fingerprint"
    with np.load(path) as data:
        ids, logits = data["ids"], data["logits"]
    for layer in (0, 17, 29):
        fresh_ids, fresh_logits = decode_layer(stack, layer)
        torch.testing.assert_close(
            torch.from_numpy(logits[layer].astype(np.float32)), fresh_logits, rtol=2e-3, atol=2e-3
        )
        same = (fresh_ids.numpy() == ids[layer]).mean()
        assert same > 0.99  # near-ties in float16 may swap neighbours
