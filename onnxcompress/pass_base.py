"""The base of every compression pass: a typed config, an honest report, a registry.

A pass is an onnx_ir `InPlacePass`, so onnx_ir's and onnxscript's own passes compose with
ours. Like onnx_ir's passes it is stateless: everything it needs is given at construction,
and everything it found is in the result it returns. It adds:

* `Config`: a frozen, keyword-only pydantic model. Each field's `description` is the one
  place a knob is documented; the CLI help, `onnxcompress passes --describe` and the recipe
  JSON Schema all read it from there.
* `context` (a constructor argument): what the pipeline knows beyond the model (calibration
  data, the original model, the seed), for passes that need data (saliency, fine-tuning).
* `CompressionResult.report`: per layer, what changed (params and bytes before/after) and,
  for every layer left alone, why. Tests assert those reasons. A pass writes it in
  `rewrite(model, report)`, the one method a plain pass implements.
* `PlannedPass`: for structural decisions that can be shown before they are made,
  `plan(model) -> Plan` decides without editing and `apply(model, plan, report)` carries the
  plan out; `run_steps(dry_run=True)` plans every step and edits nothing.

    result = MagnitudePrunePass(sparsity=0.5, context=PassContext(seed=1))(model)
    result.modified, result.report.reason_for("fc1.weight")

Passes register under a stable dotted name (`prune.magnitude`); `PASS_MODULES` lists where each
built-in pass lives, and `get_pass` imports only that module on first lookup.
"""

from __future__ import annotations

__all__ = [
    "PassConfig",
    "PassContext",
    "LayerChange",
    "Skip",
    "PassReport",
    "CompressionResult",
    "CompressionPass",
    "Plan",
    "PlanTable",
    "PlannedPass",
    "register",
    "get_pass",
    "pass_names",
    "tensor_stats",
]

import abc
import dataclasses
import importlib
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Generic, Protocol, TypeVar

import numpy as np
import onnx_ir as ir
import pydantic

from onnxcompress.errors import OnnxCompressError, QuantizedModelError, RecipeError

logger = logging.getLogger(__name__)


class PassConfig(pydantic.BaseModel):
    """Base of every pass config: frozen, unknown keys rejected by name."""

    model_config = pydantic.ConfigDict(frozen=True, extra="forbid")


@dataclasses.dataclass
class PassContext:
    """What the pipeline hands a pass besides the model.

    `data` maps graph input names (and optionally `labels`) to arrays whose first axis is
    the sample axis. `original` is the model as loaded, before any step ran. `probes`,
    `reference` (the original's `fidelity.Outputs` on them) and `gate` (tightened by the step's
    margin, as the pipeline verifies it) are the step's own check, for passes that search for
    what passes it. `held_out` is the held-out data the gates are judged on when the user gave
    it apart from `data` (`--val-data`): samples the model never trained on, which a retraining
    pass may stop early on but never train on.
    """

    data: Mapping[str, np.ndarray] | None = None
    original: ir.Model | None = None
    seed: int = 0
    probes: Mapping[str, np.ndarray] | None = None
    reference: Any = None
    gate: Any = None
    task: Any = None
    progress: Callable[[str], None] | None = None  # a line for the CLI's progress display
    held_out: Mapping[str, np.ndarray] | None = None

    def judged(self, model: ir.Model) -> tuple[Any, list[str]]:
        """(metrics, failures) of `model` on the step's probes, against its reference and gate.

        For a pass that searches for what the step's gate accepts (`probes`, `reference` set);
        without a gate handed, the default one as a step verifies it.
        """
        from onnxcompress import fidelity

        gate = self.gate or fidelity.DEFAULT_GATE.tightened(fidelity.MARGIN)
        outputs = fidelity.run(model, self.probes or {}, self.reference.views)
        metrics = fidelity.compare(self.reference, outputs, task=self.task)
        return metrics, gate.failures(metrics)


@dataclasses.dataclass(frozen=True)
class LayerChange:
    """What a pass did to one weight: sizes before and after, and a short detail."""

    name: str
    op: str
    params_before: int
    params_after: int
    bytes_before: int
    bytes_after: int
    detail: str = ""


@dataclasses.dataclass(frozen=True)
class Skip:
    """A weight a pass left alone, and why."""

    name: str
    reason: str


def tensor_stats(array: np.ndarray) -> tuple[int, int]:
    """(non-zero parameters, bytes) of a dense array: what pruning and coding change."""
    return int(np.count_nonzero(array)), int(array.nbytes)


