"""Saliency scorers and prune.taylor / prune.obd against a numpy back-propagation oracle."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from onnxcompress.errors import DataError
from onnxcompress.pass_base import PassContext
from onnxcompress.passes.prune.saliency import ObdPrunePass, TaylorPrunePass, weight_saliency
from onnxcompress.passes.prune.structured import plan_structured
from tests.builders import mlp

pytest.importorskip("torch")

SIZES = (8, 12, 10, 4)
NAMES = ("fc0.weight", "fc1.weight", "head.weight")


def per_sample_gradients(
    model: ir.Model, x: np.ndarray, labels: np.ndarray
) -> dict[str, np.ndarray]:
    """d(cross-entropy of sample n)/dW for each weight, shape (N, *W.shape), in float64."""
    w = {n: v.const_value.numpy().astype(np.float64) for n, v in model.graph.initializers.items()}
    a0 = x.astype(np.float64) @ w["fc0.weight"] + w["fc0.bias"]
    h0 = np.maximum(a0, 0)
    a1 = h0 @ w["fc1.weight"] + w["fc1.bias"]
    h1 = np.maximum(a1, 0)
    logits = h1 @ w["head.weight"].T + w["head.bias"]
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    d_logits = p - np.eye(logits.shape[1])[labels]
    d_h1 = d_logits @ w["head.weight"]
    d_a1 = d_h1 * (a1 > 0)
    d_h0 = d_a1 @ w["fc1.weight"].T
    d_a0 = d_h0 * (a0 > 0)
    return {
        "head.weight": np.einsum("no,ni->noi", d_logits, h1),
        "fc1.weight": np.einsum("ni,no->nio", h0, d_a1),
        "fc0.weight": np.einsum("ni,no->nio", x.astype(np.float64), d_a0),
    }


@pytest.fixture
def setup(rng):
    model = mlp(rng, SIZES)
    x = rng.standard_normal((32, 8)).astype(np.float32)
    labels = rng.integers(0, 4, 32)
    return model, {"x": x, "labels": labels}


def lowest(scores: np.ndarray, share: float) -> np.ndarray:
    count = round(share * scores.size)
    mask = np.zeros(scores.size, dtype=bool)
    mask[np.argsort(scores.reshape(-1), kind="stable")[:count]] = True
    return mask.reshape(scores.shape)


def test_magnitude_scorer_is_abs_w(setup):
    model, _ = setup
    scores = weight_saliency(model, ["fc1.weight"], "magnitude", PassContext())
    np.testing.assert_array_equal(
        scores["fc1.weight"], np.abs(model.graph.initializers["fc1.weight"].const_value.numpy())
    )


def test_gradient_criteria_without_data_say_what_is_missing(setup):
    model, _ = setup
    with pytest.raises(DataError, match="the taylor criterion needs calibration data"):
        TaylorPrunePass(sparsity=0.5)(model)
    with pytest.raises(DataError, match="the obd criterion needs calibration data"):
        plan_structured(model, ratio=0.5, criterion="obd")


def test_taylor_prunes_the_lowest_abs_w_times_gradient(setup):
    model, data = setup
    grads = per_sample_gradients(model, data["x"], data["labels"])
    weights = {n: model.graph.initializers[n].const_value.numpy().astype(np.float64) for n in NAMES}
    compression = TaylorPrunePass(sparsity=0.5, min_params=0, batch_size=8,
                                  context=PassContext(data=data, original=model.clone()))
    compression(model)
    for name in NAMES:
        expected = lowest(np.abs(weights[name] * grads[name].mean(0)), 0.5)
        pruned = model.graph.initializers[name].const_value.numpy() == 0
        assert np.array_equal(pruned, expected), name


def test_obd_fisher_uses_per_sample_squared_gradients(setup):
    model, data = setup
    grads = per_sample_gradients(model, data["x"], data["labels"])
    weights = {n: model.graph.initializers[n].const_value.numpy().astype(np.float64) for n in NAMES}
    context = PassContext(data=data, original=model.clone())
    scores = weight_saliency(model, list(NAMES), "obd", context, batch_size=1)
    for name in NAMES:
        fisher = (grads[name] ** 2).mean(0)
        np.testing.assert_allclose(
            scores[name], 0.5 * fisher * weights[name] ** 2, rtol=1e-4, atol=1e-9
        )
    ObdPrunePass(sparsity=0.6, scope="global", min_params=0, batch_size=1, context=context)(model)
    pooled = np.concatenate([scores[n].reshape(-1) for n in NAMES])
    threshold = np.sort(pooled)[round(0.6 * pooled.size) - 1]
    for name in NAMES:
        pruned = model.graph.initializers[name].const_value.numpy() == 0
        assert np.array_equal(pruned, scores[name] <= threshold), name


def test_structured_taylor_keeps_channels_with_the_largest_first_order_change(setup):
    model, data = setup
    grads = per_sample_gradients(model, data["x"], data["labels"])
    w0 = model.graph.initializers["fc0.weight"].const_value.numpy().astype(np.float64)
    channel = np.abs((w0 * grads["fc0.weight"].mean(0)).sum(0))
    plan = plan_structured(
        model, ratio=0.5, criterion="taylor", context=PassContext(data=data, original=model)
    )
    np.testing.assert_allclose(plan.groups[0].scores, channel, rtol=1e-4, atol=1e-9)
    assert plan.groups[0].keep == sorted(np.argsort(channel, kind="stable")[6:].tolist())
