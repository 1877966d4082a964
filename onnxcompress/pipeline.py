"""Run compression steps, each behind gates, against the ORIGINAL model's outputs.

For every step: snapshot (a cheap clone; tensors are shared, never mutated), run the
pass, then gate the result: the onnx checker, an onnxruntime session (our kernels
registered), and fidelity on probe inputs against the reference outputs computed once on
the model as loaded, at the step's gate tightened by its `margin` (`fidelity.MARGIN`: a result
kept because it passed on these probes needs room to pass on other inputs). A failed gate
either stops the run (`on_fail: stop`, the default: `FidelityGateError`, nothing is written)
or restores the snapshot and goes on (`on_fail: rollback`). Nothing here writes files; callers
save only a model that passed.
"""

from __future__ import annotations

__all__ = ["Step", "StepResult", "PipelineResult", "run_steps", "plan_steps", "model_summary"]

import dataclasses
import importlib.util
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import onnx
import onnx_ir as ir
import pydantic

from onnxcompress import fidelity, runtime, summary
from onnxcompress.errors import (
    FidelityGateError,
    OnnxCompressError,
    RecipeError,
    UnsupportedModelError,
)
from onnxcompress.io import iter_tensors, serialized
from onnxcompress.pass_base import (
    CompressionPass,
    PassConfig,
    PassContext,
    PassReport,
    Plan,
    PlannedPass,
    get_pass,
    make_config,
    pass_names,
)
from onnxcompress.probes import DEFAULT_PROBES, metadata_dims, probe_inputs, runnable_dims

logger = logging.getLogger(__name__)


class Step(pydantic.BaseModel):
    """One pass with its options and the gate its result must pass."""

    model_config = pydantic.ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    pass_name: str = pydantic.Field(
        alias="pass", description="Registered pass name, e.g. prune.magnitude."
    )
    options: dict[str, Any] = pydantic.Field(default_factory=dict, description="The pass's config.")
    gate: fidelity.Gate = pydantic.Field(
        default_factory=fidelity.Gate, description="Fidelity thresholds."
    )
    on_fail: Literal["stop", "rollback"] = pydantic.Field(
        "stop",
        description="stop: fail with nothing written; rollback: undo this step and continue.",
    )
    with_previous: bool = pydantic.Field(
        False,
        description="One round with the step before (prune, then fine-tune): a rollback undoes "
        "both.",
    )
    margin: float = pydantic.Field(
        fidelity.MARGIN,
        ge=0,
        le=1,
        description="Share of each similarity bound's headroom to 1 held back when the result is "
        "verified (0.75: rank >= 0.98 is checked as >= 0.995): what passed on the probes it was "
        "chosen on must hold on inputs it did not see. 0: the bare gate.",
    )

    @property
    def verified_gate(self) -> fidelity.Gate:
        """The gate this step's result is checked against: `gate` tightened by `margin`."""
        return self.verified_gate_on(None)

    def verified_gate_on(self, samples: int | None) -> fidelity.Gate:
        """`verified_gate` over this many probe samples: a CTC string bar spares one of them."""
        return self.gate.tightened(self.margin, samples)


StepStatus = Literal["applied", "unchanged", "rolled back", "planned"]


@dataclasses.dataclass
class StepResult:
    """What one step did: its status, the pass's report, the gate's metrics and verdict.

    A dry run's step is "planned" and carries its `plan` (a `pass_base.Plan`).
    """

    step: Step
    status: StepStatus
    report: PassReport
    metrics: fidelity.Metrics | None
    seconds: float
    failures: list[str] = dataclasses.field(default_factory=list)
    plan: Plan | None = None

    @property
    def decided_by(self) -> list[str]:
        """The metrics that rolled this step back, or every metric its gate checked and passed.

        A bound whose metric this model has not (top-1 of a detector, strings of a classifier)
        checked nothing and is left out.
        """
        if self.failures:
            return [f.split()[0] for f in self.failures]
        gate = self.step.gate.model_dump()
        return [
            name.removeprefix("min_").removeprefix("max_")
            for name, bound in gate.items()
            if bound is not None and (
                self.metrics is None
                or getattr(self.metrics, fidelity.BOUNDS[name][0]) is not None
            )
        ]

    def to_dict(self) -> dict[str, Any]:
        """The step as JSON-ready values, for the report file."""
        return {
            "pass": self.step.pass_name,
            "options": self.step.options,
            "status": self.status,
            "seconds": round(self.seconds, 4),
            "metrics": self.metrics.to_dict() if self.metrics else None,
            "gate": self.step.gate.model_dump(),
            "margin": self.step.margin,
            "decided_by": self.decided_by,
            "failures": self.failures,
            **self.report.to_dict(),
        }


