"""Channel groups: which tensor entries one neuron / conv channel owns across the graph.

A *channel group* is a set of activations that share one channel index space: the output of
a MatMul / Gemm / Conv ("producer"), followed through per-channel ops (bias Add, Mul,
BatchNormalization, element-wise activations, pooling) up to the layers that read it
("consumers": the next MatMul / Gemm rows or Conv input channels). A residual Add of two
activations ties their channels, so both producers join one group. Each group lists the
`TensorCut`s that removing a channel implies; groups the analysis cannot map carry the reason.

Used by `prune.structured` (remove the weakest channels) and `prune.dead_neurons` (remove
channels left without connections).
"""

from __future__ import annotations

__all__ = [
    "TensorCut",
    "ChannelGroup",
    "find_channel_groups",
    "const_values",
    "UNARY_OPS",
    "BINARY_OPS",
    "SPATIAL_OPS",
    "PRODUCER_OPS",
]

import dataclasses
import logging
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxcompress.sites import constant_array

logger = logging.getLogger(__name__)

#: Ops applied element-wise with one activation input: channel c in, channel c out.
UNARY_OPS = frozenset(
    {
        "Relu", "LeakyRelu", "Sigmoid", "Tanh", "Elu", "Selu", "Gelu", "HardSigmoid", "HardSwish",
        "Softplus", "Softsign", "Erf", "Identity", "Dropout", "Abs", "Neg", "Exp", "Sqrt", "Mish",
        "Celu", "ThresholdedRelu", "Clip", "Cast",
    }
)
#: Binary ops with a constant operand broadcast per channel (or a scalar).
BINARY_OPS = frozenset({"Add", "Sub", "Mul", "Div"})
#: Spatial ops that keep the channel axis (axis 1) of an NC... activation.
SPATIAL_OPS = frozenset({"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool"})
PRODUCER_OPS = ("MatMul", "Gemm", "Conv")



@dataclasses.dataclass(frozen=True)
class TensorCut:
    """Delete entries of a constant tensor along `axis`.

    Channel c removes indices c·repeat … c·repeat + repeat − 1 (repeat > 1 behind a Flatten).
    """

    name: str
    axis: int
    role: str
    repeat: int = 1



# ---------------------------------------------------------------------------------------
# Constants: initializers or Constant-node outputs (read and written through onnxcompress.sites).


def const_values(graph: ir.Graph) -> dict[str, ir.Value]:
    """Name -> value of every constant tensor in the main graph."""
    found: dict[str, ir.Value] = {name: value for name, value in graph.initializers.items()}
    for node in graph:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.outputs[0].name:
            found[node.outputs[0].name] = node.outputs[0]
    return found


# ---------------------------------------------------------------------------------------
# Analysis: follow channels through the graph.


@dataclasses.dataclass
class ChannelGroup:
    """The result of tracing one channel space through the graph (before scoring)."""

    producers: list[tuple[str, int]]  # (weight name, out axis)
    consumers: list[tuple[str, int, int]]  # (weight name, in axis, repeat)
    cuts: list[TensorCut]
    activations: list[ir.Value]
    channels: int
    skip_reason: str | None = None
    # (shape const, index, repeat)
    reshapes: list[tuple[str, int, int]] = dataclasses.field(default_factory=list)


class _Unsupported(Exception):
    """The channel mapping is not handled here; the message is the skip reason."""


def _node_label(node: ir.Node) -> str:
    return f"{node.op_type} {node.name!r}" if node.name else node.op_type


def _weight_of(node: ir.Node) -> tuple[str, np.ndarray] | None:
    """The constant weight of a MatMul / Gemm / Conv node, if its weight is constant."""
    if len(node.inputs) < 2 or node.inputs[1] is None:
        return None
    array = constant_array(node.inputs[1])
    if array is None or not node.inputs[1].name:
        return None
    return node.inputs[1].name, array


def _producer_axes(node: ir.Node, weight: np.ndarray) -> tuple[int, int]:
    """(weight out axis, activation channel axis counted from the end)."""
    if node.op_type == "MatMul":
        if weight.ndim != 2:
            raise _Unsupported(f"{_node_label(node)} has a {weight.ndim}-D weight (batched MatMul)")
        return 1, -1
    if node.op_type == "Gemm":
        return (0 if node.attributes.get_int("transB", 0) else 1), -1
    if node.attributes.get_int("group", 1) != 1:
        raise _Unsupported(
            f"{_node_label(node)} is a grouped Conv (group > 1 ties in and out channels)"
        )
    return 0, 1 - weight.ndim


