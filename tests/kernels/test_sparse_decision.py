"""sparse.csr's measured decision with the kernel: converts when faster, records why not."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

from onnxcompress import runtime
from onnxcompress.pass_base import get_pass
from onnxcompress.passes.sparse.csr import csr_arrays, measure_layer
from tests.builders import mlp_proto
from tests.kernels.sparse_models import pruned
from tests.passes.sparse.test_sparse_csr import prune_proto

SparseCsr = get_pass("sparse.csr")
FAST = {"repeats": 3, "cold_cache": False, "threads": 1, "min_params": 16}


def _model(rng):
    proto = mlp_proto(rng, (64, 96, 32, 10))
    return prune_proto(proto, rng, {"fc0.weight": 0.95, "fc1.weight": 0.95, "head.weight": 0.95})


def test_not_faster_stays_dense_with_the_timing(rng):
    result = SparseCsr(min_speedup=1000.0, **FAST)(ir.serde.deserialize_model(_model(rng)))
    assert not result.modified
    for name in ("fc0.weight", "fc1.weight", "head.weight"):
        reason = result.report.reason_for(name)
        assert reason is not None and reason.startswith("SparseMatMul not faster at batch 1: ")
        assert reason.endswith("x < min_speedup 1000.0)")
        timing = result.report.notes["timings"][name]
        assert timing["dense_ms"] > 0 and timing["sparse_ms"] > 0


def test_faster_is_converted_and_runs_with_the_kernel(rng):
    proto = _model(rng)
    result = SparseCsr(min_speedup=1e-6, portable=False, batch=4, **FAST)(
        ir.serde.deserialize_model(proto)
    )
    assert result.modified
    out = ir.to_proto(result.model)
    assert not out.functions  # --no-portable: the kernel is required
    assert [n.op_type for n in out.graph.node].count("SparseMatMul") == 3
    assert all("faster at batch 4" in c.detail for c in result.report.changes)
    x = rng.standard_normal((4, 64)).astype(np.float32)
    expected = runtime.session(proto, threads=1).run(None, {"x": x})[0]
    actual = runtime.session(out, threads=1).run(None, {"x": x})[0]
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)
    onnx.checker.check_model(out)


def test_measure_layer_times_both_variants(rng):
    weight = pruned(rng, (128, 64), 0.9)
    arrays, attributes = csr_arrays(weight)
    timing = measure_layer(
        weight, "SparseMatMul", arrays, attributes, 2, threads=1, repeats=3, cold_cache=True
    )
    assert set(timing) == {"dense", "sparse", "overhead"} and min(timing.values()) > 0


def test_shared_layers_run_with_the_kernels(rng):
    from tests.passes.sparse.test_sparse_codebook_layers import shared_mlp

    proto = shared_mlp(rng)
    result = SparseCsr(min_speedup=1e-6, portable=False, **FAST)(ir.serde.deserialize_model(proto))
    out = ir.to_proto(result.model)
    assert {"SparseCodebookMatMul", "CodebookMatMul"} <= {n.op_type for n in out.graph.node}
    assert set(result.report.notes["timings"]) == {"fc0.weight", "fc1.weight", "head.weight"}
    for batch in (1, 5):
        x = rng.standard_normal((batch, 48)).astype(np.float32)
        expected = runtime.session(proto, threads=1).run(None, {"x": x})[0]
        np.testing.assert_allclose(runtime.session(out, threads=1).run(None, {"x": x})[0], expected,
                                   rtol=1e-5, atol=1e-5)


def test_sparsify_command_measures_and_writes_a_kernel_only_model(rng, tmp_path):
    """`onnxcompress sparsify` as a user runs it: measured decision, --no-portable, --batch."""
    import json
    import subprocess
    import sys

    proto = prune_proto(
        mlp_proto(rng, (64, 96, 32, 10)), rng, {"fc0.weight": 0.95, "fc1.weight": 0.5}
    )
    source, target, report = (
        tmp_path / "pruned.onnx",
        tmp_path / "sparse.onnx",
        tmp_path / "report.json",
    )
    onnx.save(proto, source)
    command = [
        sys.executable,
        "-c",
        "from onnxcompress.cli import main; main()",
        "sparsify",
        str(source),
        "-o",
        str(target),
        "--min-sparsity",
        "0.7",
        "--batch",
        "4",
        "--no-portable",
        "--min-speedup",
        "1e-6",
        "--min-params",
        "16",
        "--threads",
        "1",
        "--report",
        str(report),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    (step,) = json.loads(report.read_text())["steps"]
    # measured, and any speed is enough
    assert [c["name"] for c in step["changes"]] == ["fc0.weight"]
    assert "faster at batch 4" in step["changes"][0]["detail"]
    reasons = {s["name"]: s["reason"] for s in step["skipped"]}
    assert reasons["fc1.weight"].startswith("sparsity 0.4") and reasons["fc1.weight"].endswith(
        " < min_sparsity 0.7"
    )
    assert set(step["notes"]["timings"]) == {"fc0.weight"}
    out = onnx.load(target)
    assert not out.functions and [n.op_type for n in out.graph.node].count("SparseMatMul") == 1
    # needs the library: no portable fallback
    assert runtime.missing_kernel_ops(out) == ["SparseMatMul"]
    x = rng.standard_normal((4, 64)).astype(np.float32)
    np.testing.assert_allclose(
        runtime.session(out, threads=1).run(None, {"x": x})[0],
        runtime.session(proto, threads=1).run(None, {"x": x})[0],
        rtol=1e-5,
        atol=1e-5,
    )
