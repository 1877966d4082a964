"""Han's dead-neuron removal: after unstructured pruning, drop neurons with no connections left.

Han et al., "Learning both Weights and Connections for Efficient Neural Networks", NIPS 2015,
§3.3: "after pruning connections, neurons with zero input connections or zero output
connections may be safely pruned". Here a neuron is one channel of a channel group (see
`structured.py`), so removal shrinks every tensor along the chain.

Exact, not lossy, by construction:

* no outgoing connection: every consumer weight row of the channel is zero, so the channel
  contributes nothing downstream; removing it is exact whatever it computes;
* no incoming connection: every producer filter of the channel is zero, so the channel
  carries a constant (its bias pushed through the per-channel ops). It is removed only when
  that constant is exactly zero where the consumers read it (e.g. a zero bias, or a negative
  bias behind a Relu); a non-zero constant would shift the next layer, so the channel stays
  and the count is reported (`constant_channels_kept`).
"""

from __future__ import annotations

__all__ = [
    "DeadNeuronConfig",
    "DeadNeuronPass",
    "DeadNeuronPlan",
    "dead_channels",
    "plan_dead_neurons",
]

import dataclasses
import fnmatch
import logging
import math

import numpy as np
import onnx_ir as ir
import pydantic

from onnxcompress.pass_base import PassConfig, PassReport, PlannedPass, register
from onnxcompress.passes.prune.channels import (
    BINARY_OPS,
    ChannelGroup,
    find_channel_groups,
)
from onnxcompress.passes.prune.structured import (
    GroupPlan,
    StructuredPlan,
    apply_plan,
    record_changes,
)
from onnxcompress.sites import constant_array

logger = logging.getLogger(__name__)


def _channel_slices(array: np.ndarray, axis: int, channels: int, repeat: int) -> np.ndarray:
    """(channels, rest) view of a weight: row c holds every entry of channel c."""
    moved = np.moveaxis(array, axis, 0)
    return moved.reshape(channels, repeat * int(np.prod(moved.shape[1:], dtype=np.int64)))


def _constant(value: ir.Value | None) -> np.ndarray:
    """A parameter the channel tracer already proved constant (it refuses groups with others)."""
    array = constant_array(value)
    if array is None:  # pragma: no cover - find_channel_groups refuses such groups
        raise ValueError(f"{value.name if value is not None else 'an input'} is not a constant")
    return array


def _per_channel(array: np.ndarray, channels: int) -> np.ndarray:
    return (
        np.full(channels, float(array.reshape(-1)[0]))
        if array.size == 1
        else array.reshape(channels).astype(np.float64)
    )


_UNARY = {
    "Relu": lambda x, n: np.maximum(x, 0.0),
    "Identity": lambda x, n: x,
    "Dropout": lambda x, n: x,
    "Sigmoid": lambda x, n: 1.0 / (1.0 + np.exp(-x)),
    "Tanh": lambda x, n: np.tanh(x),
    "Neg": lambda x, n: -x,
    "Abs": lambda x, n: np.abs(x),
    "Erf": lambda x, n: np.vectorize(math.erf)(x),
    "LeakyRelu": lambda x, n: np.where(x >= 0, x, x * n.attributes.get_float("alpha", 0.01)),
}


def _constant_outputs(model: ir.Model, group: ChannelGroup) -> np.ndarray:
    """The per-channel constant each consumer reads when every producer filter is zero.

    Evaluated through the group's nodes in graph order; NaN where an op is not modelled.
    Returns the elementwise max of |constant| over consumer inputs (0 means removable).
    """
    channels = group.channels
    members = {id(v) for v in group.activations}
    values: dict[int, np.ndarray] = {}
    unknown = np.full(channels, np.nan)
    producers = {name for name, _ in group.producers}
    reads = np.zeros(channels)
    unread = np.zeros(channels, dtype=bool)
    for node in model.graph:
        inputs = [v for v in node.inputs if v is not None and id(v) in members]
        if node.op_type in ("MatMul", "Gemm", "Conv") and node.inputs[1] is not None:
            if inputs and node.inputs[0] is not None and id(node.inputs[0]) in members:
                seen = values.get(id(node.inputs[0]), unknown)
                unread |= np.isnan(seen)
                reads = np.maximum(reads, np.abs(np.nan_to_num(seen)))
            if node.inputs[1].name in producers:
                bias = np.zeros(channels)
                if node.op_type != "MatMul" and len(node.inputs) > 2 and node.inputs[2] is not None:
                    beta = node.attributes.get_float("beta", 1.0) if node.op_type == "Gemm" else 1.0
                    bias = beta * _per_channel(_constant(node.inputs[2]), channels)
                values[id(node.outputs[0])] = bias
            continue
        if not inputs or id(node.outputs[0]) not in members:
            continue
        known = [values.get(id(v), unknown) for v in inputs]
        values[id(node.outputs[0])] = _evaluate(node, known, channels)
    return np.where(unread, np.nan, reads)


