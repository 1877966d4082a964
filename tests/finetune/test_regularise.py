"""Regularisers per layer: L1 / biased decay against numpy, group lasso to exact zeros, then removal."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
import torch

from onnxcompress.fidelity import Gate
from onnxcompress.finetune.config import FinetuneConfig
from onnxcompress.finetune.executor import OnnxModule, to_ir
from onnxcompress.finetune.regularise import (
    RegularisedLayer,
    group_axes,
    penalty,
    proximal_group_step,
    regularised_layers,
)
from onnxcompress.pipeline import Step, run_steps
from tests.finetune.conftest import ort_run

NO_GATE = Gate.off()


def test_group_axes_follow_wens_groups() -> None:
    conv = (8, 4, 3, 3)  # out, in, kh, kw
    assert group_axes(conv, "filters", 0, 1) == (1, 2, 3)  # one norm per output filter
    assert group_axes(conv, "channels", 0, 1) == (0, 2, 3)  # one per input channel
    assert group_axes(conv, "shapes", 0, 1) == (0,)  # one per (channel, kh, kw) position
    assert group_axes(conv, "depth", 0, 1) == (0, 1, 2, 3)
    assert group_axes((16, 32), "channels", 1, 0) == (1,)  # MatMul [in, out]: a row per input


@pytest.mark.parametrize("kind", ["hyperbolic", "exponential"])
def test_penalties_match_their_formulas(mlp_pair, kind) -> None:
    _, proto = mlp_pair
    model = to_ir(proto)
    module = OnnxModule(model)
    config = FinetuneConfig(l1=0.01, biased_decay=0.5, biased_decay_kind=kind)
    layers = regularised_layers(model, module.trainable_names(), config)
    assert [layer.name for layer in layers] == ["layers.0.weight", "layers.1.weight", "layers.2.weight"]
    expected = 0.0
    for layer in layers:
        w = module.tensor(layer.name).detach().numpy().astype(np.float64)
        bias = w**2 / (1 + w**2) if kind == "hyperbolic" else 1 - np.exp(-(w**2))
        expected += 0.01 * np.abs(w).sum() + 0.5 * bias.sum()
    got = penalty(module, layers, config)
    assert got is not None and float(got) == pytest.approx(expected, rel=1e-5)


def test_proximal_step_is_the_group_soft_threshold(rng) -> None:
    from onnx import TensorProto, helper, numpy_helper

    w = rng.standard_normal((6, 4)).astype(np.float32)  # MatMul [in, out]
    w[2] *= 0.01  # a weak input channel
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
                              initializer=[numpy_helper.from_array(w, "w")])
    module = OnnxModule(to_ir(helper.make_model(graph)))
    config = FinetuneConfig(group_lasso=1.0, groups=("channels",))
    proximal_group_step(module, [RegularisedLayer("w", out_axis=1, in_axis=0)], config, lr=0.2)
    norms = np.linalg.norm(w, axis=1, keepdims=True)
    expected = w * np.maximum(0, 1 - 0.2 * np.sqrt(4) / norms)
    got = module.tensor("w").detach().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
    assert np.all(got[2] == 0.0)  # the weak channel is exactly zero, not just small


def test_group_lasso_zeroes_channels_and_dead_neurons_removes_them_exactly(mlp_pair, digits) -> None:
    _, proto = mlp_pair
    x, y = digits
    name = proto.graph.input[0].name
    train = {name: x[:400], "labels": y[:400]}
    options = {"epochs": 6, "lr": 0.05, "optimizer": "sgd", "group_lasso": 0.1, "groups": ["channels"],
               "regularise": ["layers.[12].*"]}
    trained = run_steps(to_ir(proto), [Step(pass_name="finetune", options=options, gate=NO_GATE)], data=train).model
    hidden = trained.graph.initializers["layers.1.weight"].const_value.numpy()  # Gemm transB: [out, in]
    zero_inputs = np.flatnonzero(np.all(hidden == 0.0, axis=0))
    assert zero_inputs.size >= 4, "expected whole input channels at exact zero"

    removed = run_steps(trained, [Step(pass_name="prune.dead_neurons", gate=NO_GATE)]).model
    shapes = {n: v.const_value.shape for n, v in removed.graph.initializers.items()}
    assert shapes["layers.0.weight"][0] == 32 - zero_inputs.size  # the dead hidden units are gone
    assert shapes["layers.1.weight"][1] == 32 - zero_inputs.size
    feeds = {name: x[1000:1100]}
    before, after = ir.to_proto(trained), ir.to_proto(removed)
    before.ir_version = after.ir_version = 10
    np.testing.assert_allclose(ort_run(after, feeds)[0], ort_run(before, feeds)[0], rtol=1e-5, atol=1e-5)


def test_biased_decay_pushes_small_weights_to_zero_more_than_large_ones(mlp_pair, digits) -> None:
    _, proto = mlp_pair
    x, y = digits
    name = proto.graph.input[0].name
    train = {name: x[:300], "labels": y[:300]}
    base = {"epochs": 3, "lr": 0.01, "optimizer": "sgd", "lr_schedule": "constant"}

    def weights(**extra):
        steps = [Step(pass_name="finetune", options={**base, **extra}, gate=NO_GATE)]
        return run_steps(to_ir(proto), steps, data=train).model.graph.initializers["layers.0.weight"] \
            .const_value.numpy()

    plain, biased = weights(), weights(biased_decay=0.05)
    small = np.abs(plain) < np.quantile(np.abs(plain), 0.5)
    large = ~small
    shrink_small = np.abs(biased[small]).sum() / np.abs(plain[small]).sum()
    shrink_large = np.abs(biased[large]).sum() / np.abs(plain[large]).sum()
    assert shrink_small < shrink_large < 1.0  # w^2 / (1 + w^2) pulls hardest, relatively, on small weights
    torch.set_num_threads(1)
