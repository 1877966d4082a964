"""Regularisers of the fine-tune bridge, per weight layer: L1, biased weight decay, group lasso.

* L1 (Han et al. 2015 §3.1): ``l1 * sum |W|`` added to the loss. L2 is the optimizer's weight
  decay (`FinetuneConfig.l2`), not a term here.
* Hanson & Pratt 1989, "Comparing biases for minimal network construction with
  back-propagation": a weight-decay whose pull fades for large weights, so small weights go to
  zero and the ones the task needs stay. ``hyperbolic``: ``sum w^2 / (1 + w^2)``;
  ``exponential``: ``sum 1 - exp(-w^2)``. Both are ~``w^2`` near 0 and saturate at 1.
* Group lasso (Wen et al. 2016, "Learning Structured Sparsity in Deep Neural Networks", eq. 2):
  ``lambda * sum_g sqrt(|g|) * ||W_g||_2`` over the groups of a layer -- ``filters`` (one
  output unit's weights), ``channels`` (everything one input channel feeds), ``shapes`` (one
  (channel, kh, kw) position across all filters) and ``depth`` (the whole layer). Applied as
  its proximal step after every optimizer step,

      W_g <- W_g * max(0, 1 - lr * lambda * sqrt(|g|) / ||W_g||),

  which sets a whole group to *exact* zero (a subgradient step only shrinks it), so the
  structured pass (`prune.dead_neurons`) can then remove the zeroed channels exactly.

Exact: the penalties and the proximal operator as written; which groups reach zero depends
on the data and the strength (lossy by design).
"""

from __future__ import annotations

__all__ = ["RegularisedLayer", "regularised_layers", "penalty", "group_axes", "proximal_group_step"]

import dataclasses
import fnmatch
import math
from collections.abc import Sequence

import onnx_ir as ir
import torch

from onnxcompress.finetune.config import FinetuneConfig
from onnxcompress.finetune.executor import OnnxModule


@dataclasses.dataclass(frozen=True)
class RegularisedLayer:
    """A weight the regularisers act on, and which of its axes are its output and input units."""

    name: str
    out_axis: int | None
    in_axis: int | None


def regularised_layers(model: ir.Model, trained: Sequence[str], config: FinetuneConfig) -> list[RegularisedLayer]:
    """The trained weight sites matching `config.regularise` (every weight site by default)."""
    from onnxcompress.sites import find_weight_sites

    layers = []
    for site in find_weight_sites(model, min_params=0).sites:
        if site.name not in trained:
            continue
        if config.regularise and not any(fnmatch.fnmatchcase(site.name, p) for p in config.regularise):
            continue
        layers.append(RegularisedLayer(site.name, site.out_axis, site.in_axis))
    return layers


def penalty(module: OnnxModule, layers: Sequence[RegularisedLayer], config: FinetuneConfig) -> torch.Tensor | None:
    """The differentiable terms (L1, biased decay) summed over `layers`, or None when both are off."""
    if not layers or (config.l1 <= 0 and config.biased_decay <= 0):
        return None
    total = torch.zeros(())
    for layer in layers:
        weight = module.tensor(layer.name)
        if config.l1 > 0:
            total = total + config.l1 * weight.abs().sum()
        if config.biased_decay > 0:
            square = weight * weight
            bias = square / (1 + square) if config.biased_decay_kind == "hyperbolic" else 1 - torch.exp(-square)
            total = total + config.biased_decay * bias.sum()
    return total


def group_axes(shape: Sequence[int], kind: str, out_axis: int | None, in_axis: int | None) -> tuple[int, ...]:
    """The axes a group's norm is taken over (the others index the groups)."""
    every = tuple(range(len(shape)))
    if kind == "depth":
        return every
    if kind == "filters" and out_axis is not None:
        return tuple(a for a in every if a != out_axis)
    if kind == "channels" and in_axis is not None:
        return tuple(a for a in every if a != in_axis)
    if kind == "shapes" and out_axis is not None:
        return (out_axis,)
    return ()  # no such grouping for this layer: nothing to do


@torch.no_grad()
def proximal_group_step(
    module: OnnxModule, layers: Sequence[RegularisedLayer], config: FinetuneConfig, lr: float
) -> None:
    """Wen's group lasso as a proximal step on each layer's trained parameter (exact zeros)."""
    threshold = lr * config.group_lasso
    for layer in layers:
        originals = list(module.originals(layer.name))
        if len(originals) != 1 or tuple(originals[0].shape) != tuple(module.tensor(layer.name).shape):
            continue  # low-rank factors or codebooks: groups of the product are not groups of a factor
        parameter = originals[0]
        effective = module.tensor(layer.name)  # masked entries count as the zeros they are
        for kind in config.groups:
            axes = group_axes(tuple(parameter.shape), kind, layer.out_axis, layer.in_axis)
            if not axes:
                continue
            size = math.prod(parameter.shape[a] for a in axes)
            norm = effective.pow(2).sum(dim=axes, keepdim=True).sqrt()
            scale = (1 - threshold * math.sqrt(size) / norm.clamp(min=1e-30)).clamp(min=0)
            parameter.mul_(scale)
            effective = module.tensor(layer.name)
