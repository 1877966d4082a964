"""`prune.obs`: unstructured or N:M pruning with Optimal Brain Surgeon updates (SparseGPT).

Per layer, the calibration Hessian H = X^T X of the layer's input (captured through
onnxruntime, Conv via im2col per group) drives `obs.sparsegpt`: the weights to remove are
chosen block by block by the OBS saliency w^2 / [H^-1]_qq, and the weights that remain move
to cancel the layer's output change on the calibration inputs. At equal sparsity this gives a
lower layer reconstruction error tr(D H D^T) than magnitude pruning (the report's detail
line gives both for every layer), which is what lets post-training pruning go to 50% and
more without retraining.

Counts are exact: round(s*n) zeros per layer, or N zeros in every M consecutive input
features of each output channel (Conv: in the flattened (channel, kh, kw) order). Existing
zeros count toward the target and stay zero. Layers the calibration cannot capture (Gather,
batch-major recurrent, shared or subgraph weights) are pruned by plain magnitude, with the
reason in the report. H is captured once on the model as this pass receives it (earlier pipeline
steps included), or per layer after the earlier ones with `sequential`.

Lossy: the gate is the pipeline's fidelity check; the reconstruction is greedy and exact only
on the calibration inputs.
"""

from __future__ import annotations

__all__ = ["ObsPruneConfig", "ObsPrunePass"]

import logging

import numpy as np
import onnx_ir as ir
import pydantic

from onnxcompress.calibration import LayerHessian
from onnxcompress.pass_base import CompressionPass, PassReport, register
from onnxcompress.passes.prune.magnitude import prune_to_count
from onnxcompress.passes.reconstruct import layers
from onnxcompress.passes.reconstruct.obs import magnitude_prune, parse_n_m, sparsegpt
from onnxcompress.sites import WeightSite, find_weight_sites

logger = logging.getLogger(__name__)


class ObsPruneConfig(layers.ReconstructConfig):
    """Options of `prune.obs`: a share or an N:M pattern, plus the calibration knobs."""

    sparsity: float | None = pydantic.Field(
        None, ge=0.0, lt=1.0, description="Share of each layer's weights set to zero, in [0, 1)."
    )
    n_m: str | None = pydantic.Field(
        None,
        description="Semi-structured N:M instead of a share, e.g. '2:4': "
        "N zeros in every M input features.",
    )
    maskblock: int = pydantic.Field(
        8,
        ge=1,
        description="Columns per adaptive mask choice (share only; SparseGPT uses 128 on LLMs).",
    )
    exclude: tuple[str, ...] = pydantic.Field((), description="Weight-name globs never pruned.")
    min_params: int = pydantic.Field(
        16, ge=0, description="Weights smaller than this are left dense."
    )
    ops: tuple[str, ...] | None = pydantic.Field(
        None, description="Only weights of these op types."
    )

    @pydantic.model_validator(mode="after")
    def _one_target(self) -> ObsPruneConfig:
        if (self.sparsity is None) == (self.n_m is None):
            raise ValueError("give exactly one of sparsity or n_m")
        if self.n_m is not None:
            parse_n_m(self.n_m)
        return self


