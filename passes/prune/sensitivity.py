"""Per-layer pruning sensitivity, and per-layer rates chosen from it under a budget.

Han et al., "Learning both Weights and Connections for Efficient Neural Networks", NIPS 2015,
§4 and Fig. 5: prune each layer alone at increasing rates and watch the quality drop; layers
that tolerate more pruning get a higher rate.

Measure: each weight layer is magnitude-pruned alone (exactly as `prune.magnitude` does it)
at each ratio, and the model is scored on probe data against reference outputs computed
once on the unpruned model: output cosine, or accuracy when the data carries `labels`.

Choose: from the curves, per-layer rates such that the WHOLE model (all layers pruned
together) stays within a budget (cosine >= c, or an accuracy drop <= d) while removing the
most parameters. A single tolerance t sets every layer's rate to the largest ratio whose
alone-drop is <= t; t is searched over a geometric ladder from the budget down, each
candidate is measured jointly, and the passing candidate that removes the most parameters
wins; then coordinate ascent raises each layer (largest first) to the highest ratio at
which the joint model still meets the budget (binary search over its grid). The result is a
plan: `prune.magnitude` options with per-layer `overrides`.

What is exact: the measured metrics (on the given probes). What is not: the joint model's
behaviour on other data; the pipeline's fidelity gate still guards the real step. A cosine budget
is therefore met as that gate verifies it, with its margin held back (`Budget.verified_gate`):
rates fitted to these probes at the bare budget would be rolled back by the step they plan.

This module is the analysis only; `onnxcompress.report_sensitivity` writes its results
(JSON, CSV, the recipe, the plot).
"""

from __future__ import annotations

__all__ = [
    "DEFAULT_RATIOS",
    "Budget",
    "LayerCurve",
    "SensitivityResult",
    "Evaluator",
    "analyse",
    "choose_rates",
    "sensitivity",
]

import dataclasses
import logging
import pickle
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import numpy as np
import onnx
import onnx_ir as ir

from onnxcompress import fidelity, runtime
from onnxcompress.data import LABELS
from onnxcompress.errors import DataError, QuantizedModelError, UnsupportedModelError, UserError
from onnxcompress.io import in_memory, minimum_ir_version
from onnxcompress.parallel import Executor, LocalExecutor, SweepCache, Task, run_sweep
from onnxcompress.parallel.sweep import Sweep, forget, remember
from onnxcompress.pass_base import quantized_ops
from onnxcompress.passes.prune.magnitude import prune_to_count
from onnxcompress.runtime import ORT_ERRORS
from onnxcompress.sites import WeightSite, find_weight_sites

logger = logging.getLogger(__name__)

DEFAULT_RATIOS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


@dataclasses.dataclass(frozen=True)
class Budget:
    """What the whole pruned model must keep: a cosine floor, or a max accuracy drop."""

    min_cosine: float = cast(float, fidelity.DEFAULT_GATE.min_cosine)  # what `optimize` will apply
    max_accuracy_drop: float = 0.005  # a fraction: 0.005 = 0.5 percentage points
    # With a cosine budget the joint plan must pass these too, as `optimize`'s default gate asks.
    min_rank_correlation: float | None = fidelity.DEFAULT_GATE.min_rank_correlation
    min_top1: float | None = fidelity.DEFAULT_GATE.min_top1
    # held back as `optimize` verifies the plan's step (`pipeline.Step.margin`)
    margin: float = fidelity.MARGIN

    def verified_gate(self) -> fidelity.Gate:
        """A cosine budget as the gate `optimize` verifies the plan with, its margin held back."""
        return fidelity.Gate(
            min_cosine=self.min_cosine,
            min_rank_correlation=self.min_rank_correlation,
            min_top1=self.min_top1,
        ).tightened(self.margin)

    def other_checks(self) -> fidelity.Gate:
        """The verified gate's checks besides cosine, which the joint plan must pass too."""
        return self.verified_gate().model_copy(update={"min_cosine": None})

    def allowed_drop(self, metric: str) -> float:
        """How far `metric` may fall from the baseline under this budget (cosine: verified)."""
        if metric == "accuracy":
            return self.max_accuracy_drop
        return 1.0 - cast(float, self.verified_gate().min_cosine)


@dataclasses.dataclass
class LayerCurve:
    """One layer's metric at each ratio of the grid, and the ratio chosen for it."""

    name: str
    op: str
    params: int
    ratios: list[float]
    values: list[float]
    chosen: float = 0.0


