"""`codebook.gptq`: k-means codebooks assigned with GPTQ error feedback from calibration data.

Per layer: the codebook starts as `codebook.kmeans` would make it (1-D k-means of the
weights, 2^b entries; for a pruned layer entry 0 is the exact zero and only the non-zeros are
clustered). Then instead of rounding every weight to its nearest centroid independently, the
input columns are assigned one at a time (`obs.gptq_quantize`): the error of a column,
divided by the inverse Hessian's Cholesky diagonal, is pushed onto the columns not yet
assigned, so they absorb it (Frantar et al., GPTQ, 2023; Optimal Brain Compression, 2022).
With `refine`, the centroids are then re-fitted with the assignments fixed: the k values that
minimise tr(D H D^T) are the solution of a k x k linear system (kept only if it lowers the
error). At equal bits the layer reconstruction error is lower than plain k-means (the report's
detail line gives both for every layer).

The result is written in exactly the form `codebook.kmeans` writes (`graph.insert_codebook`,
indices + codebook + Cast + Gather, the bit width and zero-entry flag in the Gather's metadata;
indices bit-packed below 8 bits where it pays, uint4 for 4 bits on opset >= 21, else uint8,
by the same rule), so `inspect`, `pack` and centroid fine-tuning
read it like any other codebook. Zeros of a pruned layer stay exact zeros (the reserved entry);
non-zeros are only assigned non-zero entries.

Layers the calibration cannot capture (Gather tables, batch-major recurrent or shared weights,
subgraphs) get plain k-means, with the reason in the report. H is captured once on the model as
this pass receives it, or per layer after the earlier ones with `sequential`.

Lossy: every weight is a codebook entry (exact), the reconstruction is greedy and exact only
on the calibration inputs; the gate is the pipeline's fidelity check.
"""

from __future__ import annotations

__all__ = ["GptqCodebookConfig", "GptqCodebookPass", "refine_centroids", "gptq_codebook"]

import logging

import numpy as np
import onnx_ir as ir
import pydantic

from onnxcompress.calibration import LayerHessian
from onnxcompress.formats.codebook import insert_codebook
from onnxcompress.formats.packed import pack_codebook_indices
from onnxcompress.pass_base import PassContext, PassReport, register
from onnxcompress.passes.codebook.kmeans import (
    KMeansClusterConfig,
    KMeansClusterPass,
    cluster_weights,
)
from onnxcompress.passes.reconstruct import layers
from onnxcompress.passes.reconstruct.obs import codebook_quantizer, gptq_quantize
from onnxcompress.sites import WeightSite, find_weight_sites

logger = logging.getLogger(__name__)

_CLUSTERABLE = (np.float32, np.float16, np.float64)


class GptqCodebookConfig(KMeansClusterConfig, layers.ReconstructConfig):
    """codebook.kmeans's options plus the calibration knobs and GPTQ's own.

    Inheriting the k-means options (bits, storage, exclusions) keeps one spelling of each.
    """

    act_order: bool = pydantic.Field(
        False,
        description="Assign input columns by decreasing H_ii instead of in order "
        "(GPTQ's act-order).",
    )
    refine: bool = pydantic.Field(
        True,
        description="Re-fit the centroids to the assignments by least squares under H "
        "(kept if better).",
    )


def refine_centroids(
    matrix: np.ndarray,
    indices: np.ndarray,
    codebook: np.ndarray,
    stats: LayerHessian,
    zero_entry: bool,
) -> np.ndarray:
    """Centroids minimising sum_g tr((W - C[I]) H_g (W - C[I])^T) with the indices fixed.

    With one-hot M_r of row r's indices, the normal equations are
    (sum_r M_r^T H M_r) c = sum_r M_r^T H w_r; the zero entry stays 0.
    """
    k = codebook.size
    gram = np.zeros((k, k))
    rhs = np.zeros(k)
    for group, rows in layers.group_slices(matrix.shape[0], stats.groups):
        hessian = stats.hessian[group]
        for row_w, row_i in zip(matrix[rows], indices[rows], strict=True):
            pair = (row_i[:, None] * k + row_i[None, :]).reshape(-1)
            gram += np.bincount(pair, weights=hessian.reshape(-1), minlength=k * k).reshape(k, k)
            rhs += np.bincount(row_i, weights=hessian @ row_w, minlength=k)
    free = np.arange(k)[1:] if zero_entry else np.arange(k)
    used = free[np.diag(gram)[free] > 0]
    result = np.asarray(codebook, np.float64).copy()
    if used.size == 0:
        return result
    sub = gram[np.ix_(used, used)]
    sub = sub + np.eye(used.size) * 1e-10 * max(float(np.mean(np.diag(sub))), 1e-300)
    try:
        result[used] = np.linalg.solve(sub, rhs[used])
    except np.linalg.LinAlgError:
        return np.asarray(codebook, np.float64)
    return result


