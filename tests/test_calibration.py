"""Layer-wise Hessians: d^T H d must equal the layer's squared output change, exactly."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcompress.calibration import layer_hessians, supported
from onnxcompress.sites import find_weight_sites
from tests.builders import finish, mlp


def conv_model(rng: np.random.Generator) -> ir.Model:
    weight = rng.standard_normal((6, 2, 3, 3)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node(
                "Conv",
                ["x", "w"],
                ["y"],
                group=2,
                strides=[2, 1],
                pads=[1, 2, 0, 1],
                dilations=[1, 2],
            )
        ],
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4, 9, 10])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 6, "h", "w"])],
        [numpy_helper.from_array(weight, "w")],
    )
    return ir.from_proto(finish(graph))


def run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(
        ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    return session.run(None, {"x": x})[0]


def with_weight(model: ir.Model, name: str, array: np.ndarray) -> ir.Model:
    copy = model.clone()
    copy.graph.initializers[name].const_value = ir.tensor(array.astype(np.float32), name=name)
    return copy


def test_conv_hessian_gives_the_output_change_of_any_weight_change(rng):
    model = conv_model(rng)
    x = rng.standard_normal((3, 4, 9, 10)).astype(np.float32)
    (site,) = find_weight_sites(model, min_params=0).sites
    (stats,) = layer_hessians(model, {"x": x}, [site]).values()
    assert stats.hessian.shape == (2, 18, 18)
    delta = rng.standard_normal((6, 2, 3, 3))
    change = run(with_weight(model, "w", delta), x)  # the conv is linear in its weight
    per_channel = delta.reshape(6, 18)
    predicted = sum(per_channel[o] @ stats.hessian[o // 3] @ per_channel[o] for o in range(6))
    assert predicted == pytest.approx(float(np.sum(change.astype(np.float64) ** 2)), rel=1e-4)


def test_matmul_hessian_is_x_transpose_x_of_the_layer_input(rng):
    model = mlp(rng, (16, 8, 4))
    x = rng.standard_normal((20, 16)).astype(np.float32)
    sites = find_weight_sites(model, min_params=0).sites
    stats = layer_hessians(model, {"x": x}, sites)
    first = stats[sites[0].name]
    assert first.rows == 20 and first.groups == 1
    np.testing.assert_allclose(first.hessian[0], x.astype(np.float64).T @ x, rtol=1e-6)
    assert stats[sites[1].name].hessian.shape == (1, 8, 8)


def test_layers_inside_subgraphs_or_read_through_slices_are_not_captured(rng):
    """Layers inside subgraphs, or reading their weight through Slice/Concat, get no H.

    Their input is no main-graph value (or the weight is not the layer's operand as stored):
    codebook.search scores them by their own relative error instead.
    """
    from tests.passes.codebook.test_subgraph_weights import _if_model

    model = ir.from_proto(_if_model(rng))
    sites = find_weight_sites(model, derived=True).sites
    assert {site.name for site in sites} == {"then_w", "then_r", "else_w"}
    assert not any(supported(site, model) for site in sites)


def lstm_model(rng: np.random.Generator, hidden: int = 3) -> ir.Model:
    """x [time, batch, 4] -> bidirectional LSTM -> Y [time, 2, batch, hidden]."""
    w = rng.standard_normal((2, 4 * hidden, 4)).astype(np.float32)
    r = rng.standard_normal((2, 4 * hidden, hidden)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("LSTM", ["x", "w", "r"], ["y"], hidden_size=hidden,
                          direction="bidirectional")],
        "lstm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [6, "n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [6, 2, "n", hidden])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(r, "r")],
    )
    return ir.from_proto(finish(graph))


def test_lstm_hessians_come_from_its_input_and_the_states_it_emits(rng):
    """W multiplies x_t in both directions; R multiplies the state each direction emits."""
    model = lstm_model(rng)
    x = rng.standard_normal((6, 5, 4)).astype(np.float32)
    sites = {site.name: site for site in find_weight_sites(model, min_params=0).sites}
    stats = layer_hessians(model, {"x": x}, list(sites.values()))
    rows = x.reshape(-1, 4).astype(np.float64)
    assert stats["w"].hessian.shape == (2, 4, 4)
    for direction in range(2):
        np.testing.assert_allclose(stats["w"].hessian[direction], rows.T @ rows, rtol=1e-6)
    y = run(model, x).astype(np.float64)  # [time, directions, batch, hidden]
    for direction in range(2):
        states = y[:, direction].reshape(-1, 3)
        np.testing.assert_allclose(stats["r"].hessian[direction], states.T @ states, rtol=1e-5)
