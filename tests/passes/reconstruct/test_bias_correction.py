"""Bias correction: a changed weight's mean output shift goes into the layer's own bias."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcompress.calibration import layer_hessians
from onnxcompress.passes.reconstruct.bias_correction import (
    centred_hessian,
    corrected_bias,
    layer_bias,
)
from onnxcompress.sites import constant_array, find_weight_sites
from tests.builders import finish, mlp


def conv_with_bias(rng: np.random.Generator) -> ir.Model:
    """A grouped, strided, padded Conv with a bias, over inputs far from zero mean."""
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["y"], group=2, strides=[2, 1], pads=[1] * 4)],
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4, 9, 10])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 6, "h", "w"])],
        [
            numpy_helper.from_array(rng.standard_normal((6, 2, 3, 3)).astype(np.float32), "w"),
            numpy_helper.from_array(rng.standard_normal(6).astype(np.float32), "b"),
        ],
    )
    return ir.from_proto(finish(graph))


def run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(
        ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    return session.run(None, {"x": x})[0].astype(np.float64)


def test_every_layer_kind_finds_the_bias_it_owns(rng):
    biases = {
        site.name: (bias.name if (bias := layer_bias(site)) is not None else None)
        for site in find_weight_sites(mlp(rng), min_params=0).sites
    }
    assert biases == {
        "fc0.weight": "fc0.bias", "fc1.weight": "fc1.bias", "head.weight": "head.bias"
    }  # MatMul -> Add(constant), and Gemm's third input


def test_the_corrected_bias_keeps_the_mean_output_over_the_calibration_inputs(rng):
    model = conv_with_bias(rng)
    x = (rng.standard_normal((8, 4, 9, 10)) + 2.0).astype(np.float32)  # a mean far from zero
    (site,) = find_weight_sites(model, min_params=0).sites
    stats = layer_hessians(model, {"x": x}, [site], seed=0)[site.name]
    weight = site.array()
    delta = rng.standard_normal(weight.shape) * 0.1  # a quantisation-like change
    bias = layer_bias(site)
    assert bias is not None
    original_bias = np.array(constant_array(bias))
    before = run(model, x)

    site.replace((weight + delta).astype(np.float32))
    shifted = run(model, x)
    bias.const_value = ir.tensor(
        corrected_bias(original_bias, delta.reshape(6, -1), stats), name=bias.name
    )
    corrected = run(model, x)

    def mean_shift(after: np.ndarray) -> float:
        return float(np.abs((after - before).mean(axis=(0, 2, 3))).max())

    # exact on the rows captured; padding makes border patches differ slightly from the mean row
    assert mean_shift(corrected) < 0.1 * mean_shift(shifted)


def test_the_centred_hessian_scores_what_is_left_after_correction(rng):
    model = mlp(rng, (8, 16, 4))
    site = find_weight_sites(model, min_params=0).sites[0]  # x @ W + b
    x = (rng.standard_normal((64, 8)) + 1.5).astype(np.float32)
    stats = layer_hessians(model, {"x": x}, [site])[site.name]
    delta = rng.standard_normal(site.shape) * 0.1
    error = x.astype(np.float64) @ delta
    left = error - error.mean(axis=0)  # the part no bias can remove
    d = delta.T  # [out, in]
    predicted = sum(d[o] @ centred_hessian(stats)[0] @ d[o] for o in range(d.shape[0]))
    assert predicted == pytest.approx(float(np.sum(left**2)), rel=1e-6)
