"""The factors of one weight and what they cost: MatMul/Gemm matrices and Conv kernels.

Kinds (Denton et al. 2014; Jaderberg et al. 2014; Zhang et al. 2015 for the channel form):

* ``matmul`` — MatMul(X, W), W stored K×N: W ≈ A·B with A K×r, B r×N, so X·W ≈ (X·A)·B.
  Works for any batched left operand X[..., K] (MatMul broadcasts).
* ``gemm`` — Gemm(X, S, C) with op(S) = S or Sᵀ: the stored S ≈ P·Q. With transB = 0 the first
  Gemm reads P (K×r) and the second Q (r×N); with transB = 1 (S is N×K) the first reads Q (r×K)
  and the second P (N×r), both keeping transB = 1. transA, alpha, beta and the bias C stay on
  the first (transA) and second (alpha, beta, C) Gemm.
* ``conv_channel`` — W (M, C/g, k…) per group j as the matrix W_j (M/g) × (C/g·∏k) ≈ P_j·Q_j:
  a k… conv with g·r filters (Q_j, original strides, pads, dilations, auto_pad, group g)
  followed by a 1×1 conv (P_j, group g) that also adds the bias.
* ``conv_spatial`` — 2-D kernels only: per group the matrix T[(c,i), (m,j)] = W_j[m,c,i,j] of
  shape (C/g·kh) × (M/g·kw) ≈ P·Q: a kh×1 conv with g·r channels (stride, dilation and pads of
  the height axis) followed by a 1×kw conv (those of the width axis, group g, bias).
  Exact: Σ_k H[m,k,j]·V[k,c,i] = T_r[(c,i),(m,j)], and the width padding of the second conv
  pads zeros that the first conv (no bias) maps to zeros.

Every kind is exact at full rank and otherwise loses exactly the discarded singular values of
its matrix (Eckart–Young); channel and spatial matrices are rearrangements of the same W, so
their Frobenius errors compare directly. Costs: parameters of the weight (bias excluded) and
FLOPs (2 per multiply-add) per output row (MatMul/Gemm) or per output position (Conv; the kh×1
conv of the spatial form runs at stride 1 along the width, so it costs s_w times more
positions).
"""

from __future__ import annotations

__all__ = [
    "KINDS",
    "Decomposition",
    "conv_attributes",
    "matrices_of",
]

import dataclasses
import math
from collections.abc import Iterable
from typing import SupportsInt

import numpy as np

from onnxcompress.passes.lowrank.linalg import (
    TruncatedSVD,
    energy_rank,
    max_useful_rank,
    split_factors,
    truncated_svd,
)

KINDS: tuple[str, ...] = ("matmul", "gemm", "conv_channel", "conv_spatial")


@dataclasses.dataclass(frozen=True)
class ConvAttributes:
    """The attributes of a Conv, with defaults filled in (2 spatial axes or any other count)."""

    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads: tuple[int, ...]
    group: int
    auto_pad: str


def conv_attributes(attributes: dict[str, object], kernel: tuple[int, ...]) -> ConvAttributes:
    """Read Conv attributes from plain values (ints / int lists / str), filling ONNX defaults."""
    rank = len(kernel)
    strides = _int_tuple(attributes.get("strides") or [1] * rank)
    dilations = _int_tuple(attributes.get("dilations") or [1] * rank)
    pads = _int_tuple(attributes.get("pads") or [0] * (2 * rank))
    group = _int(attributes.get("group") or 1)
    auto_pad = str(attributes.get("auto_pad") or "NOTSET")
    return ConvAttributes(kernel, strides, dilations, pads, group, auto_pad)


def _int_tuple(value: object) -> tuple[int, ...]:
    """An ints attribute as a tuple; anything else is the TypeError `int()` would raise."""
    if not isinstance(value, Iterable):
        raise TypeError(f"expected a list of ints, got {value!r}")
    return tuple(int(v) for v in value)


def _int(value: object) -> int:
    """An int attribute; anything else is the TypeError `int()` would raise."""
    if not isinstance(value, SupportsInt | str):
        raise TypeError(f"expected an int, got {value!r}")
    return int(value)


def matrices_of(
    kind: str, weight: np.ndarray, group: int = 1, trans_b: bool = False
) -> list[np.ndarray]:
    """The matrix (one per group for Conv) whose SVD gives the factors of `kind`."""
    del trans_b  # Gemm factors the stored matrix whatever its orientation
    if kind in ("matmul", "gemm"):
        return [np.asarray(weight)]
    out_channels = weight.shape[0]
    per_group = out_channels // group
    blocks = [weight[j * per_group : (j + 1) * per_group] for j in range(group)]
    if kind == "conv_channel":
        return [b.reshape(per_group, -1) for b in blocks]
    if kind == "conv_spatial":
        _, in_per_group, kh, kw = weight.shape
        return [b.transpose(1, 2, 0, 3).reshape(in_per_group * kh, per_group * kw) for b in blocks]
    raise ValueError(f"unknown kind {kind!r}")


