"""Relative (difference) indices with padding entries, as in Deep Compression §2 and Fig. 2.

A pruned layer stores only its non-zero entries, each as (gap to the previous one, value).
Gaps are held in r bits, so a gap larger than 2^r needs *padding entries*: an entry that
advances 2^r positions and writes the zero value (codebook index 0). The paper uses r = 8 for
conv and r = 5 for fc layers.

Encoding here, over the flattened (C-order) index tensor of length n:

    positions p_0 < p_1 < ... of the non-zero codebook indices, p_{-1} = -1
    gap g_i = p_i - p_{i-1} >= 1;   pads_i = (g_i - 1) // 2^r  entries of (2^r, 0) first,
    then (g_i - pads_i * 2^r, symbol_i);   a stored diff is (gap - 1) in [0, 2^r - 1]

Exact and invertible: decoding takes the cumulative sum of the gaps and writes each symbol at
its position (padding writes 0 where 0 already is). Trailing zeros need no entries, n is known.
"""

from __future__ import annotations

__all__ = ["encode_relative", "decode_relative", "entry_count"]

import numpy as np

from onnxcompress.errors import ModelLoadError


def entry_count(indices: np.ndarray, index_bits: int) -> int:
    """Entries (non-zeros plus padding) the relative encoding of `indices` needs."""
    positions = np.flatnonzero(indices.reshape(-1))
    gaps = np.diff(positions, prepend=-1)
    return int(positions.size + np.sum((gaps - 1) >> index_bits))


def encode_relative(indices: np.ndarray, index_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(diff symbols in [0, 2^r), value symbols) for the non-zeros of a flat index tensor."""
    if not 1 <= index_bits <= 16:
        raise ValueError(f"index_bits must be in 1..16, got {index_bits}")
    flat = indices.reshape(-1)
    positions = np.flatnonzero(flat)
    span = 1 << index_bits
    gaps = np.diff(positions, prepend=-1)
    pads = (gaps - 1) >> index_bits
    total = int(positions.size + pads.sum())
    diffs = np.full(total, span - 1, dtype=np.int64)
    values = np.zeros(total, dtype=np.int64)
    real = np.cumsum(pads + 1) - 1
    diffs[real] = gaps - pads * span - 1
    values[real] = flat[positions]
    return diffs, values


def decode_relative(
    diffs: np.ndarray, values: np.ndarray, size: int, index_bits: int
) -> np.ndarray:
    """The flat uint8 index tensor of length `size`; ModelLoadError if the entries overrun it."""
    if diffs.size != values.size:
        raise ModelLoadError("archive layer has different numbers of index and value entries")
    if diffs.size and (int(diffs.min()) < 0 or int(diffs.max()) >= 1 << index_bits):
        raise ModelLoadError("archive layer holds a relative index wider than its bit width")
    positions = np.cumsum(diffs + 1) - 1
    if positions.size and int(positions[-1]) >= size:
        raise ModelLoadError("archive layer's relative indices run past the end of the tensor")
    flat = np.zeros(size, dtype=np.uint8)
    real = values != 0
    flat[positions[real]] = values[real]
    return flat
