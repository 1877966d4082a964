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
   model against the ORIGINAL's outputs with the gate the pipeline verifies the step with (its
   probes, reference, and gate tightened by the step's margin, `fidelity.MARGIN`); the largest t
   that passes wins. Trials are cheap: the codebooks are computed once. The margin is there
   because the choice is fitted to the calibration inputs: on open-nsfw (30 calibration images)
   a choice at rank correlation 0.985 held only 0.975 on 35 other images.

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
from onnxcompress.data import sample_axis, take_samples
from onnxcompress.errors import UnsupportedModelError
from onnxcompress.formats.codebook import insert_codebook
from onnxcompress.formats.packed import (
    decoder_nbytes,
    pack_codebook_indices,
    packed_nbytes,
    packing_pays,
    packs_indices,
)
from onnxcompress.io import model_bytes
from onnxcompress.parallel import SweepCache, Task, make_executor, run_sweep
from onnxcompress.parallel.sweep import Sweep, adopt, forget
from onnxcompress.pass_base import CompressionPass, PassConfig, PassReport, register
from onnxcompress.passes.codebook.kmeans import KMeansClusterPass, cluster_weights
from onnxcompress.passes.reconstruct.bias_correction import (
    centred_hessian,
    corrected_bias,
    layer_bias,
)
from onnxcompress.sites import WeightSite, constant_array, find_weight_sites, set_constant

logger = logging.getLogger(__name__)

PER_CHANNEL = "kmeans-per-channel"


