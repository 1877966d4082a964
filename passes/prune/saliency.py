"""Saliency scorers for pruning, and the data-driven unstructured passes prune.taylor / prune.obd.

A scorer maps weights to one importance per weight (or per output channel); pruning then
zeroes the least important. Three are pluggable by name:

* ``magnitude``: |w| (Han et al. 2015). Needs nothing but the weights.
* ``taylor``: |w · ∂L/∂w|, the gradient of the loss accumulated over the data: the
  first-order change of the loss when w is removed (Molchanov et al., ICLR 2017); per
  channel |Σ_c w·g| (their eq. 8).
* ``obd``: ½ · h_ii · w², with the Hessian diagonal h_ii estimated from data by the squared
  gradient (empirical Fisher) or by Hutchinson's estimator E[v ⊙ Hv] (LeCun, Denker & Solla,
  "Optimal Brain Damage", NIPS 1990); per channel, the sum over the channel.

The gradients come from the PyTorch bridge (`onnxcompress.finetune.gradients`), imported only
when a gradient scorer runs: without data it is a `DataError`, without torch a
`MissingDependencyError`. The loss is cross-entropy against `labels` when the data has them,
else against the original model's own predictions (distillation), as the bridge defines.

Lossy with no a-priori bound (the saliencies are local approximations of the loss change):
the pipeline's fidelity gate is the guard. Counts are exact: ⌊s·n⌉ weights per layer.
"""

from __future__ import annotations

__all__ = [
    "Scorer",
    "SCORERS",
    "weight_saliency",
    "channel_saliency",
    "SaliencyPruneConfig",
    "ObdPruneConfig",
    "TaylorPrunePass",
    "ObdPrunePass",
]

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import onnx_ir as ir
import pydantic

from onnxcompress.errors import DataError
from onnxcompress.pass_base import CompressionPass, PassConfig, PassContext, PassReport, register
from onnxcompress.sites import WeightSite, find_weight_sites

logger = logging.getLogger(__name__)

#: (model, weight names, context, per_channel, options) -> name -> scores
Scorer = Callable[
    [ir.Model, Sequence[str], PassContext, bool, Mapping[str, Any]], dict[str, np.ndarray]
]


def _magnitude(model: ir.Model, names: Sequence[str], context: PassContext, per_channel: bool,
               options: Mapping[str, Any]) -> dict[str, np.ndarray]:
    sites = find_weight_sites(model, min_params=0).by_name()
    out = {}
    for name in names:
        site = sites[name]
        magnitude = np.abs(site.array().astype(np.float64))
        if per_channel:
            axis = site.out_axis or 0
            magnitude = np.moveaxis(magnitude, axis, 0).reshape(magnitude.shape[axis], -1).sum(1)
        out[name] = magnitude
    return out


def _require_data(context: PassContext, criterion: str) -> Mapping[str, np.ndarray]:
    if context.data is None:
        raise DataError(
            f"the {criterion} criterion needs calibration data for its gradients: give --data NPZ "
            "(arrays keyed by input name, optional 'labels'), or use a magnitude criterion"
        )
    return context.data


def _taylor(model: ir.Model, names: Sequence[str], context: PassContext, per_channel: bool,
            options: Mapping[str, Any]) -> dict[str, np.ndarray]:
    data = _require_data(context, "taylor")
    from onnxcompress.finetune.gradients import taylor_scores

    return taylor_scores(
        model,
        data,
        names=list(names),
        per_channel=per_channel,
        original=context.original,
        seed=context.seed,
        **options,
    )


def _obd(model: ir.Model, names: Sequence[str], context: PassContext, per_channel: bool,
         options: Mapping[str, Any]) -> dict[str, np.ndarray]:
    data = _require_data(context, "obd")
    from onnxcompress.finetune.gradients import obd_scores

    return obd_scores(
        model,
        data,
        names=list(names),
        per_channel=per_channel,
        original=context.original,
        seed=context.seed,
        **options,
    )


SCORERS: dict[str, Scorer] = {"magnitude": _magnitude, "taylor": _taylor, "obd": _obd}


def _scorer(criterion: str) -> Scorer:
    try:
        return SCORERS[criterion]
    except KeyError:
        raise DataError(
            f"unknown saliency criterion {criterion!r}; one of {', '.join(SCORERS)}"
        ) from None


def weight_saliency(model: ir.Model, names: Sequence[str], criterion: str, context: PassContext,
                    **options: Any) -> dict[str, np.ndarray]:
    """One score per weight (the weight's shape) for each named weight."""
    return _scorer(criterion)(model, names, context, False, options)


def channel_saliency(model: ir.Model, names: Sequence[str], criterion: str, context: PassContext,
                     **options: Any) -> dict[str, np.ndarray]:
    """One score per output channel of each named weight (the structured criterion)."""
    return _scorer(criterion)(model, names, context, True, options)