@dataclasses.dataclass
class PassReport:
    """Per-layer account of one pass run."""

    pass_name: str
    changes: list[LayerChange] = dataclasses.field(default_factory=list)
    skipped: list[Skip] = dataclasses.field(default_factory=list)
    notes: dict[str, Any] = dataclasses.field(default_factory=dict)

    def changed(
        self,
        name: str,
        op: str,
        before: np.ndarray,
        after: np.ndarray | None = None,
        *,
        params_after: int | None = None,
        bytes_after: int | None = None,
        detail: str = "",
    ) -> None:
        """Record a change; `after` defaults to explicit counts for non-dense results."""
        params_before, bytes_before = tensor_stats(before)
        if after is not None:
            params_after, bytes_after = tensor_stats(after)
        if params_after is None or bytes_after is None:
            raise ValueError("give either `after` or both params_after and bytes_after")
        self.changes.append(
            LayerChange(name, op, params_before, params_after, bytes_before, bytes_after, detail)
        )

    def skip(self, name: str, reason: str) -> None:
        """Record why a layer was left alone: every skip has a reason a test can assert."""
        logger.info("%s: skipping %s: %s", self.pass_name, name, reason)
        self.skipped.append(Skip(name, reason))

    def reason_for(self, name: str) -> str | None:
        """The recorded skip reason of a weight, if it was skipped."""
        return next((s.reason for s in self.skipped if s.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready values, for the pipeline report."""
        return {
            "pass": self.pass_name,
            "changes": [dataclasses.asdict(c) for c in self.changes],
            "skipped": [dataclasses.asdict(s) for s in self.skipped],
            "notes": self.notes,
        }


QUANTIZED_OPS = frozenset(
    {
        "QuantizeLinear",
        "DequantizeLinear",
        "DynamicQuantizeLinear",
        "MatMulInteger",
        "ConvInteger",
        "MatMulNBits",
        "MatMulBnb4",
        "DynamicQuantizeMatMul",
        "GatherBlockQuantized",
    }
)


def quantized_ops(model: ir.Model) -> list[str]:
    """The quantization ops a model uses, sorted; empty for a float model."""
    found = set()
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.op_type in QUANTIZED_OPS or node.op_type.startswith("QLinear"):
            found.add(node.op_type)
    return sorted(found)


@dataclasses.dataclass
class CompressionResult(ir.passes.PassResult):
    """onnx_ir's result plus the account of what the pass did to each weight."""

    report: PassReport


class CompressionPass(ir.passes.InPlacePass, abc.ABC):
    """Base of every onnxcompress pass.

    Subclasses set `name`, `Config` and `summary`, and implement `rewrite(model, report)`,
    which edits the model, records every change and skip in `report`, and returns whether
    the model changed. A pass must either apply fully or change nothing: check
    preconditions before the first edit. Tensors are never edited in place; a pass swaps
    in new ones, so snapshots stay cheap and memory-mapped inputs stay untouched. Nothing
    is stored on the instance after construction: one instance may run on many models.
    """

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    Config: ClassVar[type[PassConfig]] = PassConfig
    lossy: ClassVar[bool] = True

    def __init__(self, config: PassConfig | None = None, /, *, context: PassContext | None = None,
                 **options: Any) -> None:
        super().__init__()
        if config is not None and options:
            raise TypeError("give either a config object or keyword options, not both")
        self.config = config if config is not None else make_config(self.Config, options)
        self.context = context if context is not None else PassContext()

    def needs_calibration(self) -> bool:
        """Whether random probes cannot vouch for this pass: its error depends on the inputs.

        Lossy passes need real samples by default; a pass whose error is small per weight
        whatever the input (float16, int8 per channel) or that is exact says False.
        """
        return self.lossy

    def requires(self, model: ir.Model) -> None:
        """Refuse a model the pass must not touch, before anything changes."""
        if self.lossy:
            ops = quantized_ops(model)
            if ops:
                raise QuantizedModelError(
                    f"{self.name} refuses an already quantized model (found {', '.join(ops)})"
                )

    def __call__(self, model_or_result: ir.Model | ir.passes.PassResult, /) -> CompressionResult:
        """onnx_ir wraps precondition failures; surface our own errors unwrapped."""
        try:
            result = super().__call__(model_or_result)
        except ir.passes.PreconditionError as error:
            if isinstance(error.__cause__, OnnxCompressError):
                raise error.__cause__ from None
            raise
        assert isinstance(result, CompressionResult)
        return result

    def call(self, model: ir.Model) -> CompressionResult:
        """onnx_ir's entry point: a fresh report per run, then `apply`."""
        report = PassReport(self.name)
        modified = self.rewrite(model, report)
        return CompressionResult(model, modified, report)

    @abc.abstractmethod
    def rewrite(self, model: ir.Model, report: PassReport) -> bool:
        """Rewrite `model` in place, recording each change and skip; True if anything changed."""


@dataclasses.dataclass(frozen=True)
class PlanTable:
    """A plan as a table for people (the CLI's dry run prints it): plain strings, no styling."""

    title: str
    columns: tuple[str, ...]
    rows: Sequence[tuple[str, ...]]
    right_aligned: frozenset[str] = frozenset()
    notes: tuple[str, ...] = ()  # lines printed under the table


class Plan(Protocol):
    """A pass's decisions before any edit: serialisable, printable, and what it leaves alone."""

    def to_dict(self) -> dict[str, Any]:
        """The plan as JSON-ready values: what `--save-plan` writes and a recipe reads back."""

    def skips(self) -> list[Skip]:
        """The layers the plan leaves alone, each with its reason."""

    def table(self) -> PlanTable:
        """The plan for people, as the dry run prints it."""


PlanT = TypeVar("PlanT", bound=Plan)


class PlannedPass(CompressionPass, Generic[PlanT]):
    """A pass that decides first (`plan`, no edit) and edits second (`apply`).

    Distiller's thinning recipe: the plan gives dry runs, reports and reuse (a saved plan
    applied to the same model) for free. `rewrite` is plan-then-apply.
    """

    @abc.abstractmethod
    def plan(self, model: ir.Model) -> PlanT:
        """Decide every edit without touching `model`."""

    @abc.abstractmethod
    def apply(self, model: ir.Model, plan: PlanT, report: PassReport) -> bool:
        """Carry out `plan` on `model`; record each change in `report`; True if anything changed."""

    def rewrite(self, model: ir.Model, report: PassReport) -> bool:
        """Plan, then apply: a planned pass's one-shot run is its dry run carried out."""
        return self.apply(model, self.plan(model), report)

    def record_plan(self, plan: PlanT, report: PassReport) -> None:
        """What a plan alone tells a report: its skips and itself (the dry run's whole account)."""
        for skip in plan.skips():
            report.skip(skip.name, skip.reason)
        report.notes["plan"] = plan.to_dict()


def make_config(config_class: type[PassConfig], options: Mapping[str, Any]) -> PassConfig:
    """Build a config, turning pydantic's errors into one line naming each bad field."""
    try:
        return config_class(**options)
    except pydantic.ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '<config>'}: {e['msg']}"
            for e in error.errors()
        )
        raise RecipeError(f"invalid options for {config_class.__qualname__}: {problems}") from None


