"""`lowrank.svd`: truncated-SVD factorization of MatMul, Gemm and Conv weights, only where it pays.

Denton et al. 2014 (≈2× faster convolutions within 1% accuracy; 5–10× fewer parameters in fully
connected layers), with the Conv forms of `decompose` (channel k×k→1×1, spatial kh×1→1×kw).

W (m×n) ≈ U_r Σ_r V_rᵀ, one node becomes two. Lossy: the weight loses exactly its discarded
singular values (Eckart–Young: ‖W − W_r‖_F² = Σ_{i>r} σᵢ²); exact (to float rounding) at full
rank. How the output of the model moves is not bounded a priori; the `budget` mode measures it,
and the pipeline's fidelity gate guards every mode.

Rank per layer, one of:
* `energy` e — the smallest r keeping Σ_{i≤r} σᵢ² ≥ e·‖W‖_F²;
* `ratio` ρ — the largest r whose params (or FLOPs) are ≤ ρ × the original's;
* `budget` b — the greedy per-layer search of `budget` keeps the output cosine ≥ b on probes.

`conv="clustered"` takes Denton's filter clustering instead (clustered.py): k-means groups of
the output filters, each with its own SVD rank, as standard ONNX ops (Conv, Split, 1×1 Convs,
Concat, Gather); `rank` is then the total over the groups.

A layer is never factorized when r ≥ mn/(m+n) (the factors would not be smaller), and with
`speed` on, not when onnxruntime runs the factor pair no faster than the original node. Conv
layers take the cheaper of the channel and spatial forms. Every layer left alone is recorded
with its reason, in the plan and in the pass report.
"""

from __future__ import annotations

__all__ = ["LowRankConfig", "LowRankSVDPass"]

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import onnx_ir as ir
import pydantic

from onnxcompress.errors import RecipeError, UnsupportedModelError
from onnxcompress.pass_base import PassConfig, PassContext, PassReport, PlannedPass, register
from onnxcompress.passes.lowrank.budget import Candidate, greedy_select
from onnxcompress.passes.lowrank.clustered import ClusteredDecomposition, apply_clustered
from onnxcompress.passes.lowrank.decompose import ConvAttributes, Decomposition, conv_attributes
from onnxcompress.passes.lowrank.plan import LayerPlan, Plan
from onnxcompress.passes.lowrank.rewrite import apply_factors, plain_attributes, taken_names
from onnxcompress.sites import WeightSite, find_weight_sites

if TYPE_CHECKING:
    from onnxcompress.passes.lowrank.latency import PairLatency

logger = logging.getLogger(__name__)

OPS = ("MatMul", "Gemm", "Conv")
_FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE)
DEFAULT_ENERGY = 0.9


