"""No command writes over its input or a file the input maps (issue 14): exit 2, files untouched.

The input's data files get the names a destination would take: an archive `-o`, the data
file `<output>.data`, a report, a plan, the files `sensitivity -o` writes.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import onnx
import pytest
from typer.testing import CliRunner

from onnxcompress.cli import app
from tests.builders import mlp_proto

runner = CliRunner()


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def _state(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _model_reading(folder: Path, data_name: str, rng) -> Path:  # type: ignore[no-untyped-def]
    """folder/m.onnx whose weights live in folder/<data_name>."""
    onnx.save(mlp_proto(rng, (32, 64, 48, 10)), str(folder / "m.onnx"), save_as_external_data=True,
              all_tensors_to_one_file=True, location=data_name, size_threshold=0)
    return folder / "m.onnx"


@pytest.mark.parametrize(
    ("data_name", "args"),
    [
        ("w.bin", ("pack", "{model}", "-o", "{dir}/w.bin")),
        (
            "w.json",
            (
                "prune",
                "{model}",
                "--sparsity",
                "0.5",
                "-o",
                "{dir}/o.onnx",
                "--report",
                "{dir}/w.json",
            ),
        ),
        (
            "w.json",
            (
                "lowrank",
                "{model}",
                "--ratio",
                "0.5",
                "--min-params",
                "0",
                "--dry-run",
                "--save-plan",
                "{dir}/w.json",
            ),
        ),
        (
            "w.json",
            (
                "lowrank",
                "{model}",
                "--ratio",
                "0.5",
                "--min-params",
                "0",
                "-o",
                "{dir}/o.onnx",
                "--save-plan",
                "{dir}/w.json",
            ),
        ),
        (
            "w.json",
            (
                "prune",
                "{model}",
                "--structured",
                "--ratio",
                "0.25",
                "--save-plan",
                "{dir}/w.json",
                "-o",
                "{dir}/o.onnx",
            ),
        ),
        (
            "recipe.yaml",
            ("sensitivity", "{model}", "-o", "{dir}", "--ratios", "0.5", "--workers", "1"),
        ),
        (
            "o.onnx.data",
            ("--external-data", "prune", "{model}", "--sparsity", "0.5", "-o", "{dir}/o.onnx"),
        ),
        ("w.json", ("pack", "{model}", "-o", "{dir}/a.onnxc", "--report", "{dir}/w.json")),
    ],
    ids=[
        "pack-archive",
        "report",
        "lowrank-dry-run-plan",
        "lowrank-plan",
        "structured-plan",
        "sensitivity",
        "external-data-file",
        "pack-report",
    ],
)
def test_no_destination_may_be_a_file_the_input_reads(rng, tmp_path, data_name, args):
    model = _model_reading(tmp_path, data_name, rng)
    before = _state(tmp_path)
    result = invoke(*(a.format(model=model, dir=tmp_path) for a in args))
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and result.output.count("\n") == 1, result.output
    assert "refusing to overwrite" in result.output
    assert _state(tmp_path) == before


def test_an_output_data_file_may_not_be_the_input_model(rng, tmp_path):
    """`--external-data prune o.onnx.data -o o.onnx` would write o.onnx's weights over its input."""
    onnx.save(mlp_proto(rng), str(tmp_path / "o.onnx.data"))
    before = _state(tmp_path)
    result = invoke(
        "--external-data",
        "prune",
        tmp_path / "o.onnx.data",
        "--sparsity",
        "0.5",
        "-o",
        tmp_path / "o.onnx",
    )
    assert result.exit_code == 2 and "refusing to overwrite the input model" in result.output, (
        result.output
    )
    assert _state(tmp_path) == before


def test_unpack_never_writes_over_its_archive(rng, tmp_path):
    onnx.save(mlp_proto(rng), str(tmp_path / "m.onnx"))
    assert invoke("pack", tmp_path / "m.onnx", "-o", tmp_path / "r.onnx.data", "-q").exit_code == 0
    before = _state(tmp_path)
    result = invoke(
        "--external-data", "unpack", tmp_path / "r.onnx.data", "-o", tmp_path / "r.onnx"
    )
    assert result.exit_code == 2 and "refusing to overwrite the input archive" in result.output, (
        result.output
    )
    assert _state(tmp_path) == before
