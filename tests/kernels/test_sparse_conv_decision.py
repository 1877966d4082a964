"""sparse.csr's measured decision on Conv layers: timed against onnxruntime's Conv at a batch."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

from onnxcompress import runtime
from onnxcompress.pass_base import PassContext, get_pass
from tests.passes.sparse.test_sparse_conv_pass import pruned_cnn

SparseCsr = get_pass("sparse.csr")
FAST = {"repeats": 3, "cold_cache": False, "threads": 1, "min_params": 16}


def test_faster_convs_are_converted_and_run_with_the_kernel(rng):
    proto = pruned_cnn(rng, 0.95)
    result = SparseCsr(min_speedup=1e-6, portable=False, batch=2, **FAST)(
        ir.serde.deserialize_model(proto)
    )
    out = ir.to_proto(result.model)
    assert not out.functions and [n.op_type for n in out.graph.node].count("SparseConv") == 3
    timings = result.report.notes["timings"]
    assert set(timings) == {"c0.weight", "c1.weight", "c2.weight"}
    assert all(
        t["op"] == "SparseConv" and t["batch"] == 2 and t["dense_ms"] > 0 for t in timings.values()
    )
    assert all("faster at batch 2" in c.detail for c in result.report.changes)
    assert runtime.missing_kernel_ops(out) == ["SparseConv"]
    x = rng.standard_normal((2, 4, 16, 16)).astype(np.float32)
    np.testing.assert_allclose(
        runtime.session(out, threads=1).run(None, {"x": x})[0],
        runtime.session(proto, threads=1).run(None, {"x": x})[0],
        rtol=1e-5,
        atol=1e-5,
    )
    onnx.checker.check_model(out)


def test_not_faster_stays_dense_with_the_timing(rng):
    result = SparseCsr(min_speedup=1000.0, **FAST)(
        ir.serde.deserialize_model(pruned_cnn(rng, 0.95))
    )
    assert not result.modified
    reason = result.report.reason_for("c0.weight")
    assert reason is not None and reason.startswith("SparseConv not faster at batch 1: ")


def test_unknown_input_size_cannot_be_measured(rng):
    proto = pruned_cnn(rng, 0.95)
    for dim in proto.graph.input[0].type.tensor_type.shape.dim[2:]:
        dim.dim_param = "side"  # H and W symbolic: the layer's speed depends on them
    result = SparseCsr(min_speedup=1e-6, **FAST)(ir.serde.deserialize_model(proto))
    assert not result.modified
    assert result.report.reason_for("c0.weight").startswith("Conv input size unknown")
    probes = {
        "x": rng.standard_normal((4, 4, 16, 16)).astype(np.float32)
    }  # what --input-shape or --data gives
    sized = SparseCsr(min_speedup=1e-6, context=PassContext(probes=probes), **FAST)
    assert sized(ir.serde.deserialize_model(proto)).modified