@dataclasses.dataclass
class PipelineResult:
    """The model after every step, with what each step did and the final fidelity."""

    model: ir.Model
    steps: list[StepResult]
    before: dict[str, int]
    after: dict[str, int]
    final_metrics: fidelity.Metrics | None
    # what every gate was fed
    probes: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The run as JSON-ready values (not the model), for the report file."""
        return {
            "before": self.before,
            "after": self.after,
            "fidelity": self.final_metrics.to_dict() if self.final_metrics else None,
            "steps": [s.to_dict() for s in self.steps],
        }


def model_summary(model: ir.Model) -> dict[str, int]:
    """Weight parameters, the non-zero ones, and bytes of all constant tensors."""
    rows = summary.layer_table(model, count_distinct=False)
    params = sum(row.params for row in rows)
    nonzero = sum(row.nonzero for row in rows)
    tensor_bytes = sum(int(t.nbytes) for t in iter_tensors(model))
    return {"weight_params": params, "nonzero_weight_params": nonzero, "tensor_bytes": tensor_bytes}


def validate(model: ir.Model, probes: Mapping[str, np.ndarray],
             views: Sequence[fidelity.OutputView] | None = None) -> fidelity.Outputs:
    """Checker, then an onnxruntime session, then outputs on the probes. Raises on failure."""
    with serialized(model) as model_file:
        try:
            onnx.checker.check_model(model_file)
        except onnx.checker.ValidationError as error:
            raise _Invalid(f"onnx checker: {str(error).splitlines()[0]}") from None
    try:
        return fidelity.run(model, probes, views)
    except Exception as error:  # onnxruntime raises its own untyped errors
        raise _Invalid(f"onnxruntime: {str(error).splitlines()[0]}") from None


class _Invalid(Exception):
    """The step produced a model that does not check or does not run."""


ProgressCallback = Callable[[int, int, Step], None]


def run_steps(
    model: ir.Model,
    steps: Sequence[Step],
    *,
    data: Mapping[str, np.ndarray] | None = None,
    probe_count: int = DEFAULT_PROBES,
    seed: int = 0,
    on_step: ProgressCallback | None = None,
    input_sizes: Mapping[tuple[str, int], int] | None = None,
    task: fidelity.TaskMetric | None = None,
    on_progress: Callable[[str], None] | None = None,
    dry_run: bool = False,
    gate_data: Mapping[str, np.ndarray] | None = None,
) -> PipelineResult:
    """Apply `steps` to a copy of `model`, each gated; return the result and its account.

    Every pass and option is validated before any work starts. `model` itself is untouched.
    Without `data`, probes are drawn at sizes the original runs on (`input_sizes` first);
    `task` scores both models' outputs for gates with `min_task`. `gate_data`: held-out samples
    the gates are judged on instead of `data`'s first ones (passes see it as `held_out`).
    `dry_run` plans every step instead (see `plan_steps`): no probe is run and no gate checked.
    """
    configs = [make_config(get_pass(step.pass_name).Config, step.options) for step in steps]
    if dry_run:
        return plan_steps(model, steps, configs, data=data, seed=seed, on_step=on_step, task=task,
                          on_progress=on_progress)
    original = model
    model = _clone(original)
    judged_on = gate_data if gate_data is not None else data
    probes = reference_probes(
        original, count=probe_count, seed=seed, data=judged_on, input_sizes=input_sizes
    )
    reference = _reference_outputs(original, probes, judged_on)
    before = model_summary(model)
    results: list[StepResult] = []
    metrics: fidelity.Metrics | None = fidelity.compare(reference, reference, task=task)
    round_start, round_metrics = _clone(model), metrics  # before the current round of steps
    for index, (step, config) in enumerate(zip(steps, configs, strict=True)):
        if on_step is not None:
            on_step(index, len(steps), step)
        context = PassContext(data=data, original=original, seed=seed, probes=probes,
                              reference=reference, gate=step.verified_gate_on(reference.samples),
                              task=task,
                              progress=on_progress, held_out=gate_data)
        snapshot = _clone(model)
        if not step.with_previous:
            round_start, round_metrics = snapshot, metrics
        result = _gated_step(model, step, get_pass(step.pass_name)(config, context=context))
        if result.status != "rolled back":
            metrics = result.metrics or metrics
        elif step.on_fail == "stop":
            raise FidelityGateError(_failed(index, step, result.failures) + "; nothing was written")
        else:
            logger.info("%s; rolled back", _failed(index, step, result.failures))
            model = snapshot
            if step.with_previous and results and results[-1].status == "applied":
                model, metrics = round_start, round_metrics  # the whole round goes
                results[-1].status = "rolled back"
                results[-1].failures.append(
                    f"rolled back with step {index + 1} ({step.pass_name}), its round"
                )
        results.append(result)
        logger.info("%s: %s in %.2fs (%s)", step.pass_name, result.status, result.seconds,
                    result.metrics)
    return PipelineResult(model, results, before, model_summary(model), metrics, dict(probes))


def _reference_outputs(original: ir.Model, probes: Mapping[str, np.ndarray],
                       data: Mapping[str, np.ndarray] | None) -> fidelity.Outputs:
    """The original's outputs on the probes, refused when a gate could never be trusted on them."""
    try:
        reference = fidelity.run(original, probes)
    except UnsupportedModelError as error:
        raise UnsupportedModelError(f"the input model does not run: {error}") from None
    _refuse_broken_weights(original, reference.values)
    _check_finite(reference, data)
    return reference


