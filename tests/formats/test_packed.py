"""Bit-packed codebook indices and float16 storage: smaller files, same outputs.

Stock onnxruntime decodes them at session load (constant folding), with outputs equal to the
uint8 form.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from onnxcompress.archive.format import pack, unpack
from onnxcompress.formats.codebook import codebook_layers, dense_weight
from onnxcompress.formats.packed import (
    decode_packed,
    pack_codebook_indices,
    pack_indices,
    packed_nbytes,
    store_fp16,
    unpack_indices,
)
from onnxcompress.pass_base import get_pass
from tests.builders import mlp_proto

SIZES = (128, 256, 128, 64)  # 32768 + 32768 + 8192 weights: decoder overhead is small beside them


# --- the layout in numpy ---------------------------------------------------------------------


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("count", [0, 1, 7, 8, 9, 13, 1001])
def test_round_trip_every_width(rng, bits, count):
    indices = rng.integers(0, 1 << bits, count).astype(np.uint8)
    packed = pack_indices(indices, bits)
    assert packed.dtype == np.uint8 and packed.shape == (math.ceil(count / 8), bits)
    assert packed.nbytes == packed_nbytes(count, bits)
    np.testing.assert_array_equal(unpack_indices(packed, bits, count), indices)
    # the in-graph algebra (Gather bytes, Div by 2^s, Mod 2^b) gives the same indices
    np.testing.assert_array_equal(decode_packed(packed, bits, count), indices)


def test_layout_is_little_endian_groups_of_eight():
    # 3 bits: indices 1..7, 0 -> bit stream 100 010 110 001 101 011 111 000 (LSB first)
    packed = pack_indices(np.array([1, 2, 3, 4, 5, 6, 7, 0]), 3)
    assert packed.tolist() == [[0b11010001, 0b01011000, 0b00011111]]


def test_values_beyond_the_width_are_refused():
    with pytest.raises(ValueError, match="0..7"):
        pack_indices(np.array([8]), 3)
    with pytest.raises(ValueError, match="bits"):
        pack_indices(np.array([0]), 9)


# --- clustered models ---------------------------------------------------------------------------


def _clustered(bits: int, *, pack_indices: bool = True, opset: int = 17, seed: int = 0) -> ir.Model:
    proto = mlp_proto(np.random.default_rng(seed), SIZES)
    proto.opset_import[0].version = opset
    model = ir.from_proto(proto)
    get_pass("codebook.kmeans")(bits=bits, pack_indices=pack_indices, min_params=1000)(model)
    return model


def _bytes(model: ir.Model) -> bytes:
    return ir.to_proto(model).SerializeToString()


def _dense_bytes() -> bytes:
    proto = mlp_proto(np.random.default_rng(0), SIZES)
    proto.opset_import[0].version = 17
    return proto.SerializeToString()


def _ops(path) -> list[str]:  # type: ignore[no-untyped-def]
    return sorted(node.op_type for node in onnx.load(str(path)).graph.node)


def _stock_session(data: bytes, optimized: str | None = None) -> ort.InferenceSession:
    """A plain onnxruntime session: no custom-op library registered, CPU only."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    if optimized:
        options.optimized_model_filepath = optimized
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("bits", [3, 5, 6])
def test_packed_model_is_smaller_runs_in_stock_onnxruntime_and_equals_uint8(rng, tmp_path, bits):
    uint8_form, packed_form = _bytes(_clustered(bits, pack_indices=False)), _bytes(_clustered(bits))
    weights = sum(
        math.prod(layer.shape) for layer in codebook_layers(_clustered(bits, pack_indices=False))
    )
    saved = len(uint8_form) - len(packed_form)
    # (8 - bits)/8 byte per weight, < 1 KB per layer
    assert abs(saved - weights * (8 - bits) / 8) < 3 * 1000

    onnx.checker.check_model(onnx.load_from_string(packed_form), full_check=True)
    x = rng.standard_normal((4, SIZES[0])).astype(np.float32)
    want = _stock_session(uint8_form).run(None, {"x": x})[0]
    got = _stock_session(packed_form, str(tmp_path / "packed.onnx")).run(None, {"x": x})[0]
    np.testing.assert_array_equal(got, want)
    # constant folding left no decoder op: the session computes with the dense weights
    _stock_session(_dense_bytes(), str(tmp_path / "dense.onnx"))
    assert _ops(tmp_path / "packed.onnx") == _ops(tmp_path / "dense.onnx")
    assert not {"Cast", "Div", "Mod", "Reshape"} & set(_ops(tmp_path / "packed.onnx"))


