"""Malformed models, data and recipes (issue 14): one `error: ...` line, exit 2, no traceback.

Each row was a traceback (exit 1) or a silently wrong model (exit 0) before. Files are built
inline from the small MLP, each with one defect; the command runs in-process on a fresh folder,
and the folder must be unchanged afterwards (inputs untouched, nothing written).
"""

from __future__ import annotations

import hashlib
import io
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from tests.builders import NO_GATE, mlp_proto
from tests.fuzz.corpus import laughs_yaml
from tests.run_cli import run_cli

Edit = Callable[[onnx.ModelProto], None]


def _set_bias_nan(model: onnx.ModelProto) -> None:
    bias = numpy_helper.to_array(model.graph.initializer[1]).copy()
    bias[3] = np.nan
    model.graph.initializer[1].CopyFrom(
        numpy_helper.from_array(bias, model.graph.initializer[1].name)
    )


def _gemm_trans_b_as_text(model: onnx.ModelProto) -> None:
    gemm = next(node for node in model.graph.node if node.op_type == "Gemm")
    del gemm.attribute[:]
    gemm.attribute.append(helper.make_attribute("transB", "yes"))


def _first_input_dim(value: int) -> Edit:
    def edit(model: onnx.ModelProto) -> None:
        model.graph.input[0].type.tensor_type.shape.dim[1].dim_value = value
    return edit


def _batch_dim(value: int) -> Edit:
    def edit(model: onnx.ModelProto) -> None:
        model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = value
    return edit


def _weight_dim(value: int) -> Edit:
    def edit(model: onnx.ModelProto) -> None:
        model.graph.initializer[0].dims[0] = value
    return edit


MODELS: dict[str, Edit] = {
    "nan_bias": _set_bias_nan,
    "cycle": lambda m: m.graph.node[0].input.__setitem__(0, "r0"),  # MatMul reads the Relu after it
    "ghost_output": lambda m: setattr(m.graph.output[0], "name", "nobody_makes_this"),
    "negative_dim": _first_input_dim(-16),
    "huge_batch": _batch_dim(10**9),
    "short_raw_data": lambda m: setattr(
        m.graph.initializer[0], "raw_data", m.graph.initializer[0].raw_data[:100]
    ),
    "huge_weight_dim": _weight_dim(10**12),
    "zero_dim_with_data": _weight_dim(0),
    "undefined_weight_type": lambda m: setattr(m.graph.initializer[0], "data_type", 0),
    "undefined_input_type": lambda m: setattr(m.graph.input[0].type.tensor_type, "elem_type", 0),
    "gemm_trans_b_text": _gemm_trans_b_as_text,
}


def _huge_header_npz(path: Path) -> None:
    """An .npz whose x.npy header declares shape (10**12, 16) over 64 bytes of data."""
    member = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        member, {"descr": "<f4", "fortran_order": False, "shape": (10**12, 16)}
    )
    member.write(bytes(64))
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("x.npy", member.getvalue())


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("malformed")
    rng = np.random.default_rng(0)
    base = mlp_proto(rng)
    onnx.save(base, folder / "mlp.onnx")
    for name, edit in MODELS.items():
        model = onnx.ModelProto()
        model.CopyFrom(base)
        edit(model)
        onnx.save(model, folder / f"{name}.onnx")
    x = rng.standard_normal((20, 16)).astype(np.float32)
    with_nan = x.copy()
    with_nan[3, 2], with_nan[4, 4] = np.nan, np.inf
    np.savez(folder / "nan.npz", x=with_nan)
    np.savez(folder / "labels_2d.npz", x=x, labels=rng.integers(0, 10, (20, 3)))
    np.savez(folder / "void_labels.npz", x=x, labels=np.zeros(20, "V4"))
    _huge_header_npz(folder / "huge_header.npz")
    (folder / "seed.yaml").write_text(
        "seed: -1\nsteps:\n  - pass: prune.magnitude\n    options: {sparsity: 0.5}\n"
    )
    (folder / "deep.yaml").write_text("steps: " + "[" * 5000 + "]" * 5000 + "\n")
    (folder / "laughs.yaml").write_text(laughs_yaml(levels=9))
    (folder / "deep_plan.json").write_text("[" * 100_000 + "]" * 100_000)
    return folder


