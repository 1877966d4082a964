"""codebook.kmeans: structure, onnxruntime against numpy, zeros kept, skips with reasons."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcompress import runtime
from onnxcompress.formats.codebook import codebook_layers, dense_weight
from onnxcompress.pass_base import get_pass
from onnxcompress.passes.codebook.kmeans import cluster_weights
from tests.builders import finish, mlp_proto


def _cluster(model: ir.Model, **options):
    result = get_pass("codebook.kmeans")(**options)(model)
    return result.report, result.modified


def _mlp_forward(model: ir.Model, x: np.ndarray) -> np.ndarray:
    """Numpy forward of tests.builders.mlp with weights read from the codebooks."""
    weights = {
        layer.name: dense_weight(layer).astype(np.float64) for layer in codebook_layers(model)
    }
    for name, value in model.graph.initializers.items():
        if name not in weights and value.const_value is not None:
            weights[name] = value.const_value.numpy().astype(np.float64)
    h = x.astype(np.float64)
    index = 0
    while f"fc{index}.weight" in weights:
        h = np.maximum(h @ weights[f"fc{index}.weight"] + weights[f"fc{index}.bias"], 0)
        index += 1
    return h @ weights["head.weight"].T + weights["head.bias"]


def test_mlp_structure_and_onnxruntime_match_numpy(rng):
    proto = mlp_proto(rng, (64, 128, 96, 10))
    original = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    model = ir.from_proto(proto)
    report, modified = _cluster(model, overrides={"head.*": 4})
    assert modified
    layers = {layer.name: layer for layer in codebook_layers(model)}
    assert sorted(layers) == ["fc0.weight", "fc1.weight", "head.weight"]
    assert (layers["fc0.weight"].bits, layers["fc0.weight"].index_dtype) == (5, "packed")
    assert (layers["head.weight"].bits, layers["head.weight"].index_dtype) == (4, "uint4")
    for name, layer in layers.items():
        assert layer.k <= 1 << layer.bits
        assert layer.shape == original[name].shape
        codebook = layer.codebook()
        assert codebook.dtype == np.float32 and np.all(np.diff(codebook) > 0)
        # Nearest centroid, so the error is at most half the widest gap between centroids.
        error = np.abs(dense_weight(layer) - original[name])
        assert error.max() <= np.diff(codebook).max() / 2 + 1e-7
        nearest = np.min(np.abs(original[name][..., None] - codebook), axis=-1)
        np.testing.assert_array_equal(error, nearest)
    assert not report.skipped
    out = ir.to_proto(model)
    onnx.checker.check_model(out, full_check=True)
    x = rng.standard_normal((5, 64)).astype(np.float32)
    y = runtime.session(out, threads=1).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, _mlp_forward(model, x), rtol=1e-5, atol=1e-5)
    # The file itself shrinks: 1 byte (or half) per weight instead of 4.
    assert len(out.SerializeToString()) < 0.32 * len(proto.SerializeToString())


def test_pruned_zeros_stay_exactly_zero_and_cost_no_centroid(rng):
    model = ir.from_proto(mlp_proto(rng, (64, 128, 96, 10)))
    get_pass("prune.magnitude")(sparsity=0.9)(model)
    before = {n: v.const_value.numpy().copy() for n, v in model.graph.initializers.items()}
    _cluster(model, bits=3)
    for layer in codebook_layers(model):
        weights = before[layer.name]
        assert layer.zero_entry
        codebook = layer.codebook()
        assert codebook[0] == 0.0 and layer.k == 8  # 7 learned centroids + the exact zero
        assert np.all(codebook[1:] != 0.0)
        decoded = dense_weight(layer)
        np.testing.assert_array_equal(decoded == 0, weights == 0)
        np.testing.assert_array_equal(layer.indices() == 0, weights == 0)


def test_cluster_weights_without_zeros_uses_all_entries(rng):
    weights = rng.standard_normal((40, 30)).astype(np.float32)
    indices, codebook, zero_entry = cluster_weights(weights, 4)
    assert not zero_entry and codebook.size == 16 and indices.max() == 15
    assert indices.shape == weights.shape and indices.dtype == np.uint8


def _conv_proto(rng: np.random.Generator, opset: int = 21) -> onnx.ModelProto:
    w = rng.standard_normal((16, 8, 3, 3)).astype(np.float32)
    b = rng.standard_normal(16).astype(np.float32)
    const = rng.standard_normal((200, 4)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "conv.weight", "conv.bias"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["c"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("MatMul", ["f", "fc.weight"], ["h"]),
        helper.make_node(
            "Constant", [], ["const.weight"], value=numpy_helper.from_array(const, "const.weight")
        ),
        helper.make_node("Flatten", ["x"], ["xf"]),
        helper.make_node("Slice", ["xf", "zero", "two_hundred", "one"], ["xs"]),
        helper.make_node("MatMul", ["xs", "const.weight"], ["g"]),
        helper.make_node("Add", ["h", "g"], ["y"]),
    ]
    inits = [
        numpy_helper.from_array(w, "conv.weight"),
        numpy_helper.from_array(b, "conv.bias"),
        numpy_helper.from_array(rng.standard_normal((16, 4)).astype(np.float32), "fc.weight"),
        numpy_helper.from_array(np.array([0], np.int64), "zero"),
        numpy_helper.from_array(np.array([200], np.int64), "two_hundred"),
        numpy_helper.from_array(np.array([1], np.int64), "one"),
    ]
    graph = helper.make_graph(
        nodes, "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8, 10, 10])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        inits,
    )
    return finish(graph, opset)


def test_conv_defaults_skips_and_onnxruntime(rng):
    proto = _conv_proto(rng)
    model = ir.from_proto(proto)
    report, _ = _cluster(model, bits=None, min_params=128)
    layers = {layer.name: layer for layer in codebook_layers(model)}
    assert sorted(layers) == ["const.weight", "conv.weight"]  # a Constant node's weight too
    assert (layers["conv.weight"].bits, layers["const.weight"].bits) == (8, 5)
    assert report.reason_for("fc.weight") == "too small (64 < min_params=128)"
    # onnxruntime on the clustered graph equals onnxruntime on the dense decoded weights.
    dense = onnx.ModelProto()
    dense.CopyFrom(proto)
    for tensor in dense.graph.initializer:
        if tensor.name == "conv.weight":
            tensor.CopyFrom(
                numpy_helper.from_array(dense_weight(layers["conv.weight"]), "conv.weight")
            )
    for node in dense.graph.node:
        if node.op_type == "Constant" and node.output[0] == "const.weight":
            node.attribute[0].t.CopyFrom(numpy_helper.from_array(dense_weight(layers["const.weight"])))
    x = rng.standard_normal((2, 8, 10, 10)).astype(np.float32)
    clustered = ir.to_proto(model)
    onnx.checker.check_model(clustered, full_check=True)
    got = runtime.session(clustered, threads=1).run(None, {"x": x})[0]
    want = runtime.session(dense, threads=1).run(None, {"x": x})[0]
    np.testing.assert_array_equal(got, want)


def test_old_opset_keeps_uint8_and_exclusion_is_recorded(rng):
    proto = mlp_proto(rng, (64, 128, 96, 10))
    for opset in proto.opset_import:
        opset.version = 17
    model = ir.from_proto(proto)
    report, _ = _cluster(model, bits=4, exclude=("head.*",), pack_indices=False)
    assert {layer.index_dtype for layer in codebook_layers(model)} == {"uint8"}
    assert report.reason_for("head.weight") == "excluded by name"
    onnx.checker.check_model(ir.to_proto(model), full_check=True)


def test_deterministic_bytes_and_idempotent(rng):
    proto = mlp_proto(rng, (64, 128, 96, 10))
    first, second = ir.from_proto(proto), ir.from_proto(proto)
    _cluster(first, init="random")
    _cluster(second, init="random")
    assert ir.to_proto(first).SerializeToString() == ir.to_proto(second).SerializeToString()
    _, modified = _cluster(first)
    assert not modified and len(codebook_layers(first)) == 3


def test_invalid_bits_rejected():
    from onnxcompress.errors import RecipeError

    with pytest.raises(RecipeError, match="bits"):
        get_pass("codebook.kmeans")(bits=9)
    with pytest.raises(RecipeError, match="outside 1..8"):
        get_pass("codebook.kmeans")(overrides={"a*": 0})