def test_packing_is_byte_deterministic():
    assert _bytes(_clustered(5, seed=1)) == _bytes(_clustered(5, seed=1))


def test_codebook_layers_finds_packed_layers_with_their_bits():
    model = _clustered(5)
    reference = {layer.name: layer for layer in codebook_layers(_clustered(5, pack_indices=False))}
    layers = codebook_layers(model)
    assert sorted(layer.name for layer in layers) == ["fc0.weight", "fc1.weight", "head.weight"]
    for layer in layers:
        assert (layer.bits, layer.index_dtype) == (5, "packed")
        assert layer.stored_index_bytes == packed_nbytes(math.prod(layer.shape), 5)
        np.testing.assert_array_equal(layer.indices(), reference[layer.name].indices())
        np.testing.assert_array_equal(dense_weight(layer), dense_weight(reference[layer.name]))


def test_packing_an_existing_uint8_model_equals_packing_in_the_pass():
    model = _clustered(6, pack_indices=False)
    assert pack_codebook_indices(model)
    assert not pack_codebook_indices(model)  # nothing left in the uint8 form
    assert _bytes(model) == _bytes(_clustered(6))


def test_storage_by_opset():
    assert {layer.index_dtype for layer in codebook_layers(_clustered(4, opset=17))} == {"packed"}
    # same size
    assert {layer.index_dtype for layer in codebook_layers(_clustered(4, opset=21))} == {"uint4"}
    # smaller
    assert {layer.index_dtype for layer in codebook_layers(_clustered(3, opset=21))} == {"packed"}
    # nothing to pack
    assert {layer.index_dtype for layer in codebook_layers(_clustered(8))} == {"uint8"}
    old = _clustered(5, pack_indices=False, opset=10)
    assert not pack_codebook_indices(old)  # the decoder needs opset 11


def test_opset_11_is_enough(rng):
    model = _clustered(3, opset=11)
    assert {layer.index_dtype for layer in codebook_layers(model)} == {"packed"}
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    x = rng.standard_normal((2, SIZES[0])).astype(np.float32)
    want = _stock_session(_bytes(_clustered(3, pack_indices=False, opset=11))).run(None, {"x": x})[
        0
    ]
    np.testing.assert_array_equal(_stock_session(_bytes(model)).run(None, {"x": x})[0], want)


def test_archive_round_trip_of_a_packed_model():
    model = _clustered(5)
    assert unpack(pack(model).data).SerializeToString() == _bytes(model)


# --- float16 storage ------------------------------------------------------------------------------


def test_fp16_storage_halves_dense_weights_and_runs_in_stock_onnxruntime(rng, tmp_path):
    proto = mlp_proto(np.random.default_rng(0), SIZES)
    proto.opset_import[0].version = 17
    model = ir.from_proto(proto)
    converted = store_fp16(model)
    assert converted == [
        "fc0.weight",
        "fc0.bias",
        "fc1.weight",
        "fc1.bias",
        "head.weight",
        "head.bias",
    ]
    half = _bytes(model)
    assert len(half) < 0.52 * len(proto.SerializeToString())
    onnx.checker.check_model(onnx.load_from_string(half), full_check=True)
    x = rng.standard_normal((4, SIZES[0])).astype(np.float32)
    want = _stock_session(proto.SerializeToString()).run(None, {"x": x})[0]
    got = _stock_session(half, str(tmp_path / "optimized.onnx")).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-2)
    assert "Cast" not in {
        node.op_type for node in onnx.load(str(tmp_path / "optimized.onnx")).graph.node
    }


