"""Compact storage of per-unit score arrays ([n_layers, d_mlp] float) as bytes in the cache.

Formats (the first bytes tell them apart, so caches written by earlier versions stay readable):
- zstd frame: float16, bytes shuffled (high bytes together: they compress well). Arrays up to 2**18 values.
- b"Z8" + rows + per-row scale + zstd frame: 8-bit log codes. Larger arrays (GPT-J: 458,752 units).
- b"L8" + rows + scale + zlib stream: the same codes, as mmtui 0.1 wrote them (read only).
- a zlib stream: shuffled float16, as mmtui 0.1 wrote them (read only).
zstd level 3 packs as tightly as zlib level 1 did at a tenth of the time (bench/store_write.py).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np
import zstandard

LOSSLESS_MAX_VALUES = 1 << 18  # arrays up to this size (smol: 46,080 units) keep float16; larger ones, 8 bits
LOG8, LOG8_ZLIB = b"Z8", b"L8"
LOG8_STEPS = 8  # codes per octave: a code is within 2**(1/16) - 1 = 4.4% of the value it stands for
ZSTD_LEVEL = 3
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def pack_array(array: np.ndarray) -> bytes:
    """A [rows, cols] float array -> compact bytes.

    Up to LOSSLESS_MAX_VALUES values: float16, bytes shuffled, zstd. Larger: 8-bit log codes per row scale,
    within 4.4% of each value, values below 2**-15.75 of their row's largest magnitude stored as 0, zstd.
    Thread-safe, and releases the GIL while it compresses (the cache writer packs on worker threads).
    """
    array = np.asarray(array, dtype=np.float32)
    compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    if array.size <= LOSSLESS_MAX_VALUES:
        half = np.ascontiguousarray(array, dtype=np.float16).view(np.uint8).reshape(-1, 2)
        return compressor.compress(np.ascontiguousarray(half.T).tobytes())
    rows = array.reshape(array.shape[0], -1)
    scale = np.abs(rows).max(axis=1).astype(np.float32)  # [rows]
    with np.errstate(divide="ignore", invalid="ignore"):
        level = np.rint(127 + LOG8_STEPS * np.log2(np.abs(rows) / scale[:, None]))
    level = np.where(np.isfinite(level) & (level >= 1), level, 0).astype(np.uint8)
    codes = level | (np.signbit(rows) & (level > 0)).astype(np.uint8) << 7
    header = LOG8 + np.uint32(rows.shape[0]).tobytes() + scale.tobytes()
    return header + compressor.compress(codes.tobytes())


def unpack_array(blob: bytes, shape: Sequence[int]) -> np.ndarray:
    """Inverse of pack_array (and of the formats earlier versions wrote): a float32 array of `shape`."""
    if blob[:2] in (LOG8, LOG8_ZLIB):
        n_rows = int(np.frombuffer(blob, dtype=np.uint32, count=1, offset=2)[0])
        scale = np.frombuffer(blob, dtype=np.float32, count=n_rows, offset=6)
        body = blob[6 + 4 * n_rows :]
        raw = zstandard.decompress(body) if blob[:2] == LOG8 else zlib.decompress(body)
        codes = np.frombuffer(raw, dtype=np.uint8).reshape(n_rows, -1)
        level = (codes & 0x7F).astype(np.float32)
        values = scale[:, None] * np.exp2((level - 127) / LOG8_STEPS)
        values = np.where(level > 0, np.where(codes & 0x80, -values, values), 0.0)
        return values.astype(np.float32).reshape(shape)
    raw = zstandard.decompress(blob) if blob[:4] == _ZSTD_MAGIC else zlib.decompress(blob)
    halves = np.frombuffer(raw, dtype=np.uint8).reshape(2, -1)
    return np.ascontiguousarray(halves.T).view(np.float16).reshape(shape).astype(np.float32)
