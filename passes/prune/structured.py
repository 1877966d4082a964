"""Structured pruning: remove whole neurons and conv output channels, shrinking every tensor.

References: Wen et al., "Learning Structured Sparsity in Deep Neural Networks", NIPS 2016
(filter/channel removal); Li et al., "Pruning Filters for Efficient ConvNets", ICLR 2017
(L1 norm of a filter as its importance); Molchanov et al. 2017 (first-order Taylor).

The channel groups come from `channels.py`: one channel index space traced from its
producers (MatMul / Gemm / Conv) through per-channel ops to its consumers, residual Adds
tying producers together. Removing channel c of a group deletes, physically:

* column/filter c of every producer weight, and its bias entry;
* entry c of every per-channel parameter on the way (bias, scale, BN scale/B/mean/var);
* row/input-channel c of every consumer weight (c·HW … (c+1)·HW−1 behind a Flatten of a
  static C×H×W activation).

Exactness: the pruned model computes exactly what the original computes with the removed
channels' consumer rows set to zero, so when the removed channels carry zero activations
(or zero outgoing weights) the outputs are unchanged up to float rounding. Otherwise it is
lossy with no a-priori bound; the pipeline's fidelity gate is the guard.

Groups the analysis cannot map are skipped with a reason: channels that reach a graph
output, ops whose index mapping is not handled (Concat, Split, Reshape, Transpose, ...),
grouped convolutions, weights shared between nodes, excluded names.

Plan first, apply second (a `PlannedPass`): `plan_structured` returns a serialisable
`StructuredPlan` (`--dry-run` prints it); `apply_plan` performs it.
"""

from __future__ import annotations

__all__ = [
    "GroupPlan",
    "StructuredPlan",
    "plan_structured",
    "apply_plan",
    "StructuredPruneConfig",
    "StructuredPrunePass",
]

import dataclasses
import fnmatch
import json
import logging
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import numpy as np
import onnx_ir as ir
import pydantic

from onnxcompress.errors import RecipeError, UnsupportedModelError
from onnxcompress.pass_base import (
    PassConfig,
    PassContext,
    PassReport,
    PlannedPass,
    PlanTable,
    Skip,
    register,
)
from onnxcompress.passes.prune.channels import (
    ChannelGroup,
    TensorCut,
    const_values,
    find_channel_groups,
)
from onnxcompress.sites import set_constant

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------
# The serialisable plan.


@dataclasses.dataclass
class GroupPlan:
    """One channel group: its tensors, channel scores, and which channels stay."""

    name: str
    channels: int
    producers: list[str]
    consumers: list[str]
    cuts: list[TensorCut]
    activations: list[str]
    scores: list[float] = dataclasses.field(default_factory=list)
    keep: list[int] = dataclasses.field(default_factory=list)
    skip_reason: str | None = None
    reshapes: list[tuple[str, int, int]] = dataclasses.field(default_factory=list)

    @property
    def removed(self) -> list[int]:
        """The channels the plan drops."""
        kept = set(self.keep)
        return [c for c in range(self.channels) if c not in kept]

    def to_dict(self) -> dict[str, Any]:
        """The group as JSON-ready values; a skipped group removes nothing."""
        out = dataclasses.asdict(self)
        out["removed"] = self.removed if self.skip_reason is None else []
        return out

    @classmethod
    def from_group(cls, group: ChannelGroup) -> GroupPlan:
        """The plan entry of a traced group, before any channel is chosen."""
        return cls(
            name="+".join(name for name, _ in group.producers),
            channels=group.channels,
            producers=[n for n, _ in group.producers],
            consumers=[n for n, _, _ in group.consumers],
            cuts=list(group.cuts),
            activations=[v.name or "" for v in group.activations],
            skip_reason=group.skip_reason,
            reshapes=list(group.reshapes),
        )

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> GroupPlan:
        """A group from a plan file, unknown keys ignored."""
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in raw.items() if k in fields}
        values["cuts"] = [TensorCut(**c) for c in raw.get("cuts", [])]
        values["reshapes"] = [tuple(r) for r in raw.get("reshapes", [])]
        return cls(**values)