PRUNE = ("prune", "--sparsity", "0.5")
# (test id, arguments, words the one error line must contain)
CASES = [
    (
        "nan in --data",
        (*PRUNE, "mlp.onnx", "--data", "nan.npz", "-o", "out.onnx"),
        "'x' holds 2 non-finite values (NaN or inf)",
    ),
    (
        "nan weight poisons the reference",
        ("prune", "--sparsity", "0.99", "nan_bias.onnx", "-o", "out.onnx"),
        "the input model gives NaN/inf outputs on the probes: tensor 'fc0.bias' holds 1 NaN/inf",
    ),
    ("cycle: prune", (*PRUNE, "cycle.onnx", "-o", "out.onnx"), "has a cycle"),
    ("cycle: inspect", ("inspect", "cycle.onnx"), "has a cycle"),
    (
        "output nothing produces: inspect",
        ("inspect", "ghost_output.onnx"),
        "graph output 'nobody_makes_this' is produced by no node",
    ),
    (
        "output nothing produces: cluster",
        ("cluster", "ghost_output.onnx", "--bits", "4", "-o", "out.onnx"),
        "is produced by no node",
    ),
    (
        "negative input dimension",
        (*PRUNE, "negative_dim.onnx", "-o", "out.onnx"),
        "graph input 'x' has a negative dimension",
    ),
    (
        "huge fixed input dimension",
        (*PRUNE, "huge_batch.onnx", "-o", "out.onnx"),
        "over the cap of 67,108,864",
    ),
    (
        "raw_data shorter than the shape",
        ("inspect", "short_raw_data.onnx"),
        "tensor 'fc0.weight' has shape [16, 32] (2,048 bytes of FLOAT) but holds 100 bytes",
    ),
    (
        "huge declared weight dimension",
        (*PRUNE, "huge_weight_dim.onnx", "-o", "out.onnx"),
        "has shape [1000000000000, 32]",
    ),
    (
        "zero dimension with data",
        ("pack", "zero_dim_with_data.onnx", "-o", "out.onnxc"),
        "has shape [0, 32] (0 bytes of FLOAT) but holds 2,048 bytes",
    ),
    (
        "UNDEFINED weight type",
        (*PRUNE, "undefined_weight_type.onnx", "-o", "out.onnx"),
        "tensor 'fc0.weight' has the UNDEFINED element type",
    ),
    (
        "UNDEFINED input type",
        ("inspect", "undefined_input_type.onnx"),
        "graph input 'x' has the UNDEFINED element type",
    ),
    (
        "attribute of the wrong type",
        ("inspect", "gemm_trans_b_text.onnx"),
        "attribute 'transB' is STRING, Gemm expects INT",
    ),
    (
        "recipe seed -1",
        ("optimize", "mlp.onnx", "--recipe", "seed.yaml", "-o", "out.onnx"),
        "seed: Input should be greater than or equal to 0",
    ),
    (
        "deeply nested recipe",
        ("optimize", "mlp.onnx", "--recipe", "deep.yaml", "-o", "out.onnx"),
        "nested too deeply",
    ),
    (
        "recipe aliases expanding to a billion values",
        ("recipe", "show", "laughs.yaml"),
        "expands to more than 100,000 values",
    ),
    (
        "deeply nested plan",
        ("lowrank", "mlp.onnx", "--plan", "deep_plan.json", "-o", "out.onnx"),
        "nested too deeply",
    ),
    (
        "npz header declares a huge shape",
        (*PRUNE, "mlp.onnx", "--data", "huge_header.npz", "-o", "out.onnx"),
        "array 'x' declares shape (1000000000000, 16)",
    ),
    (
        "bench --batch 100000000",
        ("bench", "mlp.onnx", "mlp.onnx", "--batch", "100000000", "--runs", "1"),
        "over the cap",
    ),
    (
        "labels of no number type: bench",
        ("bench", "mlp.onnx", "mlp.onnx", "--data", "void_labels.npz", "--runs", "1"),
        "labels must be integer class indices, got |V4",
    ),
    (
        "2-D labels: finetune",
        ("finetune", "mlp.onnx", "--data", "labels_2d.npz", "-o", "out.onnx"),
        "labels have shape [20, 3]",
    ),
    (
        "seed -1: prune sensitivity option",
        ("sensitivity", "mlp.onnx", "-o", "sens", "--seed", "-1"),
        "Invalid value for '--seed'",
    ),
]


def _state(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        if p.is_file()
        else "folder"
        for p in folder.rglob("*")
    }


@pytest.fixture
def work(library: Path, tmp_path: Path) -> Path:
    shutil.copytree(library, tmp_path / "work")
    return tmp_path / "work"


@pytest.mark.parametrize(
    ("args", "words"), [case[1:] for case in CASES], ids=[case[0] for case in CASES]
)
def test_malformed_input_is_one_error_line(work, args, words):
    before = _state(work)
    outcome = run_cli(args, cwd=work)
    assert outcome.code == 2, outcome.stderr
    assert len(outcome.error_lines) == 1 and outcome.stderr.startswith("error: "), outcome.stderr
    assert words in outcome.stderr
    assert _state(work) == before


def test_unsorted_acyclic_graph_is_sorted_and_compressed(work):
    model = onnx.load(work / "mlp.onnx")
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(reversed(nodes))  # every node before its producer, no cycle
    onnx.save(model, work / "reversed.onnx")
    # the order, not the gate
    outcome = run_cli((*PRUNE, *NO_GATE, "reversed.onnx", "-o", "out.onnx"), cwd=work)
    assert outcome.code == 0, outcome.stderr
    onnx.checker.check_model(str(work / "out.onnx"))


def test_nan_outputs_on_random_probes_ask_for_real_data(work):
    """Log of a negative random probe is NaN in the original too: not the model's fault.

    But no gate can pass on NaN, so the command asks for real samples instead of comparing
    what is left.
    """
    rng = np.random.default_rng(1)
    graph = helper.make_graph(
        [helper.make_node("Log", ["x"], ["l"]), helper.make_node("MatMul", ["l", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["b", 16])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["b", 8])],
        [numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.save(model, work / "log.onnx")
    outcome = run_cli(("prune", "--sparsity", "0.3", "log.onnx", "-o", "out.onnx"), cwd=work)
    assert outcome.code == 2, outcome.stderr
    assert "NaN or inf in outputs ['y'] on the random probes (give --data" in outcome.stderr
    assert "tensor" not in outcome.stderr  # no weight is blamed
