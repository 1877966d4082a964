"""Weight sites: found wherever real exported models keep them, with the right axes."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from onnxcompress.sites import constant_array, constant_node_array, find_weight_sites, set_constant
from tests.builders import finish, mlp


def test_initializers_of_an_mlp_with_axes(rng):
    scan = find_weight_sites(mlp(rng))
    sites = scan.by_name()
    assert sorted(sites) == ["fc0.weight", "fc1.weight", "head.weight"]
    assert (sites["fc0.weight"].in_axis, sites["fc0.weight"].out_axis) == (-2, -1)
    # Gemm with transB=1 stores [out, in].
    assert (sites["head.weight"].in_axis, sites["head.weight"].out_axis) == (1, 0)
    assert sites["fc0.weight"].holder == "initializer"


def _branch(name: str, weight: np.ndarray) -> ir.Graph:
    return helper.make_graph(
        [
            helper.make_node(
                "Constant", [], [f"{name}_w"], value=numpy_helper.from_array(weight, f"{name}_w")
            ),
            helper.make_node("MatMul", ["x", f"{name}_w"], [f"{name}_y"]),
        ],
        name,
        [],
        [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, [1, 8])],
    )


def test_constant_nodes_and_if_branches(rng):
    conv_w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node(
                "Constant", [], ["conv_w"], value=numpy_helper.from_array(conv_w, "conv_w")
            ),
            helper.make_node("Conv", ["img", "conv_w"], ["feat"]),
            helper.make_node(
                "If",
                ["cond"],
                ["y"],
                then_branch=_branch("then", rng.standard_normal((8, 8)).astype(np.float32)),
                else_branch=_branch("else", rng.standard_normal((8, 8)).astype(np.float32)),
            ),
        ],
        "g",
        [
            helper.make_tensor_value_info("img", TensorProto.FLOAT, [1, 3, 8, 8]),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8]),
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
        ],
        [
            helper.make_tensor_value_info("feat", TensorProto.FLOAT, [1, 4, 6, 6]),
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8]),
        ],
    )
    model = ir.from_proto(finish(graph))
    sites = find_weight_sites(model).by_name()
    assert sorted(sites) == ["conv_w", "else_w", "then_w"]
    assert sites["conv_w"].holder == "constant"
    assert (sites["conv_w"].out_axis, sites["conv_w"].in_axis) == (0, 1)
    # Replacing a Constant-held weight rewrites the node's attribute.
    sites["then_w"].replace(np.zeros((8, 8), np.float32))
    node = sites["then_w"].value.producer()
    assert not node.attributes["value"].as_tensor().numpy().any()


def test_shared_weight_is_one_site_with_two_consumers(rng):
    w = numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "shared")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "shared"], ["h"]),
            helper.make_node("MatMul", ["h", "shared"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
        [w],
    )
    (site,) = find_weight_sites(ir.from_proto(finish(graph))).sites
    assert len(site.consumers) == 2


def test_skips_are_recorded_with_reasons(rng):
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "fed"], ["h"]),
            helper.make_node("MatMul", ["h", "tiny"], ["h2"]),
            helper.make_node("MatMul", ["h2", "stft_basis"], ["y"]),
        ],
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4]),
            helper.make_tensor_value_info("fed", TensorProto.FLOAT, [4, 4]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
        [
            numpy_helper.from_array(np.ones((4, 2), np.float32), "tiny"),
            numpy_helper.from_array(np.ones((2, 64), np.float32), "stft_basis"),
        ],
    )
    scan = find_weight_sites(ir.from_proto(finish(graph)), min_params=16, exclude=["stft_*"])
    reasons = {skip.name: skip.reason for skip in scan.skipped}
    assert scan.sites == []
    assert reasons["fed"].startswith("graph input")
    assert reasons["tiny"] == "too small (8 < min_params=16)"
    assert reasons["stft_basis"] == "excluded by name"


def test_embedding_gather_is_a_site_but_index_gather_is_not(rng):
    table = numpy_helper.from_array(rng.standard_normal((50, 8)).astype(np.float32), "embed")
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["embed", "ids"], ["e"]),
            helper.make_node("Gather", ["e", "pos"], ["y"], axis=1),
        ],
        "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])],
        [table, numpy_helper.from_array(np.array(0, np.int64), "pos")],
    )
    sites = find_weight_sites(ir.from_proto(finish(graph))).by_name()
    assert list(sites) == ["embed"]
    assert sites["embed"].op_type == "Gather"


def test_codebook_and_kernel_layers_are_skipped_with_their_reason(rng):
    """A pass run after cluster or sparsify says why it left those layers (no silent no-op)."""
    from onnxcompress.pass_base import get_pass
    from onnxcompress.sites import CODEBOOK_LAYER
    from tests.passes.sparse.test_sparse_codebook_layers import shared_mlp

    shared = ir.serde.deserialize_model(shared_mlp(rng))
    reasons = {s.name: s.reason for s in find_weight_sites(shared).skipped}
    assert reasons == {
        "fc0.weight": CODEBOOK_LAYER,
        "fc1.weight": CODEBOOK_LAYER,
        "head.weight": CODEBOOK_LAYER,
    }

    kernels = get_pass("sparse.csr")(decide="always", min_params=16)(shared).model
    reasons = {s.name: s.reason for s in find_weight_sites(kernels).skipped}
    assert (
        reasons["fc0.weight"]
        == "held by the SparseCodebookMatMul kernel: run this pass before sparsify"
    )
    assert (
        reasons["fc1.weight"] == "held by the CodebookMatMul kernel: run this pass before sparsify"
    )


def _constants_model(rng) -> ir.Model:
    """y = (x @ w) * c_tensor + c_float: an initializer, a Constant tensor, a Constant literal."""
    w = rng.standard_normal((4, 3)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node(
                "Constant", [], ["c_tensor"], value=numpy_helper.from_array(np.ones(3, np.float32))
            ),
            helper.make_node("Constant", [], ["c_float"], value_float=0.5),
            helper.make_node("MatMul", ["x", "w"], ["h"]),
            helper.make_node("Mul", ["h", "c_tensor"], ["m"]),
            helper.make_node("Add", ["m", "c_float"], ["y"]),
        ],
        "constants",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [numpy_helper.from_array(w, "w")],
    )
    return ir.from_proto(finish(graph))


def test_constants_are_read_from_initializers_and_constant_nodes_only(rng):
    model = _constants_model(rng)
    values = {
        v.name: v for node in model.graph for v in (*node.inputs, *node.outputs) if v is not None
    }
    assert constant_array(values["w"]).shape == (4, 3)
    assert np.array_equal(constant_array(values["c_tensor"]), np.ones(3))
    assert constant_array(values["c_float"]) is None  # a literal, not a tensor a pass may rewrite
    assert constant_array(values["h"]) is None and constant_array(values["x"]) is None
    assert constant_node_array(values["c_float"].producer()) == np.float32(0.5)


def test_set_constant_swaps_a_new_tensor_of_any_shape_and_keeps_the_old_one(rng):
    model = _constants_model(rng)
    values = {v.name: v for node in model.graph for v in node.outputs}
    old = constant_array(values["c_tensor"])
    set_constant(values["c_tensor"], np.full(2, 3.0, np.float32))
    assert np.array_equal(constant_array(values["c_tensor"]), [3.0, 3.0]) and values[
        "c_tensor"
    ].shape == (2,)
    assert np.array_equal(old, np.ones(3))
    assert np.array_equal(
        values["c_tensor"].producer().attributes["value"].as_tensor().numpy(), [3.0, 3.0]
    )