@dataclasses.dataclass
class StructuredPlan:
    """Every channel group found, with the channels each keeps (or why it is skipped)."""

    criterion: str
    ratio: float | None
    groups: list[GroupPlan]

    def active(self) -> list[GroupPlan]:
        """The groups the plan actually shrinks."""
        return [g for g in self.groups if g.skip_reason is None and len(g.keep) < g.channels]

    def skips(self) -> list[Skip]:
        """The channel groups left whole, each with its reason."""
        return [Skip(g.name, g.skip_reason) for g in self.groups if g.skip_reason is not None]

    def to_dict(self) -> dict[str, Any]:
        """The plan as JSON-ready values."""
        return {
            "criterion": self.criterion,
            "ratio": self.ratio,
            "groups": [g.to_dict() for g in self.groups],
        }

    def to_json(self) -> str:
        """The plan file's text."""
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> StructuredPlan:
        """A plan from its JSON form (a missing key raises KeyError for the caller to name)."""
        return cls(
            raw["criterion"], raw.get("ratio"), [GroupPlan.from_dict(g) for g in raw["groups"]]
        )

    def table(self) -> PlanTable:
        """Per group: channels, how many stay, who reads them, and what happens (or why not)."""
        rows = [
            (g.name, str(g.channels), str(len(g.keep) if g.skip_reason is None else g.channels),
             ", ".join(g.consumers), g.skip_reason or f"remove {g.removed}")
            for g in self.groups
        ]
        return PlanTable(f"structured plan ({self.criterion}, ratio {self.ratio})",
                         ("group (producers)", "channels", "kept", "consumers", "note"), rows,
                         right_aligned=frozenset({"channels", "kept"}))


# ---------------------------------------------------------------------------------------
# Scoring and planning.

Criterion = Literal["l1", "l2", "taylor", "obd"]


def _tensor(value: ir.Value) -> ir.TensorProtocol:
    """The tensor of a value from `const_values`, which holds only values that have one."""
    tensor = value.const_value
    if tensor is None:  # pragma: no cover - const_values keeps constants only
        raise UnsupportedModelError(f"{value.name!r} is not a constant")
    return tensor


def _norm_scores(model: ir.Model, group: ChannelGroup, criterion: str) -> np.ndarray:
    constants = const_values(model.graph)
    total = np.zeros(group.channels, dtype=np.float64)
    for name, out_axis in group.producers:
        weight = np.moveaxis(_tensor(constants[name]).numpy().astype(np.float64), out_axis, 0)
        flat = weight.reshape(group.channels, -1)
        total += np.abs(flat).sum(1) if criterion == "l1" else np.sqrt((flat**2).sum(1))
    return total


def plan_structured(
    model: ir.Model,
    *,
    ratio: float,
    criterion: str = "l1",
    exclude: Iterable[str] = (),
    min_channels: int = 1,
    context: PassContext | None = None,
    scores: Mapping[str, np.ndarray] | None = None,
) -> StructuredPlan:
    """Trace the channel groups and keep the (1 − ratio) highest-scoring channels of each.

    `scores` (weight name -> per-output-channel score) replaces the norm criteria; the
    gradient criteria (`taylor`, `obd`) compute it from `context.data`.
    """
    patterns = tuple(exclude)

    def allowed(name: str) -> bool:
        return not any(fnmatch.fnmatchcase(name, p) for p in patterns)

    groups = find_channel_groups(model, allowed=allowed)
    if criterion in ("taylor", "obd") and scores is None:
        from onnxcompress.passes.prune.saliency import channel_saliency

        names = [name for g in groups if g.skip_reason is None for name, _ in g.producers]
        scores = channel_saliency(model, names, criterion, context or PassContext())
    plans = []
    for group in groups:
        plan = GroupPlan.from_group(group)
        if group.skip_reason is None:
            if scores is not None:
                channel_scores = np.zeros(group.channels)
                for name, _ in group.producers:
                    channel_scores += np.asarray(scores[name], dtype=np.float64).reshape(
                        group.channels
                    )
            else:
                channel_scores = _norm_scores(model, group, criterion)
            plan.scores = [float(s) for s in channel_scores]
            remove = min(round(ratio * group.channels), group.channels - min_channels)
            order = np.argsort(channel_scores, kind="stable")
            plan.keep = sorted(int(c) for c in order[max(remove, 0):])
            if remove <= 0:
                plan.skip_reason = f"ratio {ratio} removes no channel of {group.channels}"
        plans.append(plan)
    return StructuredPlan(criterion, ratio, plans)


# ---------------------------------------------------------------------------------------
# Applying a plan.


def _indices(keep: list[int], repeat: int) -> np.ndarray:
    keep_array = np.asarray(keep, dtype=np.int64)
    return (keep_array[:, None] * repeat + np.arange(repeat)[None, :]).reshape(-1)


