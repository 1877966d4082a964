"""Sensitivity analysis: one curve per layer, and a chosen plan that meets its budget."""

from __future__ import annotations

import csv
import json

import numpy as np
import onnx_ir as ir
import pytest

from onnxcompress import fidelity
from onnxcompress.errors import UserError
from onnxcompress.passes.prune.magnitude import MagnitudePrunePass, prune_to_count
from onnxcompress.passes.prune.sensitivity import Budget, sensitivity
from onnxcompress.recipe import load_recipe
from onnxcompress.report_sensitivity import write_outputs
from tests.builders import mlp, mlp_reference

SIZES = (16, 48, 32, 10)
LAYERS = ["fc0.weight", "fc1.weight", "head.weight"]


def outputs(model: ir.Model, x: np.ndarray) -> np.ndarray:
    return mlp_reference(ir.to_proto(model), x)


def test_curves_match_an_independent_numpy_evaluation(rng):
    model = mlp(rng, SIZES)
    x = rng.standard_normal((32, 16)).astype(np.float32)
    result = sensitivity(model, data={"x": x}, probes=32, ratios=(0.25, 0.5, 0.9), workers=1)
    assert [c.name for c in result.curves] == LAYERS
    reference = outputs(model, x)
    for curve in result.curves:
        for ratio, value in zip(curve.ratios, curve.values, strict=True):
            pruned = model.clone()
            weight = pruned.graph.initializers[curve.name].const_value.numpy()
            pruned.graph.initializers[curve.name].const_value = ir.tensor(
                prune_to_count(weight, round(ratio * weight.size)), name=curve.name)
            got = outputs(pruned, x)
            expected = float(np.dot(got.ravel(), reference.ravel())
                             / (np.linalg.norm(got) * np.linalg.norm(reference)))
            assert value == pytest.approx(expected, abs=1e-5)
        assert curve.values == sorted(curve.values, reverse=True)  # more pruning, less fidelity


def test_chosen_plan_meets_the_cosine_budget_on_the_probes(rng, tmp_path):
    model = mlp(rng, SIZES)
    x = rng.standard_normal((64, 16)).astype(np.float32)
    cosine_only = Budget(min_cosine=0.98, min_rank_correlation=None, min_top1=None)
    result = sensitivity(model, data={"x": x}, probes=64, budget=cosine_only, workers=1)
    assert result.removed_params > 0
    plan = result.plan()
    assert plan["pass"] == "prune.magnitude"
    pruned = model.clone()
    MagnitudePrunePass(**plan["options"])(pruned)
    cosine = fidelity.compare([outputs(model, x)], [outputs(pruned, x)]).cosine
    assert cosine >= 0.995  # 0.98 as `optimize` verifies the plan's step: the margin held back
    assert cosine == pytest.approx(result.joint_value, abs=1e-5)
    zeros = sum(
        int(np.count_nonzero(pruned.graph.initializers[n].const_value.numpy() == 0)) for n in LAYERS
    )
    assert zeros == result.removed_params

    written = write_outputs(result, tmp_path)
    report = json.loads((tmp_path / "sensitivity.json").read_text())
    assert [layer["name"] for layer in report["layers"]] == LAYERS
    assert all(len(layer["values"]) == len(layer["ratios"]) == 10 for layer in report["layers"])
    assert report["plan"]["options"]["overrides"] == {c.name: c.chosen for c in result.curves}
    rows = list(csv.DictReader((tmp_path / "sensitivity.csv").open()))
    assert len(rows) == 3 * 10 and {r["layer"] for r in rows} == set(LAYERS)
    recipe = load_recipe(tmp_path / "recipe.yaml")
    assert recipe.steps[0].options == plan["options"] and recipe.steps[0].gate.min_cosine == 0.98
    assert (
        recipe.steps[0].gate.min_rank_correlation is None and recipe.steps[0].gate.min_top1 is None
    )
    png = tmp_path / "sensitivity.png"
    if png in written:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_accuracy_budget_with_labels(rng):
    model = mlp(rng, SIZES)
    x = rng.standard_normal((200, 16)).astype(np.float32)
    labels = outputs(model, x).argmax(-1)  # the original is 100% right on its own labels
    result = sensitivity(model, data={"x": x, "labels": labels}, ratios=(0.2, 0.4, 0.6, 0.8),
                         budget=Budget(max_accuracy_drop=0.05), workers=1)
    assert result.metric == "accuracy" and result.baseline == 1.0
    pruned = model.clone()
    MagnitudePrunePass(**result.plan()["options"])(pruned)
    accuracy = float(np.mean(outputs(pruned, x).argmax(-1) == labels))
    assert accuracy >= 0.95
    assert accuracy == pytest.approx(result.joint_value)


def test_bad_ratios_are_refused(rng):
    with pytest.raises(UserError, match="ratios must lie in"):
        sensitivity(mlp(rng, SIZES), ratios=(0.5, 1.0), workers=1)


def test_override_globs_match_names_with_glob_characters_exactly():
    import fnmatch

    from onnxcompress.passes.prune.sensitivity import _glob_escape

    for name in ("blocks[0].weight", "a*b", "what?"):
        pattern = _glob_escape(name)
        assert fnmatch.fnmatchcase(name, pattern)
        assert not fnmatch.fnmatchcase(name + "x", pattern)
    assert not fnmatch.fnmatchcase("blocks0.weight", _glob_escape("blocks[0].weight"))


@pytest.mark.parametrize("workers", [1, 2])
def test_progress_is_reported_per_layer_serial_or_in_processes(rng, workers):
    model = mlp(rng, SIZES)
    seen: list[tuple[int, int]] = []
    result = sensitivity(
        model, probes=8, ratios=(0.5,), workers=workers, on_layer=lambda d, t: seen.append((d, t))
    )
    assert seen == [(1, 3), (2, 3), (3, 3)]
    assert [c.name for c in result.curves] == LAYERS
