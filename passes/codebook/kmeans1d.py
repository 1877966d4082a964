"""Fast exact 1-D k-means (Lloyd's algorithm on sorted data) for weight sharing.

Han, Mao & Dally, "Deep Compression" (ICLR 2016), section 3: the weights of a layer are
clustered with k-means, minimising the within-cluster sum of squares

    argmin_C  sum_i sum_{w in c_i} |w - c_i|^2 ,

and every weight is replaced by its centroid. The paper compares three initialisations and
recommends *linear* (centroids evenly spaced between the smallest and largest weight),
because it keeps the few large weights that matter most; *density* places them at evenly
spaced quantiles of the weights' CDF and *random* (Forgy) picks k distinct weights.

In one dimension the nearest-centroid regions are intervals: with sorted centroids c_j,
cluster j holds exactly the values in ((c_{j-1}+c_j)/2, (c_j+c_{j+1})/2]. So each Lloyd
step needs only k-1 binary searches into the sorted values and k segment sums. The values
are sorted once; segment sums come from prefix sums kept at block granularity (float64 sums
of 1024-value blocks, plus at most one partial block per boundary), so an iteration costs
O(k (log n + 1024)) instead of O(n k). Labels are computed once at the end.

What is exact: every iteration is exactly Lloyd's (nearest-centroid assignment, ties to the
lower centroid, then means), so from the same initial centroids this reaches the same fixed
point as textbook Lloyd. Inertia never increases, hence never exceeds the inertia of the
initial centroids. An empty cluster is re-seeded at the value farthest from its centroid in
the cluster of largest squared error, which strictly lowers the inertia. When the data has
at most k distinct values, the codebook is those values and the result is lossless.
Lossy: k-means itself (a local optimum of the quantisation error).
"""

from __future__ import annotations

__all__ = ["KMeansResult", "kmeans_1d", "assign_nearest", "initial_centroids", "INITS"]

import dataclasses
import logging
from typing import Literal

import numpy as np

logger = logging.getLogger(__name__)

Init = Literal["linear", "density", "random", "optimal"]
INITS: tuple[str, ...] = ("linear", "density", "random", "optimal")
#: Most prefix-sum entries kept (two float64 arrays: 16 MiB); larger inputs sum in blocks.
_MAX_BLOCKS = 1 << 20


@dataclasses.dataclass(frozen=True)
class KMeansResult:
    """A 1-D codebook and the labels of the values it was fitted on.

    `centroids` is sorted ascending, distinct, in the dtype of the input values;
    `labels[i]` is the index of the centroid nearest to `values[i]` (ties to the lower).
    `inertia` is the sum of squared distances to the assigned centroids (float64).
    """

    centroids: np.ndarray
    labels: np.ndarray
    inertia: float