def apply_plan(model: ir.Model, plan: StructuredPlan) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Shrink every tensor the plan's active groups name; return name -> (before, after).

    All checks run before the first edit: every tensor exists and has the expected size.
    """
    constants = const_values(model.graph)
    cuts: dict[str, list[tuple[int, np.ndarray]]] = {}
    values_by_name = {v.name: v for node in model.graph for v in node.outputs if v is not None}
    activations: list[ir.Value] = []
    reshapes: list[tuple[str, int, int]] = []
    for group in plan.active():
        for cut in group.cuts:
            if cut.name not in constants:
                raise UnsupportedModelError(
                    f"plan names tensor {cut.name!r}, which the model lacks"
                )
            shape = _tensor(constants[cut.name]).shape.numpy()
            if cut.axis >= len(shape) or shape[cut.axis] != group.channels * cut.repeat:
                raise UnsupportedModelError(
                    f"plan expects {cut.name!r} to have {group.channels * cut.repeat} entries on "
                    f"axis {cut.axis}, it has shape {list(shape)}"
                )
            cuts.setdefault(cut.name, []).append((cut.axis, _indices(group.keep, cut.repeat)))
        for name, index, repeat in group.reshapes:
            target = constants.get(name)
            if target is None or int(_tensor(target).numpy()[index]) != group.channels * repeat:
                raise UnsupportedModelError(f"plan expects reshape target {name!r}[{index}] = "
                                            f"{group.channels * repeat}")
            reshapes.append((name, index, len(group.keep) * repeat))
        activations += [values_by_name[n] for n in group.activations if n in values_by_name]
    changed = {}
    for name, axis_cuts in cuts.items():
        before = _tensor(constants[name]).numpy()
        after = before
        for axis, kept in axis_cuts:
            after = np.take(after, kept, axis=axis)
        set_constant(constants[name], after)
        changed[name] = (before, after)
    for name, index, size in reshapes:
        before = _tensor(constants[name]).numpy()
        after = before.copy()
        after[index] = size
        set_constant(constants[name], after)
        changed[name] = (before, after)
    graph_outputs = {id(v) for v in model.graph.outputs}
    for value in activations:
        if id(value) not in graph_outputs:
            value.shape = None  # stale: the channel count changed
    return changed


# ---------------------------------------------------------------------------------------
# The pass.


class StructuredPruneConfig(PassConfig):
    """Options of `prune.structured`: the share of channels, the criterion, or a saved plan."""

    ratio: float = pydantic.Field(
        0.5,
        ge=0.0,
        lt=1.0,
        description="Share of channels removed from every channel group, in [0, 1).",
    )
    criterion: Criterion = pydantic.Field(
        "l1",
        description="Channel importance: l1 / l2 norm of the producer filters, or taylor / obd "
        "(needs data).",
    )
    exclude: tuple[str, ...] = pydantic.Field(
        (), description="Weight-name globs: a group touching one of them is left whole."
    )
    min_channels: int = pydantic.Field(1, ge=1, description="Channels every group keeps at least.")
    plan: dict[str, Any] | None = pydantic.Field(
        None,
        description="A saved plan (from --dry-run / plan_structured) applied instead of planning.",
    )


def record_changes(changed: Mapping[str, tuple[np.ndarray, np.ndarray]],
                   report: PassReport) -> None:
    """Report every shrunk tensor with its shapes."""
    for name, (before, after) in changed.items():
        shapes = f"shape {list(before.shape)} -> {list(after.shape)}"
        report.changed(name, "tensor", before, after, detail=shapes)


@register
class StructuredPrunePass(PlannedPass[StructuredPlan]):
    """Remove the least important neurons / channels of every channel group."""

    name = "prune.structured"
    summary = (
        "Structured pruning (Wen et al. 2016): remove whole neurons and conv channels, shrinking "
        "tensors."
    )
    Config = StructuredPruneConfig
    config: StructuredPruneConfig

    def plan(self, model: ir.Model) -> StructuredPlan:
        """The saved plan of the config, or the channels each group keeps under the criterion."""
        if self.config.plan is not None:
            try:
                return StructuredPlan.from_dict(self.config.plan)
            except KeyError as error:
                raise RecipeError(
                    f"prune.structured: invalid plan: missing key {error} (write one with "
                    "--dry-run --save-plan)"
                ) from None
            except (TypeError, ValueError, AttributeError) as error:
                raise RecipeError(f"prune.structured: invalid plan: {error}") from None
        return plan_structured(
            model,
            ratio=self.config.ratio,
            criterion=self.config.criterion,
            exclude=self.config.exclude,
            min_channels=self.config.min_channels,
            context=self.context,
        )

    def apply(self, model: ir.Model, plan: StructuredPlan, report: PassReport) -> bool:
        """Shrink every group the plan names and report each change."""
        self.record_plan(plan, report)
        changed = apply_plan(model, plan)
        record_changes(changed, report)
        return bool(changed)
