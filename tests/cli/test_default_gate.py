"""Every one-pass command gates its step with THE default gate unless told otherwise."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from typer.testing import CliRunner

from onnxcompress.cli import app
from onnxcompress.fidelity import DEFAULT_GATE
from tests.builders import mlp_proto, save_proto


def on_a_grid(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every weight a multiple of 1/32 (under 256 values a tensor): 8-bit codebooks are exact.

    These tests are about which gate a command applies, not how close its result comes.
    """
    for tensor in model.graph.initializer:
        snapped = np.round(numpy_helper.to_array(tensor) * 32) / 32
        tensor.CopyFrom(numpy_helper.from_array(snapped.astype(np.float32), tensor.name))
    return model

COMMANDS = [
    ("prune", "--sparsity", "0.01"),
    ("prune", "--dead-neurons"),
    ("prune", "--structured", "--ratio", "0.0"),
    ("lowrank", "--energy", "0.9999", "--min-params", "0"),
    ("cluster", "--bits", "8"),
    ("sparsify", "--always", "--min-params", "0"),
]


@pytest.mark.parametrize("command", COMMANDS, ids=[" ".join(c) for c in COMMANDS])
def test_one_pass_commands_use_the_default_gate(rng, tmp_path, command):
    model = save_proto(on_a_grid(mlp_proto(rng, (16, 32, 24, 10))), tmp_path / "mlp.onnx")
    report = tmp_path / "report.json"
    args = [command[0], model, *command[1:], "-o", tmp_path / "out.onnx", "--report", report]
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    gates = [step["gate"] for step in json.loads(report.read_text())["steps"]]
    assert gates and all(gate == DEFAULT_GATE.model_dump() for gate in gates)


def test_a_threshold_given_changes_only_that_threshold(rng, tmp_path):
    model = save_proto(on_a_grid(mlp_proto(rng, (16, 32, 24, 10))), tmp_path / "mlp.onnx")
    report = tmp_path / "report.json"
    args = ["cluster", model, "--bits", "8", "--min-cosine", "0.95", "-o", tmp_path / "o.onnx",
            "--report", report]
    assert CliRunner().invoke(app, [str(a) for a in args]).exit_code == 0
    (step,) = json.loads(report.read_text())["steps"]
    assert step["gate"] == {**DEFAULT_GATE.model_dump(), "min_cosine": 0.95}


def test_optimize_takes_the_detector_bar_and_keeps_the_others(rng, tmp_path):
    model = save_proto(mlp_proto(rng, (16, 32, 24, 10)), tmp_path / "mlp.onnx")
    report = tmp_path / "report.json"
    args = ["optimize", model, "--min-box-f1", "0.95", "-o", tmp_path / "o.onnx",
            "--report", report]
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    gates = [step["gate"] for step in json.loads(report.read_text())["steps"]]
    assert gates and all(g == {**DEFAULT_GATE.model_dump(), "min_box_f1": 0.95} for g in gates)