def _entry_indices(values: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    """The index of each value's exact entry in `codebook` (values are codebook entries)."""
    order = np.argsort(codebook, kind="stable")
    position = np.clip(np.searchsorted(codebook[order], values), 0, codebook.size - 1)
    return order[position]


@register
class GptqCodebookPass(KMeansClusterPass):
    """Codebook per layer with GPTQ-style error feedback from calibration data.

    It writes the codebook.kmeans graph form, so every reader of that form reads it too.
    """

    name = "codebook.gptq"
    summary = (
        "k-means codebooks assigned with GPTQ error feedback (and refitted) on calibration data."
    )
    Config = GptqCodebookConfig
    config: GptqCodebookConfig

    def needs_calibration(self) -> bool:
        """True: the assignment is fitted to the layer inputs."""
        return True

    def rewrite(self, model: ir.Model, report: PassReport) -> bool:
        """Plan every layer (GPTQ or its k-means fallback) before rewriting any of them."""
        scan = find_weight_sites(
            model,
            min_params=self.config.min_params,
            exclude=self.config.exclude,
            ops=self.config.ops,
        )
        for skip in scan.skipped:
            report.skip(skip.name, skip.reason)
        todo = []
        for site in scan.sites:
            reason = self._reason_to_skip(model, site)
            if reason is not None:
                report.skip(site.name, reason)
            else:
                todo.append(site)
        calibrated = {s.name for s in todo if layers.calibration_reason(s, model) is None}
        probes = (
            layers.calibration_inputs(model, self.context, self.config.probes, report)
            if calibrated
            else {}
        )
        stats: dict[str, LayerHessian] = {}
        if calibrated and not self.config.sequential:
            stats = layers.hessians_for(
                model, probes, [s for s in todo if s.name in calibrated], self.context.seed
            )
        totals = {"gptq_error": 0.0, "kmeans_error": 0.0}
        planned = []
        for site in todo:
            if self.config.sequential and site.name in calibrated:
                stats.update(layers.hessians_for(model, probes, [site], self.context.seed))
            plan = self._plan(model, site, stats.get(site.name), totals)
            if self.config.sequential:
                self._write(model, *plan, report=report)
            else:
                planned.append(plan)
        for plan in planned:
            self._write(model, *plan, report=report)
        report.notes.update({key: round(value, 6) for key, value in totals.items()})
        return bool(todo)

    def _plan(
        self,
        model: ir.Model,
        site: WeightSite,
        stats: LayerHessian | None,
        totals: dict[str, float],
    ) -> tuple[WeightSite, int, np.ndarray, np.ndarray, np.ndarray, bool, str]:
        """What `_write` needs for one layer: GPTQ's codebook, or plain k-means's.

        k-means stays where GPTQ cannot run or does not lower the calibration error; the label
        says which and why, for the report.
        """
        bits = self.bits_for(site)
        weights = site.array()
        indices, codebook, zero_entry = cluster_weights(
            weights,
            bits,
            init=self.config.init,
            seed=self.context.seed,
            max_iter=self.config.max_iter,
        )
        plain = (site, bits, weights, indices, codebook, zero_entry)
        if stats is None:
            reason = layers.calibration_reason(site, model)
            reason = reason or "calibration captured no input for this layer"
            return (*plain, f"plain k-means fallback ({reason})")
        matrix = layers.matrix_form(site, weights)
        plain_values = layers.matrix_form(site, codebook[indices])
        kmeans_error = layers.layer_error(matrix, plain_values, stats)
        entries = np.asarray(codebook, np.float64)
        try:
            values = self._assign(matrix, stats, entries, zero_entry)
        except np.linalg.LinAlgError as failure:
            return (*plain, f"plain k-means fallback ({failure})")
        new_indices = _entry_indices(values, entries)
        error = layers.layer_error(matrix, values, stats)
        refined_note = ""
        if self.config.refine:
            entries, error, refined_note = _refined(
                matrix, new_indices, entries, stats, zero_entry, codebook.dtype, error
            )
        if error >= kmeans_error:  # never worse than plain k-means on the calibration set
            totals["gptq_error"] += kmeans_error
            totals["kmeans_error"] += kmeans_error
            return (*plain,
                    f"plain k-means kept (GPTQ error {error:.4g} >= k-means {kmeans_error:.4g})")
        totals["gptq_error"] += error
        totals["kmeans_error"] += kmeans_error
        final_indices, final_codebook = _sorted_codebook(
            site, new_indices, entries, zero_entry, codebook.dtype
        )
        detail = (
            f"GPTQ{' act-order' if self.config.act_order else ''}{refined_note}, calibration error "
            f"{error:.4g} vs k-means {kmeans_error:.4g} ({stats.rows} input rows)"
        )
        return site, bits, weights, final_indices, final_codebook, zero_entry, detail

    def _assign(
        self, matrix: np.ndarray, stats: LayerHessian, entries: np.ndarray, zero_entry: bool
    ) -> np.ndarray:
        allowed = entries[1:] if zero_entry and entries.size > 1 else entries
        quantizer = codebook_quantizer(allowed)
        out = np.empty_like(matrix)
        for group, rows in layers.group_slices(matrix.shape[0], stats.groups):
            out[rows] = gptq_quantize(
                matrix[rows],
                stats.hessian[group],
                quantizer,
                blocksize=self.config.blocksize,
                percdamp=self.config.percdamp,
                act_order=self.config.act_order,
                keep_zeros=zero_entry,
            )
        return out

    def _write(
        self,
        model: ir.Model,
        site: WeightSite,
        bits: int,
        weights: np.ndarray,
        indices: np.ndarray,
        codebook: np.ndarray,
        zero_entry: bool,
        label: str,
        *,
        report: PassReport,
    ) -> None:
        storage = self._storage(model, site, bits)
        name = site.name
        insert_codebook(
            model.graph,
            site.value,
            indices,
            codebook,
            bits=bits,
            zero_entry=zero_entry,
            packed=storage == "uint4",
        )
        if storage == "packed":
            pack_codebook_indices(model, names={name})
        report.changed(
            name,
            site.op_type,
            weights,
            params_after=int(np.count_nonzero(codebook[indices])),
            bytes_after=int(self._index_bytes(storage, indices.size, bits) + codebook.nbytes),
            detail=f"{bits} bits, {codebook.size} shared values"
            + (" (entry 0 = exact zero)" if zero_entry else "")
            + {"packed": f", {bits}-bit packed indices", "uint4": ", uint4 indices"}.get(
                storage, ", uint8 indices"
            )
            + f"; {label}",
        )


def _refined(
    matrix: np.ndarray,
    indices: np.ndarray,
    entries: np.ndarray,
    stats: LayerHessian,
    zero_entry: bool,
    dtype: np.dtype,
    error: float,
) -> tuple[np.ndarray, float, str]:
    """(entries, error, note) after the least-squares refit, or as they were if it is no better.

    A refit that merges two centroids is refused too: the codebook must keep distinct values.
    """
    refined = refine_centroids(matrix, indices, entries, stats, zero_entry).astype(dtype)
    refined_error = layers.layer_error(matrix, refined.astype(np.float64)[indices], stats)
    if refined_error < error and len(np.unique(refined)) == refined.size:
        return refined.astype(np.float64), refined_error, ", centroids refitted"
    return entries, error, ""


def _sorted_codebook(
    site: WeightSite, indices: np.ndarray, entries: np.ndarray, zero_entry: bool, dtype: np.dtype
) -> tuple[np.ndarray, np.ndarray]:
    """(indices in the weight's layout, codebook) with the entries ascending.

    Ascending as k-means writes them, so both passes' layers read alike; a reserved zero entry
    stays first.
    """
    order = np.argsort(entries, kind="stable")
    if zero_entry:  # entry 0 stays the reserved zero; the others ascending
        order = np.concatenate([[0], [i for i in order if i != 0]])
    remap = np.empty_like(order)
    remap[order] = np.arange(order.size)
    final_codebook = entries[order].astype(dtype)
    final_indices = layers.from_matrix_form(
        site, remap[indices].astype(np.float64), np.dtype(np.uint8)
    )
    return final_indices, final_codebook


def gptq_codebook(model: ir.Model, site: WeightSite, stats: LayerHessian | None, bits: int, *,
                  seed: int = 0, refine: bool = True) -> tuple[np.ndarray, np.ndarray, bool]:
    """(indices, codebook, zero_entry) of one layer at `bits`, as `codebook.gptq` makes them.

    Plain k-means where GPTQ does not lower the calibration error, or no input was captured.
    `refine`: the least-squares refit of the centroids (`refine_centroids`).
    """
    planner = GptqCodebookPass(bits=bits, refine=refine, context=PassContext(seed=seed))
    totals: dict[str, float] = {"gptq_error": 0.0, "kmeans_error": 0.0}
    _, _, _, indices, codebook, zero_entry, _ = planner._plan(model, site, stats, totals)
    return indices, codebook, zero_entry
