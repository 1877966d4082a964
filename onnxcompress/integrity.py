"""Structural checks run once when a model is loaded, listing every offender in one error.

protobuf parses many files that are not usable models: a cycle, an output nothing produces,
a negative or UNDEFINED type, an initializer whose bytes do not match its shape, an attribute
of the wrong type. Each would otherwise surface later as a crash deep inside a pass (a
clone, a reshape, a dtype lookup), so they are found up front, without reading any weight.
"""

from __future__ import annotations

__all__ = ["model_problems", "summarize", "MAX_LISTED"]

import math

import onnx
import onnx_ir as ir

from onnxcompress.io import iter_graphs, iter_tensors

#: Problems named in the error line; the rest are counted.
MAX_LISTED = 4


def model_problems(model: ir.Model) -> list[str]:
    """Every structural problem of `model`, in graph order (empty when it is sound).

    An acyclic graph whose nodes are merely out of order is sorted in place, as ONNX requires.
    """
    problems: list[str] = []
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))
    for graph in iter_graphs(model.graph):
        if not isinstance(graph, ir.Graph):  # functions are not nested in the main graph
            continue
        problems += _order_problems(graph)
        problems += _output_problems(graph)
        problems += _value_problems(graph)
        problems += _attribute_problems(graph, opset)
    problems += [problem for tensor in iter_tensors(model) for problem in _tensor_problems(tensor)]
    return problems


def summarize(problems: list[str]) -> str:
    """One line: the first `MAX_LISTED` problems and how many more there are."""
    shown = "; ".join(problems[:MAX_LISTED])
    more = len(problems) - MAX_LISTED
    return shown + (f"; and {more} more" if more > 0 else "")


def _node_name(node: ir.Node) -> str:
    return repr(node.name or node.op_type)


def _order_problems(graph: ir.Graph) -> list[str]:
    """A cycle is refused; nodes merely out of order are sorted.

    Sorting here, once, spares every later copy of the graph from failing on the order.
    """
    seen: set[int] = set()
    in_order = True
    for node in graph:
        for value in node.inputs:
            producer = value.producer() if value is not None else None
            if producer is not None and producer.graph is graph and id(producer) not in seen:
                in_order = False
        seen.add(id(node))
    if in_order:
        return []
    try:
        graph.sort()
    except ValueError:
        return [
            f"graph {graph.name or 'main'!r} has a cycle "
            "(a node reads its own output, directly or not)"
        ]
    return []


def _output_problems(graph: ir.Graph) -> list[str]:
    return [
        f"graph output {value.name!r} is produced by no node, input or initializer"
        for value in graph.outputs
        if value.producer() is None and not value.is_graph_input() and not value.is_initializer()
        and (value.graph is graph or value.graph is None)
    ]


def _value_problems(graph: ir.Graph) -> list[str]:
    """Graph inputs and outputs: a defined element type and no negative dimension."""
    problems = []
    for kind, values in (("input", graph.inputs), ("output", graph.outputs)):
        for value in values:
            if value.dtype == ir.DataType.UNDEFINED:
                problems.append(f"graph {kind} {value.name!r} has the UNDEFINED element type")
            dims = list(value.shape or ())
            if any(isinstance(d, int) and d < 0 for d in dims):
                problems.append(
                    f"graph {kind} {value.name!r} has a negative dimension {value.shape}"
                )
    return problems


def _attribute_problems(graph: ir.Graph, opset: int) -> list[str]:
    """Attributes whose type is not the one the standard op's schema declares (transB='yes')."""
    problems = []
    for node in graph:
        if node.domain not in ("", "ai.onnx"):
            continue
        declared = _schema_attributes(node.op_type, opset)
        for name, attr in node.attributes.items():
            if attr.is_ref() or name not in declared or declared[name] == attr.type.value:
                continue
            want = ir.AttributeType(declared[name]).name
            problems.append(
                f"node {_node_name(node)} ({node.op_type}): "
                f"attribute {name!r} is {attr.type.name}, "
                f"{node.op_type} expects {want}"
            )
    return problems


_SCHEMAS: dict[tuple[str, int], dict[str, int]] = {}


def _schema_attributes(op_type: str, opset: int) -> dict[str, int]:
    """Attribute name -> AttributeProto type of a standard op (empty for an unknown op)."""
    key = (op_type, opset)
    if key not in _SCHEMAS:
        try:
            schema = onnx.defs.get_schema(op_type, opset, "")
        except onnx.defs.SchemaError:
            _SCHEMAS[key] = {}
        else:
            # onnx's stub declares OpSchema.AttrType as a plain class; at run time it is an enum
            _SCHEMAS[key] = {
                name: int(a.type.value)  # type: ignore[attr-defined]
                for name, a in schema.attributes.items()
            }
    return _SCHEMAS[key]


def _tensor_problems(tensor: ir.TensorProtocol) -> list[str]:
    """A constant with no element type, a negative dimension, or bytes that do not fit its shape."""
    where = f"tensor {tensor.name!r}"
    if tensor.dtype == ir.DataType.UNDEFINED:
        return [f"{where} has the UNDEFINED element type"]
    shape = list(tensor.shape.dims) if tensor.shape is not None else []
    dims = [d for d in shape if isinstance(d, int)]
    if len(dims) < len(shape) or any(d < 0 for d in dims):
        return [f"{where} has a negative dimension {shape}"]
    if isinstance(tensor, ir.ExternalTensor):
        needed = _bytes_for(tensor.dtype, math.prod(dims))
        if tensor.length is not None and needed is not None and tensor.length < needed:
            return [f"{where} has shape {dims} ({needed:,} bytes of {tensor.dtype.name}) "
                    f"but its external data length is {tensor.length:,} bytes"]
        return []
    proto = tensor.raw if isinstance(tensor, ir.TensorProtoTensor) else None
    if not isinstance(proto, onnx.TensorProto):
        return []
    return _proto_size_problems(where, proto, tensor.dtype, dims)


def _bytes_for(dtype: ir.DataType, count: int) -> int | None:
    try:
        return -(-count * dtype.bitwidth // 8)
    except TypeError:  # strings have no fixed width
        return None


def _proto_size_problems(
    where: str, proto: onnx.TensorProto, dtype: ir.DataType, dims: list[int]
) -> list[str]:
    """The stored data must hold exactly what the shape declares (a huge or zero dimension lies)."""
    count = math.prod(dims)
    if proto.HasField("raw_data"):
        needed = _bytes_for(dtype, count)
        if needed is not None and len(proto.raw_data) != needed:
            return [f"{where} has shape {dims} ({needed:,} bytes of {dtype.name}) "
                    f"but holds {len(proto.raw_data):,} bytes"]
        return []
    try:
        field = onnx.helper.tensor_dtype_to_field(dtype.value)
    except (KeyError, ValueError, TypeError):
        return []
    stored = len(getattr(proto, field))
    expected = count * 2 if dtype in (ir.DataType.COMPLEX64, ir.DataType.COMPLEX128) else count
    if dtype != ir.DataType.STRING and dtype.bitwidth < 8:
        expected = -(-count * dtype.bitwidth // 8)  # packed: one byte per stored number
    if stored != expected:
        return [
            f"{where} has shape {dims} ({expected:,} values of {dtype.name}) but holds {stored:,}"
        ]
    return []
