"""prune.magnitude: exact counts, the right weights, and a model that still runs."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from onnxcompress import runtime
from onnxcompress.errors import RecipeError
from onnxcompress.passes.prune.magnitude import MagnitudePrunePass, prune_to_count
from tests.builders import mlp, mlp_reference

SIZES = (16, 32, 24, 10)


def sparsity(model: ir.Model, name: str) -> float:
    weights = model.graph.initializers[name].const_value.numpy()
    return 1 - np.count_nonzero(weights) / weights.size


@pytest.mark.parametrize("target", [0.0, 0.3, 0.5, 0.9, 0.97])
def test_per_layer_target_is_exact_within_one_weight(rng, target):
    model = mlp(rng, SIZES)
    MagnitudePrunePass(sparsity=target, min_params=0)(model)
    for name in ("fc0.weight", "fc1.weight", "head.weight"):
        size = model.graph.initializers[name].const_value.size
        zeros = round(sparsity(model, name) * size)
        assert abs(zeros - target * size) <= 1


def test_the_smallest_magnitudes_go(rng):
    weights = rng.standard_normal((8, 8)).astype(np.float32)
    pruned = prune_to_count(weights, 16)
    kept = np.abs(weights[pruned != 0])
    dropped = np.abs(weights[pruned == 0])
    assert dropped.max() <= kept.min()
    assert np.array_equal(pruned[pruned != 0], weights[pruned != 0])


def test_output_runs_in_onnxruntime_and_matches_numpy(rng):
    model = mlp(rng, SIZES)
    MagnitudePrunePass(sparsity=0.8, min_params=0)(model)
    proto = ir.to_proto(model)
    x = rng.standard_normal((5, 16)).astype(np.float32)
    (got,) = runtime.session(proto.SerializeToString()).run(None, {"x": x})
    np.testing.assert_allclose(got, mlp_reference(proto, x), rtol=1e-5, atol=1e-5)


def test_global_scope_hits_the_total_and_prunes_unevenly(rng):
    model = mlp(rng, SIZES)
    model.graph.initializers["fc1.weight"].const_value = ir.tensor(
        model.graph.initializers["fc1.weight"].const_value.numpy() * 1e-4, name="fc1.weight"
    )
    MagnitudePrunePass(sparsity=0.5, scope="global", min_params=0)(model)
    sizes = {
        n: model.graph.initializers[n].const_value.size
        for n in ("fc0.weight", "fc1.weight", "head.weight")
    }
    zeros = sum(round(sparsity(model, n) * s) for n, s in sizes.items())
    assert zeros == round(0.5 * sum(sizes.values()))
    # The scaled-down layer (768 weights) takes all 760 zeros; the others keep theirs.
    assert round(sparsity(model, "fc1.weight") * 768) == 760
    assert sparsity(model, "fc0.weight") == sparsity(model, "head.weight") == 0.0


def test_han_quality_threshold(rng):
    model = mlp(rng, SIZES)
    original = model.graph.initializers["fc0.weight"].const_value.numpy().copy()
    MagnitudePrunePass(quality=0.5, min_params=0)(model)
    pruned = model.graph.initializers["fc0.weight"].const_value.numpy()
    threshold = 0.5 * original.std()
    assert np.array_equal(pruned == 0, np.abs(original) < threshold)


def test_overrides_and_excludes_by_glob(rng):
    model = mlp(rng, SIZES)
    compression = MagnitudePrunePass(
        sparsity=0.5, overrides={"head.*": 0.9}, exclude=("fc1.*",), min_params=0
    )
    report = compression(model).report
    assert sparsity(model, "head.weight") == pytest.approx(0.9, abs=1 / 240)
    assert sparsity(model, "fc1.weight") == 0.0
    assert report.reason_for("fc1.weight") == "excluded by name"
    assert [c.name for c in report.changes] == ["fc0.weight", "head.weight"]


def test_sparsity_never_decreases(rng):
    model = mlp(rng, SIZES)
    MagnitudePrunePass(sparsity=0.8, min_params=0)(model)
    again = MagnitudePrunePass(sparsity=0.5, min_params=0)(model)
    assert again.modified is False
    assert again.report.reason_for("fc0.weight") == "already at or above the target sparsity"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "exactly one of sparsity or quality"),
        ({"sparsity": 0.5, "quality": 1.0}, "exactly one of sparsity or quality"),
        ({"sparsity": 1.0}, "sparsity: Input should be less than 1"),
        ({"sparsity": 0.5, "overrides": {"a*": 2.0}}, r"overrides\['a\*'\] = 2.0 is outside"),
        ({"sparsity": 0.5, "colour": "red"}, "colour: Extra inputs are not permitted"),
    ],
)
def test_invalid_options_are_named(options, message):
    with pytest.raises(RecipeError, match=message):
        MagnitudePrunePass(**options)
