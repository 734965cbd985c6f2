"""Compact storage of per-unit score arrays ([n_layers, d_mlp] float) as bytes in the cache."""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np

LOSSLESS_MAX_VALUES = 1 << 18  # arrays up to this size (smol: 46,080 units) keep float16; larger ones, 8 bits
LOG8 = b"L8"
LOG8_STEPS = 8  # codes per octave: a code is within 2**(1/16) - 1 = 4.4% of the value it stands for


def pack_array(array: np.ndarray) -> bytes:
    """A [rows, cols] float array -> compact bytes.

    Up to LOSSLESS_MAX_VALUES values: float16, bytes shuffled (high bytes together: they compress well),
    zlib. Larger (GPT-J: 458,752 units): 8-bit log codes per row scale, within 4.4% of each value, values
    below 2**-15.75 of their row's largest magnitude stored as 0, zlib level 1 (fast).
    """
    array = np.asarray(array, dtype=np.float32)
    if array.size <= LOSSLESS_MAX_VALUES:
        half = np.ascontiguousarray(array, dtype=np.float16).view(np.uint8).reshape(-1, 2)
        return zlib.compress(np.ascontiguousarray(half.T).tobytes(), 6)
    rows = array.reshape(array.shape[0], -1)
    scale = np.abs(rows).max(axis=1).astype(np.float32)  # [rows]
    with np.errstate(divide="ignore", invalid="ignore"):
        level = np.rint(127 + LOG8_STEPS * np.log2(np.abs(rows) / scale[:, None]))
    level = np.where(np.isfinite(level) & (level >= 1), level, 0).astype(np.uint8)
    codes = level | (np.signbit(rows) & (level > 0)).astype(np.uint8) << 7
    header = LOG8 + np.uint32(rows.shape[0]).tobytes() + scale.tobytes()
    return header + zlib.compress(codes.tobytes(), 1)


def unpack_array(blob: bytes, shape: Sequence[int]) -> np.ndarray:
    """Inverse of pack_array: a float32 array of `shape`."""
    if not blob.startswith(LOG8):
        raw = np.frombuffer(zlib.decompress(blob), dtype=np.uint8).reshape(2, -1)
        return np.ascontiguousarray(raw.T).view(np.float16).reshape(shape).astype(np.float32)
    n_rows = int(np.frombuffer(blob, dtype=np.uint32, count=1, offset=2)[0])
    scale = np.frombuffer(blob, dtype=np.float32, count=n_rows, offset=6)
    codes = np.frombuffer(zlib.decompress(blob[6 + 4 * n_rows :]), dtype=np.uint8).reshape(n_rows, -1)
    level = (codes & 0x7F).astype(np.float32)
    values = scale[:, None] * np.exp2((level - 127) / LOG8_STEPS)
    values = np.where(level > 0, np.where(codes & 0x80, -values, values), 0.0)
    return values.astype(np.float32).reshape(shape)
