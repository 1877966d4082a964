"""codebook.search: per-layer bits, the fewest bytes whose whole model passes the step's gate."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from onnxcompress import fidelity
from onnxcompress.calibration import layer_hessians
from onnxcompress.formats.codebook import codebook_layers
from onnxcompress.passes.codebook.search import relative_error
from onnxcompress.pipeline import Step, run_steps
from onnxcompress.sites import find_weight_sites
from tests.builders import mlp

SIZES = (32, 128, 128, 10)


def search(model: ir.Model, x: np.ndarray, gate: fidelity.Gate, **options: object):
    step = Step(pass_name="codebook.search", options=options, gate=gate, on_fail="rollback")
    return run_steps(model, [step], data={"x": x})


def bits_by_layer(model: ir.Model) -> dict[str, int]:
    return {layer.name: layer.bits for layer in codebook_layers(model)}


@pytest.fixture
def calibration(rng):
    return rng.standard_normal((64, SIZES[0])).astype(np.float32)


def test_a_loose_target_takes_the_cheapest_width_everywhere(rng, calibration):
    model = mlp(rng, SIZES)
    loose = fidelity.Gate(min_cosine=0.5, min_rank_correlation=None, min_top1=None)
    result = search(model, calibration, loose)
    assert set(bits_by_layer(result.model).values()) == {3}
    assert result.steps[0].report.notes == {}  # the cheapest choice passed at once: no bisection


def test_a_strict_target_is_met_with_more_bits_and_verified(rng, calibration):
    model = mlp(rng, SIZES)
    strict = fidelity.Gate(min_cosine=0.9999, min_rank_correlation=0.999, min_top1=None)
    result = search(model, calibration, strict)
    step = result.steps[0]
    assert step.status == "applied" and not step.failures
    widths = bits_by_layer(result.model)
    assert widths and max(widths.values()) > 3
    reference = fidelity.run(model, {"x": calibration})
    written = fidelity.run(result.model, {"x": calibration}, reference.views)
    assert not strict.failures(fidelity.compare(reference, written))  # checked independently


def test_an_unreachable_target_leaves_every_layer_dense_with_a_reason(rng, calibration):
    model = mlp(rng, SIZES)
    impossible = fidelity.Gate(
        min_cosine=None, max_abs=0.0, min_rank_correlation=None, min_top1=None
    )
    result = search(model, calibration, impossible)
    assert result.steps[0].status == "unchanged"
    assert not codebook_layers(result.model)
    reasons = [s.reason for s in result.steps[0].report.skipped]
    assert reasons and all(r.startswith("kept dense") for r in reasons)


def test_layer_error_is_the_relative_output_error_on_the_calibration_inputs(rng, calibration):
    model = mlp(rng, SIZES)
    site = find_weight_sites(model, min_params=0).sites[0]  # x @ W, W: [in, out]
    stats = layer_hessians(model, {"x": calibration}, [site])[site.name]
    weights = site.array()
    quantized = weights + rng.standard_normal(weights.shape).astype(np.float32) * 0.01
    x = calibration.astype(np.float64)
    expected = np.sum((x @ (quantized - weights)) ** 2) / np.sum((x @ weights) ** 2)
    assert relative_error(weights, quantized, stats.hessian, site) == pytest.approx(
        expected, rel=1e-6
    )


def test_same_inputs_same_bytes(rng, calibration):
    model = mlp(rng, SIZES)
    gate = fidelity.Gate(min_cosine=0.999, min_rank_correlation=0.99, min_top1=None)
    first = ir.to_proto(search(model, calibration, gate).model).SerializeToString()
    second = ir.to_proto(search(model, calibration, gate).model).SerializeToString()
    assert first == second


def test_a_conv_without_captured_input_is_scored_per_output_channel(rng):
    """A conv scored without its input (H = I) is blind to rescaling one filter.

    Scaling a filter (and what reads it) leaves a ReLU network's function unchanged.
    """
    from onnxcompress.sites import Layout, WeightSite

    weights = rng.standard_normal((4, 3, 3, 3))
    delta = rng.standard_normal(weights.shape) * 0.01
    site = WeightSite("w", "Conv", None, 1, None, Layout(1, 0, 1), "constant", [])  # type: ignore[arg-type]
    error = relative_error(weights, weights + delta, None, site)
    scale = np.array([100.0, 1.0, 1.0, 0.01])[:, None, None, None]
    assert relative_error(weights * scale, (weights + delta) * scale, None, site) == (
        pytest.approx(error, rel=1e-9)
    )
    per_channel = np.sum(delta**2, axis=(1, 2, 3)) / np.sum(weights**2, axis=(1, 2, 3))
    assert error == pytest.approx(per_channel.mean(), rel=1e-9)
