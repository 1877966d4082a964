"""codebook.search: per-layer bits, the fewest bytes whose whole model passes the step's gate."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from onnxcompress import fidelity
from onnxcompress.calibration import layer_hessians
from onnxcompress.formats.codebook import codebook_layers
from onnxcompress.passes.codebook.search import PER_CHANNEL, Fitter, relative_error
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
    notes = result.steps[0].report.notes
    assert "tolerance" not in str(notes)  # the cheapest choice passed at once: no bisection


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


def uneven_channels(rng: np.random.Generator) -> ir.Model:
    """An MLP whose output channels sit at scales 1x .. 30x apart, as BatchNorm folding leaves."""
    model = mlp(rng, SIZES)
    for site in find_weight_sites(model, min_params=0).sites:
        weights = site.array()
        axis = site.out_axis
        shape = [1] * weights.ndim
        shape[axis] = weights.shape[axis]
        scales = np.geomspace(1.0, 30.0, weights.shape[axis]).reshape(shape)
        site.replace((weights * rng.permutation(scales, axis=axis)).astype(np.float32))
    return model


def test_channels_at_uneven_scales_take_per_channel_codebooks(rng, calibration):
    model = uneven_channels(rng)
    sites = find_weight_sites(model, min_params=0).sites
    fitter = Fitter(model, layer_hessians(model, {"x": calibration}, sites), seed=0)
    first = sites[0]  # x @ W: its 128 output columns at scales 1x .. 30x
    errors = {
        method: relative_error(
            first.array(), fitter.fit(first.name, method, 6).weights(), fitter.hessian(first.name),
            first,
        )
        for method in ("kmeans", PER_CHANNEL)
    }
    assert errors[PER_CHANNEL] < 0.75 * errors["kmeans"]

    strict = fidelity.Gate(min_cosine=0.9999, min_rank_correlation=0.999, min_top1=None)
    # k-means codebooks only: this strict a gate fails 8-bit k-means, where `auto` brings GPTQ
    result = search(model, calibration, strict, method="kmeans")
    details = [change.detail for change in result.steps[0].report.changes]
    assert any("per channel" in detail for detail in details)
    scaled = [layer for layer in codebook_layers(result.model) if layer.scales() is not None]
    assert scaled and all(layer.weight_name != layer.name for layer in scaled)
    reference = fidelity.run(model, {"x": calibration})
    outputs = fidelity.run(result.model, {"x": calibration}, reference.views)
    assert not strict.failures(fidelity.compare(reference, outputs))  # checked independently


def test_biases_absorb_the_mean_error_and_the_written_model_is_what_was_verified(
    rng, calibration
):
    model = mlp(rng, SIZES)
    shifted = (calibration + 2.0).astype(np.float32)  # inputs with a mean far from zero
    loose = fidelity.Gate(min_cosine=0.9, min_rank_correlation=None, min_top1=None)
    corrected = search(model, shifted, loose).model
    plain = search(model, shifted, loose, bias_correction=False).model
    biases = [
        name for name in ("fc0.bias", "fc1.bias", "head.bias")
        if not np.array_equal(
            corrected.graph.initializers[name].const_value.numpy(),
            plain.graph.initializers[name].const_value.numpy(),
        )
    ]
    assert biases == ["fc0.bias", "fc1.bias", "head.bias"]

    def error(candidate: ir.Model) -> float:
        reference = fidelity.run(model, {"x": shifted})
        return fidelity.compare(reference, fidelity.run(candidate, {"x": shifted})).rel_l2

    assert error(corrected) < error(plain)


def two_paths(rng: np.random.Generator) -> ir.Model:
    """y = x W_loud + 0.01 x W_quiet: twin layers, one of which barely reaches the output."""
    from onnx import TensorProto, helper, numpy_helper

    from tests.builders import finish

    weights = [
        numpy_helper.from_array(rng.standard_normal((32, 64)).astype(np.float32), name)
        for name in ("loud.weight", "quiet.weight")
    ]
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "loud.weight"], ["loud"]),
            helper.make_node("MatMul", ["x", "quiet.weight"], ["quiet"]),
            helper.make_node("Mul", ["quiet", "damping"], ["damped"]),
            helper.make_node("Add", ["loud", "damped"], ["y"]),
        ],
        "two_paths",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 64])],
        [*weights, numpy_helper.from_array(np.array(0.01, np.float32), "damping")],
    )
    return ir.from_proto(finish(graph))


def test_a_layer_whose_error_barely_reaches_the_output_takes_fewer_bits(rng, calibration):
    model = two_paths(rng)
    gate = fidelity.Gate(min_cosine=0.9995, min_rank_correlation=None, min_top1=None)
    weighted = bits_by_layer(search(model, calibration, gate).model)
    assert weighted["quiet.weight"] < weighted["loud.weight"]
    unweighted = bits_by_layer(search(model, calibration, gate, sensitivity=False).model)
    assert unweighted.get("quiet.weight", 32) >= weighted["quiet.weight"]


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


def test_refinement_lowers_what_one_tolerance_left_and_keeps_the_target(rng, calibration):
    model = two_paths(rng)  # one tolerance for both twins stops at the loud one's limit
    gate = fidelity.Gate(min_cosine=0.9995, min_rank_correlation=None, min_top1=None)
    plain = search(model, calibration, gate, refine_trials=0, sensitivity=False)
    refined = search(model, calibration, gate, sensitivity=False)
    before, after = bits_by_layer(plain.model), bits_by_layer(refined.model)
    assert after["quiet.weight"] < before["quiet.weight"]
    assert all(after[name] <= bits for name, bits in before.items())
    reference = fidelity.run(model, {"x": calibration})
    outputs = fidelity.run(refined.model, {"x": calibration}, reference.views)
    searched = gate.model_copy(update={"min_cosine": 0.9995 + 0.0005 * 0.75})  # margin 0.75
    assert not searched.failures(fidelity.compare(reference, outputs))