@dataclasses.dataclass
class Decomposition:
    """One weight seen as `kind`: its matrices, their SVDs (computed lazily) and the costs.

    `width_stride` is the Conv width stride (only the spatial kind's FLOPs depend on it).
    """

    kind: str
    weight: np.ndarray
    group: int = 1
    trans_b: bool = False
    width_stride: int = 1
    svd_method: str = "auto"
    seed: int = 0
    _svds: list[TruncatedSVD] | None = dataclasses.field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.matrices = matrices_of(self.kind, self.weight, self.group, self.trans_b)
        self.rows, self.cols = self.matrices[0].shape

    # ---- costs -----------------------------------------------------------------------
    @property
    def max_rank(self) -> int:
        """Largest rank whose factors are strictly smaller than the weight (0: none is)."""
        return max_useful_rank(self.rows, self.cols)

    @property
    def params_before(self) -> int:
        """Parameters of the weight as it is."""
        return int(self.weight.size)

    def params_after(self, rank: int) -> int:
        """Parameters of both factors at `rank`, over all groups."""
        return self.group * rank * (self.rows + self.cols)

    @property
    def flops_before(self) -> int:
        """Multiply-adds (x2) per output position of the weight as it is."""
        return 2 * int(self.weight.size)

    def flops_after(self, rank: int) -> int:
        """Multiply-adds (x2) of both factors at `rank`, in the units of `flops_before`."""
        if self.kind == "conv_spatial":
            return 2 * self.group * rank * (self.rows * self.width_stride + self.cols)
        return 2 * self.params_after(rank)

    def rank_for_ratio(self, ratio: float, metric: str = "params") -> int:
        """Largest rank whose params (or FLOPs) are at most `ratio` of the original's; ≥ 1."""
        if metric == "flops":
            per_rank = self.flops_after(1)
            budget = ratio * self.flops_before
        else:
            per_rank = self.params_after(1)
            budget = ratio * self.params_before
        return max(1, math.floor(budget / per_rank + 1e-9))

    # ---- spectra ---------------------------------------------------------------------
    def svds(self, rank: int | None = None) -> list[TruncatedSVD]:
        """SVDs of the matrices holding at least `rank` triplets (all when None)."""
        full = min(self.rows, self.cols)
        want = full if rank is None else min(rank, full)
        if self._svds is None or self._svds[0].rank < want:
            self._svds = [
                truncated_svd(
                    m, None if want >= full else want, method=self.svd_method, seed=self.seed
                )
                for m in self.matrices
            ]
        return self._svds

    def energy(self, rank: int) -> float:
        """Share of the squared Frobenius norm kept at `rank` (1 for an all-zero weight)."""
        svds = self.svds(rank)
        total = sum(s.total_energy for s in svds)
        kept = sum(float(np.sum(s.s[:rank] ** 2)) for s in svds)
        return 1.0 if total <= 0 else kept / total

    def relative_error(self, rank: int) -> float:
        """Predicted ‖W − W_r‖_F / ‖W‖_F (exact on the exact path)."""
        return math.sqrt(max(0.0, 1.0 - self.energy(rank)))

    def rank_for_energy(self, energy: float) -> int | None:
        """Smallest rank keeping `energy` of ‖W‖_F² among ranks ≤ max_rank; None if none does."""
        if self.max_rank == 0:
            return None
        svds = self.svds(self.max_rank)
        if self.group == 1:
            return energy_rank(svds[0].s[: self.max_rank], svds[0].total_energy, energy)
        total = sum(s.total_energy for s in svds)
        kept = np.zeros(self.max_rank)
        for s in svds:
            values = np.zeros(self.max_rank)
            values[: min(self.max_rank, s.rank)] = s.s[: self.max_rank] ** 2
            kept += values
        return energy_rank(np.sqrt(kept), total, energy)

    # ---- factors ---------------------------------------------------------------------
    def factors(self, rank: int) -> tuple[np.ndarray, np.ndarray]:
        """(first weight, second weight) in the stored layouts of the two replacement nodes."""
        pairs = [split_factors(s, rank) for s in self.svds(rank)]
        dtype = self.weight.dtype
        if self.kind == "matmul" or (self.kind == "gemm" and not self.trans_b):
            first, second = pairs[0]
        elif self.kind == "gemm":
            p, q = pairs[0]
            first, second = q, p
        elif self.kind == "conv_channel":
            in_per_group = self.weight.shape[1]
            kernel = self.weight.shape[2:]
            first = np.concatenate([q.reshape(rank, in_per_group, *kernel) for _, q in pairs])
            second = np.concatenate([p for p, _ in pairs]).reshape(
                self.weight.shape[0], rank, *([1] * len(kernel))
            )
        else:  # conv_spatial
            out_channels, in_per_group, kh, kw = self.weight.shape
            per_group = out_channels // self.group
            first = np.concatenate([p.T.reshape(rank, in_per_group, kh, 1) for p, _ in pairs])
            second = np.concatenate(
                [
                    q.reshape(rank, per_group, kw)
                    .transpose(1, 0, 2)
                    .reshape(per_group, rank, 1, kw)
                    for _, q in pairs
                ]
            )
        return np.ascontiguousarray(first, dtype=dtype), np.ascontiguousarray(second, dtype=dtype)