@dataclasses.dataclass
class SensitivityResult:
    """The analysis: per-layer curves, the chosen plan and how the joint model scores."""

    metric: str
    baseline: float
    budget: Budget
    curves: list[LayerCurve]
    joint_value: float
    total_params: int
    removed_params: int

    @property
    def overrides(self) -> dict[str, float]:
        """The chosen rates as prune.magnitude overrides, names escaped for fnmatch."""
        return {_glob_escape(c.name): c.chosen for c in self.curves}

    def plan(self) -> dict[str, Any]:
        """A recipe step: prune.magnitude with the chosen per-layer rates as overrides."""
        return {
            "pass": "prune.magnitude",
            "options": {"sparsity": 0.0, "min_params": 0, "overrides": self.overrides},
        }

    def to_dict(self) -> dict[str, Any]:
        """The result as JSON-ready values, the recipe step included."""
        return {
            "metric": self.metric,
            "baseline": self.baseline,
            "budget": dataclasses.asdict(self.budget),
            "joint_value": self.joint_value,
            "total_params": self.total_params,
            "removed_params": self.removed_params,
            "layers": [dataclasses.asdict(c) for c in self.curves],
            "plan": self.plan(),
        }


def _glob_escape(name: str) -> str:
    """A glob matching exactly `name` (fnmatch has no escape; brackets quote)."""
    return "".join(f"[{ch}]" if ch in "*?[" else ch for ch in name)


class Evaluator:
    """Scores a model with some weights swapped, against references computed once."""

    def __init__(
        self, model_bytes: bytes, data: Mapping[str, np.ndarray] | None, probes: int, seed: int
    ):
        self.model = ir.from_proto(onnx.load_from_string(model_bytes))
        self.labels = None if data is None else data.get(LABELS)
        self.metric = "accuracy" if self.labels is not None else "cosine"
        count = probes if self.labels is None else len(self.labels)
        self.probes = fidelity.probe_inputs(self.model, count=count, seed=seed, data=data)
        self.sites = {s.name: s for s in find_weight_sites(self.model, min_params=0).sites}
        self.reference = self._run()
        self.baseline = self._score(self.reference)

    def _run(self) -> list[np.ndarray]:
        proto = ir.to_proto(self.model)
        proto.ir_version = minimum_ir_version(self.model)
        return _session(proto).run(None, self.probes)

    def _score(self, outputs: Sequence[np.ndarray]) -> float:
        if self.labels is not None:
            return float(np.mean(np.asarray(outputs[0]).argmax(-1) == self.labels))
        return fidelity.compare(self.reference, outputs).cosine

    def _outputs_with(self, rates: Mapping[str, float]) -> list[np.ndarray]:
        """Outputs with each named layer magnitude-pruned to its rate (then restored)."""
        originals: dict[str, np.ndarray] = {}
        try:
            for name, rate in rates.items():
                site = self.sites[name]
                originals[name] = site.array()
                if rate > 0:
                    site.replace(prune_to_count(originals[name], round(rate * site.size)))
            return self._run()
        finally:
            for name, array in originals.items():
                self.sites[name].replace(array)

    def score_with(self, rates: Mapping[str, float]) -> float:
        """The metric with each named layer magnitude-pruned to its rate."""
        return self._score(self._outputs_with(rates))

    def meets(
        self, rates: Mapping[str, float], allowed: float, others: fidelity.Gate
    ) -> tuple[bool, float]:
        """Whether the joint model keeps the budget, and its metric.

        With a cosine budget it must also pass the default gate's other checks (rank
        correlation, top-1), as `optimize` will.
        """
        outputs = self._outputs_with(rates)
        if self.labels is not None:
            value = self._score(outputs)
            return self.baseline - value <= allowed, value
        metrics = fidelity.compare(self.reference, outputs)  # once: cosine and the other checks
        return self.baseline - metrics.cosine <= allowed and not others.failures(
            metrics
        ), metrics.cosine

    def curve(self, name: str, ratios: Sequence[float]) -> list[float]:
        """Layer `name`'s metric at each ratio, pruned alone (Han et al. Fig. 5)."""
        return [self.score_with({name: r}) for r in ratios]


