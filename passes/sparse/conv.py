"""Pruned Conv layers for `sparse.csr`: which can become SparseConv, their arrays, their timing.

A Conv whose weight is a constant fp32 [M, C/group, k] or [M, C/group, kh, kw] tensor read by
that node alone becomes `ai.onnxcompress.SparseConv(X, values, col_indices, row_ptr, bias)`
(layout in conv_layout.py); the bias is Conv's own (zeros when absent). auto_pad is resolved to
explicit pads (SAME_* needs the input's spatial size from shape inference). The decision
times onnxruntime's Conv and the kernel on one-node models at the user's batch and the layer's
own spatial size: the weights come cold from memory (the caches are flushed, as in a model
whose weights exceed them) while the input is warm (in a network the previous layer has just
written it).
"""

from __future__ import annotations

__all__ = ["ConvLayer", "conv_layer", "measure_conv", "value_shapes"]

import dataclasses
from collections.abc import Mapping

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from onnxcompress import runtime
from onnxcompress.formats.conv_layout import ConvGeometry
from onnxcompress.formats.kernel_ops import DOMAIN, OPSET_VERSION
from onnxcompress.sites import WeightSite
from onnxcompress.timing import interleaved_medians


@dataclasses.dataclass(frozen=True)
class ConvLayer:
    """A Conv that can become SparseConv: its weight, bias, geometry and input shape (if known)."""

    weight: np.ndarray  # [M, C/group, k...] float32
    bias: np.ndarray  # [M] float32
    geometry: ConvGeometry
    input_shape: tuple[int | None, ...] | None  # [N, C, spatial...] from shape inference


def value_shapes(
    model: ir.Model, probes: Mapping[str, np.ndarray] | None = None
) -> dict[str, tuple[int | None, ...]]:
    """Every value's shape onnx shape inference can tell (unknown dims None).

    Graph inputs take the size of one probe sample where they have symbolic dims.
    """
    proto = ir.to_proto(model)
    for graph_input in proto.graph.input:
        probe = (probes or {}).get(graph_input.name)
        dims = graph_input.type.tensor_type.shape.dim
        if probe is not None and len(dims) == probe.ndim:
            for dim, size in zip(dims, (1, *probe.shape[1:]), strict=True):
                dim.Clear()
                dim.dim_value = int(size)
    inferred = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    shapes: dict[str, tuple[int | None, ...]] = {}
    for info in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        if info.type.tensor_type.HasField("shape"):
            shapes[info.name] = tuple(
                d.dim_value if d.HasField("dim_value") else None
                for d in info.type.tensor_type.shape.dim
            )
    return shapes


def _ints(node: ir.Node, name: str) -> list[int] | None:
    values = node.attributes.get_ints(name)
    return [int(v) for v in values] if values else None


