"""Layer-wise reconstruction with the inverse Hessian: SparseGPT pruning and GPTQ quantisation.

One layer, in matrix form W [rows = output channels, d = input features], and its calibration
Hessian H = X^T X [d, d] (see `onnxcompress.calibration`). The layer's squared output error
for a change D of W over the calibration inputs is exactly

    E(D) = ||X D^T||_F^2 = sum over rows r of  d_r^T H d_r  = tr(D H D^T).

Optimal Brain Surgeon (Hassibi & Stork 1993) removes one weight w_q of a row and moves the
others along the inverse Hessian so that E stays minimal:

    delta = -(w_q / [H^-1]_qq) * H^-1[:, q],      added error  w_q^2 / [H^-1]_qq.

Optimal Brain Compression (Frantar & Alistarh 2022), SparseGPT and GPTQ (2023) make this
affordable for every row at once by fixing the order in which columns are treated (left to
right): the inverse Hessians of the remaining columns are then the rows of the upper
Cholesky factor U of H^-1 (H^-1 = U^T U), and treating column i of every row is

    err   = (w_i - q_i) / U_ii,          W[:, j>i] -= err * U[i, j>i],

where q_i is the column's new value (0 where pruned, the nearest level or codebook entry
when quantising). Updates within a block of `blocksize` columns are immediate, those to later
columns are batched per block ("lazy batch updates"); the result is the same up to rounding.

* `sparsegpt`: the mask is chosen every `maskblock` columns by the OBS saliency w^2 / U_ii^2
  of the weights as updated so far (adaptive mask selection; unlike SparseGPT's fixed share
  per block, the share a sub-block gets is decided against all columns still ahead, so
  layers whose input features differ in importance can lose more of the unimportant ones),
  or per group of M consecutive input features for N:M. Exact: the zero count
  (round(s*n) for a share s, computed by blocks so the total is exact) or the N:M pattern;
  existing zeros stay zero. Lossy: the other weights move to compensate; the residual error
  on the calibration set is what the method minimises greedily, not a global optimum.
* `gptq_quantize`: every value ends as one the quantiser allows (a codebook entry, or an
  integer level times a channel scale). Lossy in the same greedy sense.

Numerics: all in float64. Dead inputs (H_ii = 0: the input is zero on every calibration
sample) get H_ii = 1; for pruning their weights are zeroed first (free on the calibration set,
as in the reference code), for quantisation they are quantised without affecting the others.
H is damped by `percdamp` x mean(diag H) on the diagonal; if the Cholesky factorisation still
fails the damping is multiplied by 10, up to 6 times, then `np.linalg.LinAlgError` is raised.
"""

from __future__ import annotations

__all__ = [
    "Quantizer",
    "reconstruction_error",
    "inverse_hessian_factor",
    "sparsegpt",
    "magnitude_prune",
    "gptq_quantize",
    "integer_quantizer",
    "codebook_quantizer",
    "nearest_codebook",
    "parse_n_m",
]

import logging
from collections.abc import Callable

import numpy as np

logger = logging.getLogger(__name__)

#: (column values [rows], original column index) -> quantised values [rows]
Quantizer = Callable[[np.ndarray, int], np.ndarray]

_MAX_DAMP_RETRIES = 6


def parse_n_m(text: str) -> tuple[int, int]:
    """'2:4' -> (2, 4): N zeros in every M consecutive input features."""
    try:
        n_text, m_text = text.split(":")
        n, m = int(n_text), int(m_text)
    except ValueError:
        raise ValueError(f"N:M must look like '2:4', got {text!r}") from None
    if not 0 < n < m:
        raise ValueError(f"N:M needs 0 < N < M, got {text!r}")
    return n, m


def reconstruction_error(original: np.ndarray, new: np.ndarray, hessian: np.ndarray) -> float:
    """tr(D H D^T) for D = new - original.

    That is the layer's squared output change on the calibration set, without running it.
    """
    delta = np.asarray(new, np.float64) - np.asarray(original, np.float64)
    return float(np.einsum("ri,ij,rj->", delta, np.asarray(hessian, np.float64), delta))


