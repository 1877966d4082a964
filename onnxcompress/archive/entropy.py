"""Entropy coding of symbol streams: Huffman (as in Deep Compression) or rANS, via `constriction`.

Han et al. (ICLR 2016, §4) Huffman-code the codebook indices and the relative sparse indices,
saving 20–30% over fixed-width storage. Both coders here are lossless and model each stream
by its own symbol counts, which are stored with it:

* ``huffman``: an optimal prefix code per stream (`constriction.symbol.huffman`), within 1
  bit per symbol of the stream's empirical entropy; the paper's choice.
* ``ans``: range asymmetric numeral systems (`constriction.stream.stack.AnsCoder`, 24-bit
  quantised probabilities), within a fraction of a percent of the empirical entropy, and
  vectorised (much faster than the per-symbol Huffman loop).

Stream layout (all integers unsigned LEB128 varints, payload words little-endian uint32):

    coder (1 byte: 1 huffman, 2 ans) | n symbols | alphabet size a | a symbol counts |
    payload word count w | w × uint32

A stream whose symbols are all equal has no payload (w = 0): the counts say everything.
Short streams, where the count table would outweigh the gain, fall back to fixed width:

    coder (1 byte: 3 fixed) | n symbols | width b (1..16) | ceil(n b / 8) bytes, MSB first

Decoding checks that the decoded symbols reproduce the stored counts exactly, so a payload
that does not belong to its table is rejected rather than turned into wrong weights. The
caller says how many symbols the stream may hold (the layer's shape decides): a header that
declares more, or a count above that, is refused before anything is allocated or handed to
the coder (constriction aborts the process on a count near 2^40).
"""

from __future__ import annotations

__all__ = [
    "CODERS",
    "encode_stream",
    "decode_stream",
    "empirical_bits",
    "estimated_bytes",
    "write_varint",
    "read_varint",
]

import heapq
import io
from typing import Any

import numpy as np

from onnxcompress.errors import MissingDependencyError, ModelLoadError

CODERS = {"huffman": 1, "ans": 2}
_FIXED = 3
_NAMES = {**{value: key for key, value in CODERS.items()}, _FIXED: "fixed"}
MAX_ALPHABET = 1 << 16


def _constriction() -> Any:
    try:
        import constriction
    except ImportError:  # pragma: no cover - depends on the environment
        raise MissingDependencyError(
            "entropy coding needs the 'constriction' package: pip install 'onnxcompress[coding]'"
        ) from None
    return constriction


def write_varint(out: io.BytesIO, value: int) -> None:
    """Append `value` as an unsigned LEB128 varint: the small counts of a stream take one byte."""
    if value < 0:
        raise ValueError(f"varints are unsigned, got {value}")
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.write(bytes([byte | 0x80]))
        else:
            out.write(bytes([byte]))
            return


def read_varint(data: memoryview, offset: int) -> tuple[int, int]:
    """(value, next offset); rejects truncation and varints over 64 bits."""
    value, shift = 0, 0
    while True:
        if offset >= len(data):
            raise ModelLoadError("archive stream is truncated (varint runs past the end)")
        byte = data[offset]
        offset += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, offset
        shift += 7
        if shift > 63:
            raise ModelLoadError("archive stream holds an over-long varint")


def empirical_bits(symbols: np.ndarray) -> float:
    """n × H(empirical distribution): what an ideal entropy coder needs, in bits."""
    if symbols.size == 0:
        return 0.0
    counts = np.bincount(symbols.reshape(-1))
    counts = counts[counts > 0].astype(np.float64)
    return float(-(counts * np.log2(counts / symbols.size)).sum())


