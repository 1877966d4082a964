"""Bad input, as a shell user meets it: one `error: ...` line, exit 2 (3 for a failed gate).

Each row is a command run by the console script on a fresh copy of a folder of small models
and data files. Whatever the outcome, no traceback, the inputs are untouched and nothing is
left behind beside the output (no model, report or temporary file).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.builders import NO_GATE, finish, mlp_proto

# The command runs in a scratch folder: this checkout, not whatever is installed, must be imported.
ENV = {**os.environ, "COLUMNS": "200", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}


def _value(name: str, shape: list[object], dtype: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, shape)


def _matmul(weight: np.ndarray, x_shape: list[object], y_shape: list[object]) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [_value("x", x_shape)],
        [_value("y", y_shape)],
        [numpy_helper.from_array(weight, "w")],
    )
    return finish(graph)


def _dangling() -> onnx.ModelProto:
    """A MatMul reading a value nothing defines: protobuf-valid, not a model."""
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "nope"], ["y"])], "g",
                              [_value("x", ["b", 16])], [_value("y", ["b", 8])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


def _fails_at_run_time(rng: np.random.Generator) -> onnx.ModelProto:
    """Loads in onnxruntime, but its Reshape cannot take the probe batch."""
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"]),
            helper.make_node("Reshape", ["h", "shape"], ["y"]),
        ],
        "g",
        [_value("x", ["b", 16])],
        [_value("y", [5, None])],
        [
            numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), "w"),
            numpy_helper.from_array(np.array([5, -1], np.int64), "shape"),
        ],
    )
    return finish(graph)


def _custom_op(rng: np.random.Generator) -> onnx.ModelProto:
    weight = numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Weird", ["x", "w"], ["y"], domain="com.example")],
        "g",
        [_value("x", ["b", 16])],
        [_value("y", ["b", 8])],
        [weight],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.example", 1)]
    )
    model.ir_version = 10
    return model


def _if_model(rng: np.random.Generator) -> onnx.ModelProto:
    """Weights inside If branches; the condition is a scalar bool input."""
    branches = {}
    for side in ("then", "else"):
        weight = numpy_helper.from_array(
            rng.standard_normal((16, 8)).astype(np.float32), f"w_{side}"
        )
        branches[side] = helper.make_graph(
            [helper.make_node("MatMul", ["x", f"w_{side}"], [f"y_{side}"])],
            side,
            [],
            [_value(f"y_{side}", ["b", 8])],
            [weight],
        )
    graph = helper.make_graph(
        [
            helper.make_node(
                "If", ["c"], ["y"], then_branch=branches["then"], else_branch=branches["else"]
            )
        ],
        "g",
        [_value("x", ["b", 16]), _value("c", [], TensorProto.BOOL)],
        [_value("y", ["b", 8])],
    )
    return finish(graph)


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder every case starts from."""
    folder = tmp_path_factory.mktemp("library")
    rng = np.random.default_rng(0)
    onnx.save(mlp_proto(rng), folder / "mlp.onnx")
    onnx.save(
        _matmul(rng.standard_normal((16, 8)).astype(np.float32), ["b", 16], ["b", 8]),
        folder / "external.onnx",
        save_as_external_data=True,
        location="weights.bin",
        size_threshold=0,
    )
    onnx.save(
        _matmul(rng.standard_normal((16, 8)).astype(np.float32), ["b", 16], ["b", 8]),
        folder / "matmul.onnx",
    )
    onnx.save(
        _matmul(np.zeros((16, 0), np.float32), ["b", 16], ["b", 0]), folder / "empty_weight.onnx"
    )
    onnx.save(_dangling(), folder / "dangling.onnx")
    onnx.save(_fails_at_run_time(rng), folder / "runtime_fail.onnx")
    onnx.save(_custom_op(rng), folder / "custom_op.onnx")
    onnx.save(_if_model(rng), folder / "if.onnx")
    (folder / "garbage.onnx").write_bytes(np.random.default_rng(1).bytes(3000))
    (folder / "a_folder").mkdir()
    x = rng.standard_normal((20, 16)).astype(np.float32)
    np.savez(folder / "ok.npz", x=x, labels=rng.integers(0, 10, 20))
    np.savez(folder / "wide.npz", x=rng.standard_normal((20, 5)).astype(np.float32))
    np.savez(folder / "int.npz", x=rng.integers(0, 5, (20, 16)))
    np.savez(folder / "float64.npz", x=x.astype(np.float64))
    np.savez(folder / "no_samples.npz", x=np.zeros((0, 16), np.float32))
    np.savez(folder / "labels_out_of_range.npz", x=x, labels=np.full(20, 99))
    (folder / "empty.npz").write_bytes(b"")
    (folder / "zip_garbage.npz").write_bytes(b"PK\x03\x04garbage")
    np.save(folder / "one_array.npy", x)
    (folder / "binary.yaml").write_bytes(b"\xff\xfe\x00\x01")
    (folder / "list.json").write_text("[1, 2, 3]")
    (folder / "no_criterion.json").write_text('{"groups": []}')
    (folder / "binary.json").write_bytes(b"\xff\xfe\x00")
    return folder