def _evaluate(node: ir.Node, known: list[np.ndarray], channels: int) -> np.ndarray:
    op = node.op_type
    x = known[0]
    if op in _UNARY:
        return _UNARY[op](x, node)
    if op in ("MaxPool", "GlobalMaxPool", "GlobalAveragePool", "Flatten", "Reshape"):
        return x
    if op == "BatchNormalization":
        scale, bias, mean, var = (_constant(v).astype(np.float64) for v in node.inputs[1:5])
        epsilon = node.attributes.get_float("epsilon", 1e-5)
        return (x - mean) / np.sqrt(var + epsilon) * scale + bias
    if op in BINARY_OPS:
        if len(known) == 2:
            return known[0] + known[1]  # a residual Add (the only two-activation op allowed)
        first_is_activation = constant_array(node.inputs[0]) is None
        const = _per_channel(_constant(node.inputs[1 if first_is_activation else 0]), channels)
        a, b = (x, const) if first_is_activation else (const, x)
        return {"Add": a + b, "Sub": a - b, "Mul": a * b, "Div": a / b}[op]
    return np.full(channels, np.nan)


def dead_channels(model: ir.Model, group: ChannelGroup) -> tuple[list[int], int]:
    """(channels safe to remove, channels with no input but a non-zero constant output)."""
    constants = {v.name: v for v in model.graph.initializers.values()}
    for node in model.graph:
        if node.op_type == "Constant":
            constants[node.outputs[0].name] = node.outputs[0]

    def array(name: str) -> np.ndarray:
        found = constant_array(constants[name])
        assert found is not None
        return found

    channels = group.channels
    no_output = np.ones(channels, dtype=bool)
    for name, axis, repeat in group.consumers:
        no_output &= ~_channel_slices(array(name), axis, channels, repeat).any(axis=1)
    no_input = np.ones(channels, dtype=bool)
    for name, axis in group.producers:
        no_input &= ~_channel_slices(array(name), axis, channels, 1).any(axis=1)
    constant_zero = np.zeros(channels, dtype=bool)
    if no_input.any():
        reads = _constant_outputs(model, group)
        constant_zero = np.nan_to_num(reads, nan=1.0) == 0.0
    removable = no_output | (no_input & constant_zero)
    kept_constant = int(np.count_nonzero(no_input & ~constant_zero & ~no_output))
    return [int(c) for c in np.flatnonzero(removable)], kept_constant


@dataclasses.dataclass
class DeadNeuronPlan(StructuredPlan):
    """A structured plan removing every dead channel, and how many constant channels stay."""

    constant_channels_kept: int = 0


def plan_dead_neurons(model: ir.Model, *, exclude: tuple[str, ...] = ()) -> DeadNeuronPlan:
    """A structured plan removing every dead channel; and the count of constant channels kept."""

    def allowed(name: str) -> bool:
        return not any(fnmatch.fnmatchcase(name, p) for p in exclude)

    plans = []
    constant_kept = 0
    for group in find_channel_groups(model, allowed=allowed):
        plan = GroupPlan.from_group(group)
        if group.skip_reason is None:
            dead, kept = dead_channels(model, group)
            constant_kept += kept
            if len(dead) == group.channels:
                dead = dead[1:]  # keep one channel: a zero-width layer is not a layer
            plan.keep = [c for c in range(group.channels) if c not in set(dead)]
            if not dead:
                plan.skip_reason = "no dead neurons"
        plans.append(plan)
    return DeadNeuronPlan("dead", None, plans, constant_channels_kept=constant_kept)


class DeadNeuronConfig(PassConfig):
    """Options of `prune.dead_neurons`: which channel groups are left whole."""

    exclude: tuple[str, ...] = pydantic.Field(
        (), description="Weight-name globs: a group touching one of them is left whole."
    )


@register
class DeadNeuronPass(PlannedPass[DeadNeuronPlan]):
    """Remove neurons / channels left without input or output connections (exact)."""

    name = "prune.dead_neurons"
    summary = "Han et al. 2015: remove neurons with no incoming or no outgoing connections (exact)."
    Config = DeadNeuronConfig
    config: DeadNeuronConfig
    lossy = False

    def plan(self, model: ir.Model) -> DeadNeuronPlan:
        """The neurons left without connections, per channel group, before any edit."""
        return plan_dead_neurons(model, exclude=self.config.exclude)

    def record_plan(self, plan: DeadNeuronPlan, report: PassReport) -> None:
        """The plan's account plus the constant channels kept (removing them would not be exact)."""
        super().record_plan(plan, report)
        report.notes["constant_channels_kept"] = plan.constant_channels_kept

    def apply(self, model: ir.Model, plan: DeadNeuronPlan, report: PassReport) -> bool:
        """Remove the neurons left without connections, where that is exact; report each group."""
        self.record_plan(plan, report)
        changed = apply_plan(model, plan)
        record_changes(changed, report)
        return bool(changed)