class LowRankConfig(PassConfig):
    """Options of `lowrank.svd`: one rank mode (energy, ratio or budget), speed checks, a plan."""

    energy: float | None = pydantic.Field(
        None,
        gt=0.0,
        le=1.0,
        description="Keep this fraction of each weight's squared Frobenius norm (default 0.9 when "
        "no mode is given).",
    )
    ratio: float | None = pydantic.Field(
        None,
        gt=0.0,
        lt=1.0,
        description="Target per-layer size after/before, in (0, 1): 0.5 halves each layer.",
    )
    ratio_metric: Literal["params", "flops"] = pydantic.Field(
        "params", description="What `ratio` measures: parameters or FLOPs of each layer."
    )
    budget: float | None = pydantic.Field(
        None,
        gt=0.0,
        le=1.0,
        description="Fidelity budget: lowest output cosine on probes; ranks found by a greedy "
        "per-layer search (which, under a pipeline, also keeps to the step's gate).",
    )
    budget_ratios: tuple[float, ...] = pydantic.Field(
        (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
        description="Parameter ratios tried per layer by the budget search.",
    )
    probes: int = pydantic.Field(
        32, ge=1, le=4096, description="Probe samples for the budget search."
    )
    conv: Literal["auto", "channel", "spatial", "clustered", "off"] = pydantic.Field(
        "auto",
        description="Conv form: the cheaper of channel and spatial (auto), one of them, Denton's "
        "filter clustering (clustered: k-means groups of filters, each its own rank), or leave "
        "Conv alone (off).",
    )
    clusters: int = pydantic.Field(
        4, ge=2, le=1024,
        description="With conv=clustered: groups of output filters (k-means on the filters).",
    )
    speed: bool = pydantic.Field(
        False,
        description="Measure each factor pair with onnxruntime and keep the original unless "
        "faster.",
    )
    min_speedup: float = pydantic.Field(
        1.0,
        ge=1.0,
        description="With speed: the pair must be faster than the original by more than this "
        "factor.",
    )
    latency_batch: int = pydantic.Field(
        64, ge=1, description="With speed: batch size of the latency test."
    )
    threads: int = pydantic.Field(
        1, ge=1, le=256, description="With speed: onnxruntime intra-op threads."
    )
    svd: Literal["auto", "exact", "randomized"] = pydantic.Field(
        "auto",
        description="SVD method: randomized (seeded) for large matrices at small ranks under auto.",
    )
    min_params: int = pydantic.Field(
        4096, ge=0, description="Weights smaller than this are left alone."
    )
    max_sparsity: float = pydantic.Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="Layers with a larger share of zeros are left alone: dense factors would undo "
        "the pruning.",
    )
    include: tuple[str, ...] = pydantic.Field(
        (), description="Only weights matching these name globs."
    )
    exclude: tuple[str, ...] = pydantic.Field((), description="Weight-name globs never factorized.")
    plan: str | None = pydantic.Field(
        None, description="Apply a saved plan (JSON) instead of planning."
    )

    @pydantic.model_validator(mode="after")
    def _one_mode(self) -> LowRankConfig:
        given = [name for name in ("energy", "ratio", "budget") if getattr(self, name) is not None]
        if len(given) > 1:
            raise ValueError(f"give at most one of energy, ratio, budget (got {', '.join(given)})")
        if any(not 0.0 < r < 1.0 for r in self.budget_ratios) or not self.budget_ratios:
            raise ValueError("budget_ratios must be a non-empty list of values in (0, 1)")
        if self.conv == "clustered" and self.speed:
            raise ValueError("speed is not measured for conv=clustered (give one or the other)")
        return self

    @property
    def mode(self) -> str:
        """The rank mode in force: ratio, budget, else energy."""
        if self.ratio is not None:
            return "ratio"
        if self.budget is not None:
            return "budget"
        return "energy"

    def settings(self) -> dict[str, Any]:
        """The options as the plan records them, the mode and default energy spelled out."""
        data = self.model_dump(exclude={"plan"})
        data["mode"] = self.mode
        if self.mode == "energy" and self.energy is None:
            data["energy"] = DEFAULT_ENERGY
        return data


class _Layer:
    """An eligible weight: its site, its possible decompositions and Conv attributes."""

    def __init__(self, site: WeightSite, options: list[Any], conv: ConvAttributes | None) -> None:
        self.site = site
        self.options = options
        self.conv = conv

    def option(self, kind: str) -> Any:
        return next(d for d in self.options if d.kind == kind)

    def apply(self, model: ir.Model, kind: str, rank: int, first: np.ndarray, second: np.ndarray,
              taken: set[str]) -> None:
        """Rewrite the layer as the factors of `kind` at `rank`."""
        if kind == "conv_clustered":
            assert self.conv is not None
            blocks = self.option(kind).blocks(rank)
            apply_clustered(model, self.site, first, second, blocks, self.conv, taken)
        else:
            apply_factors(model, self.site, kind, first, second, self.conv, taken)


Layers = dict[str, _Layer]  # the eligible weights of one plan, by name
# (site, kind, first, second, shape, *, conv, threads, seed) -> the two latencies
LatencyProbe = Callable[..., "PairLatency"]


