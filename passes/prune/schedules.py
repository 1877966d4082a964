"""Iterative pruning schedules as pure functions, and their expansion into pipeline steps.

* Han et al., "Learning both Weights and Connections", NIPS 2015, §3.3: prune and retrain
  iteratively; each round raises the sparsity by a fixed step,

      s_k = min(k · Δ, s_final),  k = 1, 2, …  until s_final.

  Retraining (their §3.1–3.2): the pruned connections held at zero, L1 or L2
  regularisation, a learning rate about 1/10 of the original one, and the dropout ratio of
  a layer rescaled ``D_new = D_old · sqrt(C_new / C_old)`` (eq. 2; the `finetune` pass
  applies it to Dropout nodes after pruned layers).

* Zhu & Gupta, "To prune, or not to prune", 2017, eq. 1 (the gradual cubic schedule):

      s_t = s_f + (s_i − s_f) · (1 − (t − t_0) / (n · Δt))³,   t ∈ {t_0, t_0 + Δt, …, t_0 + n·Δt}

  pruning fast early, when redundant weights are plenty, and slowly near the target.

`expand_schedule` turns a list of sparsities into recipe steps: a prune step per round,
followed by a `finetune` step when retraining options are given (the fine-tuning itself is
the PyTorch bridge's). Without data, the rounds are prune-only steps, each gated by
fidelity. Everything here is exact arithmetic; the pruning it schedules is lossy.

In a recipe, a `schedule:` entry (`ScheduleStep`) stands for those steps:

    steps:
      - schedule: {kind: cubic, final: 0.9, rounds: 4}     # or {kind: fixed, final: 0.9, step: 0.2}
        retrain: {original_lr: 0.05, regularisation: l2, epochs: 2}   # omit: prune-only rounds
        gate: {min_cosine: 0.98}
"""

from __future__ import annotations

__all__ = [
    "fixed_steps",
    "cubic_sparsity",
    "cubic_schedule",
    "dropout_ratio",
    "RetrainOptions",
    "expand_schedule",
    "ScheduleStep",
]

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import pydantic

from onnxcompress.errors import RecipeError
from onnxcompress.fidelity import Gate
from onnxcompress.pipeline import Step


