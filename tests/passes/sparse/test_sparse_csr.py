"""sparse.csr and the portable fallback: structure, outputs against numpy, reasons, CLI.

Nothing here needs the kernel library: `decide="always"` converts without measuring and the
portable functions run in a stock onnxruntime session. The measured decision and the kernel
itself are tested in tests/kernels/.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from typer.testing import CliRunner

from onnxcompress import runtime
from onnxcompress.cli import app
from onnxcompress.errors import MissingDependencyError, RecipeError, UnsupportedModelError
from onnxcompress.formats.kernel_arrays import dense_from_csr, to_csr
from onnxcompress.formats.kernel_reference import REFERENCE_OPS
from onnxcompress.pass_base import get_pass
from tests.builders import finish, mlp_proto, save_proto
from tests.kernels.sparse_models import pruned, sparse_matmul_model

SparseCsr = get_pass("sparse.csr")


def stock_session(model: onnx.ModelProto) -> ort.InferenceSession:
    """onnxruntime WITHOUT our library: only the portable functions can run the ops."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def prune_proto(
    proto: onnx.ModelProto, rng: np.random.Generator, rates: dict[str, float]
) -> onnx.ModelProto:
    for initializer in proto.graph.initializer:
        if initializer.name in rates:
            array = numpy_helper.to_array(initializer).copy()
            array[rng.random(array.shape) < rates[initializer.name]] = 0.0
            initializer.CopyFrom(numpy_helper.from_array(array, initializer.name))
    return proto


@pytest.fixture
def pruned_mlp(rng) -> onnx.ModelProto:
    proto = mlp_proto(rng, (48, 64, 40, 10))
    return prune_proto(proto, rng, {"fc0.weight": 0.9, "fc1.weight": 0.3, "head.weight": 0.8})


def run_pass(proto: onnx.ModelProto, **options) -> tuple[onnx.ModelProto, object]:
    result = SparseCsr(**options)(ir.serde.deserialize_model(proto))
    out = ir.to_proto(result.model)
    return out, result.report


def test_formats_round_trip_exactly(rng):
    weight = pruned(rng, (70, 33), 0.85)
    weight[:, 5] = 0.0
    for index_dtype in ("uint16", "int32"):
        csr = to_csr(weight, index_dtype)
        assert csr.row_ptr[-1] == csr.nnz == np.count_nonzero(weight)
        restored = dense_from_csr(csr.values, csr.col_indices, csr.row_ptr, 70, 33)
        np.testing.assert_array_equal(restored, weight)
    assert to_csr(np.ones((70000, 2), np.float32)).col_indices.dtype == np.int32


def test_converts_pruned_layers_and_keeps_outputs(rng, pruned_mlp):
    out, report = run_pass(pruned_mlp, decide="always", min_params=16)
    onnx.checker.check_model(out)
    ops = [(n.domain, n.op_type) for n in out.graph.node]
    # fc0 (MatMul) and head (Gemm transB)
    assert ops.count(("ai.onnxcompress", "SparseMatMul")) == 2
    assert ("", "MatMul") in ops  # fc1 stays dense
    fc1 = next(
        numpy_helper.to_array(i) for i in pruned_mlp.graph.initializer if i.name == "fc1.weight"
    )
    assert (
        report.reason_for("fc1.weight")
        == f"sparsity {1 - np.count_nonzero(fc1) / fc1.size:.3f} < min_sparsity 0.7"
    )
    assert {c.name for c in report.changes} == {"fc0.weight", "head.weight"}
    names = {i.name for i in out.graph.initializer}
    assert "fc0.weight" not in names and "head.weight" not in names and "head.bias" not in names
    assert [f.name for f in out.functions] == ["SparseMatMul"]

    x = rng.standard_normal((5, 48)).astype(np.float32)
    expected = stock_session(pruned_mlp).run(None, {"x": x})[0]
    np.testing.assert_allclose(
        stock_session(out).run(None, {"x": x})[0], expected, rtol=1e-5, atol=1e-5
    )
    reference = ReferenceEvaluator(out, new_ops=REFERENCE_OPS).run(None, {"x": x})[0]
    np.testing.assert_allclose(reference, expected, rtol=1e-5, atol=1e-5)


def test_gemm_forms(rng):
    """alpha, beta, transB and a [1, N] bias fold exactly; C of shape [M, N], transA stay dense."""
    w = pruned(rng, (12, 32), 0.9)  # transB: N x K
    c = rng.standard_normal((1, 12)).astype(np.float32)
    full_c = rng.standard_normal((4, 12)).astype(np.float32)
    nodes = [
        helper.make_node("Gemm", ["x", "w", "c"], ["a"], transB=1, alpha=0.5, beta=2.0),
        helper.make_node("Gemm", ["x", "w2", "full_c"], ["b"]),
        helper.make_node("Gemm", ["xt", "w3"], ["t"], transA=1),
    ]
    w2 = pruned(rng, (32, 12), 0.9)
    w3 = pruned(rng, (32, 12), 0.9)
    graph = helper.make_graph(
        nodes, "gemms",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 32]),
         helper.make_tensor_value_info("xt", TensorProto.FLOAT, [32, 4])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [4, 12]) for n in ("a", "b", "t")],
        initializer=[numpy_helper.from_array(a, n) for a, n in
                     ((w, "w"), (c, "c"), (w2, "w2"), (full_c, "full_c"), (w3, "w3"))],
    )
    proto = finish(graph)
    out, report = run_pass(proto, decide="always", min_params=16)
    assert [n.op_type for n in out.graph.node] == ["SparseMatMul", "Gemm", "Gemm"]
    assert report.reason_for("w2") == "Gemm bias C of shape [4, 12] does not broadcast to [12]"
    assert report.reason_for("w3") == "Gemm with transA=1"
    x = rng.standard_normal((4, 32)).astype(np.float32)
    xt = rng.standard_normal((32, 4)).astype(np.float32)
    a = stock_session(out).run(["a"], {"x": x, "xt": xt})[0]
    np.testing.assert_allclose(a, 0.5 * x @ w.T + 2.0 * c, rtol=1e-5, atol=1e-5)


