"""`onnxcompress cluster | pack | unpack` from the command line: outputs and exit codes."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import numpy_helper
from typer.testing import CliRunner

from onnxcompress import runtime
from onnxcompress.cli import app
from onnxcompress.formats.codebook import codebook_layers
from tests.builders import NO_GATE, mlp_proto, save_proto

runner = CliRunner()


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def model_path(rng, tmp_path):
    return save_proto(mlp_proto(rng, (48, 64, 32, 10)), tmp_path / "mlp.onnx")


def _weights(path) -> dict[str, bytes]:
    proto = onnx.load(str(path))
    return {t.name: numpy_helper.to_array(t).tobytes() for t in proto.graph.initializer}


def test_prune_cluster_pack_unpack(model_path, tmp_path):
    pruned, clustered = tmp_path / "pruned.onnx", tmp_path / "clustered.onnx"
    assert invoke("prune", model_path, "--sparsity", "0.8", "-o", pruned, *NO_GATE).exit_code == 0
    result = invoke(
        "cluster",
        pruned,
        "-o",
        clustered,
        "--layer-bits",
        "head.*=3",
        "--min-cosine",
        "0.9",
        "--min-rank-corr",
        "-1",
        "--min-top1",
        "0",
    )
    assert result.exit_code == 0, result.output
    layers = {layer.name: layer for layer in codebook_layers(ir.load(str(clustered)))}
    assert layers["head.weight"].bits == 3 and layers["fc0.weight"].bits == 5
    assert all(layer.zero_entry for layer in layers.values())

    archive, report = tmp_path / "m.onnxc", tmp_path / "table.json"
    result = invoke("pack", clustered, "-o", archive, "--report", report)
    assert result.exit_code == 0, result.output
    assert "weights kept (P)" in result.stdout
    table = json.loads(report.read_text())
    assert table["totals"]["archive_bytes"] == archive.stat().st_size
    assert archive.stat().st_size < clustered.stat().st_size

    restored = tmp_path / "restored.onnx"
    result = invoke("unpack", archive, "-o", restored)
    assert result.exit_code == 0, result.output
    assert _weights(restored) == _weights(clustered)
    x = np.random.default_rng(1).standard_normal((2, 48)).astype(np.float32)
    want = runtime.session(str(clustered), threads=1).run(None, {"x": x})[0]
    got = runtime.session(str(restored), threads=1).run(None, {"x": x})[0]
    np.testing.assert_array_equal(got, want)


def test_corrupt_truncated_and_foreign_archives_exit_2(model_path, tmp_path):
    clustered, archive = tmp_path / "c.onnx", tmp_path / "c.onnxc"
    assert invoke("cluster", model_path, "-o", clustered, *NO_GATE).exit_code == 0
    assert invoke("pack", clustered, "-o", archive, "-q").exit_code == 0
    data = archive.read_bytes()
    rng = np.random.default_rng(7)
    cases = {
        "truncated.onnxc": data[: len(data) // 3],
        "foreign.onnxc": open(model_path, "rb").read(),
    }
    for index in range(5):
        corrupt = bytearray(data)
        corrupt[int(rng.integers(8, len(data)))] ^= 0x10
        cases[f"fuzz{index}.onnxc"] = bytes(corrupt)
    for name, content in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        out = tmp_path / f"{name}.onnx"
        result = invoke("unpack", path, "-o", out)
        assert result.exit_code == 2, (name, result.output)
        assert result.output.startswith("error: ") and result.output.count("\n") == 1
        assert not out.exists()
    result = invoke("unpack", tmp_path / "missing.onnxc", "-o", tmp_path / "m.onnx")
    assert result.exit_code == 2


def test_bad_options_exit_2(model_path, tmp_path):
    assert invoke("cluster", model_path, "--bits", "12", "-o", tmp_path / "o.onnx").exit_code == 2
    assert (
        invoke("cluster", model_path, "--layer-bits", "nobits", "-o", tmp_path / "o.onnx").exit_code
        == 2
    )
    assert invoke("pack", model_path, "--coder", "zip", "-o", tmp_path / "o.onnxc").exit_code == 2
    result = invoke("pack", model_path, "--index-bits", "wide", "-o", tmp_path / "o.onnxc")
    assert result.exit_code == 2 and "'auto' or 'paper'" in result.output


def test_pack_says_when_the_model_is_not_ready_for_deep_compression(model_path, tmp_path):
    pruned, sparse = tmp_path / "pruned.onnx", tmp_path / "sparse.onnx"
    assert invoke("prune", model_path, "--sparsity", "0.9", "-o", pruned, *NO_GATE).exit_code == 0
    result = invoke("pack", pruned, "-o", tmp_path / "a.onnxc")
    assert result.exit_code == 0, result.output
    assert "No weight-shared layer" in result.stdout and "| —" in result.stdout
    assert invoke("sparsify", pruned, "--always", "--min-params", "0", "-o", sparse).exit_code == 0
    result = invoke("pack", sparse, "-o", tmp_path / "b.onnxc", "-q")
    assert result.exit_code == 0, result.output
    assert "note: layers held by SparseMatMul" in result.stdout


def test_the_papers_storage_is_one_option_and_no_smaller_than_the_default(model_path, tmp_path):
    pruned, clustered = tmp_path / "pruned.onnx", tmp_path / "clustered.onnx"
    assert invoke("prune", model_path, "--sparsity", "0.9", "-o", pruned, *NO_GATE).exit_code == 0
    assert invoke("cluster", pruned, "-o", clustered, *NO_GATE).exit_code == 0
    default, paper = tmp_path / "default.onnxc", tmp_path / "paper.onnxc"
    assert invoke("pack", clustered, "-o", default, "-q").exit_code == 0
    result = invoke("pack", clustered, "-o", paper, "--coder", "huffman", "--index-bits", "paper")
    assert result.exit_code == 0, result.output
    assert default.stat().st_size <= paper.stat().st_size
