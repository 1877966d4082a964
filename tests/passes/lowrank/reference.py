"""Independent numpy references for the low-rank tests."""

from __future__ import annotations

import numpy as np


def conv2d(
    x: np.ndarray,
    w: np.ndarray,
    bias: np.ndarray | None = None,
    strides: tuple[int, int] = (1, 1),
    pads: tuple[int, int, int, int] = (0, 0, 0, 0),
    dilations: tuple[int, int] = (1, 1),
    group: int = 1,
) -> np.ndarray:
    """Reference ONNX Conv (NCHW, pads = top, left, bottom, right), in float64."""
    n, _, h, width = x.shape
    m, cg, kh, kw = w.shape
    (sh, sw), (dh, dw), (top, left, bottom, right) = strides, dilations, pads
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (top, bottom), (left, right)))
    ho = (h + top + bottom - dh * (kh - 1) - 1) // sh + 1
    wo = (width + left + right - dw * (kw - 1) - 1) // sw + 1
    out = np.zeros((n, m, ho, wo))
    per = m // group
    for g in range(group):
        xs = xp[:, g * cg : (g + 1) * cg]
        for i in range(kh):
            for j in range(kw):
                patch = xs[
                    :,
                    :,
                    i * dh : i * dh + sh * (ho - 1) + 1 : sh,
                    j * dw : j * dw + sw * (wo - 1) + 1 : sw,
                ]
                out[:, g * per : (g + 1) * per] += np.einsum(
                    "nchw,mc->nmhw", patch, w[g * per : (g + 1) * per, :, i, j]
                )
    if bias is not None:
        out += bias[None, :, None, None]
    return out


def truncated(matrix: np.ndarray, rank: int) -> np.ndarray:
    """The rank-r truncated SVD of a matrix, straight from numpy."""
    u, s, vt = np.linalg.svd(np.asarray(matrix, dtype=np.float64), full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vt[:rank]
