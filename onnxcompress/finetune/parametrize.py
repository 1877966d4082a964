"""Parametrizations that keep a compressed structure through training.

Registered with `torch.nn.utils.parametrize` on the executor's per-tensor holders, so the
optimizer steps the *original* parameter and the graph always sees the constrained value
(the habit of `torch.ao.pruning`):

* `Mask` -- ``W = where(M, V, 0)``. Pruned weights are exactly zero after any optimizer
  step, whatever momentum or weight decay do to ``V`` (Han et al. 2015, retraining with
  pruned connections held at zero).
* `Codebook` -- ``W = where(K, C[I], 0)`` with fixed integer indices ``I`` and trained
  centroids ``C``. Autograd of the gather sums the gradients of every weight sharing a
  centroid: ``dL/dC_k = sum_{i: I_i = k} dL/dW_i`` (Han, Mao & Dally 2016, eq. 3). ``K``
  keeps pruned positions at exactly zero.
* `LowRank` -- ``W = reshape(A @ B)``; both factors are trained. Initialised by truncated
  SVD, ``A = U_r sqrt(S_r)``, ``B = sqrt(S_r) V_r^T`` (exact when rank >= rank(W)).

In-graph codebooks (uint8 indices [+ Cast] + float codebook + Gather, as `codebook.kmeans` writes
them) need no parametrization: the executor trains the codebook initializer and the
Gather's backward is the same per-centroid sum. `attach_structure` puts a mask on every
weight with exact zeros and on every zero codebook entry, so zeros stay zeros.
"""

from __future__ import annotations

__all__ = [
    "Mask",
    "Codebook",
    "LowRank",
    "add_mask",
    "add_codebook",
    "add_low_rank",
    "attach_structure",
]

import logging
from collections.abc import Iterable

import numpy as np
import onnx_ir as ir
import torch
from torch import nn
from torch.nn.utils import parametrize

from onnxcompress.errors import UserError
from onnxcompress.finetune.executor import OnnxModule
from onnxcompress.formats.detect import codebook_tensors

logger = logging.getLogger(__name__)


class Mask(nn.Module):
    """``W = where(mask, V, 0)``: masked entries are exactly zero, whatever V holds."""

    mask: torch.Tensor  # a buffer: declared for the type checker, registered in __init__

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask.to(torch.bool))

    def forward(self, value: torch.Tensor) -> torch.Tensor:
        """The weight with pruned entries held at zero, whatever the optimizer did to them."""
        return torch.where(self.mask, value, torch.zeros((), dtype=value.dtype))

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        """Store a new weight with the pruned entries zeroed, so assignment keeps the mask."""
        return torch.where(self.mask, weight, torch.zeros((), dtype=weight.dtype))