def test_shared_and_small_weights_stay_dense(rng):
    w = pruned(rng, (32, 32), 0.9)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"]),
            helper.make_node("MatMul", ["h", "w"], ["y"]),
        ],
        "shared",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32])],
        initializer=[numpy_helper.from_array(w, "w")],
    )
    out, report = run_pass(finish(graph), decide="always", min_params=16)
    assert report.reason_for("w") == "weight read by 2 nodes"
    assert not report.changes
    out, report = run_pass(finish(graph), decide="always", min_params=2048)
    assert report.reason_for("w") == "too small (1024 < min_params=2048)"


def test_portable_fallback_matches_reference_without_the_library(rng):
    for shape, sparsity, leading in (
        ((40, 30), 0.8, (1,)),
        ((17, 9), 1.0, (2, 3)),
        ((64, 5), 0.0, (7,)),
    ):
        weight = pruned(rng, shape, sparsity)
        weight[:, 0] = 0.0  # an empty CSR row
        csr = to_csr(weight)
        bias = rng.standard_normal(shape[1]).astype(np.float32)
        model = sparse_matmul_model(csr, [*leading, shape[0]], bias, portable=True)
        onnx.checker.check_model(model)
        x = rng.standard_normal((*leading, shape[0])).astype(np.float32)
        y = stock_session(model).run(None, {"X": x})[0]
        np.testing.assert_allclose(y, x.astype(np.float64) @ weight + bias, rtol=1e-5, atol=1e-5)
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
        dims = [d.dim_value for d in inferred.graph.output[0].type.tensor_type.shape.dim]
        assert dims == [*leading, shape[1]]


def test_reference_rejects_bad_csr(rng):
    csr = to_csr(pruned(rng, (8, 4), 0.5), "int32")
    cols = csr.col_indices.copy()
    cols[0] = 8
    with pytest.raises(ValueError, match=r"col_indices\[0\] = 8 is out of range \[0, 8\)"):
        dense_from_csr(csr.values, cols, csr.row_ptr, 8, 4)


def test_preconditions(rng, pruned_mlp, monkeypatch):
    with pytest.raises(RecipeError, match="min_sparsity"):
        SparseCsr(min_sparsity=1.5)
    old = pruned_mlp
    old.opset_import[0].version = 15
    with pytest.raises(UnsupportedModelError, match="opset >= 16"):
        SparseCsr(decide="always")(ir.serde.deserialize_model(old))
    monkeypatch.setattr(runtime, "available_ops", lambda: [])
    with pytest.raises(MissingDependencyError, match="kernel library is not built"):
        SparseCsr()(ir.serde.deserialize_model(mlp_proto(rng)))
    with pytest.raises(MissingDependencyError, match="portable=False"):
        SparseCsr(decide="always", portable=False)(ir.serde.deserialize_model(mlp_proto(rng)))


def test_non_portable_model_without_library_is_a_clear_error(rng, monkeypatch):
    model = sparse_matmul_model(to_csr(pruned(rng, (8, 4), 0.5)), [1, 8])
    monkeypatch.setattr(runtime, "available_ops", lambda: [])
    with pytest.raises(
        MissingDependencyError, match=r"ai\.onnxcompress\.SparseMatMul without a portable fallback"
    ):
        runtime.session(model)
    portable = sparse_matmul_model(
        to_csr(pruned(rng, (8, 4), 0.5)), [1, 8], np.zeros(4, np.float32), portable=True
    )
    assert runtime.missing_kernel_ops(portable) == []


def test_sparsify_command(rng, tmp_path, pruned_mlp):
    source = save_proto(pruned_mlp, tmp_path / "mlp.onnx")
    target = tmp_path / "sparse.onnx"
    result = CliRunner().invoke(
        app,
        [
            "sparsify",
            str(source),
            "-o",
            str(target),
            "--always",
            "--min-sparsity",
            "0.75",
            "--min-params",
            "16",
            "--report",
            str(tmp_path / "r.json"),
        ],
    )
    assert result.exit_code == 0, result.output
    out = onnx.load(target)
    assert [n.op_type for n in out.graph.node].count("SparseMatMul") == 2
    x = rng.standard_normal((2, 48)).astype(np.float32)
    np.testing.assert_allclose(
        stock_session(out).run(None, {"x": x})[0],
        stock_session(pruned_mlp).run(None, {"x": x})[0],
        rtol=1e-5,
        atol=1e-5,
    )
    result = CliRunner().invoke(
        app, ["sparsify", str(source), "-o", str(target), "--min-sparsity", "2"]
    )
    assert result.exit_code == 2