def _session(proto: onnx.ModelProto) -> Any:
    """One-thread session; our kernel library is loaded only for models that call its ops.

    The analysis builds hundreds of sessions, and standard models need none of it.
    """
    try:
        return runtime.session(proto, threads=1, kernels="used")
    except UnsupportedModelError as error:
        raise UnsupportedModelError(f"the input model does not run: {error}") from None


def _evaluator_from(payload: bytes) -> Evaluator:
    """A worker's state for the sweep: the model, probes and reference outputs (built once)."""
    model_bytes, data, probes, seed = pickle.loads(payload)
    return Evaluator(model_bytes, data, probes, seed)


def _score_task(evaluator: Evaluator, task: Task) -> float:
    """One point of a curve: the metric with `task.layer` alone pruned to `task.setting`."""
    return evaluator.score_with({task.layer: task.setting})


def analyse(
    model: ir.Model,
    *,
    data: Mapping[str, np.ndarray] | None = None,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    probes: int = 64,
    seed: int = 0,
    min_params: int = 16,
    exclude: Sequence[str] = (),
    workers: int | None = None,
    on_layer: Callable[[int, int], None] | None = None,
    executor: Executor | None = None,
    cache: SweepCache | None = None,
) -> tuple[Evaluator, list[LayerCurve]]:
    """One curve per weight layer: the metric with that layer alone pruned at each ratio.

    One evaluation per (layer, ratio), run by `executor` (default: a `LocalExecutor` of
    `workers` processes; None uses a pool only when more than one core is free, 1 is serial)
    and stored in `cache` when given, so an interrupted sweep resumes and a re-run is free.
    `on_layer(done, total)` is called as each layer's curve is finished (for a progress bar).
    """
    quantized = quantized_ops(model)
    if quantized:  # the plan would be refused by prune.magnitude: say so now
        raise QuantizedModelError(
            f"sensitivity refuses an already quantized model (found {', '.join(quantized)})"
        )
    ratios = sorted(float(r) for r in ratios)
    if not ratios or ratios[0] < 0 or ratios[-1] >= 1:
        raise UserError(f"ratios must lie in [0, 1), got {ratios}")
    if data is not None and LABELS in data and len(data[LABELS]) == 0:
        raise DataError("the data carries no samples")
    model_bytes = _serialise(model)
    sweep = Sweep(pickle.dumps((model_bytes, None if data is None else dict(data), probes, seed)),
                  _evaluator_from, _score_task)
    try:  # this process's worker state: a serial sweep uses it as it is
        evaluator: Evaluator = remember(sweep.key, sweep.setup, lambda: sweep.payload)
    except ORT_ERRORS as error:
        raise UnsupportedModelError(
            f"the input model does not run: onnxruntime: {str(error).splitlines()[0]}"
        ) from None
    scan = find_weight_sites(evaluator.model, min_params=min_params, exclude=exclude)
    sites: list[WeightSite] = scan.sites
    for skipped in scan.skipped:
        logger.info("sensitivity: skipping %s: %s", skipped.name, skipped.reason)
    if not sites:
        raise UserError("the model has no weight layer to analyse")
    tasks = [Task(site.name, "magnitude", ratio) for site in sites for ratio in ratios]
    try:
        values = run_sweep(sweep, tasks, executor=executor or LocalExecutor(workers), cache=cache,
                           on_result=_layer_counter(tasks, len(ratios), len(sites), on_layer))
    finally:
        forget()  # the caller holds the evaluator; this process need not
    curves = [
        LayerCurve(site.name, site.op_type, site.size, list(ratios),
                   [float(v) for v in values[number * len(ratios):(number + 1) * len(ratios)]])
        for number, site in enumerate(sites)
    ]
    return evaluator, curves


def _layer_counter(tasks: Sequence[Task], per_layer: int, layers: int,
                   on_layer: Callable[[int, int], None] | None) -> Callable[[int], None]:
    """Turns 'task i is done' into on_layer(layers done, layers) as each curve completes."""
    done: dict[str, int] = {}

    def count(index: int) -> None:
        layer = tasks[index].layer
        done[layer] = done.get(layer, 0) + 1
        if on_layer is not None and done[layer] == per_layer:
            on_layer(sum(1 for n in done.values() if n == per_layer), layers)

    return count


def _serialise(model: ir.Model) -> bytes:
    proto = ir.to_proto(in_memory(model))  # sessions from bytes cannot find external data
    proto.ir_version = minimum_ir_version(model)
    return proto.SerializeToString()