class _SortedPrefix:
    """Sorted values with float64 prefix sums (and of squares) at block granularity.

    One entry per value up to `_MAX_BLOCKS` values, so a Lloyd step reads its k segment sums
    directly; beyond, blocks of the fewest values that keep the arrays at that size, and the
    tail inside a block is summed per query (a 33M-weight layer: blocks of 32).
    """

    def __init__(self, values: np.ndarray) -> None:
        self.sorted = np.sort(values)
        n = self.sorted.size
        self.n = n
        self.block = block = max(1, -(-n // _MAX_BLOCKS))
        full = n // block
        blocks = self.sorted[: full * block].reshape(full, block)
        sums = blocks.sum(axis=1, dtype=np.float64)
        squares = np.einsum("ij,ij->i", blocks, blocks, dtype=np.float64)
        self._cum1 = np.concatenate([[0.0], np.cumsum(sums)])
        self._cum2 = np.concatenate([[0.0], np.cumsum(squares)])

    def prefixes(self, edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Vectorised `prefix` for many indices: (sums, sums of squares) of sorted[:e]."""
        edges = np.asarray(edges, dtype=np.int64)
        if self.block == 1:
            return self._cum1[edges], self._cum2[edges]
        blocks = edges // self.block
        lengths = edges - blocks * self.block
        total = int(lengths.sum())
        owner = np.repeat(np.arange(edges.size), lengths)
        offsets = np.arange(total) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        tail = self.sorted[np.repeat(blocks * self.block, lengths) + offsets].astype(np.float64)
        sums = np.bincount(owner, weights=tail, minlength=edges.size)
        squares = np.bincount(owner, weights=tail * tail, minlength=edges.size)
        return self._cum1[blocks] + sums, self._cum2[blocks] + squares

    def segment_stats(self, splits: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Counts, sums and sums of squares of the segments delimited by `splits`."""
        edges = np.concatenate([[0], splits, [self.n]]).astype(np.int64)
        sums, squares = self.prefixes(edges)
        return np.diff(edges), np.diff(sums), np.diff(squares)


def _thresholds(centroids: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Largest values of `dtype` that still belong to the lower of two adjacent centroids.

    The midpoint of two float32 (or float16) numbers is exact in float64; rounding it down
    to the values' own dtype keeps the comparison `x <= t` identical to `x <= midpoint` for
    every x of that dtype, and lets the comparisons run in the values' dtype.
    """
    mid = (centroids[:-1].astype(np.float64) + centroids[1:].astype(np.float64)) / 2.0
    low = mid.astype(dtype)
    over = low.astype(np.float64) > mid
    low[over] = np.nextafter(low[over], np.asarray(-np.inf, dtype=dtype))
    return low


def _splits(data: _SortedPrefix, centroids: np.ndarray) -> np.ndarray:
    """Index in the sorted values where each cluster after the first starts."""
    return np.searchsorted(data.sorted, _thresholds(centroids, data.sorted.dtype), side="right")


def assign_nearest(values: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest of the sorted `centroids` for each value (ties to the lower).

    Runs as k-1 vectorised comparisons in the values' dtype, which for small k (<= 256) is
    several times faster than a binary search per value. Returns uint8 for k <= 256.
    """
    flat = np.asarray(values).reshape(-1)
    k = centroids.size
    dtype = np.uint8 if k <= 256 else np.uint16 if k <= 65536 else np.int64
    labels: np.ndarray = np.zeros(flat.size, dtype=dtype)  # uint8, uint16 or int64, by k
    if k > 64:
        thresholds = _thresholds(centroids, flat.dtype)
        return np.searchsorted(thresholds, flat, side="left").astype(dtype)
    for threshold in _thresholds(centroids, flat.dtype):
        labels += flat > threshold
    return labels


def initial_centroids(
    data: np.ndarray, k: int, init: Init, rng: np.random.Generator
) -> np.ndarray:
    """k starting centroids (float64, sorted) from sorted `data` by the paper's three rules."""
    if init == "linear":
        return np.linspace(float(data[0]), float(data[-1]), k)
    if init == "density":
        # Evenly spaced levels of the empirical CDF, mapped back through it.
        levels = (np.arange(k) + 0.5) / k
        positions = np.minimum((levels * data.size).astype(np.int64), data.size - 1)
        return np.sort(data[positions].astype(np.float64))
    if init == "random":
        distinct = np.unique(data)
        return np.sort(rng.choice(distinct, size=k, replace=False).astype(np.float64))
    raise ValueError(f"unknown init {init!r}; choose one of {', '.join(INITS)}")


def _reseed_empty(
    data: _SortedPrefix,
    centroids: np.ndarray,
    counts: np.ndarray,
    sums: np.ndarray,
    squares: np.ndarray,
) -> np.ndarray:
    """Move each empty centroid onto the value farthest from its centroid in the worst cluster."""
    centroids = centroids.copy()
    counts = counts.astype(np.float64)
    safe = np.maximum(counts, 1.0)
    errors = np.where(counts > 0, squares - sums * sums / safe, -1.0)
    edges = np.concatenate([[0], np.cumsum(counts).astype(np.int64)])
    used: set[float] = set()
    for empty in np.flatnonzero(counts == 0):
        worst = int(np.argmax(errors))
        if errors[worst] <= 0.0:
            break
        first = float(data.sorted[edges[worst]])
        last = float(data.sorted[edges[worst + 1] - 1])
        mean = sums[worst] / counts[worst]
        candidate = first if abs(first - mean) >= abs(last - mean) else last
        if candidate in used:
            candidate = last if candidate == first else first
        used.add(candidate)
        centroids[empty] = candidate
        errors[worst] = 0.0  # one re-seed per cluster per step; the next step re-measures
    return np.sort(centroids)


def kmeans_1d(
    values: np.ndarray,
    k: int,
    *,
    init: Init = "linear",
    seed: int = 0,
    max_iter: int = 300,
) -> KMeansResult:
    """Cluster `values` (any shape, float) into at most `k` centroids with exact Lloyd.

    The centroids are returned in the values' dtype and the labels refer to them (nearest
    centroid after the cast), so `centroids[labels]` is exactly the quantised array.
    `init="optimal"` starts Lloyd from the optimal segmentation of at most 1024 atoms (exact
    optimum for up to 2048 values): the lowest inertia, but without linear initialisation's
    bias towards keeping centroids for the few large weights, which the paper found to
    matter more for accuracy.
    """
    flat = np.asarray(values).reshape(-1)
    if not np.issubdtype(flat.dtype, np.floating):
        raise ValueError(f"kmeans_1d needs float values, got {flat.dtype}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if flat.size == 0:
        return KMeansResult(np.zeros(0, flat.dtype), np.zeros(0, np.uint8), 0.0)
    if not np.all(np.isfinite(flat)):
        raise ValueError("kmeans_1d needs finite values (found NaN or inf)")
    data = _SortedPrefix(flat)
    distinct = int(np.count_nonzero(np.diff(data.sorted))) + 1
    if distinct <= k:
        centroids = np.unique(data.sorted).astype(np.float64)
    else:
        if init == "optimal":
            start = _optimal_on_atoms(data, k)
        else:
            start = initial_centroids(data.sorted, k, init, np.random.default_rng(seed))
        centroids = _lloyd(data, np.sort(start), max_iter)
    return _finish(data, flat, centroids)


def _lloyd(data: _SortedPrefix, centroids: np.ndarray, max_iter: int) -> np.ndarray:
    """Lloyd iterations on sorted data until the assignment stops changing."""
    splits = _splits(data, centroids)
    for iteration in range(1, max_iter + 1):
        counts, sums, squares = data.segment_stats(splits)
        empty = bool(np.any(counts == 0))
        if empty:
            centroids = _reseed_empty(data, centroids, counts, sums, squares)
        else:
            centroids = sums / counts
        new_splits = _splits(data, centroids)
        if not empty and np.array_equal(new_splits, splits):
            logger.debug("kmeans_1d: converged after %d iterations", iteration)
            return centroids
        splits = new_splits
    logger.debug("kmeans_1d: stopped after max_iter=%d without convergence", max_iter)
    counts, sums, _ = data.segment_stats(splits)
    return np.where(counts > 0, sums / np.maximum(counts, 1), centroids)


def _atom_edges(data: _SortedPrefix, atoms: int) -> np.ndarray:
    """Cut points (indices into the sorted values) of the atoms the DP works on.

    Small inputs use one atom per distinct value, which makes the DP the exact optimum.
    Larger ones mix quantile cuts (resolution where the mass is) with evenly spaced value
    cuts (resolution in the tails); equal values never straddle an atom edge.
    """
    values = data.sorted
    if data.n <= 2 * atoms:
        cuts = np.flatnonzero(np.diff(values)) + 1
    else:
        by_mass = np.linspace(0, data.n, atoms // 2 + 1).astype(np.int64)
        grid = np.linspace(float(values[0]), float(values[-1]), atoms // 2 + 1)
        by_value = np.searchsorted(values, grid.astype(values.dtype), side="right")
        cuts = np.concatenate([by_mass, by_value])
        # Move every cut to the start of its run of equal values.
        cuts = np.searchsorted(values, values[np.minimum(cuts, data.n - 1)], side="left")
    return np.unique(np.concatenate([[0], cuts, [data.n]]))


def _optimal_on_atoms(data: _SortedPrefix, k: int, atoms: int = 1024) -> np.ndarray:
    """Centroids of the optimal k-segmentation of the atoms (dynamic programming).

    D_t[j] = min_{i<j} D_{t-1}[i] + SSE(atoms i..j-1), as in Wang & Song's Ckmeans.1d.dp,
    vectorised over an (m+1)^2 cost matrix; exact when each atom is one distinct value.
    """
    edges = _atom_edges(data, atoms)
    p1, p2 = data.prefixes(edges)
    count = edges.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        n = count[None, :] - count[:, None]
        s1 = p1[None, :] - p1[:, None]
        cost = (p2[None, :] - p2[:, None]) - s1 * s1 / n
    cost = np.where(n > 0, np.maximum(cost, 0.0), np.inf)
    m = edges.size - 1
    k = min(k, m)
    best = cost[0].copy()
    choice = np.zeros((k, m + 1), dtype=np.int64)
    for t in range(1, k):
        total = best[:, None] + cost
        choice[t] = np.argmin(total, axis=0)
        best = total[choice[t], np.arange(m + 1)]
    bounds = [m]
    for t in range(k - 1, 0, -1):
        bounds.append(int(choice[t, bounds[-1]]))
    bounds.append(0)
    cuts = edges[np.array(bounds[::-1])]
    counts = np.diff(cuts).astype(np.float64)
    sums = np.diff(data.prefixes(cuts)[0])
    return np.sort(sums[counts > 0] / counts[counts > 0])


def _finish(data: _SortedPrefix, flat: np.ndarray, centroids: np.ndarray) -> KMeansResult:
    """Cast the codebook to the values' dtype, label every value, measure the inertia."""
    codebook = np.unique(centroids.astype(flat.dtype))
    labels = assign_nearest(flat, codebook)
    counts, sums, squares = data.segment_stats(_splits(data, codebook))
    c = codebook.astype(np.float64)
    inertia = float(np.sum(squares - 2.0 * c * sums + counts * c * c))
    return KMeansResult(codebook, labels, max(inertia, 0.0))