@register
class ObsPrunePass(CompressionPass):
    """Prune each layer with OBS updates of the remaining weights (SparseGPT).

    The updates come from calibration data: they move what is left to cancel what was cut.
    """

    name = "prune.obs"
    summary = (
        "OBS / SparseGPT pruning (unstructured or N:M) "
        "with weight reconstruction from calibration data."
    )
    Config = ObsPruneConfig
    config: ObsPruneConfig

    def _n_m(self) -> tuple[int, int]:
        return parse_n_m(self.config.n_m) if self.config.n_m is not None else (0, 0)

    def _prune_matrix(self, matrix: np.ndarray, hessian: np.ndarray, sparsity: float) -> np.ndarray:
        n, m = self._n_m()
        return sparsegpt(matrix, hessian, sparsity, prunen=n, prunem=m,
                         blocksize=self.config.blocksize, maskblock=self.config.maskblock,
                         percdamp=self.config.percdamp)

    def _n_m_reason(self, site: WeightSite) -> str | None:
        n, m = self._n_m()
        if not m:
            return None
        if site.in_axis is None:
            return f"{site.op_type} has no input-feature axis for an N:M pattern"
        columns = site.size // site.shape[site.out_axis if site.out_axis is not None else 0]
        if columns % m:
            return f"{columns} input features are not a multiple of M={m}"
        return None

    def rewrite(self, model: ir.Model, report: PassReport) -> bool:
        """Prune each eligible layer by OBS from its H, by magnitude where no input was captured."""
        scan = find_weight_sites(
            model,
            min_params=self.config.min_params,
            exclude=self.config.exclude,
            ops=self.config.ops,
        )
        for skip in scan.skipped:
            report.skip(skip.name, skip.reason)
        todo: list[WeightSite] = []
        for site in scan.sites:
            reason = self._n_m_reason(site)
            if reason is not None:
                report.skip(site.name, reason)
            else:
                todo.append(site)
        calibrated = [s for s in todo if layers.calibration_reason(s, model) is None]
        calibrated_names = {s.name for s in calibrated}
        probes = (
            layers.calibration_inputs(model, self.context, self.config.probes, report)
            if calibrated
            else {}
        )
        stats = {} if self.config.sequential or not calibrated else layers.hessians_for(
            model, probes, calibrated, self.context.seed)
        totals = {"obs_error": 0.0, "magnitude_error": 0.0}
        planned = []
        for site in todo:
            if self.config.sequential and site.name in calibrated_names:
                stats.update(layers.hessians_for(model, probes, [site], self.context.seed))
            pruned, detail = self._prune(model, site, stats.get(site.name), totals, report)
            if pruned is None:
                continue
            if self.config.sequential:
                self._commit(site, pruned, detail, report)
            else:
                planned.append((site, pruned, detail))
        for site, pruned, detail in planned:
            self._commit(site, pruned, detail, report)
        report.notes.update({key: round(value, 6) for key, value in totals.items()})
        return bool(report.changes)

    def _commit(
        self, site: WeightSite, pruned: np.ndarray, detail: str, report: PassReport
    ) -> None:
        before = site.array()
        site.replace(pruned)
        report.changed(site.name, site.op_type, before, pruned, detail=detail)

    def _prune(self, model: ir.Model, site: WeightSite, stats: LayerHessian | None,
               totals: dict[str, float], report: PassReport) -> tuple[np.ndarray | None, str]:
        before = site.array()
        n, m = self._n_m()
        target = n / m if m else self.config.sparsity
        assert target is not None
        if not np.all(np.isfinite(before)):
            report.skip(site.name, "holds NaN or inf")
            return None, ""
        reason = layers.calibration_reason(site, model) if stats is None else None
        if stats is None:
            reason = reason or "calibration captured no input for this layer"
            pruned = self._magnitude(site, before, target)
            label = f"magnitude fallback ({reason})"
        else:
            matrix = layers.matrix_form(site, before)
            zeros_wanted = round(target * matrix.size) if not m else None
            try:
                result = self._per_group(matrix, stats, target, zeros_wanted)
            except np.linalg.LinAlgError as error:
                pruned = self._magnitude(site, before, target)
                label = f"magnitude fallback ({error})"
            else:
                reference = magnitude_prune(matrix, target, prunen=n, prunem=m)
                obs_error = layers.layer_error(matrix, result, stats)
                magnitude_error = layers.layer_error(matrix, reference, stats)
                totals["obs_error"] += obs_error
                totals["magnitude_error"] += magnitude_error
                pruned = layers.from_matrix_form(site, result, before.dtype)
                pruned[before == 0] = 0  # existing zeros stay exact zeros
                label = (
                    f"OBS, calibration error {obs_error:.4g} vs magnitude {magnitude_error:.4g} "
                    f"({stats.rows} input rows)"
                )
        if np.count_nonzero(pruned) == np.count_nonzero(before):
            report.skip(site.name, "already at or above the target sparsity")
            return None, ""
        sparsity = 1 - np.count_nonzero(pruned) / pruned.size
        pattern = f" {self.config.n_m}" if self.config.n_m is not None else ""
        return pruned, f"sparsity {sparsity:.4f}{pattern}; {label}"

    def _per_group(self, matrix: np.ndarray, stats: LayerHessian, target: float,
                   zeros_wanted: int | None) -> np.ndarray:
        """SparseGPT per group; with a share, each group's count is cut so the total is exact."""
        out = np.empty_like(matrix)
        done_rows = 0
        done_zeros = 0
        for group, rows in layers.group_slices(matrix.shape[0], stats.groups):
            block = matrix[rows]
            share = target
            if zeros_wanted is not None:
                done_rows += block.shape[0]
                wanted = round(zeros_wanted * done_rows / matrix.shape[0]) - done_zeros
                share = min(wanted / block.size, np.nextafter(1.0, 0.0)) if block.size else 0.0
            out[rows] = self._prune_matrix(block, stats.hessian[group], share)
            done_zeros += int(np.count_nonzero(out[rows] == 0))
        return out

    def _magnitude(self, site: WeightSite, weights: np.ndarray, target: float) -> np.ndarray:
        n, m = self._n_m()
        if not m:
            return prune_to_count(weights, round(target * weights.size))
        matrix = magnitude_prune(layers.matrix_form(site, weights), prunen=n, prunem=m)
        pruned = layers.from_matrix_form(site, matrix, weights.dtype)
        pruned[weights == 0] = 0
        return pruned
