"""The command line as a user meets it: outputs, exit codes, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from typer.testing import CliRunner

from onnxcompress import runtime
from onnxcompress.cli import app
from tests.builders import NO_GATE, mlp_proto, mlp_reference, save_proto

runner = CliRunner()


@pytest.fixture
def model_path(rng, tmp_path):
    return save_proto(mlp_proto(rng, (16, 64, 64, 10)), tmp_path / "mlp.onnx")


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def test_inspect_json_lists_layers_and_totals(model_path):
    result = invoke("inspect", model_path, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [layer["name"] for layer in report["layers"]] == [
        "fc0.weight",
        "fc1.weight",
        "head.weight",
    ]
    assert report["layers"][0]["shape"] == [16, 64]
    assert report["total_params"] == 16 * 64 + 64 * 64 + 64 * 10
    assert all(layer["sparsity"] == 0.0 for layer in report["layers"])


def test_prune_writes_the_default_output_and_leaves_the_input(model_path, tmp_path):
    before = open(model_path, "rb").read()
    # mild, and top-1 checked as observed only: a random MLP on random probes has close calls
    # everywhere
    result = invoke("prune", model_path, "--sparsity", "0.05", "--min-top1", "0")
    assert result.exit_code == 0, result.output
    out = tmp_path / "mlp.compressed.onnx"
    assert open(model_path, "rb").read() == before
    report = json.loads(invoke("inspect", out, "--json").stdout)
    assert report["sparsity"] == pytest.approx(0.05, abs=1e-3)
    proto = onnx.load(str(out))
    x = np.random.default_rng(3).standard_normal((4, 16)).astype(np.float32)
    (got,) = runtime.session(str(out)).run(None, {"x": x})
    np.testing.assert_allclose(got, mlp_reference(proto, x), rtol=1e-5, atol=1e-5)


def test_same_command_gives_the_same_bytes(model_path, tmp_path):
    for name in ("a.onnx", "b.onnx"):
        assert invoke("optimize", model_path, "-o", tmp_path / name).exit_code == 0
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_optimize_with_recipe_data_and_report(model_path, tmp_path, rng):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "steps:\n  - pass: prune.magnitude\n    options: {sparsity: 0.1, scope: global}\n    gate: "
        "{min_cosine: 0.9, min_rank_correlation: 0.9, min_top1: null}\n"
    )
    data = tmp_path / "calib.npz"
    np.savez(data, x=rng.standard_normal((20, 16)).astype(np.float32))
    result = invoke(
        "optimize",
        model_path,
        "-o",
        tmp_path / "o.onnx",
        "--recipe",
        recipe,
        "--data",
        data,
        "--report",
        tmp_path / "r.json",
    )
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["steps"][0]["status"] == "applied"
    assert report["steps"][0]["metrics"]["cosine"] >= 0.9


def test_failed_gate_exits_3_and_writes_nothing(model_path, tmp_path):
    result = invoke(
        "prune",
        model_path,
        "-o",
        tmp_path / "o.onnx",
        "--sparsity",
        "0.99",
        "--min-cosine",
        "0.999",
    )
    assert result.exit_code == 3
    assert result.stderr.startswith("error: step 1 (prune.magnitude) failed its gate")
    assert result.stderr.count("\n") == 1
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["inspect", "missing.onnx"], "no such file"),
        (
            ["prune", "{model}", "--sparsity", "0.5", "-o", "{model}"],
            "refusing to overwrite the input",
        ),
        (["prune", "{model}"], "give --sparsity S or --quality Q"),
        (["optimize", "{model}", "--recipe", "nope"], "no such recipe file or built-in recipe"),
        (["optimize", "{model}", "--data", "{tmp}/x.npz"], "no such data file"),
        (
            ["prune", "{model}", "--sparsity", "0.5", "-o", "{tmp}/nodir/x.onnx"],
            "output folder does not exist",
        ),
    ],
)
def test_bad_input_is_one_line_and_exit_2(model_path, tmp_path, args, message):
    filled = [a.format(model=model_path, tmp=tmp_path) for a in args]
    result = invoke(*filled)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert result.stderr.count("\n") == 1


def test_corrupt_model_and_quantized_model(tmp_path, model_path):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00\x01\x02 not onnx")
    result = invoke("prune", garbage, "--sparsity", "0.5")
    assert result.exit_code == 2 and "not an ONNX model" in result.stderr

    model = ir.load(model_path)
    relu = next(n for n in model.graph if n.op_type == "Relu")
    scale = ir.Value(name="s", const_value=ir.tensor(np.float32(0.1)))
    model.graph.register_initializer(scale)
    quant = ir.node("QuantizeLinear", [relu.outputs[0], scale])
    model.graph.insert_after(relu, [quant, ir.node("DequantizeLinear", [quant.outputs[0], scale])])
    ir.save(model, tmp_path / "q.onnx")
    for command in (
        ["prune", tmp_path / "q.onnx", "--sparsity", "0.5"],
        ["sensitivity", tmp_path / "q.onnx", "-o", tmp_path / "s"],
    ):
        result = invoke(*command)
        assert result.exit_code == 2
        assert (
            "refuses an already quantized model (found DequantizeLinear, QuantizeLinear)"
            in result.stderr
        )
    assert not (tmp_path / "s").exists()


def test_passes_and_recipe_schema():
    listing = invoke("passes")
    assert "prune.magnitude" in listing.stdout
    described = invoke("passes", "--describe", "prune.magnitude")
    assert "quality" in described.stdout and "std" in described.stdout
    schema = json.loads(invoke("recipe", "schema").stdout)
    assert "steps" in schema["properties"]
    assert "prune.magnitude" in json.dumps(schema)


def test_bench_compares_two_models(model_path, tmp_path):
    assert (
        invoke(
            "prune", model_path, "-o", tmp_path / "p.onnx", "--sparsity", "0.5", *NO_GATE
        ).exit_code
        == 0
    )
    result = invoke("bench", model_path, tmp_path / "p.onnx", "--runs", "3", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["bytes_a"] == (tmp_path / "mlp.onnx").stat().st_size
    assert 0.5 < report["metrics"]["cosine"] < 1.0
    assert report["latency_ms_a"] > 0 and report["latency_ms_b"] > 0
    # fidelity on 64 probes, not the batch
    assert report["samples"] == 64 and report["accuracy_a"] is None


def test_bench_judges_fidelity_and_accuracy_on_all_the_data(model_path, tmp_path, rng):
    assert (
        invoke(
            "prune", model_path, "-o", tmp_path / "p.onnx", "--sparsity", "0.5", *NO_GATE
        ).exit_code
        == 0
    )
    x = rng.standard_normal((100, 16)).astype(np.float32)
    # the original is right on all of them
    labels = mlp_reference(onnx.load(str(model_path)), x).argmax(-1)
    np.savez(tmp_path / "test.npz", x=x, labels=labels)
    result = invoke(
        "bench",
        model_path,
        tmp_path / "p.onnx",
        "--runs",
        "2",
        "--data",
        tmp_path / "test.npz",
        "--json",
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["samples"] == 100 and report["accuracy_a"] == 1.0
    # top-1 agreement counts the lower of the observed share (= accuracy here) and the margin
    # prediction
    assert report["metrics"]["top1_agreement"] <= report["accuracy_b"]


def test_external_data_on_request(model_path, tmp_path):
    out = tmp_path / "pruned.onnx"
    result = invoke(
        "--external-data", "prune", model_path, "--sparsity", "0.5", "-o", out, *NO_GATE
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "pruned.onnx.data").is_file()
    assert any(
        t.data_location == onnx.TensorProto.EXTERNAL
        for t in onnx.load(out, load_external_data=False).graph.initializer
    )
    assert runtime.session(out).get_inputs()[0].name == "x"

    plain = tmp_path / "plain.onnx"
    assert invoke("prune", model_path, "--sparsity", "0.5", "-o", plain, *NO_GATE).exit_code == 0
    assert not (tmp_path / "plain.onnx.data").exists()


def test_a_model_onnxruntime_rejects_is_one_error_line(tmp_path):
    """float64 weights feeding a float32 MatMul: onnx loads it, onnxruntime does not."""
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((8, 4)), "w")  # float64
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "mixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = save_proto(model, tmp_path / "mixed.onnx")
    for command in (["prune", path, "--sparsity", "0.5"], ["bench", path, path]):
        result = invoke(*command)
        assert result.exit_code == 2, result.output
        assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
        assert "onnxruntime cannot load" in result.stderr
    assert not (tmp_path / "mixed.compressed.onnx").exists()


def test_sensitivity_writes_a_recipe_that_optimize_runs(model_path, tmp_path, rng):
    data = tmp_path / "calib.npz"
    np.savez(data, x=rng.standard_normal((64, 16)).astype(np.float32))
    folder = tmp_path / "sens"
    result = invoke(
        "sensitivity",
        model_path,
        "-o",
        folder,
        "--data",
        data,
        "--min-cosine",
        "0.98",
        "--workers",
        "1",
        "--min-top1",
        "0",
    )  # a random MLP on random inputs: close calls everywhere
    assert result.exit_code == 0, result.output
    plan = json.loads((folder / "sensitivity.json").read_text())
    out = tmp_path / "planned.onnx"
    result = invoke(
        "optimize", model_path, "--recipe", folder / "recipe.yaml", "--data", data, "-o", out
    )
    assert result.exit_code == 0, result.output
    weights = {
        t.name: onnx.numpy_helper.to_array(t)
        for t in onnx.load(out).graph.initializer
        if t.name.endswith("weight")
    }
    zeros = sum(int(np.count_nonzero(w == 0)) for w in weights.values())
    assert zeros == plan["removed_params"] > 0


def test_optimize_without_data_stores_float16_and_says_random_probes_are_weak(model_path, tmp_path):
    out = tmp_path / "o.onnx"
    result = invoke("optimize", model_path, "-o", out)
    assert result.exit_code == 0, result.output
    assert "random probes, a weak proxy" in result.stdout
    halves = [
        t for t in onnx.load(out).graph.initializer if t.data_type == onnx.TensorProto.FLOAT16
    ]
    assert halves and out.stat().st_size < Path(model_path).stat().st_size * 0.6


def test_optimize_refuses_input_dependent_steps_without_data(model_path, tmp_path):
    result = invoke(
        "optimize", model_path, "-o", tmp_path / "o.onnx", "--recipe", "deep-compression"
    )
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and "give --data calib.npz" in result.stderr
    assert not (tmp_path / "o.onnx").exists()
