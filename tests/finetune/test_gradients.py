"""Taylor and OBD saliencies against native torch gradients and an exact Hessian diagonal."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcompress.errors import DataError
from onnxcompress.finetune.gradients import obd_scores, taylor_scores
from tests.finetune.conftest import torch


def _data(proto, rng, n=40):
    x = rng.standard_normal((n, 64)).astype(np.float32)
    return {proto.graph.input[0].name: x, "labels": rng.integers(0, 10, n)}


def _native_batch_grads(module, data, batch_size):
    """Per-batch gradients of the mean cross-entropy, and batch sizes (the oracle)."""
    x, y = (
        torch.from_numpy(next(v for k, v in data.items() if k != "labels")),
        torch.from_numpy(data["labels"]),
    )
    out = []
    for start in range(0, len(x), batch_size):
        module.zero_grad()
        torch.nn.functional.cross_entropy(
            module(x[start : start + batch_size]), y[start : start + batch_size]
        ).backward()
        out.append(
            (
                {
                    n: p.grad.detach().numpy().astype(np.float64)
                    for n, p in module.named_parameters()
                },
                len(x[start : start + batch_size]),
            )
        )
    return out


def test_taylor_matches_native_gradients(mlp_pair, rng) -> None:
    torch_module, proto = mlp_pair
    data = _data(proto, rng)
    batches = _native_batch_grads(torch_module, data, 16)
    total = sum(n for _, n in batches)
    scores = taylor_scores(proto, data, batch_size=16)
    channels = taylor_scores(proto, data, batch_size=16, per_channel=True)
    assert sorted(scores) == ["layers.0.weight", "layers.1.weight", "layers.2.weight"]
    for name, score in scores.items():
        g = sum(grads[name] * n / total for grads, n in batches)
        w = dict(torch_module.named_parameters())[name].detach().numpy().astype(np.float64)
        np.testing.assert_allclose(score, np.abs(w * g), rtol=1e-4, atol=1e-9)
        # Gemm with transB: output channels are rows
        np.testing.assert_allclose(
            channels[name], np.abs((w * g).sum(axis=1)), rtol=1e-4, atol=1e-9
        )


def test_obd_fisher_matches_squared_batch_gradients(mlp_pair, rng) -> None:
    torch_module, proto = mlp_pair
    data = _data(proto, rng)
    batches = _native_batch_grads(torch_module, data, 16)
    total = sum(n for _, n in batches)
    names = ["layers.1.weight"]
    scores = obd_scores(proto, data, names=names, batch_size=16)
    channels = obd_scores(proto, data, names=names, batch_size=16, per_channel=True)
    h = sum(grads[names[0]] ** 2 * n * n / total for grads, n in batches)
    w = torch_module.layers[1].weight.detach().numpy().astype(np.float64)
    np.testing.assert_allclose(scores[names[0]], 0.5 * h * w * w, rtol=1e-4, atol=1e-12)
    np.testing.assert_allclose(
        channels[names[0]], (0.5 * h * w * w).sum(axis=1), rtol=1e-4, atol=1e-12
    )
    assert np.all(scores[names[0]] >= 0)


def _linear_model(weight: np.ndarray):
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", weight.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", weight.shape[1]])],
        initializer=[numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    return model


def test_obd_hutchinson_is_exact_for_a_diagonal_hessian(rng) -> None:
    """y = x W with MSE to a teacher: H_(ij),(kl) = 2/(N*out) sum_n x_ni x_nk [j == l].

    With x = scaled one-hot rows, H is diagonal and every Rademacher probe gives it exactly.
    """
    weight = rng.standard_normal((4, 3)).astype(np.float32)
    teacher = _linear_model(weight + 0.5)
    scale = np.float32([1.0, 2.0, 0.5, 3.0])
    x = np.diag(scale).astype(np.float32)  # N = 4 samples, one per input row
    data = {"x": x}
    scores = obd_scores(_linear_model(weight), data, loss="mse", original=teacher,
                        hessian="hutchinson", hutchinson_samples=2, batch_size=4)
    h = 2.0 / (4 * 3) * (scale.astype(np.float64) ** 2)[:, None] * np.ones((1, 3))
    np.testing.assert_allclose(scores["w"], 0.5 * h * weight.astype(np.float64) ** 2, rtol=1e-5)


def test_obd_fisher_without_labels_uses_pseudo_labels(mlp_pair, rng) -> None:
    _, proto = mlp_pair
    data = _data(proto, rng)
    del data["labels"]
    scores = obd_scores(proto, data, names=["layers.0.weight"], batch_size=20)
    assert scores["layers.0.weight"].shape == (32, 64) and scores["layers.0.weight"].sum() > 0


def test_bad_options_are_user_errors(mlp_pair, rng) -> None:
    _, proto = mlp_pair
    data = _data(proto, rng)
    with pytest.raises(DataError, match="hessian must be one of"):
        obd_scores(proto, data, hessian="exact")
    with pytest.raises(DataError, match="no weights named 'nope'"):
        taylor_scores(proto, data, names=["nope"])
    with pytest.raises(DataError, match="missing input"):
        taylor_scores(proto, {"labels": data["labels"]})


def test_per_channel_taylor_of_a_conv_matches_finite_differences_in_onnxruntime(
    cnn_pair, rng
) -> None:
    """Σ_channel w·g is d/dε L(channel scaled by 1+ε) at 0.

    Central differences on onnxruntime's outputs (float64 cross-entropy in numpy) give an
    oracle independent of torch.
    """
    import onnx
    from onnx import numpy_helper

    from tests.finetune.conftest import ort_run

    _, proto = cnn_pair
    name = "conv2.weight"
    x = rng.standard_normal((32, 1, 8, 8)).astype(np.float32)
    labels = rng.integers(0, 10, 32)
    data = {proto.graph.input[0].name: x, "labels": labels}
    signed = taylor_scores(proto, data, names=[name], per_channel=True, batch_size=32)[name]
    weight = next(numpy_helper.to_array(t) for t in proto.graph.initializer if t.name == name)
    assert signed.shape == (weight.shape[0],)

    def loss(scaled: np.ndarray) -> float:
        model = onnx.ModelProto()
        model.CopyFrom(proto)
        init = next(t for t in model.graph.initializer if t.name == name)
        init.CopyFrom(numpy_helper.from_array(scaled.astype(np.float32), name))
        logits = ort_run(model, {proto.graph.input[0].name: x})[0].astype(np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        return float(-log_probs[np.arange(len(labels)), labels].mean())

    eps = 1e-2
    for channel in range(weight.shape[0]):
        up, down = weight.copy(), weight.copy()
        up[channel] *= 1 + eps
        down[channel] *= 1 - eps
        derivative = (loss(up) - loss(down)) / (2 * eps)
        assert abs(abs(derivative) - signed[channel]) <= 2e-3 * max(np.abs(signed).max(), 1e-6), (
            channel
        )
