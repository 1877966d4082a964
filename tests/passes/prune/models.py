"""Tiny seeded models for the pruning tests: a CNN with BatchNorm and a residual Add."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from onnxcompress import runtime
from tests.builders import finish


def _conv(
    rng: np.random.Generator, name: str, c_in: int, c_out: int, k: int = 3
) -> list[onnx.TensorProto]:
    w = (rng.standard_normal((c_out, c_in, k, k)) / np.sqrt(c_in * k * k)).astype(np.float32)
    b = (rng.standard_normal(c_out) * 0.1).astype(np.float32)
    return [
        numpy_helper.from_array(w, f"{name}.weight"),
        numpy_helper.from_array(b, f"{name}.bias"),
    ]


def _bn(rng: np.random.Generator, name: str, c: int) -> list[onnx.TensorProto]:
    return [
        numpy_helper.from_array(
            (1 + 0.2 * rng.standard_normal(c)).astype(np.float32), f"{name}.scale"
        ),
        numpy_helper.from_array((0.1 * rng.standard_normal(c)).astype(np.float32), f"{name}.B"),
        numpy_helper.from_array((0.1 * rng.standard_normal(c)).astype(np.float32), f"{name}.mean"),
        numpy_helper.from_array((0.5 + rng.random(c)).astype(np.float32), f"{name}.var"),
    ]


def cnn_proto(
    rng: np.random.Generator, *, concat: bool = False, reshape: bool = False
) -> onnx.ModelProto:
    """A small CNN with the shapes structured pruning must follow through.

    x[N,3,8,8] -> conv1+BN+Relu -> conv2+BN (+ residual) -> Relu -> conv3 -> Relu
    -> MaxPool 2 -> Flatten (6·4·4) -> Gemm head.  With `concat`, conv3's output is
    concatenated with itself before pooling (an index mapping the pass does not handle); with
    `reshape`, Flatten is a Reshape to [-1, 96] as torch's exporter writes it (allowzero=1).
    """
    inits = (
        _conv(rng, "conv1", 3, 8)
        + _bn(rng, "bn1", 8)
        + _conv(rng, "conv2", 8, 8)
        + _bn(rng, "bn2", 8)
    )
    inits += _conv(rng, "conv3", 8, 6)
    flat = (12 if concat else 6) * 16
    inits += [
        numpy_helper.from_array(
            (rng.standard_normal((10, flat)) / np.sqrt(flat)).astype(np.float32), "head.weight"
        ),
        numpy_helper.from_array((0.1 * rng.standard_normal(10)).astype(np.float32), "head.bias"),
    ]
    inits.append(numpy_helper.from_array(np.array([-1, flat], dtype=np.int64), "flat_shape"))
    bn = ["scale", "B", "mean", "var"]
    nodes = [
        helper.make_node("Conv", ["x", "conv1.weight", "conv1.bias"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1"] + [f"bn1.{p}" for p in bn], ["n1"]),
        helper.make_node("Relu", ["n1"], ["r1"]),
        helper.make_node("Conv", ["r1", "conv2.weight", "conv2.bias"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c2"] + [f"bn2.{p}" for p in bn], ["n2"]),
        helper.make_node("Add", ["n2", "r1"], ["res"]),
        helper.make_node("Relu", ["res"], ["r2"]),
        helper.make_node("Conv", ["r2", "conv3.weight", "conv3.bias"], ["c3"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c3"], ["r3"]),
    ]
    pooled_input = "r3"
    if concat:
        nodes.append(helper.make_node("Concat", ["r3", "r3"], ["cat"], axis=1))
        pooled_input = "cat"
    nodes += [
        helper.make_node("MaxPool", [pooled_input], ["p3"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Reshape", ["p3", "flat_shape"], ["f3"], allowzero=1) if reshape
        else helper.make_node("Flatten", ["p3"], ["f3"], axis=1),
        helper.make_node("Gemm", ["f3", "head.weight", "head.bias"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        inits,
    )
    return finish(graph)


def cnn(rng: np.random.Generator, **kwargs: bool) -> ir.Model:
    return ir.from_proto(cnn_proto(rng, **kwargs))


def run(model: ir.Model | onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    proto = ir.to_proto(model) if isinstance(model, ir.Model) else model
    proto.ir_version = 10
    onnx.checker.check_model(proto, full_check=True)
    return runtime.session(proto.SerializeToString()).run(None, feeds)
