"""The installed console script (`main`), as a shell runs it: usage errors are one line, exit 2."""

from __future__ import annotations

import subprocess
import sys

import pytest


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "onnxcompress", *args], capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("prune",), "Missing argument 'model'"),
        (("prune", "model.onnx", "--sparsity", "abc"), "Invalid value for '--sparsity'"),
        (("inspect", "model.onnx", "--jsn"), "No such option: --jsn"),
        (("bogus",), "No such command 'bogus'"),
    ],
)
def test_usage_errors_are_one_line(args, message):
    result = run(*args)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr
    assert result.stdout == ""


def test_help_and_success_exit_zero(tmp_path):
    assert run("--help").returncode == 0
    assert run("passes").returncode == 0
    assert "Usage" in run().stdout
