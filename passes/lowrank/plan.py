"""The low-rank plan: per layer the kind, the rank and the predicted cost, before any edit.

Plan first, apply second (distiller's thinning recipes): the plan is plain data, so
`--dry-run` prints it, reports embed it and a saved plan can be applied again to the same model
(the SVD is seeded, so the same plan gives the same factors). Costs are predictions from the
shapes: parameters of the weight (bias excluded) and FLOPs per output row (MatMul/Gemm) or per
output position (Conv); `rel_error` is ‖W − W_r‖_F / ‖W‖_F from the spectrum.
"""

from __future__ import annotations

__all__ = ["LayerPlan", "Plan"]

import dataclasses
import json
from pathlib import Path
from typing import Any

from onnxcompress.errors import RecipeError
from onnxcompress.pass_base import PlanTable, Skip
from onnxcompress.writer import write_text


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """What the pass will do to one weight."""

    name: str
    node: str
    op: str
    kind: str
    rank: int
    max_rank: int
    shape: tuple[int, ...]
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int
    energy: float
    rel_error: float
    latency_before_ms: float | None = None
    latency_after_ms: float | None = None

    @property
    def param_ratio(self) -> float:
        """Parameters after over before."""
        return self.params_after / self.params_before

    @property
    def flop_ratio(self) -> float:
        """Multiply-adds after over before."""
        return self.flops_after / self.flops_before

    def to_dict(self) -> dict[str, Any]:
        """The layer as JSON-ready values, for the plan file."""
        data = dataclasses.asdict(self)
        data["shape"] = list(self.shape)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LayerPlan:
        """A layer from a plan file; unknown or bad keys are a RecipeError naming the layer."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - fields
        if unknown:
            raise RecipeError(f"low-rank plan layer has unknown keys: {', '.join(sorted(unknown))}")
        try:
            return cls(**{**data, "shape": tuple(int(d) for d in data["shape"])})
        except (KeyError, TypeError, ValueError) as error:
            raise RecipeError(
                f"invalid low-rank plan layer {data.get('name')!r}: {error}"
            ) from None


@dataclasses.dataclass
class Plan:
    """Every planned layer, every skipped weight with its reason, and the settings used."""

    layers: list[LayerPlan] = dataclasses.field(default_factory=list)
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)
    # Work done while planning that applying the plan to the same model reuses (the model and
    # each layer's SVDs); never serialised: a plan read back from JSON recomputes it.
    prepared: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False, compare=False)

    def skips(self) -> list[Skip]:
        """The layers the plan leaves alone, with their reasons, as the pass report takes them."""
        return [Skip(name, reason) for name, reason in self.skipped]

    def totals(self) -> dict[str, int]:
        """Parameters and FLOPs of the planned layers, before and after."""
        return {
            "params_before": sum(layer.params_before for layer in self.layers),
            "params_after": sum(layer.params_after for layer in self.layers),
            "flops_before": sum(layer.flops_before for layer in self.layers),
            "flops_after": sum(layer.flops_after for layer in self.layers),
        }

    def to_dict(self) -> dict[str, Any]:
        """The plan as JSON-ready values, with its format tag and totals."""
        return {
            "format": "onnxcompress.lowrank.plan/1",
            "settings": self.settings,
            "layers": [layer.to_dict() for layer in self.layers],
            "skipped": [{"name": name, "reason": reason} for name, reason in self.skipped],
            "totals": self.totals(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        """A plan from its JSON form; anything else is a RecipeError."""
        if data.get("format") != "onnxcompress.lowrank.plan/1":
            raise RecipeError("not a low-rank plan (format onnxcompress.lowrank.plan/1 expected)")
        return cls(
            layers=[LayerPlan.from_dict(layer) for layer in data.get("layers", [])],
            skipped=[(item["name"], item["reason"]) for item in data.get("skipped", [])],
            settings=dict(data.get("settings", {})),
        )

    def to_json(self) -> str:
        """The plan file's text."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    def save(self, path: str | Path) -> None:
        """Write the plan file atomically, through the guarded writer."""
        write_text(Path(path), self.to_json() + "\n", "plan")

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        """Read a plan file; any defect is one RecipeError naming the file."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as error:  # ValueError: bad JSON or bytes that are not UTF-8
            raise RecipeError(f"cannot read low-rank plan {path}: {error}") from None
        except RecursionError:
            raise RecipeError(f"cannot read low-rank plan {path}: nested too deeply") from None
        if not isinstance(data, dict):
            raise RecipeError(f"{path}: not a low-rank plan (a JSON object expected)")
        return cls.from_dict(data)

    def table(self) -> PlanTable:
        """Per planned layer: kind, rank, predicted sizes and error; totals and skips below."""
        rows = [
            (layer.name, layer.op, layer.kind, f"{layer.rank}/{layer.max_rank}",
             f"{layer.params_before:,} → {layer.params_after:,}", f"×{layer.flop_ratio:.2f}",
             f"{layer.energy:.4f}", f"{layer.rel_error:.4f}")
            for layer in self.layers
        ]
        notes = []
        if self.layers:
            totals = self.totals()
            before, after = totals["params_before"], totals["params_after"]
            notes.append(f"planned layers: params {before:,} → {after:,} (×{after / before:.3f})")
        notes += [f"skipped {name}: {reason}" for name, reason in self.skipped]
        columns = ("weight", "op", "kind", "rank", "params", "FLOPs", "energy", "rel. error")
        return PlanTable("low-rank plan", columns, rows, right_aligned=frozenset(columns[3:]),
                         notes=tuple(notes))

    def reason_for(self, name: str) -> str | None:
        """Why the plan leaves layer `name` alone, or None."""
        return next((reason for skipped, reason in self.skipped if skipped == name), None)
