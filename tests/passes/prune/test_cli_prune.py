"""`onnxcompress prune --structured` / `--dry-run` and `onnxcompress sensitivity` from the shell."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from onnxcompress import runtime
from onnxcompress.cli import app
from tests.builders import NO_GATE, mlp_proto, mlp_reference, save_proto

runner = CliRunner()


@pytest.fixture
def model_path(rng, tmp_path):
    return save_proto(mlp_proto(rng, (16, 64, 32, 10)), tmp_path / "mlp.onnx")


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def test_structured_prune_writes_a_smaller_model_that_runs(model_path, tmp_path):
    out = tmp_path / "small.onnx"
    result = invoke("prune", model_path, "--structured", "--ratio", "0.5", "-o", out, *NO_GATE)
    assert result.exit_code == 0, result.output
    proto = onnx.load(str(out))
    shapes = {t.name: tuple(t.dims) for t in proto.graph.initializer}
    assert (
        shapes["fc0.weight"] == (16, 32)
        and shapes["fc1.weight"] == (32, 16)
        and shapes["head.weight"] == (10, 16)
    )
    x = np.random.default_rng(1).standard_normal((3, 16)).astype(np.float32)
    (got,) = runtime.session(str(out)).run(None, {"x": x})
    np.testing.assert_allclose(got, mlp_reference(proto, x), rtol=1e-5, atol=1e-5)


def test_dry_run_prints_the_plan_and_writes_nothing(model_path, tmp_path):
    plan_file = tmp_path / "plan.json"
    result = invoke(
        "prune",
        model_path,
        "--structured",
        "--ratio",
        "0.25",
        "--dry-run",
        "--save-plan",
        plan_file,
    )
    assert result.exit_code == 0, result.output
    assert "structured plan (l1, ratio 0.25)" in result.stdout and "remove [" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp.onnx", "plan.json"]
    plan = json.loads(plan_file.read_text())
    assert [len(g["keep"]) for g in plan["groups"][:2]] == [48, 24]
    # The saved plan applies as is.
    out = tmp_path / "planned.onnx"
    assert (
        invoke(
            "prune", model_path, "--structured", "--plan", plan_file, "-o", out, *NO_GATE
        ).exit_code
        == 0
    )
    shapes = {t.name: tuple(t.dims) for t in onnx.load(str(out)).graph.initializer}
    assert shapes["fc1.weight"] == (48, 24)


def test_structured_refuses_unstructured_options(model_path):
    result = invoke("prune", model_path, "--structured", "--sparsity", "0.5")
    assert result.exit_code == 2
    assert "error: --structured takes --ratio" in result.stderr


def test_taylor_without_data_is_a_data_error(model_path):
    result = invoke("prune", model_path, "--structured", "--criterion", "taylor", "--dry-run")
    assert result.exit_code == 2
    assert "needs calibration data" in result.stderr


def test_dead_neurons_dry_run_shows_which_neurons_go(rng, tmp_path):
    proto = mlp_proto(rng, (16, 64, 32, 10))
    fc1 = next(t for t in proto.graph.initializer if t.name == "fc1.weight")
    weight = onnx.numpy_helper.to_array(fc1).copy()
    weight[[3, 7], :] = 0  # fc0 neurons 3 and 7 reach nothing downstream
    fc1.CopyFrom(onnx.numpy_helper.from_array(weight, "fc1.weight"))
    path = save_proto(proto, tmp_path / "m.onnx")
    result = invoke("prune", path, "--dead-neurons", "--dry-run")
    assert result.exit_code == 0, result.output
    assert (
        "structured plan (dead, ratio None)" in result.stdout and "remove [3, 7]" in result.stdout
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_magnitude_pruning_has_no_dry_run(model_path):
    result = invoke("prune", model_path, "--sparsity", "0.5", "--dead-neurons", "--dry-run")
    assert result.exit_code == 2
    assert "error: --dry-run goes with --structured or --dead-neurons alone" in result.stderr


def test_magnitude_then_dead_neurons(rng, tmp_path):
    proto = mlp_proto(rng, (16, 64, 32, 10))
    arrays = {t.name: onnx.numpy_helper.to_array(t).copy() for t in proto.graph.initializer}
    # five neurons whose inputs all fall under the threshold ...
    arrays["fc1.weight"][:, :5] *= 1e-6
    arrays["fc1.bias"][:5] = -0.1  # ... with a negative bias: Relu makes them exactly zero
    for tensor in proto.graph.initializer:
        tensor.CopyFrom(onnx.numpy_helper.from_array(arrays[tensor.name], tensor.name))
    path = save_proto(proto, tmp_path / "m.onnx")
    plain, thinned = tmp_path / "plain.onnx", tmp_path / "thinned.onnx"
    assert invoke("prune", path, "--sparsity", "0.3", "-o", plain, *NO_GATE).exit_code == 0
    result = invoke("prune", path, "--sparsity", "0.3", "--dead-neurons", "-o", thinned, *NO_GATE)
    assert result.exit_code == 0, result.output
    shapes = {t.name: tuple(t.dims) for t in onnx.load(str(thinned)).graph.initializer}
    assert shapes["fc1.weight"] == (64, 27) and shapes["head.weight"] == (10, 27)
    x = np.random.default_rng(2).standard_normal((4, 16)).astype(np.float32)
    (expected,) = runtime.session(str(plain)).run(None, {"x": x})
    (got,) = runtime.session(str(thinned)).run(None, {"x": x})
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)

    # a model pruned (and fine-tuned) earlier: only the dead neurons go
    alone = tmp_path / "alone.onnx"
    result = invoke("prune", plain, "--dead-neurons", "-o", alone, *NO_GATE)
    assert result.exit_code == 0, result.output
    assert {t.name: tuple(t.dims) for t in onnx.load(str(alone)).graph.initializer} == shapes
    nothing = invoke("prune", plain, "-o", tmp_path / "x.onnx")
    assert nothing.exit_code == 2 and "give --sparsity S or --quality Q" in nothing.stderr


def test_sensitivity_command_writes_json_csv_png(model_path, tmp_path):
    folder = tmp_path / "sens"
    result = invoke(
        "sensitivity", model_path, "-o", folder, "--ratios", "0.2,0.5,0.8", "--workers", "1"
    )
    assert result.exit_code == 0, result.output
    report = json.loads((folder / "sensitivity.json").read_text())
    assert [layer["name"] for layer in report["layers"]] == [
        "fc0.weight",
        "fc1.weight",
        "head.weight",
    ]
    assert all(layer["ratios"] == [0.2, 0.5, 0.8] for layer in report["layers"])
    assert (folder / "sensitivity.csv").exists()
    assert "chosen rates remove" in result.stdout


def test_sensitivity_refuses_bad_ratios(model_path, tmp_path):
    result = invoke("sensitivity", model_path, "-o", tmp_path / "s", "--ratios", "0.5,1.5")
    assert result.exit_code == 2
    assert "--ratios must lie in [0, 1)" in result.stderr
