"""Graph surgery for one factorized layer: the weight's node becomes a pair of nodes.

The original node is kept as the second node of the pair (so its output value, its name in the
graph outputs and everything downstream are untouched) and reads the second factor; a new node
inserted before it reads the original input and the first factor. Factors become new
initializers of the main graph (visible from subgraphs as outer-scope values); the original
weight is removed once nothing reads it (initializer or `Constant` node). No tensor is edited in
place. The algebra of each kind is in `decompose`.
"""

from __future__ import annotations

__all__ = ["apply_factors", "taken_names", "plain_attributes"]

import logging

import numpy as np
import onnx_ir as ir

from onnxcompress.passes.lowrank.decompose import ConvAttributes
from onnxcompress.sites import WeightSite

logger = logging.getLogger(__name__)


def plain_attributes(node: ir.Node) -> dict[str, object]:
    """A node's attributes as plain Python values (ints, floats, lists, strings)."""
    return {name: attr.value for name, attr in node.attributes.items()}


def taken_names(model: ir.Model) -> set[str]:
    """Every value and node name used anywhere in the model (all graphs)."""
    names: set[str] = set()
    for graph in (model.graph, *model.graph.subgraphs()):
        names.update(v.name for v in graph.inputs if v.name)
        names.update(name for name in graph.initializers)
        for node in graph:
            if node.name:
                names.add(node.name)
            names.update(v.name for v in node.outputs if v.name)
    return names


def _unique(base: str, taken: set[str]) -> str:
    name, index = base, 1
    while name in taken:
        name = f"{base}_{index}"
        index += 1
    taken.add(name)
    return name


def _initializer(model: ir.Model, name: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
    value.shape = ir.Shape(array.shape)
    value.type = ir.TensorType(value.const_value.dtype)  # type: ignore[union-attr]
    model.graph.register_initializer(value)
    return value


def _drop_if_unused(site: WeightSite) -> None:
    value = site.value
    if value.uses() or value.is_graph_output():
        return
    if site.holder == "constant":
        producer = value.producer()
        if producer is not None and producer.graph is not None:
            producer.graph.remove(producer, safe=True)
        return
    graph, name = value.graph, value.name
    if graph is not None and name is not None and name in graph.initializers:
        graph.initializers.pop(name)


def _ints(name: str, values: tuple[int, ...] | list[int]) -> ir.Attr:
    return ir.AttrInt64s(name, [int(v) for v in values])


def _set_conv_attributes(
    node: ir.Node,
    kernel: list[int],
    strides: list[int],
    pads: list[int],
    dilations: list[int],
    group: int,
) -> None:
    node.attributes.pop("auto_pad", None)
    node.attributes["kernel_shape"] = _ints("kernel_shape", kernel)
    node.attributes["strides"] = _ints("strides", strides)
    node.attributes["pads"] = _ints("pads", pads)
    node.attributes["dilations"] = _ints("dilations", dilations)
    node.attributes["group"] = ir.AttrInt64("group", group)


def _conv_node(
    x: ir.Value, weight: ir.Value, hidden: ir.Value, name: str, attributes: dict[str, object]
) -> ir.Node:
    return ir.node("Conv", [x, weight], attributes=attributes, outputs=[hidden], name=name)  # type: ignore[arg-type]


def apply_factors(
    model: ir.Model,
    site: WeightSite,
    kind: str,
    first: np.ndarray,
    second: np.ndarray,
    conv: ConvAttributes | None = None,
    taken: set[str] | None = None,
) -> None:
    """Replace `site`'s node by the factor pair of `kind`; the caller has checked eligibility.

    The new first node reads the input and `first`; the original node, its attributes adjusted
    to the second factor's form, reads the first node's output and `second`.
    """
    taken = taken if taken is not None else taken_names(model)
    node = site.node
    graph = node.graph
    if graph is None:  # pragma: no cover - sites come from graphs
        raise RuntimeError(f"{site.name}: node {node.name!r} is not in a graph")
    x = node.inputs[0]
    if x is None:
        raise RuntimeError(f"{site.name}: node {node.name!r} has no data input")
    first_value = _initializer(model, _unique(f"{site.name}.lowrank_first", taken), first)
    second_value = _initializer(model, _unique(f"{site.name}.lowrank_second", taken), second)
    hidden = ir.Value(name=_unique(f"{site.name}.lowrank_hidden", taken))
    first_name = _unique(f"{node.name or site.name}.lowrank_first", taken)
    if kind == "matmul":
        new = ir.node("MatMul", [x, first_value], outputs=[hidden], name=first_name)
    elif kind == "gemm":
        gemm_attributes = {"transB": node.attributes.get_int("transB", 0)}
        gemm_attributes["transA"] = node.attributes.get_int("transA", 0)
        new = ir.node(
            "Gemm", [x, first_value], attributes=gemm_attributes, outputs=[hidden], name=first_name
        )
        node.attributes["transA"] = ir.AttrInt64("transA", 0)
    elif kind in ("conv_channel", "conv_spatial"):
        assert conv is not None
        split = _split_channel if kind == "conv_channel" else _split_spatial
        new = _conv_node(x, first_value, hidden, first_name, split(node, conv))
    else:
        raise ValueError(f"unknown kind {kind!r}")
    graph.insert_before(node, new)
    node.replace_input_with(0, hidden)
    node.replace_input_with(1, second_value)
    _drop_if_unused(site)
    logger.debug("%s: %s split into %s + %s", site.name, node.op_type, new.name, node.name)


def _split_channel(node: ir.Node, conv: ConvAttributes) -> dict[str, object]:
    """Channel form: the first conv keeps the k×k kernel; `node` becomes the 1×1 conv.

    Returns the first conv's attributes.
    """
    attributes: dict[str, object] = {
        "kernel_shape": list(conv.kernel),
        "strides": list(conv.strides),
        "dilations": list(conv.dilations),
        "group": conv.group,
    }
    if conv.auto_pad != "NOTSET":
        attributes["auto_pad"] = conv.auto_pad
    else:
        attributes["pads"] = list(conv.pads)
    ones = [1] * len(conv.kernel)
    _set_conv_attributes(node, ones, ones, [0] * (2 * len(ones)), ones, conv.group)
    return attributes


def _split_spatial(node: ir.Node, conv: ConvAttributes) -> dict[str, object]:
    """Spatial form: the first conv is kh×1, `node` becomes 1×kw; returns the first's attributes.

    The first conv takes the vertical stride, padding and dilation, `node` the horizontal ones.
    """
    kh, kw = conv.kernel
    sh, sw = conv.strides
    dh, dw = conv.dilations
    top, left, bottom, right = conv.pads if conv.auto_pad == "NOTSET" else (0, 0, 0, 0)
    _set_conv_attributes(node, [1, kw], [1, sw], [0, left, 0, right], [1, dw], conv.group)
    return {
        "kernel_shape": [kh, 1],
        "strides": [sh, 1],
        "pads": [top, 0, bottom, 0],
        "dilations": [dh, 1],
        "group": conv.group,
    }