def _gated_step(model: ir.Model, step: Step, compression: CompressionPass) -> StepResult:
    """Run one pass on `model` in place and gate its result against the context's reference.

    A failed gate comes back as status "rolled back" with its failures; the caller restores.
    """
    context = compression.context
    started = time.perf_counter()
    outcome = compression(model)
    failures: list[str] = []
    step_metrics: fidelity.Metrics | None = None
    if outcome.modified:
        try:
            outputs = validate(model, context.probes or {}, context.reference.views)
            step_metrics = fidelity.compare(context.reference, outputs, task=context.task)
            failures = step.verified_gate_on(context.reference.samples).failures(step_metrics)
        except _Invalid as error:
            failures = [f"invalid model: {error}"]
    status: StepStatus = "applied" if outcome.modified else "unchanged"
    seconds = time.perf_counter() - started
    return StepResult(step, "rolled back" if failures else status, outcome.report, step_metrics,
                      seconds, failures)


def _failed(index: int, step: Step, failures: Sequence[str]) -> str:
    return f"step {index + 1} ({step.pass_name}) failed its gate: {'; '.join(failures)}"


def plan_steps(
    model: ir.Model,
    steps: Sequence[Step],
    configs: Sequence[PassConfig] | None = None,
    *,
    data: Mapping[str, np.ndarray] | None = None,
    seed: int = 0,
    on_step: ProgressCallback | None = None,
    task: fidelity.TaskMetric | None = None,
    on_progress: Callable[[str], None] | None = None,
) -> PipelineResult:
    """Every step's plan, with nothing run through onnxruntime and no gate: the dry run.

    Each step must be a `PlannedPass`. Its plan is made on the model as the steps before it
    leave it, so each plan is carried out on an in-memory copy for the next step to see (the
    copy's sizes are the result's `after`). Each result has status "planned", its plan, and
    the report the plan alone gives (skips and the plan itself; no changes).
    """
    if configs is None:
        configs = [make_config(get_pass(step.pass_name).Config, step.options) for step in steps]
    passes = [_planned_pass(step) for step in steps]
    original, model = model, _clone(model)
    before = model_summary(model)
    results: list[StepResult] = []
    for index, (step, config, pass_class) in enumerate(zip(steps, configs, passes, strict=True)):
        if on_step is not None:
            on_step(index, len(steps), step)
        context = PassContext(data=data, original=original, seed=seed, gate=step.verified_gate,
                              task=task,
                              progress=on_progress)
        compression = pass_class(config, context=context)
        started = time.perf_counter()
        compression.requires(model)
        plan = compression.plan(model)
        report = PassReport(compression.name)
        compression.record_plan(plan, report)
        compression.apply(model, plan, PassReport(compression.name))  # what the next step plans on
        seconds = time.perf_counter() - started
        results.append(StepResult(step, "planned", report, None, seconds, plan=plan))
    return PipelineResult(model, results, before, model_summary(model), None)


