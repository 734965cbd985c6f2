"""Compact storage of per-unit score arrays ([n_layers, d_mlp] float) as bytes in the cache.

Formats (the first bytes tell them apart, so caches written by earlier versions stay readable):
- zstd frame: float16, bytes shuffled (high bytes together: they compress well). Arrays up to 2**18 values.
- b"Z8" + rows + per-row scale + zstd frame: 8-bit log codes. Larger arrays (GPT-J: 458,752 units).
- b"L8" + rows + scale + zlib stream: the same codes, as mmtui 0.1 wrote them (read only).
- a zlib stream: shuffled float16, as mmtui 0.1 wrote them (read only).
zstd level 3 packs as tightly as zlib level 1 did at a tenth of the time (bench/store_write.py).

A result's top (layer, unit, patch, score) triples are one blob too (`pack_triples`): b"T1" + count + zstd frame
of the four columns (uint16, uint32, uint16, float32), each byte-shuffled. Lossless; ~7 bytes a triple against
~30 as rows of a table with its key.

A unit's best results in a run (neuron_images) are one small blob (`pack_unit_images`): b"I1" + records of
(result id uint32, score float32, rank uint32, patch uint16), 14 bytes each, by score descending, then result.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np
import zstandard

LOSSLESS_MAX_VALUES = 1 << 18  # arrays up to this size (smol: 46,080 units) keep float16; larger ones, 8 bits
LOG8, LOG8_ZLIB = b"Z8", b"L8"
TRIPLES = b"T1"
_TRIPLE_COLUMNS: tuple[np.dtype, ...] = (
    np.dtype("<u2"),
    np.dtype("<u4"),
    np.dtype("<u2"),
    np.dtype("<f4"),
)  # layer, unit, patch, score
UNIT_IMAGES = b"I1"
UNIT_IMAGE = np.dtype([("result", "<u4"), ("score", "<f4"), ("rank", "<u4"), ("patch", "<u2")])  # packed: 14 bytes
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
        return compressor.compress(_shuffled(np.ascontiguousarray(array, dtype=np.float16).ravel()))
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
        return (scale[:, None] * _LOG8_VALUES[codes]).reshape(shape)
    raw = zstandard.decompress(blob) if blob[:4] == _ZSTD_MAGIC else zlib.decompress(blob)
    halves = np.frombuffer(raw, dtype=np.uint8).reshape(2, -1)
    return np.ascontiguousarray(halves.T).view(np.float16).reshape(shape).astype(np.float32)


def unpack_value(blob: bytes, shape: Sequence[int], row: int, col: int) -> float:
    """One value of a packed [rows, cols] array, equal to unpack_array(blob, shape)[row, col] without decoding
    the others (a unit's value in one result: `mmtui neuron` reads it for each of the unit's best images)."""
    cols = int(np.prod(shape[1:]))
    at = row * cols + col
    if blob[:2] in (LOG8, LOG8_ZLIB):
        n_rows = int(np.frombuffer(blob, dtype=np.uint32, count=1, offset=2)[0])
        scale = np.frombuffer(blob, dtype=np.float32, count=n_rows, offset=6)
        body = blob[6 + 4 * n_rows :]
        raw = zstandard.decompress(body) if blob[:2] == LOG8 else zlib.decompress(body)
        return float(scale[row] * _LOG8_VALUES[raw[at]])
    raw = zstandard.decompress(blob) if blob[:4] == _ZSTD_MAGIC else zlib.decompress(blob)
    n = len(raw) // 2
    return float(np.frombuffer(bytes((raw[at], raw[n + at])), dtype=np.float16)[0])


def _log8_values() -> np.ndarray:
    """What each 8-bit code stands for, before its row's scale: a table of 256 float32 (code 0 and 128: 0).
    Looking codes up in it gives the same bits as computing exp2 per value, at half the time."""
    codes = np.arange(256)
    level = (codes & 0x7F).astype(np.float32)
    values = np.exp2((level - 127) / LOG8_STEPS).astype(np.float32)
    return np.where(level > 0, np.where(codes & 0x80, -values, values), 0.0).astype(np.float32)


_LOG8_VALUES = _log8_values()


def _shuffled(column: np.ndarray) -> bytes:
    return np.ascontiguousarray(column.view(np.uint8).reshape(len(column), column.itemsize).T).tobytes()


def pack_triples(layer: np.ndarray, unit: np.ndarray, patch: np.ndarray, score: np.ndarray) -> bytes:
    """A result's top triples, in rank order, -> compact bytes (lossless: scores stay float32)."""
    columns = []
    for values, dtype in zip((layer, unit, patch, score), _TRIPLE_COLUMNS, strict=True):
        values = np.asarray(values)
        if dtype.kind == "u" and len(values) and (values.min() < 0 or values.max() > np.iinfo(dtype).max):
            raise ValueError(f"triple index out of range for {dtype}: {values.min()}..{values.max()}")
        columns.append(_shuffled(np.ascontiguousarray(values, dtype=dtype)))
    n = len(columns[0]) // _TRIPLE_COLUMNS[0].itemsize
    body = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(b"".join(columns))
    return TRIPLES + np.uint32(n).tobytes() + body


def unpack_triples(blob: bytes | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Inverse of pack_triples: (layer, unit, patch, score) arrays (int64, int64, int64, float32), by rank."""
    if not blob:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty, np.zeros(0, dtype=np.float32)
    if blob[:2] != TRIPLES:
        raise ValueError("not a packed triples blob")
    n = int(np.frombuffer(blob, dtype=np.uint32, count=1, offset=2)[0])
    raw = np.frombuffer(zstandard.decompress(blob[6:]), dtype=np.uint8)
    out, offset = [], 0
    for dtype in _TRIPLE_COLUMNS:
        size = n * dtype.itemsize
        column = np.ascontiguousarray(raw[offset : offset + size].reshape(dtype.itemsize, n).T).view(dtype).ravel()
        out.append(column.astype(np.float32 if dtype.kind == "f" else np.int64))
        offset += size
    return out[0], out[1], out[2], out[3]


def pack_unit_images(entries: np.ndarray, starts: np.ndarray) -> list[bytes]:
    """Records of UNIT_IMAGE, one unit's after another (each unit's starting at `starts`) -> a blob per unit."""
    body = np.ascontiguousarray(entries, dtype=UNIT_IMAGE).tobytes()
    size = UNIT_IMAGE.itemsize
    ends = np.r_[starts[1:], len(entries)] if len(starts) else starts
    return [UNIT_IMAGES + body[a * size : b * size] for a, b in zip(starts.tolist(), ends.tolist(), strict=True)]


def unpack_unit_images(blobs: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of pack_unit_images: (every blob's records one after another, how many each blob holds)."""
    if any(blob[:2] != UNIT_IMAGES for blob in blobs):
        raise ValueError("not a packed unit images blob")
    body = b"".join(blob[2:] for blob in blobs)
    counts = np.array([(len(blob) - 2) // UNIT_IMAGE.itemsize for blob in blobs], dtype=np.int64)
    return np.frombuffer(body, dtype=UNIT_IMAGE), counts
