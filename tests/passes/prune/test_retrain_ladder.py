"""`sensitivity --finetune`: rungs of doubling tolerance over the measured per-layer curves."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import yaml
from typer.testing import CliRunner

from onnxcompress.passes.prune.retrain_ladder import ladder_recipe_text, tolerance_ladder
from onnxcompress.passes.prune.sensitivity import Budget, LayerCurve, SensitivityResult
from onnxcompress.recipe import parse_recipe

RATIOS = [0.5, 0.8, 0.9, 0.95, 0.99]


def _result() -> SensitivityResult:
    robust = LayerCurve("fc1.weight", "Gemm", 1000, RATIOS, [0.98, 0.979, 0.977, 0.96, 0.80])
    fragile = LayerCurve("fc3.weight", "Gemm", 100, RATIOS, [0.977, 0.95, 0.90, 0.60, 0.20])
    return SensitivityResult("accuracy", 0.98, Budget(max_accuracy_drop=0.005), [robust, fragile], 0.97, 1100, 900)


def test_rungs_double_the_tolerance_and_keep_the_layers_order() -> None:
    rungs = tolerance_ladder(_result())
    assert rungs[0] == {"fc1.weight": 0.9, "fc3.weight": 0.5}  # t0 = 0.005: the budget itself
    assert rungs[-1] == {"fc1.weight": 0.99, "fc3.weight": 0.99}  # t = the baseline: everything measured
    for lower, higher in zip(rungs, rungs[1:], strict=False):
        assert all(higher[n] >= lower[n] for n in lower) and higher != lower
        assert all(rung["fc1.weight"] >= rung["fc3.weight"] for rung in (lower, higher))


def test_the_ladder_is_a_recipe_of_rollback_rungs_then_kmeans() -> None:
    text = ladder_recipe_text(_result())
    recipe = parse_recipe(text, "ladder")
    names = [step.pass_name for step in recipe.steps]
    assert names[-1] == "codebook.kmeans" and set(names[:-1]) == {"prune.magnitude"}
    assert all(step.on_fail == "rollback" for step in recipe.steps)
    assert yaml.safe_load(text)["steps"][0]["options"]["overrides"] == {"fc1.weight": 0.9, "fc3.weight": 0.5}


def test_cli_sensitivity_finetune_writes_the_ladder(tmp_path) -> None:
    torch = pytest.importorskip("torch")
    from sklearn.datasets import load_digits

    from onnxcompress.cli import app
    from tests.finetune.conftest import MLP, export

    torch.manual_seed(0)
    proto = export(MLP(), torch.zeros(2, 64))
    x, y = load_digits(return_X_y=True)
    x, y = (x / 16.0).astype(np.float32), y.astype(np.int64)
    model, data = tmp_path / "m.onnx", tmp_path / "d.npz"
    onnx.save(proto, model)
    np.savez(data, **{proto.graph.input[0].name: x[:300], "labels": y[:300]})
    result = CliRunner().invoke(app, ["sensitivity", str(model), "-o", str(tmp_path / "sens"), "--data", str(data),
                                      "--finetune", "--workers", "1"])
    assert result.exit_code == 0, result.output
    recipe = parse_recipe((tmp_path / "sens" / "recipe.yaml").read_text(), "ladder")
    assert recipe.name == "sensitivity-ladder" and recipe.steps[-1].pass_name == "codebook.kmeans"
    measured = yaml.safe_load((tmp_path / "sens" / "recipe.yaml").read_text())
    assert len(measured["steps"]) >= 3