class SaliencyPruneConfig(PassConfig):
    """Options shared by the data-driven saliency passes."""

    sparsity: float = pydantic.Field(
        ..., ge=0.0, lt=1.0, description="Share of weights set to zero, in [0, 1)."
    )
    scope: Literal["layer", "global"] = pydantic.Field(
        "layer",
        description="layer: the share per layer; global: the lowest saliencies over all layers.",
    )
    exclude: tuple[str, ...] = pydantic.Field((), description="Weight-name globs never pruned.")
    min_params: int = pydantic.Field(
        16, ge=0, description="Weights smaller than this are left dense."
    )
    loss: Literal["auto", "cross_entropy", "mse"] = pydantic.Field(
        "auto",
        description="auto: cross-entropy on labels if given, else against the original's outputs.",
    )
    batch_size: int = pydantic.Field(64, ge=1, description="Samples per gradient batch.")
    max_samples: int | None = pydantic.Field(
        None, ge=1, description="Use at most this many samples."
    )


class ObdPruneConfig(SaliencyPruneConfig):
    """Saliency options plus OBD's choice of diagonal Hessian estimate."""

    hessian: Literal["fisher", "hutchinson"] = pydantic.Field(
        "fisher", description="Diagonal Hessian estimate: squared gradients (Fisher) or Hutchinson."
    )
    hutchinson_samples: int = pydantic.Field(
        4, ge=1, description="Rademacher probes per batch (hutchinson)."
    )


def _lowest(scores: np.ndarray, count: int) -> np.ndarray:
    """Boolean mask of the `count` lowest scores (ties broken by position)."""
    flat = scores.reshape(-1)
    mask = np.zeros(flat.size, dtype=bool)
    if count > 0:
        mask[np.argsort(flat, kind="stable")[:count]] = True
    return mask.reshape(scores.shape)


class _SaliencyPrunePass(CompressionPass):
    """Zero the weights of lowest saliency; already-zero weights count as pruned."""

    criterion: str
    config: SaliencyPruneConfig

    def _options(self) -> dict[str, Any]:
        return {"loss": self.config.loss, "batch_size": self.config.batch_size,
                "max_samples": self.config.max_samples}

    def rewrite(self, model: ir.Model, report: PassReport) -> bool:
        _require_data(self.context, self.criterion)
        scan = find_weight_sites(
            model, min_params=self.config.min_params, exclude=self.config.exclude
        )
        for skip in scan.skipped:
            report.skip(skip.name, skip.reason)
        if not scan.sites:
            return False
        scores = weight_saliency(model, [s.name for s in scan.sites], self.criterion, self.context,
                                 **self._options())
        masks = self._masks(scan.sites, scores)
        modified = False
        for site in scan.sites:
            before = site.array()
            pruned = np.where(masks[site.name], np.zeros_like(before), before)
            if np.count_nonzero(pruned) == np.count_nonzero(before):
                report.skip(site.name, "already at or above the target sparsity")
                continue
            site.replace(pruned)
            report.changed(
                site.name,
                site.op_type,
                before,
                pruned,
                detail=f"{self.criterion} sparsity "
                f"{1 - np.count_nonzero(pruned) / pruned.size:.4f}",
            )
            modified = True
        return modified

    def _masks(
        self, sites: list[WeightSite], scores: Mapping[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        # Existing zeros go first (score -inf): pruning never revives a weight.
        ranked = {
            s.name: np.where(s.array() == 0, -np.inf, np.asarray(scores[s.name], dtype=np.float64))
            for s in sites
        }
        if self.config.scope == "layer":
            return {
                s.name: _lowest(ranked[s.name], round(self.config.sparsity * s.size)) for s in sites
            }
        pooled = np.concatenate([ranked[s.name].reshape(-1) for s in sites])
        mask = _lowest(pooled, round(self.config.sparsity * pooled.size))
        out, offset = {}, 0
        for site in sites:
            out[site.name] = mask[offset : offset + site.size].reshape(site.shape)
            offset += site.size
        return out


@register
class TaylorPrunePass(_SaliencyPrunePass):
    """`prune.taylor`: first-order saliency, one gradient pass over the data."""

    name = "prune.taylor"
    summary = (
        "Unstructured pruning by first-order Taylor saliency |w·∂L/∂w| (Molchanov et al. 2017); "
        "needs data."
    )
    Config = SaliencyPruneConfig
    criterion = "taylor"


@register
class ObdPrunePass(_SaliencyPrunePass):
    """`prune.obd`: second-order saliency from a diagonal Hessian estimate."""

    name = "prune.obd"
    summary = (
        "Optimal Brain Damage (LeCun et al. 1990): saliency ½·h_ii·w², Fisher or Hutchinson; needs "
        "data."
    )
    Config = ObdPruneConfig
    criterion = "obd"
    config: ObdPruneConfig

    def _options(self) -> dict[str, Any]:
        return {**super()._options(), "hessian": self.config.hessian,
                "hutchinson_samples": self.config.hutchinson_samples}
