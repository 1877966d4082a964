"""Unstructured magnitude pruning (Han et al., "Learning both Weights and Connections", 2015).

Weights of small magnitude are set to exactly zero. Two ways to say how many:

* a target sparsity s: per layer, the ⌊s·n⌉ smallest |w| become zero (exact count; ties are
  broken by position, so the count never drifts); with `scope: global`, one threshold over
  all layers' magnitudes, so layers with many small weights lose more;
* Han's quality parameter q: per layer, every |w| < q · std(w) becomes zero.

Lossy, with no a-priori bound: the pipeline's fidelity gate is the guard. Existing zeros
count toward the target, and sparsity never decreases.
"""

from __future__ import annotations

__all__ = ["MagnitudePruneConfig", "MagnitudePrunePass", "prune_to_count"]

import fnmatch
import logging
from typing import Literal

import numpy as np
import onnx_ir as ir
import pydantic

from onnxcompress.pass_base import CompressionPass, PassConfig, PassReport, register
from onnxcompress.sites import WeightSite, find_weight_sites

logger = logging.getLogger(__name__)


class MagnitudePruneConfig(PassConfig):
    """Options of `prune.magnitude`: a share or Han's quality rule, per layer or global."""

    sparsity: float | None = pydantic.Field(
        None, ge=0.0, lt=1.0, description="Share of weights set to zero, in [0, 1)."
    )
    quality: float | None = pydantic.Field(
        None, gt=0.0, description="Han's rule instead of a target: zero |w| < quality × std(layer)."
    )
    scope: Literal["layer", "global"] = pydantic.Field(
        "layer", description="layer: the target per layer; global: one threshold over all layers."
    )
    overrides: dict[str, float] = pydantic.Field(
        default_factory=dict,
        description="Per-layer sparsity by weight-name glob (first match wins), e.g. {'*head*': "
        "0.5}.",
    )
    exclude: tuple[str, ...] = pydantic.Field((), description="Weight-name globs never pruned.")
    min_params: int = pydantic.Field(
        16, ge=0, description="Weights smaller than this are left dense."
    )
    ops: tuple[str, ...] | None = pydantic.Field(
        None, description="Only weights of these op types."
    )

    @pydantic.model_validator(mode="after")
    def _one_criterion(self) -> MagnitudePruneConfig:
        if (self.sparsity is None) == (self.quality is None):
            raise ValueError("give exactly one of sparsity or quality")
        if self.quality is not None and self.scope == "global":
            raise ValueError("quality is a per-layer rule; use scope 'layer'")
        for pattern, value in self.overrides.items():
            if not 0.0 <= value < 1.0:
                raise ValueError(f"overrides[{pattern!r}] = {value} is outside [0, 1)")
        return self


def prune_to_count(weights: np.ndarray, zeros: int) -> np.ndarray:
    """A copy of `weights` with exactly max(`zeros`, current zeros) smallest |w| set to 0."""
    flat = np.array(weights, dtype=weights.dtype, copy=True).reshape(-1)
    zeros = min(int(zeros), flat.size)
    if zeros > 0:
        smallest = np.argpartition(np.abs(flat), zeros - 1)[:zeros]
        flat[smallest] = 0
    return flat.reshape(weights.shape)


@register
class MagnitudePrunePass(CompressionPass):
    """Zero the smallest-magnitude weights, per layer or globally."""

    name = "prune.magnitude"
    summary = "Unstructured magnitude pruning (Han et al. 2015): target sparsity or quality × std."
    Config = MagnitudePruneConfig
    config: MagnitudePruneConfig

    def _target(self, site: WeightSite) -> float | None:
        for pattern, sparsity in self.config.overrides.items():
            if fnmatch.fnmatchcase(site.name, pattern):
                return sparsity
        return self.config.sparsity

    def rewrite(self, model: ir.Model, report: PassReport) -> bool:
        """Zero the smallest weights of every eligible layer; the rest get their reason."""
        scan = find_weight_sites(
            model,
            min_params=self.config.min_params,
            exclude=self.config.exclude,
            ops=self.config.ops,
        )
        for skip in scan.skipped:
            report.skip(skip.name, skip.reason)
        if self.config.scope == "global":
            new = self._global(scan.sites)
        else:
            new = {site.name: self._per_layer(site) for site in scan.sites}
        modified = False
        for site in scan.sites:
            pruned = new.get(site.name)
            if pruned is None:
                continue
            before = site.array()
            if np.count_nonzero(pruned) == np.count_nonzero(before):
                report.skip(site.name, "already at or above the target sparsity")
                continue
            site.replace(pruned)
            report.changed(site.name, site.op_type, before, pruned,
                                detail=f"sparsity {1 - np.count_nonzero(pruned) / pruned.size:.4f}")
            modified = True
        return modified

    def _per_layer(self, site: WeightSite) -> np.ndarray:
        weights = site.array()
        if self.config.quality is not None:
            threshold = self.config.quality * float(np.std(weights))
            return np.where(np.abs(weights) < threshold, np.zeros_like(weights), weights)
        target = self._target(site)
        assert target is not None  # the validator guarantees a target without quality
        return prune_to_count(weights, round(target * weights.size))

    def _global(self, sites: list[WeightSite]) -> dict[str, np.ndarray]:
        """Overridden layers keep their own target; the rest share one magnitude threshold."""
        result: dict[str, np.ndarray] = {}
        pooled = []
        for site in sites:
            if any(fnmatch.fnmatchcase(site.name, p) for p in self.config.overrides):
                result[site.name] = self._per_layer(site)
            else:
                pooled.append(site)
        if not pooled:
            return result
        magnitudes = np.concatenate([np.abs(site.array()).reshape(-1) for site in pooled])
        assert self.config.sparsity is not None
        zeros = round(self.config.sparsity * magnitudes.size)
        if zeros == 0:
            return result
        order = np.argpartition(magnitudes, zeros - 1)[:zeros]
        keep = np.ones(magnitudes.size, dtype=bool)
        keep[order] = False
        offset = 0
        for site in pooled:
            weights = site.array()
            mask = keep[offset : offset + weights.size].reshape(weights.shape)
            offset += weights.size
            result[site.name] = np.where(mask, weights, np.zeros_like(weights))
        return result