def _rates_for(curves: Sequence[LayerCurve], baseline: float, tolerance: float) -> dict[str, float]:
    """Per layer, the largest ratio whose alone-drop stays within `tolerance` (0 if none)."""
    rates = {}
    for curve in curves:
        rate = 0.0
        for ratio, value in zip(curve.ratios, curve.values, strict=True):
            if baseline - value <= tolerance:
                rate = ratio
            else:
                break  # the curve is read from low to high ratios; stop at the first miss
        rates[curve.name] = rate
    return rates


def choose_rates(
    evaluator: Evaluator,
    curves: list[LayerCurve],
    budget: Budget,
    *,
    steps: int = 12,
    refine_passes: int = 2,
) -> SensitivityResult:
    """Pick per-layer rates meeting `budget` jointly and removing the most parameters.

    After the tolerance ladder, coordinate ascent raises each layer (largest first) to the
    highest ratio at which the joint model still meets the budget, by binary search over its
    grid (`refine_passes` sweeps; about log2(len(ratios)) evaluations per layer and sweep).
    """
    allowed = budget.allowed_drop(evaluator.metric)
    baseline = evaluator.baseline
    best: tuple[int, dict[str, float], float] = (0, {c.name: 0.0 for c in curves}, baseline)
    tried: set[tuple[float, ...]] = set()
    for step in range(steps):
        tolerance = allowed / (2**step)
        rates = _rates_for(curves, baseline, tolerance)
        key = tuple(rates[c.name] for c in curves)
        if key in tried or not any(key):
            continue
        tried.add(key)
        ok, value = evaluator.meets(rates, allowed, budget.other_checks())
        removed = sum(round(rates[c.name] * c.params) for c in curves)
        logger.info("sensitivity: tolerance %.3g -> removes %d, %s %.6f", tolerance, removed,
                    evaluator.metric, value)
        if ok and removed > best[0]:
            best = (removed, rates, value)
    removed, rates, value = _refine(
        evaluator, curves, best, allowed, budget.other_checks(), passes=refine_passes
    )
    for curve in curves:
        curve.chosen = rates[curve.name]
    return SensitivityResult(
        metric=evaluator.metric,
        baseline=baseline,
        budget=budget,
        curves=curves,
        joint_value=value,
        total_params=sum(c.params for c in curves),
        removed_params=removed,
    )


def _refine(
    evaluator: Evaluator,
    curves: list[LayerCurve],
    best: tuple[int, dict[str, float], float],
    allowed: float,
    others: fidelity.Gate,
    *,
    passes: int,
) -> tuple[int, dict[str, float], float]:
    """Coordinate ascent over the layers, largest first.

    Per layer, binary-search the highest ratio of its grid at which the joint model still
    meets the budget (the metric falls with the ratio).
    """
    removed, rates, value = best
    for _ in range(passes):
        improved = False
        for curve in sorted(curves, key=lambda c: -c.params):
            higher = [r for r in curve.ratios if r > rates[curve.name]]
            low, high, found = 0, len(higher) - 1, None
            while low <= high:
                middle = (low + high) // 2
                candidate = {**rates, curve.name: higher[middle]}
                ok, score = evaluator.meets(candidate, allowed, others)
                if ok:
                    found, low = (candidate, score), middle + 1
                else:
                    high = middle - 1
            if found is not None:
                rates, value = found
                improved = True
        if not improved:
            break
    removed = sum(round(rates[c.name] * c.params) for c in curves)
    return removed, rates, value


def sensitivity(
    model: ir.Model,
    *,
    data: Mapping[str, np.ndarray] | None = None,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    budget: Budget | None = None,
    probes: int = 64,
    seed: int = 0,
    min_params: int = 16,
    exclude: Sequence[str] = (),
    workers: int | None = None,
    on_layer: Callable[[int, int], None] | None = None,
    executor: Executor | None = None,
    cache: SweepCache | None = None,
) -> SensitivityResult:
    """Analyse every layer, then choose rates under `budget` (see the module docstring)."""
    evaluator, curves = analyse(
        model,
        data=data,
        ratios=ratios,
        probes=probes,
        seed=seed,
        min_params=min_params,
        exclude=exclude,
        workers=workers,
        on_layer=on_layer,
        executor=executor,
        cache=cache,
    )
    return choose_rates(evaluator, curves, budget or Budget())