def _check_sparsity(name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise RecipeError(f"{name} = {value} is outside [0, 1)")


def fixed_steps(final: float, step: float) -> list[float]:
    """Han's iterative schedule: Δ, 2Δ, … capped at `final` (the last entry is `final`)."""
    _check_sparsity("final", final)
    if not 0.0 < step <= 1.0:
        raise RecipeError(f"step = {step} must be in (0, 1]")
    rounds = max(1, math.ceil(final / step - 1e-9))
    return [round(min((k + 1) * step, final), 10) for k in range(rounds)]


def cubic_sparsity(
    t: float, *, initial: float, final: float, start: float, steps: int, interval: float
) -> float:
    """Zhu & Gupta's s_t at time t (constant `initial` before `start`, `final` after the end)."""
    _check_sparsity("initial", initial)
    _check_sparsity("final", final)
    if steps < 1 or interval <= 0:
        raise RecipeError("steps must be >= 1 and interval > 0")
    progress = min(max((t - start) / (steps * interval), 0.0), 1.0)
    if progress in (0.0, 1.0):
        return initial if progress == 0.0 else final
    return final + (initial - final) * (1.0 - progress) ** 3


def cubic_schedule(final: float, rounds: int, *, initial: float = 0.0) -> list[float]:
    """Sparsities after each of `rounds` equally spaced pruning events (t = t_0 + k·Δt, k = 1…n)."""
    if rounds < 1:
        raise RecipeError(f"rounds = {rounds} must be >= 1")
    return [
        round(
            cubic_sparsity(k, initial=initial, final=final, start=0, steps=rounds, interval=1), 10
        )
        for k in range(1, rounds + 1)
    ]


def dropout_ratio(old_ratio: float, old_connections: int, new_connections: int) -> float:
    """Han et al. 2015, eq. 2: D_new = D_old · sqrt(C_new / C_old)."""
    if old_connections <= 0:
        return old_ratio
    return old_ratio * math.sqrt(max(new_connections, 0) / old_connections)


@dataclasses.dataclass(frozen=True)
class RetrainOptions:
    """Han's retraining details, handed to the `finetune` step of every round."""

    original_lr: float = 1e-2
    lr_scale: float = 0.1  # Han: about 1/10 of the original learning rate
    regularisation: Literal["l1", "l2", "none"] = "l2"
    strength: float = 1e-5
    epochs: int = 1
    batch_size: int = 64
    dropout_rescale: bool = True
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def finetune_options(self) -> dict[str, Any]:
        """The `finetune` pass options for one retraining round, at the scaled learning rate."""
        options: dict[str, Any] = {
            "lr": round(self.original_lr * self.lr_scale, 12),
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "dropout_rescale": self.dropout_rescale,
            "keep_zeros": True,
        }
        if self.regularisation == "l1":
            options["l1"] = self.strength
        elif self.regularisation == "l2":
            options["l2"] = self.strength
        options.update(self.extra)
        return options


def expand_schedule(
    sparsities: Sequence[float],
    *,
    prune_pass: str = "prune.magnitude",
    prune_options: Mapping[str, Any] | None = None,
    overrides: Mapping[str, float] | None = None,
    retrain: RetrainOptions | None = None,
    gate: Gate | None = None,
    on_fail: Literal["stop", "rollback"] = "stop",
    margin: float | None = None,
) -> list[Step]:
    """Recipe steps for a schedule: prune to each sparsity, retrain after each round if asked.

    `overrides` (per-layer final rates, e.g. from the sensitivity analysis) are scaled by
    s_k / s_final each round, so every layer reaches its own rate at the last round. With
    `retrain`, prune steps are gated only by validity (checker + onnxruntime) and each
    `finetune` step by `gate`: fidelity is judged after retraining, as Han et al. do; with
    `on_fail="rollback"` a failed round is undone whole (its prune step too).
    Without `retrain`, every prune step is gated by `gate`. `margin` (default: the steps')
    is the share of each similarity bound's headroom held back when a gated step is verified.
    """
    if not sparsities:
        raise RecipeError("a schedule needs at least one sparsity")
    for index, value in enumerate(sparsities):
        _check_sparsity(f"sparsities[{index}]", value)
    if list(sparsities) != sorted(sparsities):
        raise RecipeError(f"a schedule never lowers the sparsity: {list(sparsities)}")
    gate = gate or Gate()
    final = sparsities[-1]
    prune_gate = Gate.off() if retrain is not None else gate
    margins = {} if margin is None else {"margin": margin}
    steps = []
    for sparsity in sparsities:
        options = {**(prune_options or {}), "sparsity": sparsity}
        if overrides:
            scale = sparsity / final if final > 0 else 0.0
            options["overrides"] = {
                name: round(rate * scale, 10) for name, rate in overrides.items()
            }
        steps.append(Step(pass_name=prune_pass, options=options, gate=prune_gate, on_fail=on_fail,
                          **margins))
        if retrain is not None:
            steps.append(
                Step(
                    pass_name="finetune",
                    options=retrain.finetune_options(),
                    gate=gate,
                    on_fail=on_fail,
                    with_previous=True,
                    **margins,
                )
            )
    return steps


class _Strict(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(frozen=True, extra="forbid")


class ScheduleSpec(_Strict):
    """Which sparsities the rounds reach."""

    kind: Literal["cubic", "fixed"] = pydantic.Field(
        "cubic", description="Zhu & Gupta's cubic, or Han's fixed steps."
    )
    final: float = pydantic.Field(gt=0.0, lt=1.0, description="Sparsity after the last round.")
    rounds: int = pydantic.Field(4, ge=1, le=100, description="cubic: number of pruning rounds.")
    step: float | None = pydantic.Field(
        None, gt=0.0, lt=1.0, description="fixed: sparsity added per round."
    )
    initial: float = pydantic.Field(
        0.0, ge=0.0, lt=1.0, description="cubic: sparsity before the first round."
    )

    def sparsities(self) -> list[float]:
        if self.kind == "fixed":
            if self.step is None:
                raise ValueError("a fixed schedule needs 'step'")
            return fixed_steps(self.final, self.step)
        return cubic_schedule(self.final, self.rounds, initial=self.initial)


class RetrainSpec(_Strict):
    """Han's retraining after every round (see RetrainOptions); needs labelled data or a teacher."""

    original_lr: float = pydantic.Field(
        1e-2, gt=0.0, description="The learning rate the model was trained with."
    )
    lr_scale: float = pydantic.Field(
        0.1, gt=0.0, le=1.0, description="Han: about 1/10 of the original."
    )
    regularisation: Literal["l1", "l2", "none"] = "l2"
    strength: float = pydantic.Field(1e-5, ge=0.0, description="L1 or L2 strength.")
    epochs: int = pydantic.Field(1, ge=1)
    batch_size: int = pydantic.Field(64, ge=1)
    dropout_rescale: bool = True
    extra: dict[str, Any] = pydantic.Field(
        default_factory=dict, description="Further `finetune` options."
    )


class ScheduleStep(_Strict):
    """A recipe entry that expands into prune (+ finetune) rounds."""

    schedule: ScheduleSpec
    prune_pass: Literal["prune.magnitude", "prune.taylor", "prune.obd"] = "prune.magnitude"
    options: dict[str, Any] = pydantic.Field(
        default_factory=dict, description="Options of every prune step."
    )
    overrides: dict[str, float] = pydantic.Field(
        default_factory=dict,
        description="Per-layer final rates (e.g. a sensitivity plan), scaled each round.",
    )
    retrain: RetrainSpec | None = None
    gate: Gate = pydantic.Field(default_factory=Gate)
    on_fail: Literal["stop", "rollback"] = "stop"
    margin: float | None = pydantic.Field(
        None, ge=0, le=1,
        description="Every round's verification margin, as a plain step's `margin` (default: "
        "the steps' own, fidelity.MARGIN).",
    )

    def steps(self) -> list[Step]:
        """The schedule expanded into plain gated steps: prune, then retrain, per round."""
        retrain = None if self.retrain is None else RetrainOptions(**self.retrain.model_dump())
        return expand_schedule(
            self.schedule.sparsities(), prune_pass=self.prune_pass, prune_options=self.options,
            overrides=self.overrides or None, retrain=retrain, gate=self.gate, on_fail=self.on_fail,
            margin=self.margin,
        )
