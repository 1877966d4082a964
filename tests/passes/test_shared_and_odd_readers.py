"""Tensors read by more than one node, or read on an unexpected axis, are left alone with a reason.

Regression tests from a review: each model here used to come out invalid, numerically wrong,
or bigger than it went in.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from onnxcompress.pass_base import get_pass


def model(
    nodes, inputs, outputs, initializers: dict[str, np.ndarray], opset: int = 17
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        inputs,
        outputs,
        [numpy_helper.from_array(a, n) for n, a in initializers.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def run(proto: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, feeds
    )[0]


def apply(name: str, proto: onnx.ModelProto, **options):
    result = get_pass(name)(**options)(ir.serde.deserialize_model(proto))
    out = ir.to_proto(result.model)
    onnx.checker.check_model(out)
    return result.report, out


def test_structured_pruning_skips_a_bias_shared_by_two_layers(rng):
    weights = {"W1": rng.standard_normal((8, 16)), "W2": rng.standard_normal((16, 16)),
               "W3": rng.standard_normal((16, 4)), "b": np.zeros(16)}
    proto = model(
        [
            helper.make_node("Gemm", ["x", "W1", "b"], ["h1"]),
            helper.make_node("Relu", ["h1"], ["r1"]),
            helper.make_node("Gemm", ["r1", "W2", "b"], ["h2"]),
            helper.make_node("Relu", ["h2"], ["r2"]),
            helper.make_node("Gemm", ["r2", "W3"], ["y"]),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        {k: v.astype(np.float32) for k, v in weights.items()},
    )
    x = {"x": rng.standard_normal((2, 8)).astype(np.float32)}
    report, out = apply("prune.structured", proto, ratio=0.5)
    np.testing.assert_array_equal(run(out, x), run(proto, x))  # nothing removed
    assert "'b' is shared by several nodes" in report.reason_for("W1")


def test_structured_pruning_skips_a_conv_reading_a_matmul_width(rng):
    proto = model(
        [
            helper.make_node("MatMul", ["x", "Wm"], ["h"]),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("Conv", ["r", "Wc"], ["y"], kernel_shape=[3, 3]),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 5, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        {
            "Wm": rng.standard_normal((8, 8)).astype(np.float32),
            "Wc": rng.standard_normal((4, 8, 3, 3)).astype(np.float32),
        },
    )
    x = {"x": rng.standard_normal((1, 8, 5, 8)).astype(np.float32)}
    _, out = apply("prune.structured", proto, ratio=0.5)
    assert run(out, x).shape == run(proto, x).shape
    shapes = {t.name: tuple(t.dims) for t in out.graph.initializer}
    assert shapes["Wm"] == (8, 8) and shapes["Wc"] == (4, 8, 3, 3)


def test_dead_neuron_removal_counts_gemm_beta(rng):
    w1 = rng.standard_normal((8, 6)).astype(np.float32)
    w1[:, 0] = 0.0  # neuron 0 has no incoming weight: its output is Relu(beta * C[0]) = Relu(1) = 1
    c1 = rng.standard_normal(6).astype(np.float32)
    c1[0] = -1.0
    proto = model(
        [
            helper.make_node("Gemm", ["x", "W1", "C1"], ["h"], beta=-1.0),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("Gemm", ["r", "W2"], ["y"]),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 4])],
        {"W1": w1, "C1": c1, "W2": rng.standard_normal((6, 4)).astype(np.float32)},
    )
    x = {"x": rng.standard_normal((3, 8)).astype(np.float32)}
    _, out = apply("prune.dead_neurons", proto)
    np.testing.assert_allclose(run(out, x), run(proto, x), rtol=1e-6, atol=1e-6)


def tied_embedding(rng) -> onnx.ModelProto:
    """One table read by a Gather (the embedding) and a Gemm (the output head)."""
    table = (rng.standard_normal((64, 4)) @ rng.standard_normal((4, 48))).astype(np.float32)
    table *= rng.random(table.shape) > 0.9
    return model(
        [
            helper.make_node("Gather", ["E", "ids"], ["h"]),
            helper.make_node("Gemm", ["h", "E"], ["y"], transB=1),
        ],
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 64])],
        {"E": table},
        opset=18,
    )


def test_a_tied_embedding_is_neither_factorized_nor_sparsified(rng):
    proto = tied_embedding(rng)
    for name, options in (("lowrank.svd", {"ratio": 0.5, "min_params": 0}),
                          ("sparse.csr", {"decide": "always", "min_params": 0})):
        report, out = apply(name, proto, **options)
        assert [t.name for t in out.graph.initializer] == ["E"], name  # no second copy of the table
        assert "2" in report.reason_for("E"), name