def test_fp16_reaches_constant_nodes_and_subgraphs(rng):
    """silero-vad keeps every weight in Constant nodes inside If branches: they halve too."""
    from tests.passes.codebook.test_subgraph_weights import _feeds, _if_model, _with_weights

    proto = _if_model(rng)
    model = ir.from_proto(proto)
    assert sorted(store_fp16(model)) == ["else_w", "then_r", "then_w"]
    half = _bytes(model)
    onnx.checker.check_model(onnx.load_from_string(half), full_check=True)
    assert len(half) < 0.55 * len(proto.SerializeToString())
    held = {v.name: v for v in model.graph.initializers.values()}
    assert {"else_w.fp16", "then_r.fp16", "then_w.fp16"} <= set(held)  # all in the main graph
    rounded = _with_weights(proto, {  # the dense model at float16 precision
        name[: -len(".fp16")]: np.asarray(value.const_value.numpy(), np.float32)
        for name, value in held.items() if name.endswith(".fp16")
    })
    for feeds in _feeds(proto, rng):
        got = _stock_session(half).run(None, feeds)[0]
        np.testing.assert_allclose(got, _stock_session(rounded.SerializeToString()).run(
            None, feeds)[0], rtol=1e-5, atol=1e-5)


def test_fp16_keeps_codebooks_in_float32():
    model = _clustered(5)
    store_fp16(model)
    assert {layer.codebook().dtype for layer in codebook_layers(model)} == {np.dtype(np.float32)}


# --- other passes see packed layers ------------------------------------------------------------


def test_weight_sites_name_packed_layers_as_codebook_layers():
    from onnxcompress.sites import CODEBOOK_LAYER, find_weight_sites

    scan = find_weight_sites(_clustered(5), min_params=0)
    # the decoder's int32 constant is no weight: only the three layers are reported, as codebooks
    assert {(skip.name, skip.reason) for skip in scan.skipped} == {
        (name, CODEBOOK_LAYER) for name in ("fc0.weight", "fc1.weight", "head.weight")
    }


def test_removing_a_packed_layer_drops_its_decoder_and_constants():
    from onnxcompress.formats.codebook import remove_codebook_layer

    model = _clustered(5)
    graph = model.graph
    for layer in codebook_layers(model):  # what sparse.csr does: the weight moves into a kernel
        dense = ir.Value(
            name=f"{layer.name}.dense",
            const_value=ir.tensor(dense_weight(layer), name=f"{layer.name}.dense"),
        )
        graph.register_initializer(dense)
        ir.convenience.replace_all_uses_with(layer.gather.outputs[0], dense)
        assert remove_codebook_layer(graph, layer)
    assert sorted(node.op_type for node in graph) == [
        "Add",
        "Add",
        "Gemm",
        "MatMul",
        "MatMul",
        "Relu",
        "Relu",
    ]
    assert all(
        value.const_value.dtype == ir.DataType.FLOAT for value in graph.initializers.values()
    )


def test_fine_tune_bridge_runs_the_decoder_and_finds_the_codebooks(rng):
    pytest.importorskip("torch")
    from onnxcompress.finetune.executor import OnnxModule
    from onnxcompress.formats.detect import codebook_tensors

    model = _clustered(5)
    assert codebook_tensors(model) == [
        "fc0.weight.codebook",
        "fc1.weight.codebook",
        "head.weight.codebook",
    ]
    x = rng.standard_normal((4, SIZES[0])).astype(np.float32)
    want = _stock_session(_bytes(model)).run(None, {"x": x})[0]
    np.testing.assert_allclose(OnnxModule(model).run({"x": x})[0], want, rtol=1e-5, atol=1e-5)


# --- as passes in a recipe ------------------------------------------------------------------------


def test_codebook_pack_pass_packs_a_uint8_model_exactly():
    model = _clustered(5, pack_indices=False)
    pack = get_pass("codebook.pack")()
    result = pack(model)
    assert result.modified and not pack.needs_calibration()
    assert _bytes(model) == _bytes(_clustered(5))
    change = {c.name: c for c in result.report.changes}["fc0.weight"]
    assert (change.bytes_before, change.bytes_after) == (
        128 * 256 + 32 * 4,
        128 * 256 * 5 // 8 + 32 * 4,
    )
    assert not get_pass("codebook.pack")()(model).modified


def test_cast_fp16_pass_reports_halved_bytes():
    proto = mlp_proto(np.random.default_rng(0), SIZES)
    result = get_pass("cast.fp16")(exclude=("head.bias",))(ir.from_proto(proto))
    assert result.modified
    changes = {c.name: c for c in result.report.changes}
    assert "head.bias" not in changes
    assert (changes["fc0.weight"].bytes_before, changes["fc0.weight"].bytes_after) == (
        128 * 256 * 4,
        128 * 256 * 2,
    )
