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
"""

from __future__ import annotations

__all__ = [
    "fixed_steps",
    "cubic_sparsity",
    "cubic_schedule",
    "dropout_ratio",
    "RetrainOptions",
    "expand_schedule",
]

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

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


def cubic_sparsity(t: float, *, initial: float, final: float, start: float, steps: int, interval: float) -> float:
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
        round(cubic_sparsity(k, initial=initial, final=final, start=0, steps=rounds, interval=1), 10)
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
        options: dict[str, Any] = {
            "lr": self.original_lr * self.lr_scale,
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "dropout_rescale": self.dropout_rescale,
            "keep_zeros": True,
        }
        if self.regularisation == "l1":
            options["l1"] = self.strength
        elif self.regularisation == "l2":
            options["weight_decay"] = self.strength
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
) -> list[Step]:
    """Recipe steps for a schedule: prune to each sparsity, retrain after each round if asked.

    `overrides` (per-layer final rates, e.g. from the sensitivity analysis) are scaled by
    s_k / s_final each round, so every layer reaches its own rate at the last round. With
    `retrain`, prune steps are gated only by validity (checker + onnxruntime) and each
    `finetune` step by `gate`: fidelity is judged after retraining, as Han et al. do.
    Without `retrain`, every prune step is gated by `gate`.
    """
    if not sparsities:
        raise RecipeError("a schedule needs at least one sparsity")
    for index, value in enumerate(sparsities):
        _check_sparsity(f"sparsities[{index}]", value)
    if list(sparsities) != sorted(sparsities):
        raise RecipeError(f"a schedule never lowers the sparsity: {list(sparsities)}")
    gate = gate or Gate()
    final = sparsities[-1]
    prune_gate = Gate(min_cosine=None) if retrain is not None else gate
    steps = []
    for sparsity in sparsities:
        options = {**(prune_options or {}), "sparsity": sparsity}
        if overrides:
            scale = sparsity / final if final > 0 else 0.0
            options["overrides"] = {name: round(rate * scale, 10) for name, rate in overrides.items()}
        steps.append(Step(pass_name=prune_pass, options=options, gate=prune_gate, on_fail=on_fail))
        if retrain is not None:
            steps.append(Step(pass_name="finetune", options=retrain.finetune_options(), gate=gate, on_fail=on_fail))
    return steps
