"""Storage layouts of the `ai.onnxcompress` ops and their numpy references.

`SparseMatMul` computes Y = X · W (+ bias) for a K × N weight W held as CSR of W^T (N × K):
output neuron n owns the entries `row_ptr[n] : row_ptr[n + 1]`, each a float value and the
input column it reads (uint16 when K <= 65536, else int32). This is the row-wise layout of
EIE (Han et al., "EIE: Efficient Inference Engine on Compressed Deep Neural Network", ISCA
2016) and of Deep Compression's pruned layers (Han et al., ICLR 2016). Duplicate
(row, column) entries add up, as in scipy.

Exact: `dense_from_csr(to_csr(W))` is W bit for bit; the kernel sums the same products in
another order, so outputs match dense MatMul up to fp32 rounding.
"""

from __future__ import annotations

__all__ = [
    "CsrWeight",
    "to_csr",
    "dense_from_csr",
    "index_dtype_for",
    "validate_csr",
    "sparse_matmul_reference",
]

import dataclasses
from typing import Literal

import numpy as np

IndexDtype = Literal["auto", "uint16", "int32"]


@dataclasses.dataclass(frozen=True)
class CsrWeight:
    """A K × N weight as CSR of its transpose (rows = output neurons)."""

    values: np.ndarray  # float32 [nnz]
    col_indices: np.ndarray  # uint16 or int32 [nnz], each in [0, K)
    row_ptr: np.ndarray  # int32 [N + 1]
    in_features: int  # K
    out_features: int  # N

    @property
    def nnz(self) -> int:
        return int(self.values.size)

    @property
    def nbytes(self) -> int:
        return int(self.values.nbytes + self.col_indices.nbytes + self.row_ptr.nbytes)


def index_dtype_for(in_features: int, requested: IndexDtype = "auto") -> np.dtype:
    """uint16 column indices when they fit (K <= 65536), int32 otherwise or when asked."""
    if requested == "int32":
        return np.dtype(np.int32)
    if in_features > 65536:
        if requested == "uint16":
            raise ValueError(f"uint16 column indices need K <= 65536, got K = {in_features}")
        return np.dtype(np.int32)
    return np.dtype(np.uint16)


def to_csr(weight: np.ndarray, index_dtype: IndexDtype = "auto") -> CsrWeight:
    """CSR of `weight.T` for a 2-D float weight (K × N); zeros are dropped exactly."""
    if weight.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {weight.shape}")
    in_features, out_features = (int(d) for d in weight.shape)
    if out_features * in_features >= 2**31:
        raise ValueError(f"weight {weight.shape} has too many entries for int32 row pointers")
    transposed = np.ascontiguousarray(np.asarray(weight, dtype=np.float32).T)
    rows, cols = np.nonzero(transposed)
    counts = np.bincount(rows, minlength=out_features)
    row_ptr = np.zeros(out_features + 1, dtype=np.int32)
    np.cumsum(counts, out=row_ptr[1:])
    return CsrWeight(
        values=transposed[rows, cols].astype(np.float32),
        col_indices=cols.astype(index_dtype_for(in_features, index_dtype)),
        row_ptr=row_ptr,
        in_features=in_features,
        out_features=out_features,
    )


def validate_csr(
    values: np.ndarray, col_indices: np.ndarray, row_ptr: np.ndarray, in_features: int, out_features: int
) -> None:
    """Raise ValueError naming the offending value, in the kernel's words."""
    if row_ptr.shape != (out_features + 1,):
        raise ValueError(f"row_ptr has {row_ptr.size} entries, expected N + 1 = {out_features + 1}")
    if values.shape != col_indices.shape:
        raise ValueError(f"values has {values.size} entries but col_indices has {col_indices.size}")
    if row_ptr[0] != 0:
        raise ValueError(f"row_ptr[0] = {row_ptr[0]}, expected 0")
    decreasing = np.nonzero(np.diff(row_ptr.astype(np.int64)) < 0)[0]
    if decreasing.size:
        at = int(decreasing[0]) + 1
        raise ValueError(f"row_ptr decreases at {at}: {row_ptr[at - 1]} > {row_ptr[at]}")
    if row_ptr[-1] != col_indices.size:
        raise ValueError(f"row_ptr[N] = {row_ptr[-1]} but col_indices has {col_indices.size} entries")
    bad = np.nonzero((col_indices.astype(np.int64) < 0) | (col_indices.astype(np.int64) >= in_features))[0]
    if bad.size:
        at = int(bad[0])
        raise ValueError(f"col_indices[{at}] = {col_indices[at]} is out of range [0, {in_features})")


def dense_from_csr(
    values: np.ndarray, col_indices: np.ndarray, row_ptr: np.ndarray, in_features: int, out_features: int
) -> np.ndarray:
    """The K × N dense weight the CSR arrays describe (duplicates add up)."""
    validate_csr(values, col_indices, row_ptr, in_features, out_features)
    rows = np.repeat(np.arange(out_features), np.diff(row_ptr.astype(np.int64)))
    transposed = np.zeros((out_features, in_features), dtype=np.float32)
    np.add.at(transposed, (rows, col_indices.astype(np.int64)), values.astype(np.float32))
    return transposed.T


def sparse_matmul_reference(
    x: np.ndarray,
    values: np.ndarray,
    col_indices: np.ndarray,
    row_ptr: np.ndarray,
    bias: np.ndarray | None,
    in_features: int,
    out_features: int,
) -> np.ndarray:
    """Y = X · W (+ bias), computed densely in float64 and returned as float32."""
    if x.shape[-1] != in_features:
        raise ValueError(f"X has shape {list(x.shape)}, its last dimension must be K = {in_features}")
    weight = dense_from_csr(values, col_indices, row_ptr, in_features, out_features).astype(np.float64)
    y = x.astype(np.float64) @ weight
    if bias is not None:
        y = y + bias.astype(np.float64).reshape(out_features)
    return y.astype(np.float32)
