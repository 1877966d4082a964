"""prune.obs and sparsegpt: OBS reconstruction beats magnitude at equal sparsity, counts exact."""

from __future__ import annotations

import numpy as np
import pytest

from onnxcompress.pass_base import PassContext, get_pass
from onnxcompress.passes.reconstruct.obs import (
    inverse_hessian_factor,
    magnitude_prune,
    reconstruction_error,
    sparsegpt,
)
from tests.passes.reconstruct.models import (
    conv_case,
    correlated,
    embedding_case,
    mlp_case,
    run,
    serialized,
)


def test_sparsegpt_beats_magnitude_at_50_percent(layer):
    weights, hessian = layer
    obs = sparsegpt(weights, hessian, 0.5)
    magnitude = magnitude_prune(weights, 0.5)
    assert np.count_nonzero(obs == 0) == np.count_nonzero(magnitude == 0) == weights.size // 2
    obs_error = reconstruction_error(weights, obs, hessian)
    assert obs_error < 0.7 * reconstruction_error(weights, magnitude, hessian)


def test_sparsegpt_2_4_pattern_and_error(layer):
    weights, hessian = layer
    obs = sparsegpt(weights, hessian, prunen=2, prunem=4)
    magnitude = magnitude_prune(weights, prunen=2, prunem=4)
    zeros_per_group = (obs == 0).reshape(48, 16, 4).sum(axis=2)
    assert np.all(zeros_per_group == 2)
    assert reconstruction_error(weights, obs, hessian) < 0.8 * reconstruction_error(
        weights, magnitude, hessian
    )


@pytest.mark.parametrize("options", [{"sparsity": 0.6}, {"prunen": 2, "prunem": 4}])
def test_lazy_batch_blocksize_does_not_change_the_result(layer, options):
    weights, hessian = layer
    small = sparsegpt(weights, hessian, blocksize=8, **options)
    large = sparsegpt(weights, hessian, blocksize=64, **options)
    np.testing.assert_array_equal(small == 0, large == 0)
    np.testing.assert_allclose(small, large, rtol=1e-9, atol=1e-9)


def test_existing_zeros_stay_and_count_and_the_total_is_exact(layer):
    weights, hessian = layer
    weights = weights.copy()
    weights[:, :5] = 0  # a pre-pruned block
    obs = sparsegpt(weights, hessian, 0.3, blocksize=16, maskblock=4)
    assert np.all(obs[:, :5] == 0)
    assert np.count_nonzero(obs == 0) == round(0.3 * weights.size)


def test_dead_inputs_and_a_singular_hessian(rng):
    x = correlated(rng, 8, 32)  # rank 8 < 32
    x[:, 3] = 0  # a dead input
    hessian = x.T @ x
    weights = rng.standard_normal((6, 32))
    pruned = sparsegpt(weights, hessian, 0.5, percdamp=1e-12)
    assert np.all(np.isfinite(pruned)) and np.all(pruned[:, 3] == 0)
    assert np.count_nonzero(pruned == 0) == weights.size // 2


def test_an_indefinite_hessian_is_rejected_after_damping_retries():
    with pytest.raises(np.linalg.LinAlgError):
        inverse_hessian_factor(-np.eye(4) * 1e6 + 0.0, percdamp=0.01)


def _prune(model, data, **options):
    pruning = get_pass("prune.obs")(**options, context=PassContext(data=data))
    return pruning(model).report


@pytest.mark.parametrize(
    "options", [{"sparsity": 0.5}, {"n_m": "2:4"}, {"sparsity": 0.6, "sequential": True}]
)
def test_pass_on_an_mlp(rng, options):
    model, data = mlp_case(rng)
    report = _prune(model, data, **options)
    assert [c.name for c in report.changes] == ["fc0.weight", "fc1.weight", "head.weight"]
    assert report.notes["obs_error"] < 0.8 * report.notes["magnitude_error"]
    target = options.get("sparsity", 0.5)
    for name in ("fc0.weight", "fc1.weight", "head.weight"):
        weight = model.graph.initializers[name].const_value.numpy()
        assert np.count_nonzero(weight == 0) == round(target * weight.size)
    if "n_m" in options:  # MatMul W[in, out]: groups of 4 along the input axis
        fc0 = model.graph.initializers["fc0.weight"].const_value.numpy()
        assert np.all((fc0.T == 0).reshape(64, 8, 4).sum(axis=2) == 2)
    (out,) = run(model, {"x": data["x"][:4]})
    assert out.shape == (4, 10) and np.all(np.isfinite(out))


def test_conv_and_grouped_conv(rng):
    model, data = conv_case(rng)
    report = _prune(model, data, sparsity=0.5, probes=32)
    assert [c.name for c in report.changes] == ["conv1.weight", "conv2.weight"]
    assert all("OBS" in c.detail for c in report.changes)
    assert report.notes["obs_error"] < 0.8 * report.notes["magnitude_error"]
    for name in ("conv1.weight", "conv2.weight"):
        weight = model.graph.initializers[name].const_value.numpy()
        assert np.count_nonzero(weight == 0) == round(0.5 * weight.size)
    run(model, {"x": data["x"][:2]})


def test_embedding_falls_back_to_magnitude_with_the_reason(rng):
    model, data = embedding_case(rng)
    report = _prune(model, data, sparsity=0.5)
    details = {c.name: c.detail for c in report.changes}
    assert "magnitude fallback (an embedding table (Gather)" in details["embed.weight"]
    assert "OBS" in details["proj.weight"]
    run(model, {"ids": data["ids"][:2]})


def test_n_m_skips_layers_whose_width_does_not_divide(rng):
    model, data = mlp_case(rng)
    report = _prune(model, data, n_m="2:5")
    assert report.reason_for("fc0.weight") == "32 input features are not a multiple of M=5"
    assert [c.name for c in report.changes] == []


def test_without_data_the_pipeline_probes_are_used_and_said(rng):
    model, _ = mlp_case(rng)
    report = _prune(model, None, sparsity=0.5, probes=16)
    assert report.notes["calibration"].startswith("no data")
    assert len(report.changes) == 3


def test_deterministic(rng):
    model, data = conv_case(rng)
    first, second = model.clone(), model.clone()
    _prune(first, data, sparsity=0.5, probes=16)
    _prune(second, data, sparsity=0.5, probes=16)
    assert serialized(first) == serialized(second)


def test_config_needs_one_target():
    from onnxcompress.errors import RecipeError

    with pytest.raises(RecipeError):
        get_pass("prune.obs")()
    with pytest.raises(RecipeError):
        get_pass("prune.obs")(sparsity=0.5, n_m="2:4")
    with pytest.raises(RecipeError):
        get_pass("prune.obs")(n_m="4:2")
    assert get_pass("prune.obs")(sparsity=0.5).needs_calibration()