@register
class LowRankSVDPass(PlannedPass[Plan]):
    """Factorize weights by truncated SVD where the factors are smaller (and, if asked, faster)."""

    name = "lowrank.svd"
    summary = (
        "Truncated-SVD factorization of MatMul/Gemm/Conv (Denton et al. 2014), only where it pays."
    )
    Config = LowRankConfig
    config: LowRankConfig

    def __init__(self, config: PassConfig | None = None, /, *, context: PassContext | None = None,
                 latency: LatencyProbe | None = None, **options: Any) -> None:
        """`latency` replaces the onnxruntime timing of `speed` (a fixed answer in tests)."""
        super().__init__(config, context=context, **options)
        self.latency = latency

    # ---- eligibility ---------------------------------------------------------------------
    def _eligible(self, model: ir.Model, site: WeightSite) -> tuple[_Layer | None, str]:
        """The layer's decompositions, or None and the reason it is left alone."""
        if site.readers > 1:
            return (
                None,
                f"shared by {site.readers} readers; factorizing one would not remove the weight",
            )
        if site.dtype not in _FLOAT_TYPES:
            return None, f"dtype {site.dtype.name} not supported (float32, float16, float64)"
        if site.input_index != 1:
            return None, f"weight is input {site.input_index}, not the right operand"
        weight = site.array()
        zeros = 1.0 - np.count_nonzero(weight) / max(weight.size, 1)
        if zeros > self.config.max_sparsity:
            return None, (
                f"already pruned ({zeros:.0%} zeros > max_sparsity {self.config.max_sparsity}): "
                "dense factors would undo it; factorize before pruning, or keep it sparse "
                "(sparsify, pack)"
            )
        seed = self.context.seed
        method = self.config.svd
        node = site.node
        if site.op_type == "MatMul":
            if weight.ndim != 2:
                return None, f"MatMul weight is {weight.ndim}-D {list(weight.shape)}, not a matrix"
            options = [Decomposition("matmul", weight, svd_method=method, seed=seed)]
            conv = None
        elif site.op_type == "Gemm":
            if model.opset_imports.get("", 21) < 11:
                return None, "Gemm before opset 11 cannot omit the bias of the first factor"
            options = [
                Decomposition(
                    "gemm",
                    weight,
                    trans_b=bool(node.attributes.get_int("transB", 0)),
                    svd_method=method,
                    seed=seed,
                )
            ]
            conv = None
        else:
            layer_conv = self._conv_options(site, weight)
            if isinstance(layer_conv, str):
                return None, layer_conv
            options, conv = layer_conv
        useful = [d for d in options if d.max_rank > 0]
        if not useful:
            d = options[0]
            bound = d.rows * d.cols / (d.rows + d.cols)
            return (
                None,
                f"no rank saves parameters ({d.rows}×{d.cols} matrix needs r < mn/(m+n) = "
                f"{bound:.2f})",
            )
        return _Layer(site, useful, conv), ""

    def _conv_options(
        self, site: WeightSite, weight: np.ndarray
    ) -> tuple[list[Any], ConvAttributes] | str:
        if self.config.conv == "off":
            return "Conv factorization turned off (conv=off)"
        if weight.ndim < 3:
            return f"Conv weight is {weight.ndim}-D {list(weight.shape)}"
        conv = conv_attributes(plain_attributes(site.node), tuple(int(k) for k in weight.shape[2:]))
        if conv.group < 1 or weight.shape[0] % conv.group:
            return f"group {conv.group} does not divide {weight.shape[0]} output channels"
        if len(conv.strides) != len(conv.kernel) or len(conv.dilations) != len(conv.kernel):
            return "strides/dilations do not match the kernel rank"
        seed, method = self.context.seed, self.config.svd
        if self.config.conv == "clustered":
            return self._clustered_option(site, weight, conv)
        options: list[Any] = []
        if self.config.conv in ("auto", "channel"):
            options.append(
                Decomposition(
                    "conv_channel", weight, group=conv.group, svd_method=method, seed=seed
                )
            )
        if self.config.conv in ("auto", "spatial"):
            reason = self._spatial_blocker(conv)
            if reason is None:
                options.append(
                    Decomposition(
                        "conv_spatial",
                        weight,
                        group=conv.group,
                        width_stride=conv.strides[1],
                        svd_method=method,
                        seed=seed,
                    )
                )
            elif self.config.conv == "spatial":
                return f"spatial decomposition impossible: {reason}"
        return options, conv

    def _clustered_option(self, site: WeightSite, weight: np.ndarray,
                          conv: ConvAttributes) -> tuple[list[Any], ConvAttributes] | str:
        if conv.group != 1:
            return f"filter clustering needs group = 1, the Conv has group {conv.group}"
        if weight.shape[0] <= self.config.clusters:
            return f"{weight.shape[0]} filters cannot form {self.config.clusters} clusters"
        bias = site.node.inputs[2] if len(site.node.inputs) > 2 else None
        if bias is not None and bias.const_value is None:
            return "Conv bias is not a constant: it cannot be split between the filter groups"
        return [ClusteredDecomposition(weight, self.config.clusters, seed=self.context.seed)], conv

    @staticmethod
    def _spatial_blocker(conv: ConvAttributes) -> str | None:
        if len(conv.kernel) != 2:
            return f"needs a 2-D kernel, got {len(conv.kernel)}-D"
        if min(conv.kernel) < 2:
            return f"kernel {list(conv.kernel)} is already separable"
        if conv.auto_pad not in ("NOTSET", "VALID"):
            return f"auto_pad={conv.auto_pad} cannot be split between the two convolutions"
        return None

    # ---- rank selection ------------------------------------------------------------------
    def _by_energy(self, layer: _Layer) -> tuple[Decomposition, int] | str:
        energy = self.config.energy if self.config.energy is not None else DEFAULT_ENERGY
        found, reasons = [], []
        for d in layer.options:
            rank = d.rank_for_energy(energy)
            if rank is None:
                reasons.append(
                    f"{d.kind}: energy {energy} needs rank > {d.max_rank}, no saving below r < "
                    f"{d.rows * d.cols / (d.rows + d.cols):.1f}"
                )
            else:
                found.append((d.flops_after(rank), d.relative_error(rank), d, rank))
        if not found:
            return "; ".join(reasons)
        _, _, d, rank = min(found, key=lambda item: (item[0], item[1]))
        return d, rank

    def _by_ratio(self, layer: _Layer) -> tuple[Decomposition, int] | str:
        assert self.config.ratio is not None
        found, reasons = [], []
        for d in layer.options:
            rank = d.rank_for_ratio(self.config.ratio, self.config.ratio_metric)
            if rank > d.max_rank:
                reasons.append(
                    f"{d.kind}: ratio {self.config.ratio} gives rank {rank} ≥ the no-saving bound "
                    f"{d.rows * d.cols / (d.rows + d.cols):.1f}"
                )
            else:
                found.append((d.relative_error(rank), d.flops_after(rank), d, rank))
        if not found:
            return "; ".join(reasons)
        _, _, d, rank = min(found, key=lambda item: (item[0], item[1]))
        return d, rank

    # ---- planning ------------------------------------------------------------------------
    def plan(self, model: ir.Model) -> Plan:
        """Decide kind and rank per layer without touching the model (or load the saved plan)."""
        config = self.config
        if config.plan:
            return Plan.load(config.plan)
        scan = find_weight_sites(model, min_params=config.min_params, include=config.include,
                                 exclude=config.exclude, ops=OPS)
        plan = Plan(settings=config.settings())
        plan.skipped.extend((skip.name, skip.reason) for skip in scan.skipped)
        layers: Layers = {}
        for site in scan.sites:
            layer, reason = self._eligible(model, site)
            if layer is None:
                plan.skipped.append((site.name, reason))
            else:
                layers[site.name] = layer
        if config.mode == "budget":
            chosen = self._budget_choices(model, plan, layers)
        else:
            chosen = self._rank_choices(plan, layers)
        shapes = self._input_shapes(model, layers) if config.speed else {}
        for name, (d, rank) in chosen.items():
            layer_plan = self._layer_plan(layers[name], d, rank)
            if config.speed:
                layer_plan, reason = self._check_speed(layers[name], d, layer_plan, shapes)
                if reason:
                    plan.skipped.append((name, reason))
                    continue
            plan.layers.append(layer_plan)
        plan.layers.sort(key=lambda layer: layer.name)
        plan.prepared = {"model": model, "layers": layers}
        return plan

    def _rank_choices(self, plan: Plan, layers: Layers) -> dict[str, tuple[Decomposition, int]]:
        """Kind and rank of each layer by energy or ratio; a layer no rank suits joins the skips."""
        chosen = {}
        for name, layer in layers.items():
            by_ratio = self.config.mode == "ratio"
            result = self._by_ratio(layer) if by_ratio else self._by_energy(layer)
            if isinstance(result, str):
                plan.skipped.append((name, result))
            else:
                chosen[name] = result
        return chosen

    def _layer_plan(self, layer: _Layer, d: Decomposition, rank: int) -> LayerPlan:
        return LayerPlan(
            name=layer.site.name,
            node=layer.site.node.name or "",
            op=layer.site.op_type,
            kind=d.kind,
            rank=rank,
            max_rank=d.max_rank,
            shape=layer.site.shape,
            params_before=d.params_before,
            params_after=d.params_after(rank),
            flops_before=d.flops_before,
            flops_after=d.flops_after(rank),
            energy=round(d.energy(rank), 6),
            rel_error=round(d.relative_error(rank), 6),
        )

    def _budget_choices(self, model: ir.Model, plan: Plan,
                        layers: Layers) -> dict[str, tuple[Decomposition, int]]:
        from onnxcompress.fidelity import compare, probe_inputs, run_model

        assert self.config.budget is not None
        checked = self._gate_checks()
        reference_model = self.context.original or model
        probes = {} if checked else probe_inputs(
            reference_model,
            count=self.config.probes,
            seed=self.context.seed,
            data=self.context.data,
        )
        reference = None if checked else run_model(reference_model, probes)
        candidates = self._budget_candidates(plan, layers)

        def evaluate(choice: Mapping[str, Candidate]) -> float:
            trial = model.clone()
            sites = find_weight_sites(trial, min_params=0, ops=OPS).by_name()
            taken = taken_names(trial)
            for name, candidate in choice.items():
                layer = layers[name]
                d = layer.option(candidate.kind)
                first, second = d.factors(candidate.rank)
                trial_layer = _Layer(sites[name], layer.options, layer.conv)
                trial_layer.apply(trial, d.kind, candidate.rank, first, second, taken)
            if reference is None:  # the pipeline's gate and probes judge it
                return self._gated_cosine(trial)
            return compare(reference, run_model(trial, probes)).cosine

        selection = greedy_select(candidates, evaluate, self.config.budget)
        chosen = {}
        for name in candidates:
            candidate = selection.choice.get(name)
            if candidate is None:
                best = max((score for _, score in selection.table[name]), default=float("nan"))
                reason = (
                    "no candidate rank alone passes the step's gate"
                    if best == -math.inf
                    else f"no candidate rank keeps the output cosine ≥ the search threshold "
                    f"(best alone {best:.6f}, budget {self.config.budget})"
                )
                plan.skipped.append((name, reason))
            else:
                chosen[name] = (layers[name].option(candidate.kind), candidate.rank)
        plan.settings["budget_search"] = {
            "joint_cosine": selection.score,
            "threshold": selection.threshold,
        }
        return chosen

    def _budget_candidates(self, plan: Plan, layers: Layers) -> dict[str, list[Candidate]]:
        """Each layer's (kind, rank) at each of `budget_ratios`, cheapest first; SVDs once."""
        candidates: dict[str, list[Candidate]] = {}
        for name, layer in layers.items():
            options = {}
            for d in layer.options:
                for ratio in self.config.budget_ratios:
                    rank = d.rank_for_ratio(ratio, "params")
                    if rank <= d.max_rank:
                        options[(d.kind, rank)] = Candidate(d.kind, rank, d.flops_after(rank))
            if options:
                candidates[name] = sorted(options.values(), key=lambda c: (c.cost, c.kind))
                for d in layer.options:  # one SVD per form, at the largest candidate rank
                    ranks = [c.rank for c in options.values() if c.kind == d.kind]
                    if ranks:
                        d.svds(max(ranks))
            else:
                plan.skipped.append((name, "no candidate rank below the no-saving bound"))
        return candidates

    def _gate_checks(self) -> bool:
        """Whether the pipeline handed its gate: the search then keeps to it, not to cosine alone.

        A plan chosen on cosine ≥ budget alone could still miss the gate the pipeline verifies
        the step with (tightened by its margin: cosine ≥ 0.9975, rank ≥ 0.995 by default) and
        be refused whole; on the gate's own probes every plan the search keeps passes it.
        """
        context = self.context
        return None not in (context.gate, context.probes, context.reference)

    def _gated_cosine(self, trial: ir.Model) -> float:
        """The trial's output cosine on the gate's probes, or -inf where it misses the gate."""
        metrics, failures = self.context.judged(trial)
        return -math.inf if failures else float(metrics.cosine)

    # ---- speed ---------------------------------------------------------------------------
    @staticmethod
    def _input_shapes(model: ir.Model, layers: Layers) -> dict[str, tuple[int | None, ...]]:
        if not any(layer.site.op_type == "Conv" for layer in layers.values()):
            return {}
        from onnxcompress.passes.lowrank.latency import static_input_shapes

        return static_input_shapes(model)

    def _latency_input(
        self, layer: _Layer, shapes: dict[str, tuple[int | None, ...]]
    ) -> tuple[int, ...] | str:
        site, batch = layer.site, self.config.latency_batch
        weight_shape = site.shape
        if site.op_type == "MatMul":
            return (batch, weight_shape[0])
        if site.op_type == "Gemm":
            k = weight_shape[1] if site.node.attributes.get_int("transB", 0) else weight_shape[0]
            return (k, batch) if site.node.attributes.get_int("transA", 0) else (batch, k)
        x = site.node.inputs[0]
        shape = shapes.get(x.name or "") if x is not None else None
        if shape is None or any(d is None for d in shape[1:]):
            return "speed check needs a static Conv input shape (none could be inferred)"
        return (batch, *[int(d) for d in shape[1:]])  # type: ignore[arg-type]

    def _check_speed(
        self,
        layer: _Layer,
        d: Decomposition,
        layer_plan: LayerPlan,
        shapes: dict[str, tuple[int | None, ...]],
    ) -> tuple[LayerPlan, str]:
        from onnxcompress.passes.lowrank.latency import measure_pair

        shape = self._latency_input(layer, shapes)
        if isinstance(shape, str):
            return layer_plan, shape
        first, second = d.factors(layer_plan.rank)
        measure = self.latency or measure_pair
        timing = measure(layer.site, d.kind, first, second, shape, conv=layer.conv,
                         threads=self.config.threads, seed=self.context.seed)
        layer_plan = dataclasses.replace(layer_plan, latency_before_ms=round(timing.original_ms, 4),
                                         latency_after_ms=round(timing.pair_ms, 4))
        if not timing.original_ms > self.config.min_speedup * timing.pair_ms:
            return layer_plan, (
                f"factor pair not faster: {timing.pair_ms:.3f} ms vs {timing.original_ms:.3f} ms "
                f"for the original at input {list(shape)} (rank {layer_plan.rank}, {d.kind})"
            )
        return layer_plan, ""

    # ---- apply ---------------------------------------------------------------------------
    def apply(self, model: ir.Model, plan: Plan, report: PassReport) -> bool:
        """Plan every layer, factor them all, then rewrite: the pass applies fully or not at all."""
        self.record_plan(plan, report)
        if not plan.layers:
            return False
        work = self._prepare(model, plan)  # every check and every SVD before the first edit
        taken = taken_names(model)
        for layer_plan, layer, first, second in work:
            before = layer.site.array()
            layer.apply(model, layer_plan.kind, layer_plan.rank, first, second, taken)
            detail = (
                f"{layer_plan.kind} rank {layer_plan.rank} (max useful {layer_plan.max_rank}), "
                f"energy {layer_plan.energy:.4f}, rel. error {layer_plan.rel_error:.4g}"
            )
            if layer_plan.kind == "conv_clustered":
                ranks = layer.option(layer_plan.kind).ranks(layer_plan.rank)
                detail += f", {len(ranks)} filter groups of ranks {ranks}"
            report.changed(
                layer_plan.name, layer_plan.op, before, params_after=layer_plan.params_after,
                bytes_after=layer_plan.params_after * first.itemsize, detail=detail,
            )
        return True

    def _prepare(
        self, model: ir.Model, plan: Plan
    ) -> list[tuple[LayerPlan, _Layer, np.ndarray, np.ndarray]]:
        planned_here = plan.prepared.get("model") is model
        layers: Layers = dict(plan.prepared["layers"]) if planned_here else {}
        if not planned_here:  # a plan read back from JSON: find its layers in this model
            sites = find_weight_sites(model, min_params=0, ops=OPS).by_name()
            for layer_plan in plan.layers:
                site = sites.get(layer_plan.name)
                if site is None:
                    raise RecipeError(
                        f"plan layer {layer_plan.name!r} is not a MatMul/Gemm/Conv weight of this "
                        "model"
                    )
                layer, reason = self._eligible(model, site)
                if layer is None:
                    raise UnsupportedModelError(
                        f"plan layer {layer_plan.name!r} cannot be factorized: {reason}"
                    )
                layers[layer_plan.name] = layer
        work = []
        for layer_plan in plan.layers:
            layer = layers[layer_plan.name]
            if layer.site.shape != tuple(layer_plan.shape):
                raise RecipeError(
                    f"plan layer {layer_plan.name!r} has shape {list(layer_plan.shape)}, "
                    f"the model's weight is {list(layer.site.shape)}"
                )
            kinds = [d.kind for d in layer.options]
            if layer_plan.kind not in kinds:
                raise RecipeError(
                    f"plan layer {layer_plan.name!r}: kind {layer_plan.kind!r} not possible here "
                    f"({kinds})"
                )
            d = layer.option(layer_plan.kind)
            if not 1 <= layer_plan.rank <= d.max_rank:
                raise RecipeError(
                    f"plan layer {layer_plan.name!r}: rank {layer_plan.rank} saves nothing "
                    f"(must be in 1..{d.max_rank})"
                )
            first, second = d.factors(layer_plan.rank)
            work.append((layer_plan, layer, first, second))
        return work
