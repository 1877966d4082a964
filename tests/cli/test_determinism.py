"""Seeded and deterministic: the same command on the same input writes the same bytes."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from typer.testing import CliRunner

from onnxcompress.cli import app
from tests.builders import NO_GATE, mlp_proto, save_proto

runner = CliRunner()

COMMANDS = {
    "prune": ["prune", "--sparsity", "0.8"],
    "prune --structured": ["prune", "--structured", "--ratio", "0.5"],
    "lowrank": ["lowrank", "--ratio", "0.5", "--min-params", "0"],
    "cluster": ["cluster", "--bits", "4"],
    "sparsify": ["sparsify", "--always", "--min-sparsity", "0", "--min-params", "0"],
    "optimize": ["optimize", "--recipe", "deep-compression", "--trust-random-probes"],
}


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_same_command_same_bytes(name, rng, tmp_path):
    model = save_proto(mlp_proto(rng, (32, 64, 48, 10)), tmp_path / "mlp.onnx")
    command, *options = COMMANDS[name]
    digests = []
    for run in range(2):
        out = tmp_path / f"out{run}.onnx"
        result = runner.invoke(
            app,
            [command, str(model), "-o", str(out), *NO_GATE, *options]
            if command != "optimize"
            else [command, str(model), "-o", str(out), *options],
        )
        assert result.exit_code == 0, result.output
        digests.append(digest(out))
    assert digests[0] == digests[1]


def test_finetune_is_seeded(rng, tmp_path):
    pytest.importorskip("torch")
    model = save_proto(mlp_proto(rng, (32, 64, 48, 10)), tmp_path / "mlp.onnx")
    data = tmp_path / "train.npz"
    np.savez(
        data, x=rng.standard_normal((96, 32)).astype(np.float32), labels=rng.integers(0, 10, 96)
    )
    digests = []
    for run in range(2):
        out = tmp_path / f"ft{run}.onnx"
        result = runner.invoke(
            app, ["finetune", str(model), "--data", str(data), "-o", str(out), "--epochs", "2"]
        )
        assert result.exit_code == 0, result.output
        digests.append(digest(out))
    assert digests[0] == digests[1]


def test_pack_is_deterministic(rng, tmp_path):
    model = save_proto(mlp_proto(rng, (32, 64, 48, 10)), tmp_path / "mlp.onnx")
    clustered = tmp_path / "clustered.onnx"
    assert (
        runner.invoke(app, ["cluster", str(model), "-o", str(clustered), *NO_GATE]).exit_code == 0
    )
    archives = [tmp_path / "a.onnxc", tmp_path / "b.onnxc"]
    for archive in archives:
        result = runner.invoke(app, ["pack", str(clustered), "-o", str(archive), "-q"])
        assert result.exit_code == 0, result.output
    assert digest(archives[0]) == digest(archives[1])
