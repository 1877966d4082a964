"""`inspect` on a shared-weight model: one row per logical weight, with bits and codebook size."""

from __future__ import annotations

import json
import re

from typer.testing import CliRunner

from onnxcompress.cli import app
from tests.builders import NO_GATE, mlp_proto, save_proto

runner = CliRunner()


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def test_inspect_shows_bits_and_codebook_size_of_clustered_layers(rng, tmp_path):
    model = save_proto(mlp_proto(rng, (48, 64, 32, 10)), tmp_path / "mlp.onnx")
    pruned, clustered = tmp_path / "pruned.onnx", tmp_path / "clustered.onnx"
    assert invoke("prune", model, "--sparsity", "0.75", "-o", pruned, *NO_GATE).exit_code == 0
    result = invoke("cluster", pruned, "-o", clustered, "--layer-bits", "head.*=3", *NO_GATE)
    assert result.exit_code == 0, result.output

    result = invoke("inspect", clustered, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    layers = {layer["name"]: layer for layer in report["layers"]}
    assert sorted(layers) == ["fc0.weight", "fc1.weight", "head.weight"]
    fc0, head = layers["fc0.weight"], layers["head.weight"]
    assert (fc0["bits"], fc0["codebook_size"], fc0["holder"]) == (5, 32, "codebook")
    assert (head["bits"], head["codebook_size"]) == (3, 8)
    # The logical weight, not the uint8 index tensor: its shape, params and sparsity.
    assert fc0["shape"] == [48, 64] and fc0["params"] == 48 * 64 and fc0["op"] == "MatMul"
    assert abs(fc0["sparsity"] - 0.75) < 1e-3
    assert fc0["distinct"] <= 32
    assert fc0["bytes"] == 48 * 64 * 5 // 8 + 32 * 4  # 5-bit packed indices + a float32 codebook
    assert report["total_params"] == 48 * 64 + 64 * 32 + 32 * 10

    table = invoke("inspect", clustered)
    assert table.exit_code == 0, table.output
    assert "bits" in table.stdout
    assert re.search(r"│\s+3\s+│\s+8\s+│", table.stdout)  # head.weight: 3 bits, 8 entries


def test_inspect_of_a_dense_model_has_no_codebook_fields(rng, tmp_path):
    model = save_proto(mlp_proto(rng, (16, 8, 4)), tmp_path / "mlp.onnx")
    report = json.loads(invoke("inspect", model, "--json").stdout)
    assert all(
        layer["bits"] is None and layer["codebook_size"] is None for layer in report["layers"]
    )


def test_layers_moved_into_kernels_read_back_as_the_same_weights(rng):
    """After sparse.csr, inspect still sees every weight: same shape, params and non-zeros."""
    import onnx_ir as ir

    from onnxcompress.pass_base import get_pass
    from onnxcompress.summary import layer_table
    from tests.passes.sparse.test_sparse_codebook_layers import shared_mlp

    shared = ir.serde.deserialize_model(shared_mlp(rng))
    before = {row.name: row for row in layer_table(shared)}
    kernels = get_pass("sparse.csr")(decide="always", min_params=16)(
        ir.serde.deserialize_model(ir.to_proto(shared))
    ).model
    after = {row.name: row for row in layer_table(kernels)}

    assert sorted(after) == sorted(before)
    assert {row.op for row in after.values()} == {"SparseCodebookMatMul", "CodebookMatMul"}
    for name, row in after.items():
        # kernels hold K × N; Gemm transB stored N × K
        assert row.shape in (before[name].shape, before[name].shape[::-1])
        assert (row.params, row.nonzero) == (before[name].params, before[name].nonzero)
        assert row.codebook_size == before[name].codebook_size
    assert after["fc0.weight"].bytes < before["fc0.weight"].bytes  # CSR of 10% of the indices


def test_pipeline_summary_counts_shared_weights(rng):
    import onnx_ir as ir

    from onnxcompress.pipeline import model_summary
    from tests.passes.sparse.test_sparse_codebook_layers import shared_mlp

    summary = model_summary(ir.serde.deserialize_model(shared_mlp(rng)))
    assert summary["weight_params"] == 48 * 64 + 64 * 40 + 40 * 10
    assert 0 < summary["nonzero_weight_params"] < summary["weight_params"]  # fc0 is 90% zeros