def estimated_bytes(symbols: np.ndarray, coder: str) -> float:
    """About what `encode_stream` writes, without coding: to compare options cheaply.

    Its count table exactly, and the payload as the code's own length (Huffman: the optimal
    prefix code's, from the counts) or the empirical entropy (rANS, which comes within a
    fraction of a percent of it); the fixed-width fallback where that is shorter.
    """
    flat = symbols.reshape(-1)
    counts = np.bincount(flat) if flat.size else np.zeros(0, np.int64)
    table = sum(_varint_bytes(int(c)) for c in (flat.size, counts.size, *counts.tolist()))
    payload = _huffman_bits(counts) if coder == "huffman" else empirical_bits(flat)
    fixed = flat.size * max(int(counts.size) - 1, 1).bit_length()
    return min(1 + table + 4 + payload / 8, 2 + _varint_bytes(flat.size) + fixed / 8)


def _varint_bytes(value: int) -> int:
    return max(1, (value.bit_length() + 6) // 7)


def _huffman_bits(counts: np.ndarray) -> int:
    """Length of the optimal prefix code of symbols with these counts: its internal nodes' sum."""
    heap = [int(c) for c in counts if c > 0]
    if len(heap) < 2:
        return 0
    heapq.heapify(heap)
    total = 0
    while len(heap) > 1:
        merged = heapq.heappop(heap) + heapq.heappop(heap)
        total += merged
        heapq.heappush(heap, merged)
    return total


def encode_stream(symbols: np.ndarray, coder: str) -> bytes:
    """Entropy-code non-negative integer symbols (< 65536) into a self-describing stream."""
    if coder not in CODERS:
        raise ValueError(f"unknown coder {coder!r}; choose one of {', '.join(CODERS)}")
    symbols = np.ascontiguousarray(symbols.reshape(-1))
    counts = np.bincount(symbols) if symbols.size else np.zeros(0, np.int64)
    if counts.size > MAX_ALPHABET:
        raise ValueError(f"alphabet of {counts.size} symbols exceeds {MAX_ALPHABET}")
    out = io.BytesIO()
    out.write(bytes([CODERS[coder]]))
    write_varint(out, int(symbols.size))
    write_varint(out, int(counts.size))
    for count in counts.tolist():
        write_varint(out, count)
    words = (
        _payload(symbols, counts, coder) if np.count_nonzero(counts) > 1 else np.zeros(0, np.uint32)
    )
    write_varint(out, int(words.size))
    out.write(words.astype("<u4").tobytes())
    coded = out.getvalue()
    fixed = _encode_fixed(symbols, max(int(counts.size) - 1, 1).bit_length())
    return fixed if len(fixed) < len(coded) else coded


def _encode_fixed(symbols: np.ndarray, width: int) -> bytes:
    out = io.BytesIO()
    out.write(bytes([_FIXED]))
    write_varint(out, int(symbols.size))
    out.write(bytes([width]))
    shifts = np.arange(width - 1, -1, -1, dtype=np.int64)
    bits = ((symbols.astype(np.int64)[:, None] >> shifts) & 1).astype(np.uint8)
    out.write(np.packbits(bits.reshape(-1)).tobytes())
    return out.getvalue()


def _symbol_count(data: memoryview, offset: int, max_symbols: int) -> tuple[int, int]:
    n, offset = read_varint(data, offset)
    if n > max_symbols:
        raise ModelLoadError(
            f"archive stream declares {n} symbols; its layer holds at most {max_symbols}"
        )
    return n, offset


def _decode_fixed(data: memoryview, offset: int, max_symbols: int) -> tuple[np.ndarray, int]:
    n, offset = _symbol_count(data, offset, max_symbols)
    if offset >= len(data) or not 1 <= data[offset] <= 16:
        raise ModelLoadError("archive stream has a bad fixed width")
    width = data[offset]
    end = offset + 1 + (n * width + 7) // 8
    if end > len(data):
        raise ModelLoadError("archive stream is truncated (fixed-width payload)")
    bits = np.unpackbits(np.frombuffer(data[offset + 1 : end], dtype=np.uint8))[: n * width]
    weights = (1 << np.arange(width - 1, -1, -1, dtype=np.int64))
    return bits.reshape(n, width).astype(np.int64) @ weights, end


def _payload(symbols: np.ndarray, counts: np.ndarray, coder: str) -> np.ndarray:
    constriction = _constriction()
    probabilities = counts.astype(np.float64)
    if coder == "huffman":
        tree = constriction.symbol.huffman.EncoderHuffmanTree(probabilities)
        encoder = constriction.symbol.QueueEncoder()
        encode = encoder.encode_symbol
        for symbol in symbols.tolist():
            encode(symbol, tree)
        words, _bits = encoder.get_compressed_and_bitrate()
        return np.asarray(words, dtype=np.uint32)
    model = constriction.stream.model.Categorical(
        probabilities / probabilities.sum(), perfect=False
    )
    ans = constriction.stream.stack.AnsCoder()
    ans.encode_reverse(symbols.astype(np.int32), model)
    return np.asarray(ans.get_compressed(), dtype=np.uint32)


def decode_stream(
    data: memoryview, offset: int = 0, *, max_symbols: int
) -> tuple[np.ndarray, int, str]:
    """(symbols as int64, offset after the stream, coder name); ModelLoadError on any defect.

    `max_symbols` bounds the declared length before any allocation.
    """
    if offset >= len(data):
        raise ModelLoadError("archive stream is truncated (no coder byte)")
    coder = _NAMES.get(data[offset])
    if coder is None:
        raise ModelLoadError(f"archive stream names an unknown coder ({data[offset]})")
    if coder == "fixed":
        symbols, end = _decode_fixed(data, offset + 1, max_symbols)
        return symbols, end, coder
    n, offset = _symbol_count(data, offset + 1, max_symbols)
    alphabet, offset = read_varint(data, offset)
    if alphabet > MAX_ALPHABET:
        raise ModelLoadError(f"archive stream alphabet {alphabet} exceeds {MAX_ALPHABET}")
    counts = np.zeros(alphabet, dtype=np.int64)
    for symbol in range(alphabet):
        count, offset = read_varint(data, offset)
        if count > n:
            raise ModelLoadError("archive stream counts a symbol more often than its length")
        counts[symbol] = count
    if int(counts.sum()) != n:
        raise ModelLoadError("archive stream counts do not add up to its length")
    words, offset = read_varint(data, offset)
    end = offset + 4 * words
    if end > len(data):
        raise ModelLoadError("archive stream is truncated (payload runs past the end)")
    payload = np.frombuffer(data[offset:end], dtype="<u4").astype(np.uint32)
    used = np.flatnonzero(counts)
    if used.size <= 1:
        if words:
            raise ModelLoadError("archive stream has a payload it cannot need")
        symbols = np.full(n, used[0] if used.size else 0, dtype=np.int64)
        return symbols, end, coder
    if coder == "huffman" and n > 32 * words:  # every Huffman codeword takes at least one bit
        raise ModelLoadError(f"archive stream declares {n} symbols in {32 * words} bits (huffman)")
    try:
        symbols = _decode_payload(payload, counts, n, coder)
    except ModelLoadError:
        raise
    except Exception as error:  # constriction raises on payloads that do not decode
        raise ModelLoadError(f"archive stream does not decode ({coder}): {error}") from None
    if not np.array_equal(np.bincount(symbols, minlength=alphabet)[:alphabet], counts) or (
        symbols.size and int(symbols.max()) >= alphabet
    ):
        raise ModelLoadError("archive stream decodes to symbols that contradict its counts")
    return symbols, end, coder


def _decode_payload(payload: np.ndarray, counts: np.ndarray, n: int, coder: str) -> np.ndarray:
    constriction = _constriction()
    probabilities = counts.astype(np.float64)
    if coder == "huffman":
        tree = constriction.symbol.huffman.DecoderHuffmanTree(probabilities)
        decoder = constriction.symbol.QueueDecoder(payload)
        decode = decoder.decode_symbol
        return np.fromiter((decode(tree) for _ in range(n)), dtype=np.int64, count=n)
    model = constriction.stream.model.Categorical(
        probabilities / probabilities.sum(), perfect=False
    )
    ans = constriction.stream.stack.AnsCoder(payload)
    symbols = np.asarray(ans.decode(model, n), dtype=np.int64)
    if not ans.is_empty():
        raise ModelLoadError("archive stream has data left over after decoding (ans)")
    return symbols
