"""Models whose weights live in an external data file, through the commands that rewrite them."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from onnxcompress.cli import app
from tests.builders import NO_GATE, mlp_proto

runner = CliRunner()


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def external_model(rng, tmp_path, monkeypatch):
    """m.onnx + m.data in their own folder; the commands run from another folder."""
    folder = tmp_path / "model"
    folder.mkdir()
    onnx.save(mlp_proto(rng, (32, 64, 48, 10)), str(folder / "m.onnx"), save_as_external_data=True,
              all_tensors_to_one_file=True, location="m.data", size_threshold=0)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    return folder / "m.onnx"


def test_sensitivity_and_budget_search_find_the_data_from_any_folder(external_model, tmp_path):
    result = invoke(
        "sensitivity", external_model, "-o", tmp_path / "sens", "--ratios", "0.5", "--workers", "1"
    )
    assert result.exit_code == 0, result.output
    result = invoke(
        "lowrank",
        external_model,
        "--budget",
        "0.9",
        "--min-params",
        "0",
        "-o",
        tmp_path / "l.onnx",
        *NO_GATE,
    )
    assert result.exit_code == 0, result.output


def test_pack_and_unpack_with_external_data(external_model, tmp_path):
    clustered, archive, restored = tmp_path / "c.onnx", tmp_path / "c.onnxc", tmp_path / "r.onnx"
    assert (
        invoke("--external-data", "cluster", external_model, "-o", clustered, *NO_GATE).exit_code
        == 0
    )
    result = invoke("pack", clustered, "-o", archive, "-q")
    assert result.exit_code == 0, result.output
    result = invoke("--external-data", "unpack", archive, "-o", restored)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "r.onnx.data").is_file()
    external = [t for t in onnx.load(str(restored), load_external_data=False).graph.initializer
                if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external


def test_an_embedded_output_may_share_a_name_with_the_inputs_data(external_model):
    """m.onnx reads m.data; writing out.onnx embedded never touches m.data, whatever its name."""
    folder = external_model.parent
    (folder / "m.data").rename(folder / "out.onnx.data")
    proto = onnx.load(str(external_model), load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "out.onnx.data"
    onnx.save(proto, str(external_model))
    before = (folder / "out.onnx.data").read_bytes()
    result = invoke(
        "prune", external_model, "--sparsity", "0.5", "-o", folder / "out.onnx", *NO_GATE
    )
    assert result.exit_code == 0, result.output
    assert (folder / "out.onnx.data").read_bytes() == before
    result = invoke(
        "--external-data",
        "prune",
        external_model,
        "--sparsity",
        "0.5",
        "-o",
        folder / "out2.onnx",
        *NO_GATE,
    )
    assert result.exit_code == 0, result.output
    report = json.loads(invoke("inspect", folder / "out2.onnx", "--json").stdout)
    assert report["total_params"] == 32 * 64 + 64 * 48 + 48 * 10
    assert np.isclose(report["layers"][0]["sparsity"], 0.5, atol=0.01)