def _planned_pass(step: Step) -> type[PlannedPass[Any]]:
    pass_class = get_pass(step.pass_name)
    if not issubclass(pass_class, PlannedPass):
        planned = ", ".join(n for n in pass_names() if issubclass(get_pass(n), PlannedPass))
        raise RecipeError(f"{step.pass_name} has no plan step, so it cannot be dry-run "
                          f"(passes that plan: {planned})")
    return pass_class


def reference_probes(
    model: ir.Model,
    *,
    count: int = DEFAULT_PROBES,
    seed: int = 0,
    data: Mapping[str, np.ndarray] | None = None,
    input_sizes: Mapping[tuple[str, int], int] | None = None,
) -> dict[str, np.ndarray]:
    """The probes every step is gated on: the data's first samples, or seeded draws.

    Drawn at sizes the ORIGINAL model runs on (given sizes, metadata, else the first candidate
    that runs).
    """
    if data is not None:
        return probe_inputs(model, count=count, seed=seed, data=data)
    known = {**metadata_dims(model), **(input_sizes or {})}
    sessions: list[Any] = []  # opened on the first trial only: most models have no open dimension

    def run(inputs: Mapping[str, np.ndarray]) -> object:
        if not sessions:
            with serialized(model) as model_file:
                sessions.append(runtime.session(model_file))
        try:
            return sessions[0].run(None, dict(inputs))
        except runtime.ORT_ERRORS as error:
            raise UnsupportedModelError(str(error).splitlines()[0]) from None

    sizes = runnable_dims(model, run, fixed=known, seed=seed)
    drawn = probe_inputs(model, count=count, seed=seed, sizes=sizes)
    return _matched_to_batchnorm(model, drawn, seed) or drawn


def _matched_to_batchnorm(
    model: ir.Model, drawn: dict[str, np.ndarray], seed: int
) -> dict[str, np.ndarray] | None:
    """ZeroQ probes for a model that keeps BatchNorm nodes (needs torch; else noise is kept)."""
    if not any(node.op_type == "BatchNormalization" for node in model.graph):
        return None
    if importlib.util.find_spec("torch") is None:
        logger.info("BatchNorm statistics not matched: torch is not installed; random probes kept")
        return None
    from onnxcompress.finetune.synthetic import match_batchnorm

    try:
        return match_batchnorm(model, drawn, seed=seed)
    except OnnxCompressError as error:  # an op the executor lacks: noise is still a valid probe
        logger.info("BatchNorm statistics not matched (%s); random probes kept", error)
        return None


def _check_finite(reference: fidelity.Outputs, data: Mapping[str, np.ndarray] | None) -> None:
    """A gate can never pass on NaN: refuse an original whose outputs are not finite."""
    bad = [view.output for view, value in zip(reference.views, reference.values, strict=False)
           if np.issubdtype(np.asarray(value).dtype, np.floating) and not np.isfinite(value).all()]
    if bad:
        where = (
            "the --data samples"
            if data is not None
            else "the random probes (give --data with real samples)"
        )
        raise UnsupportedModelError(
            f"the input model gives NaN or inf in outputs {bad} on {where}; no gate can pass on NaN"
        )


def _refuse_broken_weights(model: ir.Model, reference: Sequence[np.ndarray]) -> None:
    """A NaN/inf weight poisons the reference, and every gate would then pass anything.

    Non-finite outputs alone are allowed (Log of a negative probe): only those a weight explains
    are refused. Weights are scanned only when an output is non-finite, so the usual run reads none.
    """
    if all(np.isfinite(out).all() for out in map(np.asarray, reference) if out.dtype.kind in "fc"):
        return
    for tensor in iter_tensors(model):
        if tensor.dtype.is_floating_point():
            values = np.asarray(tensor.numpy(), dtype=np.float32)  # bfloat16 and float8 too
            bad = int(values.size - np.count_nonzero(np.isfinite(values)))
            if bad:
                raise UnsupportedModelError(
                    f"the input model gives NaN/inf outputs on the probes: tensor {tensor.name!r} "
                    f"holds {bad:,} NaN/inf values; fix or retrain the model before compressing it"
                )


def _clone(model: ir.Model) -> ir.Model:
    """A structural copy sharing tensors (passes swap tensors, never mutate them)."""
    copy = model.clone()
    copy.meta.update(model.meta)
    return copy