PRUNE = ("prune", "--sparsity", "0.5")
# (case id, arguments, expected exit code, words the error line must contain)
CASES = [
    # models that protobuf parses but that are not usable
    (
        "dangling input: prune",
        (*PRUNE, "dangling.onnx", "-o", "out.onnx"),
        2,
        "no input, initializer or node",
    ),
    ("dangling input: inspect", ("inspect", "dangling.onnx"), 2, "no input, initializer or node"),
    (
        "fails at run time: prune",
        (*PRUNE, "runtime_fail.onnx", "-o", "out.onnx"),
        2,
        "does not run",
    ),
    (
        "fails at run time: sensitivity",
        ("sensitivity", "runtime_fail.onnx", "-o", "sens", "--ratios", "0.5", "--workers", "1"),
        2,
        "does not run",
    ),
    (
        "unknown op: sensitivity",
        ("sensitivity", "custom_op.onnx", "-o", "sens", "--ratios", "0.5", "--workers", "1"),
        2,
        "does not run",
    ),
    # bench takes any two paths: both are checked, and must be comparable
    (
        "bench: corrupt second model",
        ("bench", "mlp.onnx", "garbage.onnx", "--runs", "1"),
        2,
        "not an ONNX model",
    ),
    (
        "bench: missing second model",
        ("bench", "mlp.onnx", "missing.onnx", "--runs", "1"),
        2,
        "no such file",
    ),
    (
        "bench: other inputs",
        ("bench", "mlp.onnx", "if.onnx", "--runs", "1"),
        2,
        "take different inputs",
    ),
    (
        "bench: other outputs",
        ("bench", "mlp.onnx", "matmul.onnx", "--runs", "1"),
        2,
        "not comparable",
    ),
    # destinations
    ("output is a folder: prune", (*PRUNE, "mlp.onnx", "-o", "a_folder"), 2, "is a folder"),
    (
        "output over the input's external data: cluster",
        ("cluster", "external.onnx", "--bits", "4", "-o", "weights.bin", *NO_GATE),
        2,
        "still reads",
    ),
    ("output is a folder: pack", ("pack", "mlp.onnx", "-o", "a_folder"), 2, "is a folder"),
    (
        "report in a missing folder",
        (*PRUNE, "mlp.onnx", "-o", "out.onnx", "--report", "nowhere/r.json"),
        2,
        "report folder does not exist",
    ),
    (
        "report over the output",
        (*PRUNE, "mlp.onnx", "-o", "out.json", "--report", "out.json"),
        2,
        "refusing to overwrite the",
    ),
    (
        "sensitivity into a file",
        ("sensitivity", "mlp.onnx", "-o", "ok.npz", "--ratios", "0.5", "--workers", "1"),
        2,
        "not a folder",
    ),
    (
        "sensitivity into a missing folder",
        ("sensitivity", "mlp.onnx", "-o", "nowhere/sens", "--ratios", "0.5", "--workers", "1"),
        2,
        "output folder does not exist",
    ),
    # data that does not fit the model's inputs
    (
        "data: wrong width",
        (*PRUNE, "mlp.onnx", "--data", "wide.npz", "-o", "out.onnx"),
        2,
        "has shape [20, 5]",
    ),
    (
        "data: integers for a float input",
        (*PRUNE, "mlp.onnx", "--data", "int.npz", "-o", "out.onnx"),
        2,
        "the model expects float32",
    ),
    (
        "data: no samples",
        (*PRUNE, "mlp.onnx", "--data", "no_samples.npz", "-o", "out.onnx"),
        2,
        "no samples",
    ),
    (
        "data: empty file",
        (*PRUNE, "mlp.onnx", "--data", "empty.npz", "-o", "out.onnx"),
        2,
        "not a readable .npz",
    ),
    (
        "data: a bare .npy",
        (*PRUNE, "mlp.onnx", "--data", "one_array.npy", "-o", "out.onnx"),
        2,
        "not an .npz",
    ),
    (
        "data: empty file: finetune",
        ("finetune", "mlp.onnx", "--data", "empty.npz", "-o", "out.onnx"),
        2,
        "not a readable .npz",
    ),
    (
        "data: not a zip: finetune",
        ("finetune", "mlp.onnx", "--data", "zip_garbage.npz", "-o", "out.onnx"),
        2,
        "not a readable .npz",
    ),
    # recipes and plans
    ("recipe: not text", ("recipe", "show", "binary.yaml"), 2, "not a readable recipe"),
    (
        "low-rank plan: a JSON list",
        ("lowrank", "mlp.onnx", "--plan", "list.json", "-o", "out.onnx"),
        2,
        "a JSON object expected",
    ),
    (
        "pack report in a missing folder",
        ("pack", "mlp.onnx", "-o", "out.onnxc", "--report", "nowhere/r.json"),
        2,
        "report folder does not exist",
    ),
    (
        "structured plan without its keys",
        ("prune", "mlp.onnx", "--structured", "--plan", "no_criterion.json", "-o", "out.onnx"),
        2,
        "missing key 'criterion'",
    ),
    (
        "low-rank plan: not text",
        ("lowrank", "mlp.onnx", "--plan", "binary.json", "-o", "out.onnx"),
        2,
        "cannot read low-rank plan",
    ),
    (
        "save-plan over the input: prune",
        (
            "prune",
            "mlp.onnx",
            "--structured",
            "--ratio",
            "0.25",
            "--save-plan",
            "mlp.onnx",
            "-o",
            "out.onnx",
        ),
        2,
        "refusing to overwrite the",
    ),
    (
        "save-plan over the input: lowrank",
        ("lowrank", "mlp.onnx", "--ratio", "0.5", "--save-plan", "mlp.onnx", "-o", "out.onnx"),
        2,
        "refusing to overwrite the",
    ),
    (
        "save-plan in a missing folder: lowrank",
        (
            "lowrank",
            "mlp.onnx",
            "--ratio",
            "0.5",
            "--save-plan",
            "nowhere/plan.json",
            "-o",
            "out.onnx",
        ),
        2,
        "plan folder does not exist",
    ),
    (
        "save-plan is a folder: prune",
        (
            "prune",
            "mlp.onnx",
            "--structured",
            "--ratio",
            "0.25",
            "--save-plan",
            "a_folder",
            "-o",
            "out.onnx",
        ),
        2,
        "is a folder",
    ),
    (
        "data: labels out of range: finetune",
        (
            "finetune",
            "mlp.onnx",
            "--data",
            "labels_out_of_range.npz",
            "--epochs",
            "1",
            "-o",
            "out.onnx",
        ),
        2,
        "class indices in 0..9",
    ),
]


