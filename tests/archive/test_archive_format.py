"""The .onnxc archive: exact round trips, relative indices, coders, corrupt input rejected."""

from __future__ import annotations

import hashlib
import struct

import numpy as np
import onnx_ir as ir
import pytest
from onnx import numpy_helper

from onnxcompress import runtime
from onnxcompress.archive import MAGIC, compression_table, pack, table_markdown, unpack
from onnxcompress.archive.entropy import (
    decode_stream,
    empirical_bits,
    encode_stream,
    estimated_bytes,
)
from onnxcompress.archive.format import AUTO_WIDTHS, _encode_layer, _layer_streams
from onnxcompress.archive.relative import decode_relative, encode_relative, entry_count
from onnxcompress.errors import ModelLoadError
from onnxcompress.formats.codebook import codebook_layers, dense_weight
from onnxcompress.pass_base import get_pass
from tests.builders import mlp_proto


def _clustered(rng: np.random.Generator, sparsity: float, **options) -> ir.Model:
    model = ir.from_proto(mlp_proto(rng, (96, 64, 40, 10)))
    if sparsity:
        get_pass("prune.magnitude")(sparsity=sparsity)(model)
    get_pass("codebook.kmeans")(**options)(model)
    return model


# --- relative indices --------------------------------------------------------------------


def test_relative_indices_match_the_paper_example():
    # Han et al. Fig. 2 style: 3-bit gaps, a gap of 9 needs one padding entry.
    indices = np.zeros(20, np.uint8)
    indices[[1, 4, 13, 14]] = [3, 1, 2, 7]
    diffs, values = encode_relative(indices, 3)
    np.testing.assert_array_equal(diffs + 1, [2, 3, 8, 1, 1])
    np.testing.assert_array_equal(values, [3, 1, 0, 2, 7])
    assert entry_count(indices, 3) == 5
    np.testing.assert_array_equal(decode_relative(diffs, values, 20, 3), indices)


@pytest.mark.parametrize("bits", [1, 3, 5, 8])
def test_relative_indices_round_trip_random(rng, bits):
    indices = (rng.integers(1, 32, 5000) * (rng.random(5000) < 0.05)).astype(np.uint8)
    indices[:300] = 0  # a long leading gap
    diffs, values = encode_relative(indices, bits)
    assert diffs.max() < 1 << bits and values.size == entry_count(indices, bits)
    np.testing.assert_array_equal(decode_relative(diffs, values, indices.size, bits), indices)


def test_relative_indices_overrunning_the_tensor_are_rejected():
    with pytest.raises(ModelLoadError, match="past the end"):
        decode_relative(np.array([3, 3]), np.array([1, 1]), 5, 2)


# --- entropy coding ----------------------------------------------------------------------


@pytest.mark.parametrize("coder", ["huffman", "ans"])
def test_streams_round_trip_near_entropy(rng, coder):
    symbols = rng.choice(32, size=20000, p=np.arange(1, 33) / np.arange(1, 33).sum())
    stream = encode_stream(symbols, coder)
    decoded, end, used = decode_stream(memoryview(stream), max_symbols=symbols.size)
    np.testing.assert_array_equal(decoded, symbols)
    assert end == len(stream) and used == coder
    ideal = empirical_bits(symbols) / 8
    # Huffman is within 1 bit per symbol of the entropy, rANS within a fraction of a percent.
    bound = ideal + symbols.size / 8 if coder == "huffman" else ideal * 1.01
    assert ideal <= len(stream) <= bound + 80  # + the count table


@pytest.mark.parametrize("symbols", [np.zeros(0, np.int64), np.full(50, 7), np.array([1, 0, 2])])
def test_degenerate_streams(symbols):
    decoded, _, _ = decode_stream(
        memoryview(encode_stream(symbols, "huffman")), max_symbols=symbols.size
    )
    np.testing.assert_array_equal(decoded, symbols)


# --- archive round trips -----------------------------------------------------------------