class _Tracer:
    """Grow one channel group from a seed producer by a worklist over activations."""

    def __init__(
        self, graph: ir.Graph, weight_users: Mapping[str, int], allowed: Callable[[str], bool]
    ):
        self.graph = graph
        self.weight_users = weight_users
        self.allowed = allowed
        self.outputs = {id(v) for v in graph.outputs}

    def trace(self, seed: ir.Node) -> ChannelGroup:
        weight = _weight_of(seed)
        assert weight is not None
        channels = int(weight[1].shape[_producer_axes(seed, weight[1])[0]])
        group = ChannelGroup([], [], [], [], channels)
        seen_nodes: set[int] = set()  # nodes passed through or read as consumers
        seen_producers: set[int] = set()
        seen_values: dict[int, tuple[int, int | None]] = {}  # id -> (neg axis, rank)
        work: list[tuple[str, Any]] = [("producer", seed)]
        try:
            while work:
                kind, item = work.pop()
                if kind == "producer":
                    if id(item) in seen_producers:
                        continue
                    seen_producers.add(id(item))
                    output, axis, rank = self._add_producer(group, item)
                    work.append(("value", (output, axis, rank)))
                elif kind == "value":
                    value, axis, rank = item
                    if id(value) in seen_values:
                        continue
                    seen_values[id(value)] = (axis, rank)
                    group.activations.append(value)
                    if id(value) in self.outputs:
                        raise _Unsupported(f"channels reach graph output {value.name!r}")
                    if value.is_graph_input():
                        raise _Unsupported(f"channels come from graph input {value.name!r}")
                    for consumer in value.consumers():
                        if id(consumer) not in seen_nodes:
                            work.extend(
                                self._forward(group, consumer, value, axis, rank, seen_nodes)
                            )
                    producer = value.producer()
                    if producer is None:
                        raise _Unsupported(f"activation {value.name!r} has no producer")
                    is_producer = producer.op_type in PRODUCER_OPS
                    if id(producer) not in (seen_producers if is_producer else seen_nodes):
                        work.extend(self._backward(group, producer, value, axis, rank, seen_nodes))
        except _Unsupported as reason:
            group.skip_reason = str(reason)
        if group.skip_reason is None:
            self._check_weights(group)
        return group

    # -- producers and consumers -------------------------------------------------------
    def _add_producer(self, group: ChannelGroup, node: ir.Node) -> tuple[ir.Value, int, int | None]:
        found = _weight_of(node)
        if found is None:
            raise _Unsupported(f"{_node_label(node)} has no constant weight")
        name, weight = found
        out_axis, act_axis = _producer_axes(node, weight)
        if weight.shape[out_axis] != group.channels:
            raise _Unsupported(
                f"tied producers disagree on the channel count ({name}: {weight.shape[out_axis]} "
                f"vs {group.channels})"
            )
        group.producers.append((name, out_axis))
        group.cuts.append(TensorCut(name, out_axis, "producer weight"))
        if node.op_type in ("Gemm", "Conv") and len(node.inputs) > 2 and node.inputs[2] is not None:
            bias = node.inputs[2]
            array = constant_array(bias)
            if array is None or not bias.name:
                raise _Unsupported(f"{_node_label(node)} has a non-constant bias")
            if (
                array.size == group.channels
                and array.ndim >= 1
                and array.shape[-1] == group.channels
            ):
                group.cuts.append(TensorCut(bias.name, array.ndim - 1, "producer bias"))
            elif array.size != 1:
                raise _Unsupported(
                    f"{_node_label(node)} bias of shape {array.shape} is not per channel"
                )
        rank: int | None
        if node.op_type == "Conv":
            rank = weight.ndim
        elif node.op_type == "Gemm":
            rank = 2
        else:
            shape = node.outputs[0].shape
            rank = len(shape) if shape is not None else None
        return node.outputs[0], act_axis, rank

    def _add_consumer(self, group: ChannelGroup, node: ir.Node, repeat: int) -> None:
        found = _weight_of(node)
        if found is None:
            raise _Unsupported(f"{_node_label(node)} reads the channels without a constant weight")
        name, weight = found
        if node.op_type == "MatMul":
            if weight.ndim != 2:
                raise _Unsupported(
                    f"{_node_label(node)} has a {weight.ndim}-D weight (batched MatMul)"
                )
            in_axis = 0
        elif node.op_type == "Gemm":
            if node.attributes.get_int("transA", 0):
                raise _Unsupported(f"{_node_label(node)} reads the channels transposed (transA=1)")
            in_axis = 1 if node.attributes.get_int("transB", 0) else 0
        else:
            if node.attributes.get_int("group", 1) != 1:
                raise _Unsupported(
                    f"{_node_label(node)} is a grouped Conv (group > 1 ties in and out channels)"
                )
            in_axis = 1
        if weight.shape[in_axis] != group.channels * repeat:
            raise _Unsupported(
                f"{_node_label(node)} input dimension {weight.shape[in_axis]} != "
                f"{group.channels} channels × {repeat}"
            )
        group.consumers.append((name, in_axis, repeat))
        group.cuts.append(TensorCut(name, in_axis, "consumer weight", repeat))

    # -- per-channel constants ---------------------------------------------------------
    def _per_channel_param(
        self, group: ChannelGroup, node: ir.Node, value: ir.Value, axis: int, rank: int | None
    ) -> None:
        array = constant_array(value)
        assert array is not None
        if array.size == 1:
            return
        param_axis = array.ndim + axis
        ok = param_axis >= 0 and array.shape[param_axis] == group.channels
        ok = ok and all(d == 1 for i, d in enumerate(array.shape) if i != param_axis)
        if rank is not None:
            ok = ok and array.ndim <= rank
        if not ok or not value.name:
            raise _Unsupported(
                f"{_node_label(node)} constant {value.name!r} of shape {array.shape} does not "
                f"broadcast per channel"
            )
        group.cuts.append(TensorCut(value.name, param_axis, f"{node.op_type} parameter"))

    # -- walking -----------------------------------------------------------------------
    def _forward(
        self, group: ChannelGroup, node: ir.Node, value: ir.Value, axis: int, rank: int | None,
        seen: set[int],
    ) -> list[tuple[str, Any]]:
        if node.graph is not self.graph:
            raise _Unsupported(f"channels are read inside a subgraph ({_node_label(node)})")
        op = node.op_type
        if node.domain not in ("", "ai.onnx"):
            raise _Unsupported(f"{_node_label(node)} (domain {node.domain}) reads the channels")
        index = next(i for i, v in enumerate(node.inputs) if v is value)
        if op in ("MatMul", "Gemm", "Conv") and index == 0:
            if op != "Conv" and axis != -1:
                raise _Unsupported(
                    f"{_node_label(node)} reads the channels on a non-contracted axis"
                )
            if op == "Conv" and (rank is None or axis != 1 - rank):
                raise _Unsupported(
                    f"{_node_label(node)} reads them on an axis other than its input channels"
                )
            seen.add(id(node))
            self._add_consumer(group, node, 1)
            return []
        if op in ("Flatten", "Reshape"):
            return self._flatten(group, node, value, axis, rank, seen)
        return self._through(group, node, axis, rank, seen)

    def _backward(
        self, group: ChannelGroup, node: ir.Node, value: ir.Value, axis: int, rank: int | None,
        seen: set[int],
    ) -> list[tuple[str, Any]]:
        if node.op_type in PRODUCER_OPS and node.outputs[0] is value:
            return [("producer", node)]
        return self._through(group, node, axis, rank, seen)

    def _through(
        self, group: ChannelGroup, node: ir.Node, axis: int, rank: int | None, seen: set[int]
    ) -> list[tuple[str, Any]]:
        """A channel-preserving node: its activation inputs and outputs join the group."""
        op = node.op_type
        if id(node) in seen:
            return []
        activations: list[ir.Value | None] = []
        if op in UNARY_OPS:
            activations = [node.inputs[0]]
            for extra in node.inputs[1:]:  # Clip min/max, Dropout ratio: scalars
                if extra is not None and (
                    (array := constant_array(extra)) is None or array.size != 1
                ):
                    raise _Unsupported(f"{_node_label(node)} has a non-scalar extra input")
        elif op in BINARY_OPS:
            constants = [v for v in node.inputs if v is not None and constant_array(v) is not None]
            activations = [v for v in node.inputs if v is not None and constant_array(v) is None]
            if op in ("Sub", "Div") and len(activations) == 2:
                raise _Unsupported(f"{_node_label(node)} combines two activations by {op}")
            if op in ("Mul",) and len(activations) == 2:
                raise _Unsupported(f"{_node_label(node)} multiplies two activations (gating)")
            if op == "Div" and node.inputs[1] in activations:
                raise _Unsupported(f"{_node_label(node)} divides by an activation")
            for constant in constants:
                self._per_channel_param(group, node, constant, axis, rank)
        elif op == "BatchNormalization":
            if rank is None or axis != 1 - rank:
                raise _Unsupported(
                    f"{_node_label(node)} normalises an axis other than the channels"
                )
            activations = [node.inputs[0]]
            for param in node.inputs[1:5]:
                if constant_array(param) is None or param is None or not param.name:
                    raise _Unsupported(f"{_node_label(node)} has non-constant parameters")
                group.cuts.append(TensorCut(param.name, 0, "BatchNormalization parameter"))
            if len([o for o in node.outputs if o is not None and o.name]) > 1:
                raise _Unsupported(f"{_node_label(node)} is in training mode (running stats out)")
        elif op in SPATIAL_OPS:
            if rank is None or axis != 1 - rank:
                raise _Unsupported(f"{_node_label(node)} pools over the channel axis")
            activations = [node.inputs[0]]
        else:
            raise _Unsupported(f"{_node_label(node)} reads the channels: index mapping not handled")
        seen.add(id(node))
        work: list[tuple[str, Any]] = [("value", (v, axis, rank)) for v in activations]
        work.append(("value", (node.outputs[0], axis, rank)))
        return work

    def _flatten(
        self, group: ChannelGroup, node: ir.Node, value: ir.Value, axis: int, rank: int | None,
        seen: set[int],
    ) -> list[tuple[str, Any]]:
        """Flatten(axis=1), or Reshape to [N, C·H·W], of N×C×H×W with a static H×W.

        Channel c becomes a block of H·W columns, read by the next MatMul / Gemm.
        """
        if rank is None or axis != 1 - rank:
            raise _Unsupported(f"{_node_label(node)} does not flatten from the channel axis")
        spatial = _static_spatial(value, rank)
        if spatial is None:
            raise _Unsupported(
                f"{_node_label(node)}: spatial size unknown, the flattened index mapping is unclear"
            )
        if node.op_type == "Flatten" and node.attributes.get_int("axis", 1) != 1:
            raise _Unsupported(f"{_node_label(node)} does not flatten from the channel axis")
        if node.op_type == "Reshape":
            self._reshape_target(group, node, value, spatial)
        seen.add(id(node))
        group.activations.append(node.outputs[0])
        if id(node.outputs[0]) in self.outputs:
            raise _Unsupported(f"channels reach graph output {node.outputs[0].name!r}")
        for consumer in node.outputs[0].consumers():
            if consumer.op_type in ("MatMul", "Gemm") and consumer.inputs[0] is node.outputs[0]:
                seen.add(id(consumer))
                self._add_consumer(group, consumer, spatial)
            else:
                raise _Unsupported(
                    f"{_node_label(consumer)} reads flattened channels: mapping not handled"
                )
        return []

    def _reshape_target(
        self, group: ChannelGroup, node: ir.Node, value: ir.Value, spatial: int
    ) -> None:
        """Accept Reshape(x, [a, C·H·W]) (rewritten when applied) or Reshape(x, [0, -1])."""
        target_value = node.inputs[1] if len(node.inputs) > 1 else None
        target = constant_array(target_value)
        if (
            node.inputs[0] is not value
            or target is None
            or target_value is None
            or not target_value.name
        ):
            raise _Unsupported(f"{_node_label(node)} has a non-constant target shape")
        if target.ndim != 1 or target.size != 2:
            raise _Unsupported(
                f"{_node_label(node)} to {target.tolist()}: only [N, C·H·W] is mapped"
            )
        first, second = int(target[0]), int(target[1])
        if node.attributes.get_int("allowzero", 0) and 0 in (first, second):
            raise _Unsupported(
                f"{_node_label(node)} to {target.tolist()} with allowzero=1: a literal 0 dimension"
            )
        if second == group.channels * spatial:
            if self.weight_users.get(target_value.name, 0) > 1:
                raise _Unsupported(
                    f"{_node_label(node)}: target shape {target_value.name!r} is shared"
                )
            group.reshapes.append((target_value.name, 1, spatial))
        elif not (second == -1 and first == 0):
            raise _Unsupported(
                f"{_node_label(node)} to {target.tolist()}: only [N, C·H·W] is mapped"
            )

    def _check_weights(self, group: ChannelGroup) -> None:
        for cut in group.cuts:
            # a bias or BN parameter too: merged zeros are common
            if self.weight_users.get(cut.name, 0) > 1:
                what = "weight" if cut.role.endswith("weight") else cut.role
                group.skip_reason = f"{what} {cut.name!r} is shared by several nodes"
                return
            if cut.role.endswith("weight") and not self.allowed(cut.name):
                group.skip_reason = f"weight {cut.name!r} is excluded"
                return
        if not group.consumers:
            group.skip_reason = "no consumer layer reads the channels"