class CodebookSearchConfig(PassConfig):
    """Options of `codebook.search`: candidate widths, the trial budget and the fitting method."""

    bits: tuple[int, ...] = pydantic.Field(
        (8, 7, 6, 5, 4, 3), description="Candidate bit widths per layer (1..8).")
    exclude: tuple[str, ...] = pydantic.Field((), description="Weight-name globs never clustered.")
    min_params: int = pydantic.Field(
        64, ge=0, description="Weights with fewer parameters stay dense."
    )
    max_trials: int = pydantic.Field(
        16, ge=1, le=64,
        description="Most whole-model verifications per bisection (2 + log2 of the candidates).",
    )
    method: Literal["auto", "kmeans", "gptq"] = pydantic.Field(
        "auto",
        description="How each width's codebook is fitted: plain k-means; 'auto' adds GPTQ error "
        "feedback under H (codebook.gptq) at every width for the layers with captured inputs when "
        "8-bit k-means on every layer misses the step's gate; 'gptq' uses it instead of k-means "
        "for widths <= gptq_max_bits. GPTQ is kept where it lowers the calibration error (it can "
        "fit small calibration sets too closely: see docs/codebook.md).",
    )
    bias_correction: bool = pydantic.Field(
        True,
        description="Move each layer's mean output error (on the calibration inputs) into the "
        "bias it owns, and score candidates by what is left (reconstruct.bias_correction).",
    )
    sensitivity: bool = pydantic.Field(
        True,
        description="Weigh each layer's error by how much of it reaches the output, measured "
        "once per layer with only that layer coded, so robust layers take fewer bits.",
    )
    sensitivity_samples: int = pydantic.Field(
        8, ge=1, description="Probe samples each layer's sensitivity is measured on."
    )
    per_channel: bool = pydantic.Field(
        True,
        description="Also try, per layer, one codebook over output channels divided by their own "
        "scale (4 bytes a channel): BatchNorm folded into Conv leaves channels at scales several "
        "times apart.",
    )
    gptq_max_bits: int = pydantic.Field(
        6, ge=1, le=8, description="Widest width fitted with GPTQ (cost grows)."
    )
    refine_trials: int = pydantic.Field(
        8, ge=0, le=64,
        description="Whole-model checks spent after the bisection lowering the layers that save "
        "the most bytes per unit of error, a batch at a time.",
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
    impact: float | None = None  # error x the layer's measured output sensitivity

    @property
    def score(self) -> float:
        """What the tolerance bounds: the impact on the output where measured, else the error."""
        return self.error if self.impact is None else self.impact


class Fitter:
    """Fits one layer's codebook at one width: a sweep worker's state (built once per process).

    The pass's own process keeps what it fits (`keep`), so a serial search fits each codebook
    once; remote workers send back only the error and the bytes, and the pass fits again the
    few widths its trials choose (k-means and GPTQ are seeded: the same codebook).
    """

    def __init__(
        self,
        model: ir.Model,
        hessians: dict[str, LayerHessian],
        seed: int,
        *,
        bias_correction: bool = True,
        keep: bool = False,
    ):
        self.model = model
        self.sites = {
            site.name: site for site in find_weight_sites(model, min_params=0, derived=True).sites
        }
        self.hessians = hessians
        self.seed = seed
        self.keep = keep
        self.packable = packs_indices(model)
        self.biased = {
            name for name, site in self.sites.items()
            if bias_correction and name in hessians and layer_bias(site) is not None
        }
        self._fitted: dict[tuple[str, str, int], Fit] = {}
        self._hessians: dict[str, np.ndarray | None] = {}
        self._energies: dict[str, float] = {}

    def fit(self, name: str, method: str, bits: int) -> Fit:
        """Layer `name`'s codebook at `bits` by `method` (seeded: the same every time)."""
        if (name, method, bits) in self._fitted:
            return self._fitted[name, method, bits]
        site = self.sites[name]
        if method == "gptq":
            from onnxcompress.passes.reconstruct.codebook_gptq import gptq_codebook

            stats = self.hessians.get(name)
            fitted = Fit(*gptq_codebook(self.model, site, stats, bits, seed=self.seed,
                                        refine=refit_affordable(stats, site.size)))
        elif method == PER_CHANNEL:
            scales = channel_scales(site)
            shared = (site.array() / scales).astype(site.array().dtype)
            fitted = Fit(*cluster_weights(shared, bits, seed=self.seed), scales=scales)
        else:
            fitted = Fit(*cluster_weights(site.array(), bits, seed=self.seed))
        if self.keep:
            self._fitted[name, method, bits] = fitted
        return fitted

    def weights(self, name: str, method: str, bits: int, dtype: np.dtype) -> np.ndarray:
        """The layer's weights as `fit` shares them, in the model's dtype, for trial models."""
        return self.fit(name, method, bits).weights().astype(dtype)

    def hessian(self, name: str) -> np.ndarray | None:
        """The Gram matrix a candidate's error is scored under: centred where a bias corrects."""
        if name not in self._hessians:  # centring costs a matrix product: once per layer
            stats = self.hessians.get(name)
            self._hessians[name] = (
                None if stats is None
                else centred_hessian(stats) if name in self.biased else stats.hessian
            )
        return self._hessians[name]

    def error(self, name: str, quantized: np.ndarray) -> float:
        """`relative_error` of `quantized` for layer `name`, its denominator computed once."""
        site, hessian = self.sites[name], self.hessian(name)
        if hessian is None:
            return relative_error(site.array(), quantized, None, site)
        if name not in self._energies:
            self._energies[name] = hessian_energy(site.array(), hessian, site)
        return relative_error(site.array(), quantized, hessian, site, self._energies[name])

    def correct_bias(self, site: WeightSite, method: str, bits: int) -> bool:
        """Write the bias that absorbs this candidate's mean output shift into `site`'s graph."""
        bias = layer_bias(site) if site.name in self.biased else None
        if bias is None:
            return False
        original = self.sites[site.name].array()
        delta = self.weights(site.name, method, bits, original.dtype).astype(np.float64) - original
        beta = site.node.attributes.get_float("beta", 1.0) if site.op_type == "Gemm" else 1.0
        array = constant_array(bias)
        assert array is not None  # layer_bias checked it
        set_constant(
            bias, corrected_bias(array, _out_by_in(delta, site), self.hessians[site.name], beta)
        )
        return True


@dataclasses.dataclass(frozen=True)
class Fit:
    """One fitted codebook: indices, shared values, the reserved-zero flag, channel scales."""

    indices: np.ndarray
    codebook: np.ndarray
    zero_entry: bool
    scales: np.ndarray | None = None

    def weights(self) -> np.ndarray:
        """The weight it decodes to: codebook[indices] (times the channel scales)."""
        shared = self.codebook[self.indices]
        return shared if self.scales is None else shared * self.scales

    @property
    def nbytes(self) -> int:
        """Stored bytes besides the indices: the codebook and the scales."""
        return self.codebook.nbytes + (0 if self.scales is None else self.scales.nbytes)


#: Most scatter-adds (rows x d^2) a GPTQ candidate's centroid refit may cost: seconds.
REFIT_BUDGET = 1 << 28


def refit_affordable(stats: LayerHessian | None, size: int) -> bool:
    """Whether GPTQ's least-squares centroid refit is worth its cost on this layer.

    It costs rows x d^2 scatter-adds, d the input features: on ddddocr's 8210 x 1024 Gemm 56 s
    per width against GPTQ's own 5 s, for 0.08% less error (GPTQ alone cut k-means's by 22x;
    benchmarks/results/ctc_kmeans_ddddocr.md).
    """
    if stats is None:
        return True
    features = stats.hessian.shape[-1]
    return (size // features) * features * features <= REFIT_BUDGET


def channel_scales(site: WeightSite) -> np.ndarray:
    """Each output channel's RMS, shaped to broadcast over the weight (1 for an all-zero one)."""
    array = np.asarray(site.array(), np.float64)
    assert site.out_axis is not None  # only layers with an output axis get these candidates
    axis = site.out_axis % array.ndim
    other = tuple(a for a in range(array.ndim) if a != axis)
    scales = np.sqrt(np.mean(array**2, axis=other, keepdims=True))
    return np.where(scales > 0, scales, 1.0).astype(site.array().dtype)


def _fitter_from(payload: bytes) -> Fitter:
    payload_model, hessians, seed, bias_correction = pickle.loads(payload)
    return Fitter(
        ir.from_proto(onnx.load_from_string(payload_model)), hessians, seed,
        bias_correction=bias_correction,
    )


def _measure(fitter: Fitter, task: Task) -> dict[str, float] | None:
    """One (layer, method, width): its relative error and stored bytes; None when not smaller."""
    site, bits = fitter.sites[task.layer], int(task.setting)
    fit = fitter.fit(task.layer, task.method, bits)
    nbytes = index_bytes(site.name, site.size, bits, packable=fitter.packable) + fit.nbytes
    if nbytes >= site.size * site.array().dtype.itemsize:
        return None
    error = fitter.error(task.layer, fit.weights())
    return {"error": error, "nbytes": nbytes}


def index_bytes(name: str, count: int, bits: int, *, packable: bool = True) -> int:
    """Bytes of `count` indices as they will be stored: bit-packed below 8 bits where it pays.

    Not `packable` (a model below opset 9): a byte each, whatever the width.
    """
    return (
        packed_nbytes(count, bits) + decoder_nbytes(name)
        if packable and packing_pays(name, count, bits)
        else count
    )


def relative_error(
    weights: np.ndarray, quantized: np.ndarray, hessian: np.ndarray | None, site: WeightSite,
    energy: float | None = None,
) -> float:
    """tr(D^T H D) / tr(W^T H W) in the layer's (out, in) form; H = I when no input was captured.

    `energy`: the denominator when known (`hessian_energy`; the same for every candidate).
    """
    delta = (np.asarray(quantized, np.float64) - np.asarray(weights, np.float64))
    if hessian is None:
        if site.op_type in ("Conv", "ConvTranspose") and site.out_axis is not None:
            return _channel_relative_error(np.asarray(weights, np.float64), delta, site.out_axis)
        denominator = float(np.sum(np.asarray(weights, np.float64) ** 2))
        return float(np.sum(delta**2)) / denominator if denominator > 0 else 0.0
    den = energy if energy is not None else hessian_energy(weights, hessian, site)
    return _quadratic(_out_by_in(delta, site), hessian) / den if den > 0 else 0.0


def hessian_energy(weights: np.ndarray, hessian: np.ndarray, site: WeightSite) -> float:
    """tr(W^T H W): the layer's output energy, `relative_error`'s denominator."""
    return _quadratic(_out_by_in(np.asarray(weights, np.float64), site), hessian)


def _quadratic(rows: np.ndarray, hessian: np.ndarray) -> float:
    """Sum over groups g of tr(R_g H_g R_g^T), R_g the rows of group g."""
    groups = hessian.shape[0]
    per_group = rows.shape[0] // groups
    total = 0.0
    for g in range(groups):
        part = rows[g * per_group : (g + 1) * per_group]
        total += float(np.sum((part @ hessian[g]) * part))
    return total


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


def _next_steps(
    candidates: dict[str, list[Candidate]],
    choice: dict[str, Candidate | None],
    dense: dict[str, int],
    frozen: set[str],
) -> list[tuple[str, Candidate]]:
    """Each layer's least damaging cheaper candidate, best bytes saved per score added first."""
    ranked = []
    for name, options in candidates.items():
        current = choice.get(name)
        now_bytes = current.nbytes if current is not None else dense[name]
        cheaper = [c for c in options if c.nbytes < now_bytes]
        if name in frozen or not cheaper:
            continue
        step = min(cheaper, key=lambda c: (c.score, c.nbytes))
        added = max(step.score - (current.score if current is not None else 0.0), 1e-30)
        ranked.append(((now_bytes - step.nbytes) / added, name, step))
    ranked.sort(key=lambda item: (-item[0], item[1]))
    return [(name, step) for _, name, step in ranked]


def _eight_bit_floor(candidates: dict[str, list[Candidate]]) -> dict[str, Candidate | None]:
    """Each layer's 8-bit candidate of least error: what `optimize` without data would write."""
    return {
        name: min((c for c in options if c.bits >= 8), key=lambda c: c.error, default=None)
        for name, options in candidates.items()
    }


def _choice_bytes(sites: list[WeightSite], choice: dict[str, Candidate | None]) -> int:
    """Stored bytes of the layers under a choice (dense where it keeps a layer dense)."""
    total = 0
    for site in sites:
        candidate = choice.get(site.name)
        total += candidate.nbytes if candidate is not None else site.size * site.array().itemsize
    return total


def _detail(candidate: Candidate, fit: Fit, scored: str, corrected: bool) -> str:
    """What the report says of a written layer: width, error, impact, codebook, bias."""
    impact = f", output impact {candidate.impact:.3g}" if candidate.impact is not None else ""
    return (
        f"{candidate.bits} bits ({scored} error {candidate.error:.3g}{impact}), "
        f"{fit.codebook.size} values"
        + (" per channel" if fit.scales is not None else "")
        + (", assigned by GPTQ" if candidate.method == "gptq" else "")
        + (", bias corrected" if corrected else "")
    )


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
            orders = {"layer error": candidates}
            if self.config.sensitivity:
                orders["output impact"] = self._weighted(model, sites, candidates, fitter)
            floor_holds = self._floor_holds(model, sites, candidates, fitter)
            found = {
                order: self._search(model, sites, ranked, floor_holds, fitter, report, order)
                for order, ranked in orders.items()
            }
            order = min(found, key=lambda name: _choice_bytes(sites, found[name]))
            report.notes["ordered by"] = order
            choice = self._refine(model, sites, orders[order], found[order], fitter, report)
            return self._write(model, sites, orders[order], choice, fitter, report)
        finally:
            forget()  # the fitted codebooks of this process go with the pass

    def _candidates(
        self, model: ir.Model, sites: list[WeightSite]
    ) -> tuple[Fitter, dict[str, list[Candidate]]]:
        """Every layer's codebook at every width, cheapest first, with its error and bytes.

        One sweep task per (layer, method, width), on the configured executor, through its cache.
        """
        hessians = layer_hessians(model, self.context.probes or {}, sites, seed=self.context.seed)
        correct = self.config.bias_correction
        fitter = Fitter(model, hessians, self.context.seed, bias_correction=correct, keep=True)
        payload = pickle.dumps(
            (
                model_bytes(model),
                {s.name: hessians[s.name] for s in sites if s.name in hessians},
                self.context.seed,
                correct,
            )
        )
        sweep = Sweep(payload, _fitter_from, _measure)
        adopt(sweep.key, fitter)  # a serial sweep fits in this process, with the live model
        tasks = [Task(site.name, method, float(bits))
                 for site in sites for bits in self.config.bits
                 for method in self._methods(site, hessians.get(site.name), bits)]
        table: dict[str, list[Candidate]] = {site.name: [] for site in sites}
        self._measured(sweep, [t for t in tasks if t.setting >= 8], table)
        narrower = [t for t in tasks if t.setting < 8]
        if self._wants_error_feedback(model, sites, table, fitter):
            # GPTQ takes k-means's place below 8 bits (it keeps k-means where no better)
            calibrated = [site.name for site in sites if site.name in hessians]
            self._say(f"{self.name}: 8-bit k-means misses the gate; fitting GPTQ codebooks for "
                      f"the {len(calibrated)} layers with captured inputs")
            narrower = [t for t in narrower if t.layer not in hessians] + [
                Task(name, "gptq", float(bits)) for name in calibrated for bits in self.config.bits
            ]
        self._measured(sweep, narrower, table)
        return fitter, {
            name: sorted(options, key=lambda c: c.nbytes) for name, options in table.items()
        }

    def _measured(self, sweep: Sweep, tasks: list[Task], table: dict[str, list[Candidate]]) -> None:
        """Run `tasks` on the configured executor, through its cache; add each candidate."""
        config = self.config
        cache = SweepCache(Path(config.cache)) if config.cache is not None else None
        with make_executor(
            config.executor, workers=config.workers, address=config.ray_address
        ) as executor:
            results = run_sweep(
                sweep, tasks, executor=executor, cache=cache, on_result=self._layer_progress(tasks)
            )
        for task, result in zip(tasks, results, strict=True):
            if result is not None:
                table[task.layer].append(
                    Candidate(int(task.setting), task.method, result["error"], result["nbytes"])
                )

    def _wants_error_feedback(self, model: ir.Model, sites: list[WeightSite],
                              table: dict[str, list[Candidate]], fitter: Fitter) -> bool:
        """`method: auto`: whether plain codebooks fail even at 8 bits, so GPTQ is worth its time.

        GPTQ fits a few dozen calibration samples too closely where k-means is enough (magika,
        docs/codebook.md), and costs seconds to minutes a layer: only where 8-bit k-means on
        every layer misses the step's own gate (ddddocr's OCR model: its LSTM and convs alone
        change strings at 8 bits; GPTQ keeps them, with the 33 MB projection at 7 bits).
        """
        if self.config.method != "auto" or not fitter.hessians:
            return False
        floor = _eight_bit_floor(table)
        return any(floor.values()) and not self._passes(model, sites, floor, fitter)

    def _methods(self, site: WeightSite, stats: LayerHessian | None, bits: int) -> list[str]:
        """How the layer's codebook at `bits` is fitted: shared, and per channel where it can."""
        shared = (
            "gptq"
            if self.config.method == "gptq"
            and stats is not None
            and bits <= self.config.gptq_max_bits
            else "kmeans"
        )
        axis = site.out_axis
        channels = site.shape[axis % len(site.shape)] if axis is not None and site.shape else 1
        return [shared] + ([PER_CHANNEL] if self.config.per_channel and channels > 1 else [])

    def _layer_progress(self, tasks: list[Task]) -> Callable[[int], None]:
        per_layer, done = Counter(task.layer for task in tasks), Counter[str]()

        def count(index: int) -> None:
            name = tasks[index].layer
            done[name] += 1
            if done[name] == per_layer[name]:
                finished = sum(1 for n, d in done.items() if d == per_layer[n])
                self._say(f"{self.name}: codebooks for layer {finished}/{len(per_layer)} ({name})")

        return count

    def _say(self, line: str) -> None:
        logger.info(line)
        if self.context.progress is not None:
            self.context.progress(line)

    @staticmethod
    def _pick(options: list[Candidate], tolerance: float) -> Candidate | None:
        return next((c for c in options if c.score <= tolerance), None)

    def _weighted(
        self,
        model: ir.Model,
        sites: list[WeightSite],
        candidates: dict[str, list[Candidate]],
        fitter: Fitter,
    ) -> dict[str, list[Candidate]]:
        """Each candidate's error times its layer's output sensitivity (`_sensitivity`)."""
        probes = self._few_probes(model)
        reference = fidelity.run(model, probes, self.context.reference.views)  # type: ignore[union-attr]
        weighted = {}
        for index, site in enumerate(sites):
            options = candidates[site.name]
            factor = self._sensitivity(model, site, options, fitter, probes, reference)
            self._say(f"{self.name}: sensitivity of layer {index + 1}/{len(sites)} ({site.name})")
            weighted[site.name] = [
                dataclasses.replace(c, impact=factor * c.error) for c in options
            ]
        return weighted

    def _few_probes(self, model: ir.Model) -> dict[str, np.ndarray]:
        """The first `sensitivity_samples` probes, along each input's own sample axis."""
        inputs = {value.name: value for value in model.graph.inputs}
        return {
            name: take_samples(
                array,
                sample_axis(model, inputs[name]) if name in inputs else 0,
                self.config.sensitivity_samples,
            )
            for name, array in (self.context.probes or {}).items()
        }

    @staticmethod
    def _sensitivity(
        model: ir.Model,
        site: WeightSite,
        options: list[Candidate],
        fitter: Fitter,
        probes: dict[str, np.ndarray],
        reference: fidelity.Outputs,
    ) -> float:
        """Output distortion per unit of layer error: the layer alone at its coarsest width.

        Layers differ by orders of magnitude in how much of their error reaches the output
        (HAWQ measures it by curvature; here it is measured directly, once per layer): the
        squared relative output error of the model with only this layer coded, over the
        layer's own error. 1.0 where it cannot be measured.
        """
        coarsest = max(options, key=lambda c: c.error, default=None)
        if coarsest is None or coarsest.error <= 0:
            return 1.0
        trial = model.clone()
        trial_site = find_weight_sites(trial, min_params=0).by_name().get(site.name)
        if trial_site is None:
            return 1.0
        fitter.correct_bias(trial_site, coarsest.method, coarsest.bits)
        trial_site.replace(
            fitter.weights(site.name, coarsest.method, coarsest.bits, site.array().dtype)
        )
        try:
            outputs = fidelity.run(trial, probes, reference.views)
        except UnsupportedModelError:
            return 1.0
        distortion = fidelity.compare(reference, outputs).rel_l2 ** 2
        return float(distortion / coarsest.error) if np.isfinite(distortion) else 1.0

    def _search(
        self,
        model: ir.Model,
        sites: list[WeightSite],
        candidates: dict[str, list[Candidate]],
        floor_holds: bool,
        fitter: Fitter,
        report: PassReport,
        order: str = "layer error",
    ) -> dict[str, Candidate | None]:
        """The largest tolerance whose choice passes the gate (bisection over candidate scores).

        Run once per ordering of the candidates (`order`: their layer error, or their output
        impact); the pass keeps the smaller verified choice. Neither ordering wins everywhere:
        on magika's three layers the impact measured at the coarsest width ranks the big conv
        too sensitive (3.92x against 4.32x by layer error); on open-nsfw it finds 4.32x where the
        layer error stops at 4.09x.

        8 bits everywhere, where it passes the step's gate (`floor_holds`), is the floor: layers
        no tolerance admits keep it.
        """
        errors = sorted({c.score for options in candidates.values() for c in options})
        floor: dict[str, Candidate | None] = (
            _eight_bit_floor(candidates) if floor_holds else dict.fromkeys(candidates)
        )
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
        report.notes[order] = {"tolerance": tolerance, "trials": trials,
                               "floor": "8 bits" if any(floor.values()) else "dense"}
        logger.info("%s: tolerance %.3g after %d trials", self.name, tolerance, trials)
        return best

    def _refine(
        self,
        model: ir.Model,
        sites: list[WeightSite],
        candidates: dict[str, list[Candidate]],
        best: dict[str, Candidate | None],
        fitter: Fitter,
        report: PassReport,
    ) -> dict[str, Candidate | None]:
        """Lower layers a step at a time, most bytes saved per unit of score first, verified.

        Batches of layers, each checked on the whole model (`refine_trials` checks). One
        tolerance for all layers stops where the first layers break the gate; the others may
        still have room. A failed batch is halved; a single layer that fails stays.
        """
        choice, frozen = dict(best), set[str]()
        batch, trials, lowered = max(1, len(sites) // 4), 0, 0
        dense = {site.name: site.size * site.array().itemsize for site in sites}
        while trials < self.config.refine_trials:
            steps = _next_steps(candidates, choice, dense, frozen)
            if not steps:
                break
            taken = steps[:batch]
            trial = {**choice, **dict(taken)}
            trials += 1
            self._say(f"{self.name}: refining, trial {trials}, {len(taken)} layers one step lower")
            if self._passes(model, sites, trial, fitter):
                choice, lowered = trial, lowered + len(taken)
            elif batch > 1:
                batch //= 2
            else:
                frozen.add(taken[0][0])
        report.notes["refined"] = {"trials": trials, "layers lowered": lowered}
        return choice

    def _floor_holds(self, model: ir.Model, sites: list[WeightSite],
                     candidates: dict[str, list[Candidate]], fitter: Fitter) -> bool:
        """Whether 8 bits everywhere passes the step's gate.

        Checked once for both orderings: their candidates differ in score, not in error, so
        both pick the same 8-bit codebooks.
        """
        floor = _eight_bit_floor(candidates)
        return any(floor.values()) and self._passes(model, sites, floor, fitter)

    def _choose(self, candidates: dict[str, list[Candidate]], tolerance: float,
                floor: dict[str, Candidate | None]) -> dict[str, Candidate | None]:
        return {
            name: self._pick(options, tolerance) or floor[name]
            for name, options in candidates.items()
        }

    def _passes(self, model: ir.Model, sites: list[WeightSite], choice: dict[str, Candidate | None],
                fitter: Fitter) -> bool:
        trial = model.clone()
        trial_sites = {
            s.name: s for s in find_weight_sites(trial, min_params=0, derived=True).sites
        }
        for site in sites:
            candidate = choice[site.name]
            if candidate is not None and site.name in trial_sites:
                trial_site = trial_sites[site.name]
                fitter.correct_bias(trial_site, candidate.method, candidate.bits)
                trial_site.replace(
                    fitter.weights(site.name, candidate.method, candidate.bits, site.array().dtype))
        try:
            return not self.context.judged(trial)[1]
        except UnsupportedModelError:
            return False

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
            corrected = fitter.correct_bias(site, candidate.method, candidate.bits)
            fit = fitter.fit(site.name, candidate.method, candidate.bits)
            insert_codebook(model.graph, site.value, fit.indices, fit.codebook, bits=candidate.bits,
                            zero_entry=fit.zero_entry, packed=False, scales=fit.scales)
            report.changed(
                site.name,
                site.op_type,
                weights,
                params_after=int(np.count_nonzero(fit.weights())),
                bytes_after=candidate.nbytes,
                detail=_detail(candidate, fit, scored, corrected),
            )
            changed = True
        if changed:
            pack_codebook_indices(model)  # below 8 bits, where it pays for its decoder
        return changed