@pytest.mark.parametrize("coder", ["huffman", "ans"])
@pytest.mark.parametrize("sparsity", [0.0, 0.9])
def test_pack_unpack_is_byte_exact(rng, coder, sparsity):
    model = _clustered(rng, sparsity, overrides={"head.*": 3})
    source = ir.to_proto(model)
    result = pack(model, coder=coder)
    restored = unpack(result.data)
    assert restored.SerializeToString() == source.SerializeToString()
    before = {t.name: numpy_helper.to_array(t) for t in source.graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in restored.graph.initializer}
    assert before.keys() == after.keys()
    for name, array in before.items():
        assert after[name].dtype == array.dtype
        assert after[name].tobytes() == array.tobytes()
    x = rng.standard_normal((3, 96)).astype(np.float32)
    want = runtime.session(source, threads=1).run(None, {"x": x})[0]
    got = runtime.session(restored, threads=1).run(None, {"x": x})[0]
    np.testing.assert_array_equal(got, want)
    dense_bytes = 4 * sum(layer.params for layer in result.layers)
    assert len(result.data) < (0.3 if sparsity == 0 else 0.12) * dense_bytes


def test_pruned_layers_store_relative_indices_and_are_smaller(rng):
    model = _clustered(rng, 0.95)
    result = pack(model, coder="huffman")
    sizes = {layer.weight: layer for layer in result.layers}
    assert sizes["fc0.weight"].mode == "sparse"
    dense_bits = 32 * sum(layer.params for layer in result.layers)
    assert 8 * sum(layer.coded_bytes for layer in result.layers) < dense_bits / 20
    decoded = {
        layer.name: dense_weight(layer)
        for layer in codebook_layers(ir.from_proto(unpack(result.data)))
    }
    for layer in codebook_layers(model):
        np.testing.assert_array_equal(decoded[layer.name], dense_weight(layer))


def test_model_without_codebooks_round_trips(rng):
    model = ir.from_proto(mlp_proto(rng))
    source = ir.to_proto(model)
    result = pack(model)
    assert result.layers == []
    assert unpack(result.data).SerializeToString() == source.SerializeToString()


def test_table_reports_each_stage(rng):
    model = _clustered(rng, 0.9, bits=4)
    table = compression_table(pack(model, index_bits="paper"))
    rows = {row["layer"]: row for row in table["layers"]}
    row = rows["fc0.weight"]
    assert row["params"] == 96 * 64 and row["kept_percent"] == pytest.approx(10.0, abs=0.05)
    assert row["weight_bits_pq"] == 4 and row["index_bits_pq"] == 5
    # P: every entry as float32 + 5-bit index; P+Q: 4 + 5 bits per entry + 16-entry codebook.
    entries = entry_count(np.asarray(next(
        layer for layer in codebook_layers(model) if layer.name == "fc0.weight").indices()), 5)
    assert row["bits_p"] == entries * 37
    assert row["bits_pq"] == entries * 9 + 16 * 32
    totals = table["totals"]
    assert totals["ratio_p"] < totals["ratio_pq"]
    assert "| fc0.weight | 6,144 | 10.0% | 4 |" in table_markdown(table)


# --- corrupt, truncated and foreign archives ---------------------------------------------


@pytest.fixture
def archive(rng) -> bytes:
    return pack(_clustered(rng, 0.8)).data


def test_foreign_file_is_rejected(rng):
    with pytest.raises(ModelLoadError, match="not an onnxcompress archive"):
        unpack(mlp_proto(rng).SerializeToString())
    with pytest.raises(ModelLoadError, match="not an onnxcompress archive"):
        unpack(b"")


