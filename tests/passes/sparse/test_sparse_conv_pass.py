"""sparse.csr on Conv layers: which become SparseConv, why others stay dense, outputs unchanged.

`decide="always"` converts without measuring and the portable function runs in a stock
onnxruntime, so nothing here needs the kernel library (the measured decision is in tests/kernels/).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from onnxcompress.formats.conv_layout import dense_from_conv_csr
from onnxcompress.pass_base import get_pass
from tests.builders import finish
from tests.kernels.sparse_models import pruned
from tests.passes.sparse.test_sparse_csr import stock_session

SparseCsr = get_pass("sparse.csr")


def pruned_cnn(rng: np.random.Generator, sparsity: float = 0.9) -> onnx.ModelProto:
    """A pruned CNN with every Conv form the pass converts, and one dense Conv it leaves.

    x [N, 4, 16, 16] -> Conv 3x3 pad 1 -> Relu -> Conv 1x1 stride 2 (no bias) -> Relu ->
    Conv 4x4 SAME_UPPER group 2 -> Conv 3x3 (dense) -> GlobalAveragePool.
    """
    weights = {
        "c0.weight": pruned(rng, (16, 4, 3, 3), sparsity),
        "c1.weight": pruned(rng, (32, 16, 1, 1), sparsity),
        "c2.weight": pruned(rng, (32, 16, 4, 4), sparsity),
        "c3.weight": pruned(rng, (16, 32, 3, 3), 0.0),
    }
    biases = {
        f"c{i}.bias": rng.standard_normal(weights[f"c{i}.weight"].shape[0]).astype(np.float32)
        for i in (0, 2, 3)
    }
    nodes = [
        helper.make_node(
            "Conv", ["x", "c0.weight", "c0.bias"], ["h0"], pads=[1, 1, 1, 1], name="c0"
        ),
        helper.make_node("Relu", ["h0"], ["r0"]),
        helper.make_node("Conv", ["r0", "c1.weight"], ["h1"], strides=[2, 2], name="c1"),
        helper.make_node("Relu", ["h1"], ["r1"]),
        helper.make_node(
            "Conv",
            ["r1", "c2.weight", "c2.bias"],
            ["h2"],
            auto_pad="SAME_UPPER",
            group=2,
            name="c2",
        ),
        helper.make_node(
            "Conv", ["h2", "c3.weight", "c3.bias"], ["h3"], pads=[1, 1, 1, 1], name="c3"
        ),
        helper.make_node("GlobalAveragePool", ["h3"], ["y"]),
    ]
    initializers = [numpy_helper.from_array(a, n) for n, a in {**weights, **biases}.items()]
    graph = helper.make_graph(
        nodes,
        "cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16, 1, 1])],
        initializer=initializers,
    )
    return finish(graph)


def test_pruned_convs_become_sparse_conv_with_the_same_outputs(rng):
    proto = pruned_cnn(rng)
    result = SparseCsr(decide="always", min_params=16)(ir.serde.deserialize_model(proto))
    out = ir.to_proto(result.model)
    onnx.checker.check_model(out)
    ops = [n.op_type for n in out.graph.node]
    assert ops.count("SparseConv") == 3 and ops.count("Conv") == 1
    assert {c.name for c in result.report.changes} == {"c0.weight", "c1.weight", "c2.weight"}
    assert result.report.reason_for("c3.weight") == "sparsity 0.000 < min_sparsity 0.7"
    assert "c0.weight" not in {i.name for i in out.graph.initializer}  # the dense weight is gone
    same_upper = next(n for n in out.graph.node if n.name == "c2")
    attributes = {a.name: helper.get_attribute_value(a) for a in same_upper.attribute}
    assert (
        attributes["pads"] == [1, 1, 2, 2]
        and attributes["group"] == 2
        and attributes["weight_shape"] == [32, 16, 4, 4]
    )
    for batch in (1, 3):
        x = rng.standard_normal((batch, 4, 16, 16)).astype(np.float32)
        expected = stock_session(proto).run(None, {"x": x})[0]
        np.testing.assert_allclose(
            stock_session(out).run(None, {"x": x})[0], expected, rtol=1e-5, atol=1e-5
        )


def test_stored_arrays_hold_the_weight_exactly(rng):
    proto = pruned_cnn(rng)
    original = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    out = ir.to_proto(
        SparseCsr(decide="always", min_params=16)(ir.serde.deserialize_model(proto)).model
    )
    stored = {i.name: numpy_helper.to_array(i) for i in out.graph.initializer}
    prefix = "c2.weight.csr_conv_"
    weight = dense_from_conv_csr(
        stored[prefix + "values"],
        stored[prefix + "col_indices"],
        stored[prefix + "row_ptr"],
        original["c2.weight"].shape,
    )
    np.testing.assert_array_equal(weight, original["c2.weight"])
    np.testing.assert_array_equal(stored[prefix + "bias"], original["c2.bias"])
    assert stored[prefix + "col_indices"].dtype == np.uint16
    np.testing.assert_array_equal(
        stored["c1.weight.csr_conv_bias"], np.zeros(32, np.float32)
    )  # no bias: zeros


def test_conv_with_a_computed_bias_or_3d_kernel_stays_dense(rng):
    weight = pruned(rng, (8, 4, 3, 3, 3), 0.9)
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], name="c3d")]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 4, 4])],
        initializer=[numpy_helper.from_array(weight, "w")],
    )
    result = SparseCsr(decide="always", min_params=16)(ir.serde.deserialize_model(finish(graph)))
    assert not result.modified
    assert (
        result.report.reason_for("w")
        == "Conv weight is 5-D; SparseConv takes 1-D and 2-D convolutions"
    )

    weight = pruned(rng, (8, 4, 3, 3), 0.9)
    nodes = [
        helper.make_node("Relu", ["b_in"], ["b"]),
        helper.make_node("Conv", ["x", "w", "b"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6, 6]),
            helper.make_tensor_value_info("b_in", TensorProto.FLOAT, [8]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 4, 4])],
        initializer=[numpy_helper.from_array(weight, "w")],
    )
    result = SparseCsr(decide="always", min_params=16)(ir.serde.deserialize_model(finish(graph)))
    assert not result.modified
    assert result.report.reason_for("w") == "Conv bias B is not a constant"
