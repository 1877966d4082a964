"""quant.int8: weight-only int8 per output channel; the error bound holds, stock ORT runs it."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from onnxcompress.passes.quantize import Int8WeightPass, quantize_per_channel
from tests.builders import mlp


def run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(
        ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    return session.run(None, {"x": x})[0]


def test_each_weight_moves_by_at_most_half_its_channel_scale(rng):
    weights = rng.standard_normal((64, 32)).astype(np.float32) * np.linspace(
        0.01, 10, 32, dtype=np.float32
    )
    q, scale = quantize_per_channel(weights, -1)
    assert q.dtype == np.int8 and scale.shape == (1, 32)
    assert np.all(np.abs(q * scale - weights) <= scale / 2 + 1e-7)


def test_the_pass_writes_a_smaller_model_that_stock_onnxruntime_runs(rng):
    model = mlp(rng, (64, 256, 128, 10))
    before = len(ir.to_proto(model).SerializeToString())
    x = rng.standard_normal((8, 64)).astype(np.float32)
    expected = run(model, x)
    quantized = model.clone()
    assert Int8WeightPass()(quantized).modified
    onnx.checker.check_model(ir.to_proto(quantized))
    assert len(ir.to_proto(quantized).SerializeToString()) < before / 3
    got = run(quantized, x)
    assert np.allclose(got, expected, rtol=0.05, atol=0.05)
    assert not Int8WeightPass().needs_calibration()
