"""Storage layouts of the `ai.onnxcompress` ops and their numpy references.

`SparseMatMul` computes Y = X · W (+ bias) for a K × N weight W held as CSR of W^T (N × K):
output neuron n owns the entries `row_ptr[n] : row_ptr[n + 1]`, each a float value and the
input column it reads (uint16 when K <= 65536, else int32). This is the row-wise layout of
EIE (Han et al., "EIE: Efficient Inference Engine on Compressed Deep Neural Network", ISCA
2016) and of Deep Compression's pruned layers (Han et al., ICLR 2016). Duplicate
(row, column) entries add up, as in scipy.

`CodebookMatMul` holds a dense weight-shared layer as W^T's codebook indices (uint8, or two
4-bit indices per byte) and a float codebook; `SparseCodebookMatMul` is CSR whose values are
codebook indices (EIE's layout for pruned and shared layers).

Exact: `dense_from_csr(to_csr(W))` is W bit for bit, and so is `codebook[unpack(pack(i))]`;
the kernel sums the same products in another order, so outputs match dense MatMul up to fp32
rounding.
"""

from __future__ import annotations

__all__ = [
    "CsrWeight",
    "to_csr",
    "dense_from_csr",
    "index_dtype_for",
    "validate_csr",
    "sparse_matmul_reference",
    "packed_row_bytes",
    "pack_codebook_indices",
    "unpack_codebook_indices",
    "codebook_matmul_reference",
    "sparse_codebook_matmul_reference",
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
        """Stored non-zeros."""
        return int(self.values.size)

    @property
    def nbytes(self) -> int:
        """Bytes of the three arrays, as the file stores them."""
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
    values: np.ndarray,
    col_indices: np.ndarray,
    row_ptr: np.ndarray,
    in_features: int,
    out_features: int,
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
        raise ValueError(
            f"row_ptr[N] = {row_ptr[-1]} but col_indices has {col_indices.size} entries"
        )
    bad = np.nonzero(
        (col_indices.astype(np.int64) < 0) | (col_indices.astype(np.int64) >= in_features)
    )[0]
    if bad.size:
        at = int(bad[0])
        raise ValueError(
            f"col_indices[{at}] = {col_indices[at]} is out of range [0, {in_features})"
        )


def dense_from_csr(
    values: np.ndarray,
    col_indices: np.ndarray,
    row_ptr: np.ndarray,
    in_features: int,
    out_features: int,
) -> np.ndarray:
    """The K × N dense weight the CSR arrays describe (duplicates add up)."""
    validate_csr(values, col_indices, row_ptr, in_features, out_features)
    counts: np.ndarray = np.diff(row_ptr.astype(np.int64))  # numpy's stub says timedelta64
    rows = np.repeat(np.arange(out_features), counts)
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
        raise ValueError(
            f"X has shape {list(x.shape)}, its last dimension must be K = {in_features}"
        )
    weight = dense_from_csr(values, col_indices, row_ptr, in_features, out_features).astype(
        np.float64
    )
    y = x.astype(np.float64) @ weight
    if bias is not None:
        y = y + bias.astype(np.float64).reshape(out_features)
    return y.astype(np.float32)


# ---- weight sharing: codebook indices -----------------------------------------------------------


def packed_row_bytes(in_features: int, bits: int) -> int:
    """Bytes per row of W^T's packed indices: K for 8 bits, ceil(K / 2) for 4 bits."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    return in_features if bits == 8 else (in_features + 1) // 2


def pack_codebook_indices(indices: np.ndarray, bits: int) -> np.ndarray:
    """W's K × N codebook indices as CodebookMatMul stores them: W^T rows, 4-bit pairs packed.

    bits = 8: uint8 [N, K]. bits = 4: uint8 [N, ceil(K/2)], column 2b in the low nibble of
    byte b and column 2b + 1 in the high nibble (zero pads odd K).
    """
    if indices.ndim != 2:
        raise ValueError(f"expected 2-D indices, got shape {indices.shape}")
    limit = 1 << bits
    if indices.size and (indices.min() < 0 or indices.max() >= limit):
        raise ValueError(f"indices must lie in [0, {limit}) for {bits} bits")
    transposed = np.ascontiguousarray(indices.T).astype(np.uint8)
    if bits == 8:
        return transposed
    out_features, in_features = transposed.shape
    padded = np.zeros((out_features, 2 * packed_row_bytes(in_features, 4)), dtype=np.uint8)
    padded[:, :in_features] = transposed
    return (padded[:, 0::2] | (padded[:, 1::2] << 4)).astype(np.uint8)


def unpack_codebook_indices(packed: np.ndarray, in_features: int, bits: int) -> np.ndarray:
    """Inverse of `pack_codebook_indices`: W's K × N indices."""
    if bits == 8:
        return np.ascontiguousarray(packed.T)
    low, high = packed & 15, packed >> 4
    transposed = np.stack([low, high], axis=2).reshape(packed.shape[0], -1)[:, :in_features]
    return np.ascontiguousarray(transposed.T)


def codebook_matmul_reference(
    x: np.ndarray,
    packed: np.ndarray,
    codebook: np.ndarray,
    bias: np.ndarray | None,
    in_features: int,
    out_features: int,
    bits: int,
) -> np.ndarray:
    """Y = X · codebook[indices] (+ bias), in float64, returned as float32."""
    if x.shape[-1] != in_features:
        raise ValueError(
            f"X has shape {list(x.shape)}, its last dimension must be K = {in_features}"
        )
    expected = (out_features, packed_row_bytes(in_features, bits))
    if packed.shape != expected:
        raise ValueError(f"indices has shape {list(packed.shape)}, expected {list(expected)}")
    if not 1 <= codebook.size <= 1 << bits:
        raise ValueError(f"codebook has {codebook.size} entries, expected 1 .. {1 << bits}")
    indices = unpack_codebook_indices(packed, in_features, bits)
    if bits == 4 and in_features % 2:
        pad = packed[:, -1] >> 4
        if pad.size and pad.max() >= codebook.size:
            raise ValueError("a padding nibble is out of range for the codebook")
    if indices.size and indices.max() >= codebook.size:
        # the first offender in storage order (row n of W^T, then column k), as the kernel scans
        n, k = np.unravel_index(int(np.argmax(indices.T >= codebook.size)), indices.T.shape)
        raise ValueError(
            f"index of W[{k}, {n}] = {indices[k, n]} is out of range for a codebook of "
            f"{codebook.size} entries"
        )
    weight = codebook.astype(np.float64)[indices.astype(np.int64)]
    y = x.astype(np.float64) @ weight
    if bias is not None:
        y = y + bias.astype(np.float64).reshape(out_features)
    return y.astype(np.float32)


def sparse_codebook_matmul_reference(
    x: np.ndarray,
    indices: np.ndarray,
    col_indices: np.ndarray,
    row_ptr: np.ndarray,
    codebook: np.ndarray,
    bias: np.ndarray | None,
    in_features: int,
    out_features: int,
) -> np.ndarray:
    """SparseMatMul whose values are codebook[indices] (the EIE layout)."""
    if not 1 <= codebook.size <= 256:
        raise ValueError(
            f"codebook has shape {list(codebook.shape)}, expected [C] with 1 <= C <= 256"
        )
    if indices.shape != col_indices.shape:
        raise ValueError(
            f"values has {indices.size} entries but col_indices has {col_indices.size}"
        )
    bad = np.nonzero(indices.astype(np.int64) >= codebook.size)[0]
    if bad.size:
        at = int(bad[0])
        raise ValueError(
            f"indices[{at}] = {indices[at]} is out of range for a codebook of {codebook.size} "
            "entries"
        )
    values = codebook.astype(np.float32)[indices.astype(np.int64)]
    return sparse_matmul_reference(x, values, col_indices, row_ptr, bias, in_features, out_features)
