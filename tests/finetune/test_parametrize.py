"""Mask, codebook and low-rank parametrizations hold their structure through optimizer steps."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcompress.errors import UserError
from onnxcompress.finetune import parametrize as P
from onnxcompress.finetune.executor import OnnxModule, to_ir
from onnxcompress.finetune.train import write_back
from onnxcompress.formats.detect import codebook_tensors
from tests.finetune.conftest import ort_run, torch


def _steps(
    module: OnnxModule, optimizer: torch.optim.Optimizer, inputs: int = 64, steps: int = 5
) -> None:
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        optimizer.zero_grad()
        module(torch.randn(16, inputs, generator=generator)).square().mean().backward()
        optimizer.step()


OPTIMIZERS = {
    "sgd_momentum_wd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=0.1),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
}


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_mask_keeps_pruned_weights_exactly_zero(mlp_pair, optimizer) -> None:
    _, proto = mlp_pair
    module = OnnxModule(proto)
    before = module.tensor("layers.0.weight").detach().clone()
    keep = before.abs() > before.abs().median()
    P.add_mask(module, "layers.0.weight", keep)
    _steps(module, OPTIMIZERS[optimizer](module.parameters()))
    after = module.tensor("layers.0.weight").detach()
    assert torch.count_nonzero(after[~keep]) == 0
    assert (after[keep] != before[keep]).float().mean() > 0.99  # the kept weights did train


def test_codebook_shares_values_and_sums_gradients_per_centroid(mlp_pair, rng) -> None:
    _, proto = mlp_pair
    module = OnnxModule(proto)
    weight = module.tensor("layers.1.weight").detach().numpy().copy()
    weight[0, :5] = 0.0  # pruned: must stay zero and use no centroid
    indices = rng.integers(0, 4, weight.shape)
    centroids = np.float32([-0.2, -0.05, 0.05, 0.2])
    with torch.no_grad():
        module.tensor("layers.1.weight").copy_(torch.from_numpy(weight))
    P.add_codebook(module, "layers.1.weight", indices, centroids)
    shared = module.tensor("layers.1.weight").detach().numpy()
    keep = weight != 0
    np.testing.assert_array_equal(shared, np.where(keep, centroids[indices], 0))

    # gradient per centroid == sum of the dense weight gradients of its members (numpy oracle)
    x = torch.from_numpy(rng.standard_normal((8, 64)).astype(np.float32))
    dense = OnnxModule(proto)
    with torch.no_grad():
        dense.tensor("layers.1.weight").copy_(torch.from_numpy(shared))
    dense(x).square().mean().backward()
    dense_grad = dense.parameter("layers.1.weight").grad.numpy()
    module(x).square().mean().backward()
    got = module.parameter("layers.1.weight").grad.numpy()
    want = np.bincount(indices[keep], weights=dense_grad[keep], minlength=4)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-8)

    optimizer = torch.optim.SGD(module.parameters(), lr=0.05, momentum=0.9, weight_decay=0.1)
    _steps(module, optimizer)
    trained = module.tensor("layers.1.weight").detach().numpy()
    new_centroids = module.parameter("layers.1.weight").detach().numpy()
    assert not np.allclose(new_centroids, centroids)
    np.testing.assert_array_equal(trained, np.where(keep, new_centroids[indices], 0))


def test_codebook_from_dense_shared_weight(rng) -> None:
    values = np.float32([-1.0, 0.5, 2.0])
    weight = values[rng.integers(0, 3, (6, 5))]
    weight[0, 0] = 0
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 5])],
        initializer=[numpy_helper.from_array(weight, "w")],
    )
    module = OnnxModule(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    P.add_codebook(module, "w")
    np.testing.assert_array_equal(module.tensor("w").detach().numpy(), weight)
    _steps(module, torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9), inputs=6)
    trained = module.tensor("w").detach().numpy()
    assert trained[0, 0] == 0
    assert len(np.unique(trained[weight != 0])) <= 3 and not np.array_equal(trained, weight)


def test_low_rank_starts_at_truncated_svd_and_stays_low_rank(mlp_pair) -> None:
    _, proto = mlp_pair
    module = OnnxModule(proto)
    weight = module.tensor("layers.0.weight").detach().numpy().astype(np.float64)
    P.add_low_rank(module, "layers.0.weight", 3)
    u, s, vt = np.linalg.svd(weight, full_matrices=False)
    oracle = (u[:, :3] * s[:3]) @ vt[:3]
    np.testing.assert_allclose(
        module.tensor("layers.0.weight").detach().numpy(), oracle, rtol=0, atol=1e-5
    )
    factors = module.originals("layers.0.weight")
    assert [tuple(f.shape) for f in factors] == [(32, 3), (3, 64)]
    _steps(module, torch.optim.SGD(module.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01))
    trained = module.tensor("layers.0.weight").detach().numpy()
    assert np.linalg.matrix_rank(trained, tol=1e-4) == 3
    assert not np.allclose(trained, oracle, atol=1e-4)
    with pytest.raises(UserError, match="rank 40 does not fit"):
        P.add_low_rank(module, "layers.1.weight", 40)


def _in_graph_codebook(rng) -> tuple[ir.Model, np.ndarray, np.ndarray]:
    """uint8 indices, Cast, float codebook, Gather, Reshape into MatMul (codebook.kmeans's form)."""
    codebook = np.float32([0.0, -0.4, -0.1, 0.1, 0.4])  # entry 0 is the pruned zero
    indices = rng.integers(0, 5, 24).astype(np.uint8)
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["indices"], ["indices64"], to=TensorProto.INT64),
            helper.make_node("Gather", ["codebook", "indices64"], ["flat"], axis=0),
            helper.make_node("Reshape", ["flat", "shape"], ["w"]),
            helper.make_node("MatMul", ["x", "w"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
        initializer=[
            numpy_helper.from_array(codebook, "codebook"),
            numpy_helper.from_array(indices, "indices"),
            numpy_helper.from_array(np.int64([6, 4]), "shape"),
        ],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    proto.ir_version = 10
    return to_ir(proto), codebook, indices


def test_in_graph_codebook_trains_centroids_keeps_indices_and_zero(rng) -> None:
    model, codebook, indices = _in_graph_codebook(rng)
    assert codebook_tensors(model) == ["codebook"]
    module = OnnxModule(model)
    assert module.trainable_names() == ["codebook"]  # indices are integers, never trained
    assert P.attach_structure(module, model) == {"codebook": "mask"}
    _steps(
        module,
        torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1),
        inputs=6,
    )
    arrays = module.arrays()
    assert arrays["codebook"][0] == 0.0 and not np.allclose(arrays["codebook"][1:], codebook[1:])
    changed = write_back(model, arrays)
    assert [name for name, _, _ in changed] == ["codebook"]
    np.testing.assert_array_equal(model.graph.initializers["indices"].const_value.numpy(), indices)
    x = rng.standard_normal((3, 6)).astype(np.float32)
    proto = ir.to_proto(model)
    proto.ir_version = 10
    want = x @ arrays["codebook"][indices].reshape(6, 4)
    np.testing.assert_allclose(ort_run(proto, {"x": x})[0], want, rtol=1e-5, atol=1e-6)


def test_mask_shape_mismatch_is_refused(mlp_pair) -> None:
    module = OnnxModule(mlp_pair[1])
    with pytest.raises(UserError, match="mask for 'layers.0.weight' has shape"):
        P.add_mask(module, "layers.0.weight", np.ones((3, 3), bool))
    P.add_mask(module, "layers.0.weight")
    with pytest.raises(UserError, match="already carries a parametrization"):
        P.add_mask(module, "layers.0.weight")


def test_uint4_codebook_indices_run(rng) -> None:
    import ml_dtypes

    codebook = np.float32([0.0, -0.3, 0.2, 0.5])
    indices = rng.integers(0, 4, 12)
    graph = ir.Graph(
        inputs=[x := ir.val("x", ir.DataType.FLOAT, ir.Shape([2, 4]))],
        outputs=[],
        nodes=[],
        opset_imports={"": 21},
        name="g",
    )
    index_value = ir.val(
        "idx",
        ir.DataType.UINT4,
        ir.Shape([12]),
        const_value=ir.tensor(indices.astype(ml_dtypes.uint4), name="idx"),
    )
    book_value = ir.val(
        "book", ir.DataType.FLOAT, ir.Shape([4]), const_value=ir.tensor(codebook, name="book")
    )
    shape_value = ir.val(
        "shape",
        ir.DataType.INT64,
        ir.Shape([2]),
        const_value=ir.tensor(np.int64([4, 3]), name="shape"),
    )
    for value in (index_value, book_value, shape_value):
        graph.register_initializer(value)
    cast = ir.node("Cast", [index_value], attributes={"to": ir.DataType.INT32})
    gather = ir.node("Gather", [book_value, cast.outputs[0]], attributes={"axis": 0})
    reshape = ir.node("Reshape", [gather.outputs[0], shape_value])
    matmul = ir.node("MatMul", [x, reshape.outputs[0]])
    graph.extend([cast, gather, reshape, matmul])
    graph.outputs.append(matmul.outputs[0])
    matmul.outputs[0].name = "y"
    model = ir.Model(graph, ir_version=10)
    module = OnnxModule(model)
    assert codebook_tensors(model) == ["book"]
    feeds = {"x": rng.standard_normal((2, 4)).astype(np.float32)}
    want = feeds["x"] @ codebook[indices].reshape(4, 3)
    np.testing.assert_allclose(module.run(feeds)[0], want, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(ort_run(ir.to_proto(model), feeds)[0], want, rtol=1e-6, atol=1e-7)
