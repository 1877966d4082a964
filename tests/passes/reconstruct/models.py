"""Tiny seeded models and correlated calibration data for the reconstruction passes."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from onnxcompress import runtime
from tests.builders import finish, mlp


def correlated(rng: np.random.Generator, samples: int, features: int) -> np.ndarray:
    """Inputs whose features are strongly correlated (what real layer inputs look like)."""
    mix = rng.standard_normal((features, features)) / np.sqrt(features)
    return rng.standard_normal((samples, features)) @ mix + 0.3 * rng.standard_normal(
        (samples, features)
    )


def mlp_case(rng: np.random.Generator) -> tuple[ir.Model, dict[str, np.ndarray]]:
    model = mlp(rng, (32, 64, 48, 10))
    return model, {"x": correlated(rng, 256, 32).astype(np.float32)}


def conv_case(rng: np.random.Generator) -> tuple[ir.Model, dict[str, np.ndarray]]:
    """Conv(4->8, 3x3, pad 1) -> Relu -> grouped Conv(8->8, groups 4, 3x3, stride 2)."""
    w1 = (rng.standard_normal((8, 4, 3, 3)) / 6).astype(np.float32)
    w2 = (rng.standard_normal((8, 2, 3, 3)) / 4).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "conv1.weight"], ["c1"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c1"], ["r1"]),
            helper.make_node(
                "Conv", ["r1", "conv2.weight"], ["y"], group=4, strides=[2, 2], pads=[1, 1, 1, 1]
            ),
        ],
        "convs",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4, 10, 10])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8, 5, 5])],
        [numpy_helper.from_array(w1, "conv1.weight"), numpy_helper.from_array(w2, "conv2.weight")],
    )
    # Smooth images: neighbouring pixels (one patch's entries) are correlated.
    x = np.cumsum(np.cumsum(rng.standard_normal((64, 4, 10, 10)), axis=2), axis=3) / 5
    return ir.from_proto(finish(graph)), {"x": x.astype(np.float32)}


def embedding_case(rng: np.random.Generator) -> tuple[ir.Model, dict[str, np.ndarray]]:
    """Gather(table, ids) -> MatMul(proj): the table has no layer input to reconstruct."""
    table = rng.standard_normal((40, 16)).astype(np.float32)
    proj = (rng.standard_normal((16, 8)) / 4).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["embed.weight", "ids"], ["e"]),
            helper.make_node("MatMul", ["e", "proj.weight"], ["y"]),
        ],
        "embed",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n", 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 5, 8])],
        [
            numpy_helper.from_array(table, "embed.weight"),
            numpy_helper.from_array(proj, "proj.weight"),
        ],
    )
    return ir.from_proto(finish(graph)), {"ids": rng.integers(0, 40, (32, 5)).astype(np.int64)}


def run(model: ir.Model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Check the model (full check) and run it in onnxruntime."""
    proto = ir.to_proto(model)
    onnx.checker.check_model(proto, full_check=True)
    return runtime.session(proto.SerializeToString()).run(None, feeds)


def serialized(model: ir.Model) -> bytes:
    return ir.to_proto(model).SerializeToString()