class Codebook(nn.Module):
    """``W = where(keep, C[indices], 0)``; the original parameter is the centroid vector C."""

    indices: torch.Tensor  # buffers: declared for the type checker, registered in __init__
    keep: torch.Tensor

    def __init__(self, indices: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("indices", indices.to(torch.long))
        self.register_buffer(
            "keep", (keep if keep is not None else torch.ones_like(indices)).to(torch.bool)
        )

    def forward(self, centroids: torch.Tensor) -> torch.Tensor:
        """The dense weight from the shared values: each gradient sums over its cluster (Han)."""
        shared = centroids[self.indices]
        return torch.where(self.keep, shared, torch.zeros((), dtype=shared.dtype))

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        """Centroids as the mean of the (kept) weights of each index (0 for an empty one)."""
        flat = self.indices[self.keep]
        size = int(self.indices.max().item()) + 1 if self.indices.numel() else 0
        sums = torch.zeros(size, dtype=weight.dtype).index_add_(0, flat, weight[self.keep])
        counts = torch.zeros(size, dtype=weight.dtype).index_add_(
            0, flat, torch.ones_like(weight[self.keep])
        )
        return torch.where(counts > 0, sums / counts.clamp(min=1), torch.zeros_like(sums))


class LowRank(nn.Module):
    """``W = reshape(A @ B, shape)`` with A: [rows, r], B: [r, cols], rows = shape[0]."""

    def __init__(self, shape: tuple[int, ...], rank: int) -> None:
        super().__init__()
        self.shape = tuple(shape)
        self.rank = int(rank)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """The dense weight as the product of the two trained factors."""
        return (a @ b).reshape(self.shape)

    def right_inverse(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Factors of a new weight by its rank-`rank` SVD, split evenly (sqrt of s on each side)."""
        matrix = weight.reshape(self.shape[0], -1).to(torch.float64)
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        root = s[: self.rank].sqrt()
        a = (u[:, : self.rank] * root).to(weight.dtype)
        b = (root[:, None] * vh[: self.rank]).to(weight.dtype)
        return a.contiguous(), b.contiguous()


def _holder(module: OnnxModule, name: str) -> nn.Module:
    holder = module.holder(name)
    if parametrize.is_parametrized(holder, "weight"):
        raise UserError(f"{name!r} already carries a parametrization")
    if not module.tensor(name).is_floating_point():
        raise UserError(f"{name!r} is not a float tensor")
    return holder


def add_mask(module: OnnxModule, name: str, mask: np.ndarray | torch.Tensor | None = None) -> None:
    """Hold `name` at zero where `mask` is False (default: where it is zero now)."""
    holder = _holder(module, name)
    weight = module.tensor(name)
    if mask is None:
        mask = weight.detach() != 0
    mask = torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask)
    if tuple(mask.shape) != tuple(weight.shape):
        raise UserError(
            f"mask for {name!r} has shape {tuple(mask.shape)}, the weight "
            f"{tuple(weight.shape)}"
        )
    parametrize.register_parametrization(holder, "weight", Mask(mask))


def add_codebook(
    module: OnnxModule,
    name: str,
    indices: np.ndarray | torch.Tensor | None = None,
    centroids: np.ndarray | torch.Tensor | None = None,
) -> None:
    """Share the weights of `name`: fixed `indices`, trainable `centroids`.

    Without `indices`, the weight's distinct non-zero values are the codebook (a weight
    already clustered in dense form). Zeros stay exactly zero and use no centroid.
    """
    holder = _holder(module, name)
    weight = module.tensor(name).detach()
    keep = weight != 0
    if indices is None:
        values, inverse = torch.unique(weight, return_inverse=True)
        indices = inverse
        centroids = values
    indices_t = torch.as_tensor(
        np.asarray(indices) if not isinstance(indices, torch.Tensor) else indices
    )
    if tuple(indices_t.shape) != tuple(weight.shape):
        raise UserError(
            f"codebook indices for {name!r} have shape {tuple(indices_t.shape)}, not "
            f"{tuple(weight.shape)}"
        )
    codebook = Codebook(indices_t, keep)
    parametrize.register_parametrization(holder, "weight", codebook, unsafe=True)
    if centroids is not None:
        with torch.no_grad():
            original = module.parameter(name)  # the centroids, now the trained tensor
            given = torch.as_tensor(
                np.asarray(centroids) if not isinstance(centroids, torch.Tensor) else centroids
            )
            if given.shape != original.shape:
                raise UserError(
                    f"{name!r}: {given.numel()} centroids for {original.numel()} indices"
                )
            original.copy_(given.to(original.dtype))


def add_low_rank(module: OnnxModule, name: str, rank: int) -> None:
    """Train `name` as a product of two factors of inner dimension `rank` (SVD-initialised)."""
    holder = _holder(module, name)
    shape = tuple(module.tensor(name).shape)
    if len(shape) < 2 or not 1 <= rank <= min(shape[0], int(np.prod(shape[1:]))):
        raise UserError(f"rank {rank} does not fit {name!r} of shape {shape}")
    parametrize.register_parametrization(holder, "weight", LowRank(shape, rank), unsafe=True)


def attach_structure(
    module: OnnxModule, model: ir.Model, names: Iterable[str] | None = None
) -> dict[str, str]:
    """Masks so that every zero of a weight (and of a codebook) stays zero while training.

    `names`: the weights to consider (default: every weight site and in-graph codebook that
    the module trains). Returns, per name, what was attached (``mask``) or why nothing was.
    """
    from onnxcompress.sites import find_weight_sites

    trainable = set(module.trainable_names())
    if names is None:
        candidates = {site.name for site in find_weight_sites(model, min_params=0).sites}
        candidates |= set(codebook_tensors(model))
        names = sorted(candidates & trainable)
    done: dict[str, str] = {}
    for name in names:
        holder = module.holder(name)
        if parametrize.is_parametrized(holder, "weight"):
            done[name] = "already parametrized"
            continue
        zeros = int((module.tensor(name).detach() == 0).sum())
        if zeros == 0:
            done[name] = "no zeros"
            continue
        add_mask(module, name)
        done[name] = "mask"
        logger.debug("mask on %s: %d zeros held", name, zeros)
    return done
