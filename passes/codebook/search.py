"""Per-layer bit widths found by search: the fewest bytes that keep the WHOLE model within its gate.

One bit width for every layer wastes bytes where layers are robust and breaks the model where
they are not (a 214-class classifier at 5 bits everywhere: top-1 agreement 0.92). HAQ/HAWQ
allocate bits per layer; this is the simplest faithful version of that idea:

1. Candidates per layer: k-means codebooks at each width in `bits` (8, 7, 6, 5, 4, 3 by default),
   each scored by its relative layer-output error on the calibration inputs,

       e(l, b) = tr(D^T H D) / tr(W^T H W),   D = W_b - W,   H = X^T X  (onnxcompress.calibration),

   the quantity OBS/GPTQ minimise. Weights without a captured input use H = I, the relative
   weight error (per output channel, averaged, for convolutions: `_channel_relative_error`):
   embeddings, and layers inside If/Loop/Scan subgraphs (their inputs are no main-graph values,
   so they cannot be exposed as outputs; silero-vad's every layer), or reading their weight
   through Slice/Concat/... Bytes: indices at b bits plus the codebook.
2. One tolerance t for all layers: each layer takes its cheapest candidate with e <= t (none:
   its 8-bit codebook when 8 bits everywhere passes the step's gate, as `optimize` without data
   would write, else dense). Larger t, smaller model, larger drift.
3. t is found by bisection over the sorted candidate errors, each trial verified on the whole
   model against the ORIGINAL's outputs with the step's own gate (the pipeline's probes and
   reference) tightened by `margin`; the largest t that passes wins. Trials are cheap: the
   codebooks are computed once. The margin is there because the choice is fitted to the
   calibration inputs: on open-nsfw (30 calibration images) a choice at rank correlation 0.985
   held only 0.975 on 35 other images.

Exact: every written weight is codebook[indices]; the written model passed the gate on the
probes. Lossy: the codebooks; the search is greedy in one dimension (one t), not optimal.
"""

from __future__ import annotations

__all__ = ["CodebookSearchConfig", "CodebookSearchPass", "Candidate", "Fitter"]

import dataclasses
import logging
import pickle
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import onnx_ir as ir
import pydantic

from onnxcompress import fidelity
from onnxcompress.calibration import RECURRENT, LayerHessian, layer_hessians
from onnxcompress.errors import UnsupportedModelError
from onnxcompress.formats.codebook import insert_codebook
from onnxcompress.formats.packed import (
    decoder_nbytes,
    pack_codebook_indices,
    packed_nbytes,
    packing_pays,
)
from onnxcompress.io import model_bytes
from onnxcompress.parallel import SweepCache, Task, make_executor, run_sweep
from onnxcompress.parallel.sweep import Sweep, adopt, forget
from onnxcompress.pass_base import CompressionPass, PassConfig, PassReport, register
from onnxcompress.passes.codebook.kmeans import KMeansClusterPass, cluster_weights
from onnxcompress.sites import WeightSite, find_weight_sites

logger = logging.getLogger(__name__)


