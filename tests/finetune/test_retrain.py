"""`optimize --finetune`: a finetune round after every pruning / k-means step, gated on accuracy."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from onnxcompress.cli import app
from onnxcompress.fidelity import Gate
from onnxcompress.finetune.retrain import accuracy_change, with_retraining
from onnxcompress.passes.finetune import _without_gate_samples
from onnxcompress.pipeline import Step
from onnxcompress.recipe import load_recipe


def test_deep_compression_gets_a_round_per_step_and_a_longer_ladder() -> None:
    steps = with_retraining(load_recipe("deep-compression").steps, max_drop=0.003)
    names = [s.pass_name for s in steps]
    prunes = [s.options["sparsity"] for s in steps if s.pass_name == "prune.magnitude"]
    assert prunes == [0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.975]  # past 0.9: the kept share halved twice
    assert names == ["prune.magnitude", "finetune"] * 7 + ["codebook.kmeans", "finetune"]
    for lossy, retrain in zip(steps[::2], steps[1::2], strict=True):
        assert lossy.gate == Gate.off() and lossy.on_fail == "rollback"  # judged after retraining
        # a failed round is undone whole
        assert retrain.with_previous and retrain.on_fail == "rollback"
        assert retrain.gate.min_task == -0.003 and retrain.gate.min_cosine is None
    untouched = Step(pass_name="cast.fp16")
    assert with_retraining([untouched]) == [untouched]


def test_accuracy_change_is_candidate_minus_original() -> None:
    labels = np.array([0, 1, 2, 1])
    original = [np.eye(3)[[0, 1, 2, 2]]]  # 3 of 4 right
    candidate = [np.eye(3)[[0, 1, 0, 0]]]  # 2 of 4 right
    assert accuracy_change(labels)(original, candidate) == pytest.approx(-0.25)
    assert accuracy_change(labels)(candidate, original) == pytest.approx(0.25)
    many = np.zeros(2000, dtype=np.int64)
    right, six_wrong = [np.eye(3)[many]], [np.eye(3)[np.r_[np.ones(6, np.int64), many[6:]]]]
    # exactly the bar, not a float hair below
    assert accuracy_change(many)(right, six_wrong) >= -0.003


def test_the_gates_samples_are_left_out_of_training() -> None:
    data = {"x": np.arange(300, dtype=np.float32)[:, None], "labels": np.arange(300)}
    probes = {"x": data["x"][:64]}
    kept = _without_gate_samples(data, probes)
    assert len(kept["x"]) == 236 and kept["x"][0, 0] == 64 and kept["labels"][0] == 64
    # not the data's first samples
    assert _without_gate_samples(data, {"x": data["x"][1:65]}) is data
    # too few
    assert _without_gate_samples({k: v[:100] for k, v in data.items()}, probes)["x"].shape[0] == 100


def test_optimize_finetune_prunes_past_the_no_retrain_knee_within_the_accuracy_bar(
    pruning_files,
) -> None:
    files = pruning_files(0.8)
    report = files.report
    result = CliRunner().invoke(
        app,
        ["optimize", str(files.model), "-o", str(files.out), "--recipe", str(files.recipe),
         "--data", str(files.data), "--finetune", "--report", str(report)],
    )
    assert result.exit_code == 0, result.output
    steps = json.loads(report.read_text())["steps"]
    assert [s["pass"] for s in steps] == ["prune.magnitude", "finetune"] * 3
    applied = [s for s in steps if s["status"] == "applied"]
    assert applied and all(
        s["metrics"]["task"] >= -0.003 for s in applied if s["pass"] == "finetune"
    )
    sizes = json.loads(report.read_text())
    # past the recipe's 0.8
    assert sizes["after"]["nonzero_weight_params"] <= 0.11 * sizes["before"]["weight_params"]
    result = CliRunner().invoke(
        app, ["optimize", str(files.model), "-o", str(files.out), "--recipe", str(files.recipe),
              "--finetune"]
    )
    assert result.exit_code == 2 and "--finetune retrains on labelled samples" in result.output