def _static_spatial(value: ir.Value, rank: int) -> int | None:
    """H·W·… of an N×C×spatial activation when every spatial dimension is static."""
    shape = value.shape
    if shape is not None and len(shape) == rank:
        dims = [d for d in list(shape)[2:] if isinstance(d, int)]
        if len(dims) == rank - 2:  # every spatial dimension static
            return int(np.prod(dims)) if dims else 1
    # Global pooling leaves 1×1 whatever the input was.
    producer = value.producer()
    if producer is not None and producer.op_type in ("GlobalAveragePool", "GlobalMaxPool"):
        return 1
    return None


def find_channel_groups(
    model: ir.Model, *, allowed: Callable[[str], bool] = lambda name: True
) -> list[ChannelGroup]:
    """Every channel group of the main graph, each seeded by its first producer."""
    graph = model.graph
    _infer_shapes(model)
    weight_users: dict[str, int] = {}
    for node in ir.traversal.RecursiveGraphIterator(graph):
        for value in node.inputs:
            if value is not None and value.name and constant_array(value) is not None:
                weight_users[value.name] = weight_users.get(value.name, 0) + 1
    tracer = _Tracer(graph, weight_users, allowed)
    groups: list[ChannelGroup] = []
    claimed: set[str] = set()
    for node in graph:
        if node.op_type not in PRODUCER_OPS or node.domain not in ("", "ai.onnx"):
            continue
        found = _weight_of(node)
        if found is None or found[0] in claimed:
            continue
        try:
            _producer_axes(node, found[1])
        except _Unsupported as reason:
            groups.append(ChannelGroup([(found[0], -1)], [], [], [], 0, str(reason)))
            claimed.add(found[0])
            continue
        group = tracer.trace(node)
        if not group.producers:
            group.producers.append((found[0], -1))
        claimed.update(name for name, _ in group.producers)
        groups.append(group)
    return groups


def _infer_shapes(model: ir.Model) -> None:
    """Fill activation shapes (for ranks and Flatten sizes) with onnx shape inference."""
    import onnx

    try:
        proto = ir.to_proto(model)
        inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=False)
    except Exception as error:  # shape inference is a convenience; missing shapes mean skips
        logger.debug("shape inference failed: %s", error)
        return
    shapes = {}
    for info in list(inferred.graph.value_info) + list(inferred.graph.output):
        if info.type.HasField("tensor_type") and info.type.tensor_type.HasField("shape"):
            dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                    for d in info.type.tensor_type.shape.dim]
            shapes[info.name] = (dims, info.type.tensor_type.elem_type)
    for node in model.graph:
        for output in node.outputs:
            if output.shape is None and output.name in shapes:
                dims, elem_type = shapes[output.name]
                output.shape = ir.Shape(dims)
                if output.type is None and elem_type:
                    output.dtype = ir.DataType(elem_type)