def _prepared(
    weights: np.ndarray, hessian: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(W float64 copy, H float64 copy with dead inputs fixed, dead mask)."""
    w = np.array(weights, dtype=np.float64, copy=True, order="C")
    h = np.array(hessian, dtype=np.float64, copy=True, order="C")
    if w.ndim != 2 or h.shape != (w.shape[1], w.shape[1]):
        raise ValueError(
            f"weights {w.shape} and hessian {h.shape} do not match (want [rows, d] and [d, d])"
        )
    h = (h + h.T) / 2
    dead = np.diag(h) <= 0
    h[dead, :] = 0
    h[:, dead] = 0
    h[dead, dead] = 1
    return w, h, dead


def inverse_hessian_factor(hessian: np.ndarray, percdamp: float = 0.01) -> np.ndarray:
    """Upper Cholesky factor U of (H + damp I)^-1 (so H^-1 = U^T U), retrying with more damping."""
    h = np.asarray(hessian, np.float64)
    mean_diag = float(np.mean(np.diag(h))) if h.size else 1.0
    if not np.isfinite(mean_diag) or mean_diag <= 0:
        mean_diag = 1.0
    damp = max(percdamp, 1e-10) * mean_diag
    eye = np.eye(h.shape[0])
    for attempt in range(_MAX_DAMP_RETRIES + 1):
        try:
            lower = np.linalg.cholesky(h + damp * eye)
            lower_inv = np.linalg.inv(lower)
            inverse = lower_inv.T @ lower_inv
            factor = np.linalg.cholesky((inverse + inverse.T) / 2).T
            if np.all(np.isfinite(factor)) and np.all(np.diag(factor) > 0):
                return factor
        except np.linalg.LinAlgError:
            pass
        logger.info(
            "Cholesky failed with damping %.3g (attempt %d); retrying with 10x", damp, attempt + 1
        )
        damp *= 10
    raise np.linalg.LinAlgError("the layer Hessian is not positive definite even after damping")


def _lowest(scores: np.ndarray, count: int) -> np.ndarray:
    """Mask of the `count` lowest scores, ties broken by position.

    Position breaks ties as a stable sort would, but in O(n), so results are reproducible.
    """
    picked = np.zeros(scores.size, dtype=bool)
    if count >= scores.size:
        picked[:] = True
    elif count > 0:
        threshold = np.partition(scores, count - 1)[count - 1]
        picked = scores < threshold
        ties = np.flatnonzero(scores == threshold)[: count - int(np.count_nonzero(picked))]
        picked[ties] = True
    return picked


def sparsegpt(
    weights: np.ndarray,
    hessian: np.ndarray,
    sparsity: float = 0.5,
    *,
    prunen: int = 0,
    prunem: int = 0,
    blocksize: int = 128,
    maskblock: int = 8,
    percdamp: float = 0.01,
) -> np.ndarray:
    """Prune W [rows, d] to `sparsity` (or N:M) with OBS updates of the remaining weights.

    Returns a new float64 array. With prunen/prunem, exactly `prunen` of every `prunem`
    consecutive input features of each row are zero (d must be a multiple of prunem) and
    `sparsity` is ignored; existing zeros count toward the target either way. Without N:M the
    mask is chosen every `maskblock` columns from the weights as updated so far (SparseGPT
    uses 128 on LLM layers; narrow layers of small models do clearly better with a few columns).
    """
    w, h, dead = _prepared(weights, hessian)
    rows, columns = w.shape
    n_m = prunen > 0 and prunem > 0
    blocksize, maskblock = _block_sizes(columns, sparsity, prunen, prunem, blocksize, maskblock)
    # Weights already zero, and those of dead inputs, are free: they count toward the target.
    w[:, dead] = 0
    free = (w == 0) | dead[None, :]
    factor = inverse_hessian_factor(h, percdamp)
    full_diag = np.diag(factor)
    zeros_so_far = 0
    for start in range(0, columns, blocksize):
        stop = min(start + blocksize, columns)
        w1 = w[:, start:stop].copy()
        u1 = factor[start:stop, start:stop]
        diag = np.diag(u1)
        errors = np.zeros_like(w1)
        mask = free[:, start:stop].copy()
        for i in range(stop - start):
            if n_m and i % prunem == 0:
                group = slice(i, i + prunem)
                _mask_n_m(w1[:, group], mask[:, group], diag[group], prunen)
            elif not n_m and i % maskblock == 0:
                # Adaptive mask: of all columns not yet treated, the ones of lowest OBS saliency
                # w^2 / U_jj^2 (weights as updated so far) make up what the exact total still
                # needs; those in this sub-block are pruned now, the rest are scored again later.
                end = min(i + maskblock, stop - start)
                needed = max(round(sparsity * w.size) - zeros_so_far, 0)
                # lazy updates so far
                later = w[:, stop:] - errors[:, :i] @ factor[start : start + i, stop:]
                ahead = np.concatenate([w1[:, i:], later], axis=1)
                score = np.where(
                    free[:, start + i :], -np.inf, ahead**2 / full_diag[None, start + i :] ** 2
                )
                picked = _lowest(score.reshape(-1), needed)
                mask[:, i:end] |= picked.reshape(score.shape)[:, : end - i]
                zeros_so_far += int(np.count_nonzero(mask[:, i:end]))
            errors[:, i] = _obs_update(w1, u1, mask[:, i], i)
        w[:, start:stop] = w1
        w[:, stop:] -= errors @ factor[start:stop, stop:]
    return w


def _block_sizes(
    columns: int, sparsity: float, prunen: int, prunem: int, blocksize: int, maskblock: int
) -> tuple[int, int]:
    """(blocksize, maskblock), checked: a block holds whole N:M groups, or whole mask blocks."""
    if prunen > 0 and prunem > 0:
        if columns % prunem:
            raise ValueError(f"{columns} input features are not a multiple of M={prunem}")
        return max(prunem, blocksize - blocksize % prunem), maskblock
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity {sparsity} is outside [0, 1)")
    maskblock = max(1, min(maskblock, blocksize))
    return max(maskblock, blocksize - blocksize % maskblock), maskblock


def _mask_n_m(group: np.ndarray, mask: np.ndarray, diag: np.ndarray, prunen: int) -> None:
    """Mark, in the view `mask`, the `prunen` weights of lowest OBS saliency in each row's group.

    Weights already free (zero) score lowest, so they count toward the N first.
    """
    score = np.where(mask, -np.inf, group**2 / diag[None, :] ** 2)
    lowest = np.argsort(score, axis=1, kind="stable")[:, :prunen]
    np.put_along_axis(mask, lowest, True, axis=1)


def _obs_update(w1: np.ndarray, u1: np.ndarray, masked: np.ndarray, i: int) -> np.ndarray:
    """Zero column `i` where masked and move its error onto the later columns; return the error.

    This is the OBS update with the Cholesky factor's row: the kept weights absorb the change.
    """
    column = w1[:, i]
    pruned = np.where(masked, 0.0, column)
    error = (column - pruned) / u1[i, i]
    w1[:, i] = pruned
    w1[:, i + 1 :] -= np.outer(error, u1[i, i + 1 :])
    return error


def magnitude_prune(
    weights: np.ndarray, sparsity: float = 0.5, *, prunen: int = 0, prunem: int = 0
) -> np.ndarray:
    """The baseline: the same zero count (or N:M pattern) by smallest |w|, nothing else moved."""
    w = np.array(weights, dtype=np.float64, copy=True, order="C")
    rows, columns = w.shape
    if prunen > 0 and prunem > 0:
        if columns % prunem:
            raise ValueError(f"{columns} input features are not a multiple of M={prunem}")
        groups = np.abs(w).reshape(rows, columns // prunem, prunem)
        lowest = np.argsort(groups, axis=2, kind="stable")[:, :, :prunen]
        mask = np.zeros_like(groups, dtype=bool)
        np.put_along_axis(mask, lowest, True, axis=2)
        w[mask.reshape(rows, columns)] = 0
        return w
    count = round(sparsity * w.size)
    if count:
        w.reshape(-1)[np.argsort(np.abs(w).reshape(-1), kind="stable")[:count]] = 0
    return w


def gptq_quantize(
    weights: np.ndarray,
    hessian: np.ndarray,
    quantizer: Quantizer,
    *,
    blocksize: int = 128,
    percdamp: float = 0.01,
    act_order: bool = False,
    keep_zeros: bool = False,
) -> np.ndarray:
    """Quantise W [rows, d] column by column with GPTQ error feedback; returns a new float64 array.

    `quantizer(column, j)` gives the allowed values for input column j (its original index,
    also with `act_order`, which treats columns by decreasing H_jj). With `keep_zeros`,
    weights that are exactly 0 on entry stay exactly 0 (a pruned layer's pattern) and the
    error of holding them at 0 is compensated like any other.
    """
    w, h, _ = _prepared(weights, hessian)
    rows, columns = w.shape
    zero = w == 0 if keep_zeros else np.zeros_like(w, dtype=bool)
    order = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(columns)
    w, h, zero = w[:, order], h[np.ix_(order, order)], zero[:, order]
    factor = inverse_hessian_factor(h, percdamp)
    result = np.zeros_like(w)
    for start in range(0, columns, blocksize):
        stop = min(start + blocksize, columns)
        w1 = w[:, start:stop].copy()
        u1 = factor[start:stop, start:stop]
        errors = np.zeros_like(w1)
        for i in range(stop - start):
            column = w1[:, i]
            quantised = np.asarray(quantizer(column, int(order[start + i])), np.float64)
            quantised = np.where(zero[:, start + i], 0.0, quantised)
            error = (column - quantised) / u1[i, i]
            result[:, start + i] = quantised
            w1[:, i + 1 :] -= np.outer(error, u1[i, i + 1 :])
            errors[:, i] = error
        w[:, stop:] -= errors @ factor[start:stop, stop:]
    inverse_order = np.empty_like(order)
    inverse_order[order] = np.arange(columns)
    return result[:, inverse_order]


def integer_quantizer(
    weights: np.ndarray, bits: int, *, symmetric: bool = True
) -> tuple[Quantizer, np.ndarray, np.ndarray]:
    """Per-output-channel integer levels from each row's range: (quantizer, scale, zero_point).

    Symmetric (bits >= 2): scale = max|w_row| / (2^(b-1) - 1), q in [-2^(b-1), 2^(b-1) - 1],
    value scale * q. Asymmetric: the row's range with 0 inside it over q in [0, 2^b - 1],
    value scale * (q - zero_point), zero_point an integer (so 0 is exact).
    """
    w = np.asarray(weights, np.float64)
    if symmetric:
        if bits < 2:
            raise ValueError("symmetric integer levels need at least 2 bits")
        top = (1 << (bits - 1)) - 1
        lowest, highest = -(1 << (bits - 1)), top
        scale = np.max(np.abs(w), axis=1) / top
        zero_point = np.zeros(w.shape[0])
    else:
        lowest, highest = 0, (1 << bits) - 1
        low, high = np.minimum(w.min(axis=1), 0), np.maximum(w.max(axis=1), 0)
        scale = (high - low) / highest
        zero_point = np.round(-low / np.where(scale > 0, scale, 1))
    scale = np.where(scale > 0, scale, 1.0)

    def quantize(column: np.ndarray, index: int) -> np.ndarray:
        levels = np.clip(np.round(column / scale) + zero_point, lowest, highest)
        return scale * (levels - zero_point)

    return quantize, scale, zero_point


def nearest_codebook(values: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    """Index of the nearest entry of a sorted 1-D codebook for every value (ties to the lower)."""
    codebook = np.asarray(codebook, np.float64)
    position = np.clip(np.searchsorted(codebook, values), 1, max(codebook.size - 1, 1))
    if codebook.size == 1:
        return np.zeros(np.shape(values), dtype=np.int64)
    left, right = codebook[position - 1], codebook[position]
    return np.where(np.abs(values - left) <= np.abs(right - values), position - 1, position)


def codebook_quantizer(codebook: np.ndarray) -> Quantizer:
    """Nearest entry of a fixed set of values (any order; used as given, never updated)."""
    entries = np.unique(np.asarray(codebook, np.float64))

    def quantize(column: np.ndarray, index: int) -> np.ndarray:
        return entries[nearest_codebook(column, entries)]

    return quantize