def _state(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        if p.is_file()
        else "folder"
        for p in folder.rglob("*")
    }


@pytest.mark.parametrize(
    ("args", "code", "words"), [case[1:] for case in CASES], ids=[case[0] for case in CASES]
)
def test_bad_input_is_one_error_line(library, tmp_path, args, code, words):
    work = tmp_path / "work"
    shutil.copytree(library, work)
    before = _state(work)
    result = subprocess.run(
        [sys.executable, "-m", "onnxcompress", *args],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=300,
        env={**ENV, "COLUMNS": "200"},
    )
    assert result.returncode == code, result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert words in result.stderr
    assert _state(work) == before  # inputs untouched, nothing written, no temporary left


@pytest.mark.parametrize(
    ("model", "args"),
    [
        ("if.onnx", (*PRUNE, *NO_GATE)),  # weights in If branches, a scalar bool input
        # numpy's default float64 is cast to float32
        ("mlp.onnx", (*PRUNE, "--data", "float64.npz", *NO_GATE)),
        ("empty_weight.onnx", ("sparsify", "--always", "--min-params", "0", "--min-sparsity", "0")),
    ],
    ids=["if-node", "float64 data", "zero-size weight"],
)
def test_edge_models_compress_to_a_model_that_runs(library, tmp_path, model, args):
    work = tmp_path / "work"
    shutil.copytree(library, work)
    command, *options = args
    result = subprocess.run(
        [sys.executable, "-m", "onnxcompress", command, model, *options, "-o", "out.onnx"],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    onnx.checker.check_model(str(work / "out.onnx"))
    import onnxruntime

    session = onnxruntime.InferenceSession(
        str(work / "out.onnx"), providers=["CPUExecutionProvider"]
    )
    feeds = {"x": np.ones((2, 16), np.float32)}
    if model == "if.onnx":
        feeds["c"] = np.array(True)
    assert session.run(None, feeds)[0].shape[0] == 2