#: Every built-in pass: its registered name -> the module that defines it. An explicit list, not
#: import-time discovery: `pass_names()` reads it without importing any pass, `get_pass(name)`
#: imports that one module (the only way the core reaches `onnxcompress.passes`). A new pass
#: adds one line here (tests/test_pass_registry.py checks every registered pass is listed).
PASS_MODULES: dict[str, str] = {
    "prune.magnitude": "onnxcompress.passes.prune.magnitude",
    "prune.taylor": "onnxcompress.passes.prune.saliency",
    "prune.obd": "onnxcompress.passes.prune.saliency",
    "prune.structured": "onnxcompress.passes.prune.structured",
    "prune.dead_neurons": "onnxcompress.passes.prune.dead_neurons",
    "prune.obs": "onnxcompress.passes.reconstruct.prune_obs",
    "lowrank.svd": "onnxcompress.passes.lowrank.svd",
    "codebook.kmeans": "onnxcompress.passes.codebook.kmeans",
    "codebook.search": "onnxcompress.passes.codebook.search",
    "codebook.gptq": "onnxcompress.passes.reconstruct.codebook_gptq",
    "codebook.pack": "onnxcompress.passes.storage",
    "cast.fp16": "onnxcompress.passes.storage",
    "quant.int8": "onnxcompress.passes.quantize",
    "sparse.csr": "onnxcompress.passes.sparse.csr",
    "finetune": "onnxcompress.passes.finetune",
}

#: A recipe's `schedule:` entry (iterative pruning rounds) is defined beside the pruning passes.
SCHEDULE_STEP = "onnxcompress.passes.prune.schedules:ScheduleStep"


def schedule_step() -> type[Any]:
    """The pydantic model of a recipe's `schedule:` entry (`.steps()` expands it).

    Imported on first use like the passes.
    """
    module, _, name = SCHEDULE_STEP.partition(":")
    return getattr(importlib.import_module(module), name)  # type: ignore[no-any-return]


_REGISTRY: dict[str, type[CompressionPass]] = {}
PassT = TypeVar("PassT", bound=type[CompressionPass])


def register(cls: PassT) -> PassT:
    """Class decorator: make a pass available under its `name`.

    Built-in ones are also listed in `PASS_MODULES`, so that looking them up imports them.
    """
    existing = _REGISTRY.get(cls.name)
    if existing is not None and existing is not cls:
        raise RuntimeError(f"two passes claim the name {cls.name!r}")
    _REGISTRY[cls.name] = cls
    return cls


def get_pass(name: str) -> type[CompressionPass]:
    """The pass registered as `name`, importing its module on first use."""
    if name not in _REGISTRY and name in PASS_MODULES:
        importlib.import_module(PASS_MODULES[name])
    try:
        return _REGISTRY[name]
    except KeyError:
        raise RecipeError(
            f"unknown pass {name!r}; available: {', '.join(pass_names())}"
        ) from None


def pass_names() -> list[str]:
    """Every pass name, built-in and registered, without importing any pass."""
    return sorted(set(PASS_MODULES) | set(_REGISTRY))


def describe(cls: type[CompressionPass]) -> list[tuple[str, str, str]]:
    """(field, type and default, description) for each config field of a pass."""
    rows = []
    for field_name, field in cls.Config.model_fields.items():
        default = (
            "required"
            if field.is_required()
            else repr(field.get_default(call_default_factory=True))
        )
        annotation = str(field.annotation).replace("typing.", "")
        annotation = (
            getattr(field.annotation, "__name__", annotation)
            if "[" not in annotation
            else annotation
        )
        rows.append((field_name, f"{annotation} = {default}", field.description or ""))
    return rows