def test_truncated_archives_are_rejected(archive):
    for length in (4, 30, 56, len(archive) // 2, len(archive) - 1):
        with pytest.raises(ModelLoadError):
            unpack(archive[:length])
    with pytest.raises(ModelLoadError, match="extra bytes"):
        unpack(archive + b"\0")


def test_fuzzed_archives_are_rejected(rng, archive):
    for _ in range(200):
        corrupt = bytearray(archive)
        position = int(rng.integers(len(MAGIC), len(corrupt)))
        corrupt[position] ^= 1 << int(rng.integers(8))
        with pytest.raises(ModelLoadError):
            unpack(bytes(corrupt))


def test_resealed_tampering_is_still_caught(archive):
    """A re-computed digest over a broken manifest or a short body must not yield a model either.

    (A flipped byte inside a resealed coded stream can decode to other valid weights: the
    digest is what guards the content, so this test only forges structure.)
    """
    header = struct.Struct("<8sHHIQ32s")
    _, version, flags, manifest_len, _, _ = header.unpack_from(archive)
    manifest = archive[56 : 56 + manifest_len]
    body = archive[56 + manifest_len :]
    for tampered_manifest, tampered_body in (
        (manifest, body[:-7]),
        (b"garbage", body),
        (manifest, body + b"\0"),
    ):
        prefix = header.pack(
            MAGIC, version, flags, len(tampered_manifest), len(tampered_body), b"\0" * 32
        )[:24]
        digest = hashlib.sha256(prefix + tampered_manifest + tampered_body).digest()
        with pytest.raises(ModelLoadError):
            unpack(prefix + digest + tampered_manifest + tampered_body)


def test_auto_index_width_is_never_larger_and_round_trips(rng):
    model = _clustered(rng, 0.93)
    fixed = pack(model, coder="ans", index_bits=5)
    auto = pack(model, coder="ans", index_bits="auto")
    assert sum(layer.coded_bytes for layer in auto.layers) <= sum(
        layer.coded_bytes for layer in fixed.layers
    )
    assert {layer.index_bits for layer in auto.layers} <= set(range(2, 11))
    assert unpack(auto.data).SerializeToString() == ir.to_proto(model).SerializeToString()
    with pytest.raises(Exception, match="index_bits"):
        pack(model, index_bits=0)


@pytest.mark.parametrize("coder", ["huffman", "ans"])
@pytest.mark.parametrize("size, alphabet, kept", [(20000, 32, 0.3), (3000, 200, 1.0), (40, 4, 1.0)])
def test_the_size_estimate_is_within_a_few_bytes_of_the_stream(rng, coder, size, alphabet, kept):
    symbols = rng.integers(0, alphabet, size) * (rng.random(size) < kept)
    assert abs(estimated_bytes(symbols, coder) - len(encode_stream(symbols, coder))) <= 8


def test_auto_width_is_as_small_as_coding_every_width(rng):
    indices = (rng.integers(1, 32, 60000) * (rng.random(60000) < 0.05)).astype(np.uint8)
    indices[:5000] = 0  # a pruned border, as MNIST's first layer has
    every = min(sum(map(len, _encode_layer(indices, w, "ans")[:2])) for w in AUTO_WIDTHS)
    value, diff, _, _, _ = _layer_streams(indices, "Gemm", "ans", "auto")
    assert len(value) + len(diff) <= every * 1.005


def test_the_default_archive_is_no_larger_than_the_papers_storage(rng):
    """rANS with a per-layer width by default; Huffman at the paper's widths stays one option."""
    model = _clustered(rng, 0.95)
    default, paper = pack(model), pack(model, coder="huffman", index_bits="paper")
    assert len(default.data) < len(paper.data)
    assert {layer.index_bits for layer in paper.layers} == {5}  # fc layers: the paper's 5 bits
    for result in (default, paper):
        assert unpack(result.data).SerializeToString() == ir.to_proto(model).SerializeToString()


def test_a_layer_too_dense_for_gaps_is_coded_once_at_the_papers_width(rng):
    model = _clustered(rng, 0.0)
    assert {(layer.mode, layer.index_bits) for layer in pack(model).layers} == {("dense", 5)}