class CodebookSearchConfig(PassConfig):
    """Options of `codebook.search`: candidate widths, the trial budget and the fitting method."""

    bits: tuple[int, ...] = pydantic.Field(
        (8, 7, 6, 5, 4, 3), description="Candidate bit widths per layer (1..8).")
    exclude: tuple[str, ...] = pydantic.Field((), description="Weight-name globs never clustered.")
    min_params: int = pydantic.Field(
        64, ge=0, description="Weights with fewer parameters stay dense."
    )
    max_trials: int = pydantic.Field(12, ge=1, le=64, description="Most whole-model verifications.")
    method: Literal["kmeans", "gptq"] = pydantic.Field(
        "kmeans",
        description="How each width's codebook is fitted: plain k-means, or GPTQ error feedback "
        "under H (codebook.gptq) for widths <= gptq_max_bits, kept where it lowers the calibration "
        "error (it can fit small calibration sets too closely: see docs/codebook.md).",
    )
    gptq_max_bits: int = pydantic.Field(
        6, ge=1, le=8, description="Widest width fitted with GPTQ (cost grows)."
    )
    margin: float = pydantic.Field(
        0.75,
        ge=0,
        le=1,
        description="Share of each 'at least' threshold's headroom to 1 the search keeps in "
        "reserve (0.75: rank >= 0.98 is searched as >= 0.995), so the choice holds on inputs it "
        "did not see.",
    )

    executor: Literal["local", "ray"] = pydantic.Field(
        "local",
        description="Where the per-layer errors are measured: this machine's processes, or a Ray "
        "cluster (one task per layer and width; pip install 'onnxcompress[ray]').",
    )
    workers: int = pydantic.Field(
        1, ge=1, description="Local processes, or CPUs of a local Ray cluster."
    )
    ray_address: str | None = pydantic.Field(
        None, description="Ray cluster to join (auto, ray://host:port); None starts a local one.")
    cache: str | None = pydantic.Field(
        None,
        description="Folder caching each layer's error per width by model hash, so a re-run is "
        "free.",
    )

    @pydantic.field_validator("bits")
    @classmethod
    def _check_bits(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if not value or any(not 1 <= b <= 8 for b in value):
            raise ValueError("bits must be a non-empty list of widths in 1..8")
        return tuple(sorted(set(value), reverse=True))


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One layer at one bit width: how its codebook is fitted, its error and its bytes."""

    bits: int
    method: str
    error: float
    nbytes: int


class Fitter:
    """Fits one layer's codebook at one width: a sweep worker's state (built once per process).

    The pass's own process keeps what it fits (`keep`), so a serial search fits each codebook
    once; remote workers send back only the error and the bytes, and the pass fits again the
    few widths its trials choose (k-means and GPTQ are seeded: the same codebook).
    """

    def __init__(
        self, model: ir.Model, hessians: dict[str, LayerHessian], seed: int, *, keep: bool = False
    ):
        self.model = model
        self.sites = {
            site.name: site for site in find_weight_sites(model, min_params=0, derived=True).sites
        }
        self.hessians = hessians
        self.seed = seed
        self.keep = keep
        self._fitted: dict[tuple[str, str, int], tuple[np.ndarray, np.ndarray, bool]] = {}

    def fit(self, name: str, method: str, bits: int) -> tuple[np.ndarray, np.ndarray, bool]:
        """(indices, codebook, zero_entry) of layer `name` at `bits`."""
        if (name, method, bits) in self._fitted:
            return self._fitted[name, method, bits]
        site = self.sites[name]
        if method == "gptq":
            from onnxcompress.passes.reconstruct.codebook_gptq import gptq_codebook

            fitted = gptq_codebook(self.model, site, self.hessians.get(name), bits, seed=self.seed)
        else:
            fitted = cluster_weights(site.array(), bits, seed=self.seed)
        if self.keep:
            self._fitted[name, method, bits] = fitted
        return fitted

    def weights(self, name: str, method: str, bits: int, dtype: np.dtype) -> np.ndarray:
        """The layer's weights as `fit` shares them, in the model's dtype, for trial models."""
        indices, codebook, _ = self.fit(name, method, bits)
        return codebook[indices].astype(dtype)


def _fitter_from(payload: bytes) -> Fitter:
    payload_model, hessians, seed = pickle.loads(payload)
    return Fitter(ir.from_proto(onnx.load_from_string(payload_model)), hessians, seed)


def _measure(fitter: Fitter, task: Task) -> dict[str, float] | None:
    """One (layer, method, width): its relative error and stored bytes; None when not smaller."""
    site, bits = fitter.sites[task.layer], int(task.setting)
    indices, codebook, _ = fitter.fit(task.layer, task.method, bits)
    nbytes = index_bytes(site.name, site.size, bits) + codebook.nbytes
    if nbytes >= site.size * site.array().dtype.itemsize:
        return None
    stats = fitter.hessians.get(task.layer)
    error = relative_error(site.array(), codebook[indices], stats.hessian if stats else None, site)
    return {"error": error, "nbytes": nbytes}


def index_bytes(name: str, count: int, bits: int) -> int:
    """Bytes of `count` indices as they will be stored: bit-packed below 8 bits where it pays."""
    return (
        packed_nbytes(count, bits) + decoder_nbytes(name)
        if packing_pays(name, count, bits)
        else count
    )


def relative_error(
    weights: np.ndarray, quantized: np.ndarray, hessian: np.ndarray | None, site: WeightSite
) -> float:
    """tr(D^T H D) / tr(W^T H W) in the layer's (out, in) form; H = I when no input was captured."""
    delta = (np.asarray(quantized, np.float64) - np.asarray(weights, np.float64))
    if hessian is None:
        if site.op_type in ("Conv", "ConvTranspose") and site.out_axis is not None:
            return _channel_relative_error(np.asarray(weights, np.float64), delta, site.out_axis)
        denominator = float(np.sum(np.asarray(weights, np.float64) ** 2))
        return float(np.sum(delta**2)) / denominator if denominator > 0 else 0.0
    rows_delta, rows_weight = (
        _out_by_in(delta, site),
        _out_by_in(np.asarray(weights, np.float64), site),
    )
    groups = hessian.shape[0]
    per_group = rows_delta.shape[0] // groups
    num = den = 0.0
    for g in range(groups):
        d, w = (
            rows_delta[g * per_group : (g + 1) * per_group],
            rows_weight[g * per_group : (g + 1) * per_group],
        )
        num += float(np.sum((d @ hessian[g]) * d))
        den += float(np.sum((w @ hessian[g]) * w))
    return num / den if den > 0 else 0.0


def _channel_relative_error(weights: np.ndarray, delta: np.ndarray, out_axis: int) -> float:
    """Mean over output channels of |d_c|^2 / |w_c|^2: a conv's error without its input.

    A ReLU network computes the same function when one channel's filter is scaled by a > 0
    and what reads that channel by 1/a, so the weights' own scale says nothing of a channel's
    weight downstream; this error is blind to that rescaling too, the whole-tensor one is not.
    On silero-vad (its layers sit inside If branches: no captured input) the whole-tensor error
    ranked its most fragile layer (encoder.3: one 54.9 weight beside channels of norm 0.27)
    the safest at 8 bits (2e-5, against 1.4e-3 here, where 6-bit LSTM weights score 1.7e-3).
    """
    w = np.moveaxis(weights, out_axis, 0).reshape(weights.shape[out_axis], -1)
    d = np.moveaxis(delta, out_axis, 0).reshape(w.shape)
    norms = np.sum(w**2, axis=1)
    live = norms > 0
    return float(np.mean(np.sum(d[live] ** 2, axis=1) / norms[live])) if live.any() else 0.0


def _out_by_in(array: np.ndarray, site: WeightSite) -> np.ndarray:
    """The weight as [output channels, input features] in the calibration's feature order."""
    if site.op_type == "Conv":
        return array.reshape(array.shape[0], -1)
    if site.op_type in RECURRENT:  # [directions, gates * hidden, d]: a row group per direction
        return array.reshape(-1, array.shape[-1])
    if site.op_type == "Gemm" and site.node.attributes.get_int("transB", 0) == 1:
        return array
    return array.T  # MatMul and Gemm without transB store [in, out]


@register
class CodebookSearchPass(CompressionPass):
    """Per-layer k-means bit widths, the fewest bytes whose whole model passes the step's gate."""

    name = "codebook.search"
    summary = (
        "Weight sharing with per-layer bits found by search: fewest bytes within the step's gate."
    )
    Config = CodebookSearchConfig
    config: CodebookSearchConfig

    def rewrite(self, model: ir.Model, report: PassReport) -> bool:
        """Pick each layer's width against the step's gate, verifying the whole model as it goes."""
        context = self.context
        if context.probes is None or context.reference is None:
            raise UnsupportedModelError(
                f"{self.name} runs inside a gated step (optimize or a recipe)"
            )
        scan = find_weight_sites(
            model, min_params=self.config.min_params, exclude=self.config.exclude, derived=True
        )
        for skip in scan.skipped:
            report.skip(skip.name, skip.reason)
        checker = KMeansClusterPass(bits=min(self.config.bits), min_params=self.config.min_params)
        sites = []
        named = Counter(site.name for site in scan.sites)
        for site in scan.sites:
            reason = checker._reason_to_skip(model, site)
            if named[site.name] > 1:  # the search keys its codebooks by weight name
                reason = "another weight has the same name (sibling subgraphs): use codebook.kmeans"
            if reason is not None and "would not be smaller" not in reason:
                report.skip(site.name, reason)
            else:
                sites.append(site)
        if not sites:
            return False
        try:
            fitter, candidates = self._candidates(model, sites)
            choice = self._search(model, sites, candidates, fitter, report)
            return self._write(model, sites, candidates, choice, fitter, report)
        finally:
            forget()  # the fitted codebooks of this process go with the pass

    def _candidates(
        self, model: ir.Model, sites: list[WeightSite]
    ) -> tuple[Fitter, dict[str, list[Candidate]]]:
        """Every layer's codebook at every width, cheapest first, with its error and bytes.

        One sweep task per (layer, method, width), on the configured executor, through its cache.
        """
        hessians = layer_hessians(model, self.context.probes or {}, sites, seed=self.context.seed)
        fitter = Fitter(model, hessians, self.context.seed, keep=True)
        payload = pickle.dumps(
            (
                model_bytes(model),
                {s.name: hessians[s.name] for s in sites if s.name in hessians},
                self.context.seed,
            )
        )
        sweep = Sweep(payload, _fitter_from, _measure)
        adopt(sweep.key, fitter)  # a serial sweep fits in this process, with the live model
        tasks = [Task(site.name, self._method(site, hessians.get(site.name), bits), float(bits))
                 for site in sites for bits in self.config.bits]
        config = self.config
        cache = SweepCache(Path(config.cache)) if config.cache is not None else None
        with make_executor(
            config.executor, workers=config.workers, address=config.ray_address
        ) as executor:
            results = run_sweep(
                sweep, tasks, executor=executor, cache=cache, on_result=self._layer_progress(tasks)
            )
        table: dict[str, list[Candidate]] = {site.name: [] for site in sites}
        for task, result in zip(tasks, results, strict=True):
            if result is not None:
                table[task.layer].append(
                    Candidate(int(task.setting), task.method, result["error"], result["nbytes"])
                )
        return fitter, {
            name: sorted(options, key=lambda c: c.nbytes) for name, options in table.items()
        }

    def _method(self, site: WeightSite, stats: LayerHessian | None, bits: int) -> str:
        return (
            "gptq"
            if self.config.method == "gptq"
            and stats is not None
            and bits <= self.config.gptq_max_bits
            else "kmeans"
        )

    def _layer_progress(self, tasks: list[Task]) -> Callable[[int], None]:
        widths, layers = len(self.config.bits), len(tasks) // len(self.config.bits)
        done: dict[str, int] = {}

        def count(index: int) -> None:
            name = tasks[index].layer
            done[name] = done.get(name, 0) + 1
            if done[name] == widths:
                finished = sum(1 for n in done.values() if n == widths)
                self._say(f"{self.name}: codebooks for layer {finished}/{layers} ({name})")

        return count

    def _say(self, line: str) -> None:
        logger.info(line)
        if self.context.progress is not None:
            self.context.progress(line)

    @staticmethod
    def _pick(options: list[Candidate], tolerance: float) -> Candidate | None:
        return next((c for c in options if c.error <= tolerance), None)

    def _search(
        self,
        model: ir.Model,
        sites: list[WeightSite],
        candidates: dict[str, list[Candidate]],
        fitter: Fitter,
        report: PassReport,
    ) -> dict[str, Candidate | None]:
        """The largest tolerance whose choice passes the gate (bisection over candidate errors).

        8 bits everywhere, checked with the step's own gate, is the floor (what `optimize` writes
        without data); widths below it must pass the gate tightened by `margin`.
        """
        errors = sorted({c.error for options in candidates.values() for c in options})
        floor = {
            name: next((c for c in options if c.bits >= 8), None)
            for name, options in candidates.items()
        }
        if not any(floor.values()) or not self._passes(
            model, sites, floor, fitter, tightened=False
        ):
            floor = {name: None for name in candidates}
        # errors[low] passes (-1: the floor), errors[high + 1..] fail
        low, high = -1, len(errors) - 1
        best, trials = floor, 1
        if errors and self._passes(
            model, sites, self._choose(candidates, errors[-1], floor), fitter
        ):
            return self._choose(candidates, errors[-1], floor)
        trials += 1
        high -= 1
        while low < high and trials < self.config.max_trials:
            middle = (low + high + 1) // 2
            choice = self._choose(candidates, errors[middle], floor)
            trials += 1
            self._say(f"{self.name}: trial {trials}, tolerance {errors[middle]:.3g}")
            if self._passes(model, sites, choice, fitter):
                low, best = middle, choice
            else:
                high = middle - 1
        tolerance = errors[low] if low >= 0 else 0.0
        report.notes.update({"tolerance": tolerance, "trials": trials,
                             "floor": "8 bits" if any(floor.values()) else "dense"})
        logger.info("%s: tolerance %.3g after %d trials", self.name, tolerance, trials)
        return best

    def _choose(self, candidates: dict[str, list[Candidate]], tolerance: float,
                floor: dict[str, Candidate | None]) -> dict[str, Candidate | None]:
        return {
            name: self._pick(options, tolerance) or floor[name]
            for name, options in candidates.items()
        }

    def _passes(self, model: ir.Model, sites: list[WeightSite], choice: dict[str, Candidate | None],
                fitter: Fitter, *, tightened: bool = True) -> bool:
        trial = model.clone()
        trial_sites = {
            s.name: s for s in find_weight_sites(trial, min_params=0, derived=True).sites
        }
        for site in sites:
            candidate = choice[site.name]
            if candidate is not None and site.name in trial_sites:
                trial_sites[site.name].replace(
                    fitter.weights(site.name, candidate.method, candidate.bits, site.array().dtype))
        gate = self._searched_gate() if tightened else (self.context.gate or fidelity.DEFAULT_GATE)
        try:
            outputs = fidelity.run(trial, self.context.probes or {}, self.context.reference.views)
        except UnsupportedModelError:
            return False
        metrics = fidelity.compare(self.context.reference, outputs, task=self.context.task)
        return not gate.failures(metrics)

    def _searched_gate(self) -> fidelity.Gate:
        """The step's gate with `margin` of each lower bound's headroom held back."""
        gate = self.context.gate or fidelity.DEFAULT_GATE
        tightened = {
            name: bound + (1.0 - bound) * self.config.margin
            for name in ("min_cosine", "min_rank_correlation", "min_top1")
            if (bound := getattr(gate, name)) is not None and bound < 1.0
        }
        return gate.model_copy(update=tightened)

    def _write(
        self,
        model: ir.Model,
        sites: list[WeightSite],
        candidates: dict[str, list[Candidate]],
        choice: dict[str, Candidate | None],
        fitter: Fitter,
        report: PassReport,
    ) -> bool:
        changed = False
        for site in sites:
            candidate = choice[site.name]
            if candidate is None:
                options = candidates[site.name]
                cheapest = (
                    f"{options[-1].bits} bits error {options[-1].error:.3g}"
                    if options
                    else "no saving"
                )
                report.skip(site.name, f"kept dense: even {cheapest} is over the tolerance")
                continue
            weights = site.array()
            scored = "layer" if site.name in fitter.hessians else "weight"  # H = I: weight error
            indices, codebook, zero_entry = fitter.fit(site.name, candidate.method, candidate.bits)
            insert_codebook(model.graph, site.value, indices, codebook,
                            bits=candidate.bits, zero_entry=zero_entry, packed=False)
            report.changed(
                site.name,
                site.op_type,
                weights,
                params_after=int(np.count_nonzero(codebook[indices])),
                bytes_after=candidate.nbytes,
                detail=f"{candidate.bits} bits ({scored} error {candidate.error:.3g}), "
                f"{codebook.size} values",
            )
            changed = True
        if changed and model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0)) >= 11:
            pack_codebook_indices(model)  # below 8 bits, where it pays for its decoder
        return changed