def _resolved_pads(
    node: ir.Node,
    kernel: tuple[int, ...],
    strides: list[int],
    dilations: list[int],
    input_shape: tuple[int | None, ...] | None,
) -> list[int] | str:
    """Explicit pads for any auto_pad, or why they cannot be known."""
    spatial = len(kernel)
    auto_pad = node.attributes.get_string("auto_pad", "NOTSET")
    if auto_pad == "NOTSET":
        return _ints(node, "pads") or [0] * (2 * spatial)
    if auto_pad == "VALID":
        return [0] * (2 * spatial)
    sizes = input_shape[2:] if input_shape is not None else ()
    if len(sizes) != spatial or any(d is None for d in sizes):
        return (
            f"auto_pad={auto_pad} needs the input's spatial size, which shape inference cannot tell"
        )
    begin, end = [], []
    for a in range(spatial):
        size = int(sizes[a])  # type: ignore[arg-type]
        out = -(-size // strides[a])
        total = max((out - 1) * strides[a] + (kernel[a] - 1) * dilations[a] + 1 - size, 0)
        small, large = total // 2, total - total // 2
        begin.append(small if auto_pad == "SAME_UPPER" else large)
        end.append(large if auto_pad == "SAME_UPPER" else small)
    return begin + end


def conv_layer(site: WeightSite, input_shape: tuple[int | None, ...] | None) -> ConvLayer | str:
    """The layer's SparseConv parts.

    Or why it stays dense (eligibility of the weight itself is checked by the caller: one reader,
    fp32, main graph).
    """
    node = site.node
    if len(site.shape) not in (3, 4):
        return f"Conv weight is {len(site.shape)}-D; SparseConv takes 1-D and 2-D convolutions"
    if site.input_index != 1:
        return "weight is not Conv's W input"
    weight = np.ascontiguousarray(site.array(), dtype=np.float32)
    kernel = tuple(int(k) for k in weight.shape[2:])
    spatial = len(kernel)
    strides = _ints(node, "strides") or [1] * spatial
    dilations = _ints(node, "dilations") or [1] * spatial
    pads = _resolved_pads(node, kernel, strides, dilations, input_shape)
    if isinstance(pads, str):
        return pads
    group = node.attributes.get_int("group", 1)
    bias_value = node.inputs[2] if len(node.inputs) > 2 else None
    if bias_value is None:
        bias = np.zeros(weight.shape[0], dtype=np.float32)
    elif bias_value.const_value is None:
        return "Conv bias B is not a constant"
    else:
        bias = np.ascontiguousarray(bias_value.const_value.numpy(), dtype=np.float32).reshape(-1)
    geometry = ConvGeometry.of(tuple(weight.shape), strides, pads, dilations, group)
    return ConvLayer(weight, bias, geometry, input_shape)


def _one_node_model(
    node: onnx.NodeProto, initializers: list[onnx.TensorProto], x_shape: list[int]
) -> bytes:
    graph = helper.make_graph(
        [node],
        "layer",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
        initializer=initializers,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, OPSET_VERSION)],
    )
    model.ir_version = 8
    return model.SerializeToString()


def layer_models(
    layer: ConvLayer, arrays: dict[str, np.ndarray], x_shape: list[int]
) -> dict[str, bytes]:
    """One-node models: onnxruntime's Conv, SparseConv, and Identity (the cost of a call)."""
    attributes = layer.geometry.attributes()
    del attributes["weight_shape"]
    dense = helper.make_node(
        "Conv", ["X", "W", "B"], ["Y"], kernel_shape=list(layer.weight.shape[2:]), **attributes
    )
    sparse = helper.make_node(
        "SparseConv", ["X", *arrays, "B"], ["Y"], domain=DOMAIN, **layer.geometry.attributes()
    )
    bias = numpy_helper.from_array(layer.bias, "B")
    return {
        "dense": _one_node_model(
            dense, [numpy_helper.from_array(layer.weight, "W"), bias], x_shape
        ),
        "sparse": _one_node_model(
            sparse,
            [
                *(numpy_helper.from_array(np.ascontiguousarray(a), n) for n, a in arrays.items()),
                bias,
            ],
            x_shape,
        ),
        "overhead": _one_node_model(helper.make_node("Identity", ["X"], ["Y"]), [], x_shape),
    }


def measure_conv(
    layer: ConvLayer,
    arrays: dict[str, np.ndarray],
    x_shape: list[int],
    *,
    threads: int | None = None,
    repeats: int = 15,
    cold_cache: bool = True,
    seed: int = 0,
) -> dict[str, float]:
    """Median seconds of onnxruntime's Conv, of SparseConv, and of a call that computes nothing.

    Alternating in one process (`timing.interleaved_medians`); with `cold_cache` every call
    starts with the caches flushed and then the input rewritten (warm input, cold weights).
    """
    models = layer_models(layer, arrays, x_shape)
    sessions = [runtime.session(model, threads=threads) for model in models.values()]
    x = np.random.default_rng(seed).standard_normal(x_shape).astype(np.float32)
    medians = interleaved_medians(
        sessions, {"X": x}, repeats=repeats, cold_cache=cold_cache, warm_inputs=cold_cache
    )
    return dict(zip(models, medians, strict=True))
