"""Tiny seeded models built inline with onnx.helper, for tests that need a real graph."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

OPSET = 21


def finish(graph: onnx.GraphProto, opset: int = OPSET, **kwargs: object) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], **kwargs)
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model


def mlp_proto(
    rng: np.random.Generator, sizes: tuple[int, ...] = (16, 32, 24, 10)
) -> onnx.ModelProto:
    """x -> [MatMul + Add + Relu] * (n-2) -> Gemm(transB=1): the shapes exported MLPs have."""
    nodes, inits = [], []
    current = "x"
    for index, (fan_in, fan_out) in enumerate(zip(sizes[:-2], sizes[1:-1], strict=True)):
        w = (rng.standard_normal((fan_in, fan_out)) / np.sqrt(fan_in)).astype(np.float32)
        b = (rng.standard_normal(fan_out) * 0.1).astype(np.float32)
        inits += [
            numpy_helper.from_array(w, f"fc{index}.weight"),
            numpy_helper.from_array(b, f"fc{index}.bias"),
        ]
        nodes += [
            helper.make_node("MatMul", [current, f"fc{index}.weight"], [f"h{index}"]),
            helper.make_node("Add", [f"h{index}", f"fc{index}.bias"], [f"a{index}"]),
            helper.make_node("Relu", [f"a{index}"], [f"r{index}"]),
        ]
        current = f"r{index}"
    fan_in, fan_out = sizes[-2], sizes[-1]
    w = (rng.standard_normal((fan_out, fan_in)) / np.sqrt(fan_in)).astype(np.float32)
    b = (rng.standard_normal(fan_out) * 0.1).astype(np.float32)
    inits += [numpy_helper.from_array(w, "head.weight"), numpy_helper.from_array(b, "head.bias")]
    nodes.append(
        helper.make_node("Gemm", [current, "head.weight", "head.bias"], ["logits"], transB=1)
    )
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", sizes[0]])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", sizes[-1]])],
        inits,
    )
    return finish(graph)


def mlp(rng: np.random.Generator, sizes: tuple[int, ...] = (16, 32, 24, 10)) -> ir.Model:
    return ir.from_proto(mlp_proto(rng, sizes))


def mlp_reference(proto: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """Numpy forward pass of `mlp_proto`, reading weights from the proto (after any pass)."""
    weights = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    h = x.astype(np.float64)
    index = 0
    while f"fc{index}.weight" in weights:
        h = np.maximum(h @ weights[f"fc{index}.weight"] + weights[f"fc{index}.bias"], 0)
        index += 1
    return h @ weights["head.weight"].T + weights["head.bias"]


def save_proto(proto: onnx.ModelProto, path) -> str:  # type: ignore[no-untyped-def]
    onnx.save(proto, str(path))
    return str(path)


#: CLI options for a loose gate: tests about mechanics (not fidelity) compress toy models hard.
NO_GATE = ("--min-cosine", "-1", "--min-rank-corr", "-1", "--min-top1", "0")
