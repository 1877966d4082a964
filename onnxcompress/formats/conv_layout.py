"""SparseConv's storage and its numpy reference: a Conv weight as CSR of its flattened filters.

`SparseConv(X, values, col_indices, row_ptr[, bias])` computes ONNX Conv (1-D or 2-D, any
strides, pads, dilations and group) for the weight W of shape `weight_shape` = [M, C/group, k...]
held as CSR whose row m is filter m flattened (W.reshape(M, -1)): column (c·kh + i)·kw + j for
channel c of the filter's group and tap (i, j). Those are the rows of the sparse × dense product
over the unfolded input in Liu et al., "Sparse Convolutional Neural Networks" (CVPR 2015);
the kernel (kernels/src/sparse_conv.cc) runs it as a direct sparse convolution. Attributes:
`weight_shape`, `strides`, `pads`, `dilations`, `group` (auto_pad is resolved to pads first).
Exact: `dense_from_conv_csr(conv_csr(W))` is W bit for bit.
"""

from __future__ import annotations

__all__ = [
    "ConvGeometry",
    "conv_csr",
    "dense_from_conv_csr",
    "sparse_conv_reference",
    "sparse_conv_op_reference",
]

import dataclasses
from typing import Any

import numpy as np

from onnxcompress.formats.kernel_arrays import CsrWeight, IndexDtype, dense_from_csr, to_csr


@dataclasses.dataclass(frozen=True)
class ConvGeometry:
    """The SparseConv attributes, ONNX defaults filled in."""

    weight_shape: tuple[int, ...]
    strides: tuple[int, ...]
    pads: tuple[int, ...]
    dilations: tuple[int, ...]
    group: int = 1

    @classmethod
    def of(
        cls, weight_shape: tuple[int, ...], strides=None, pads=None, dilations=None, group: int = 1
    ) -> ConvGeometry:
        """A geometry from a weight shape and the Conv attributes ONNX stores (absent: defaults)."""
        spatial = len(weight_shape) - 2
        return cls(
            tuple(int(d) for d in weight_shape),
            tuple(int(s) for s in strides or [1] * spatial),
            tuple(int(p) for p in pads or [0] * (2 * spatial)),
            tuple(int(d) for d in dilations or [1] * spatial),
            int(group),
        )

    def attributes(self) -> dict[str, Any]:
        """The geometry as SparseConv node attributes."""
        return {
            "weight_shape": list(self.weight_shape),
            "strides": list(self.strides),
            "pads": list(self.pads),
            "dilations": list(self.dilations),
            "group": self.group,
        }

    def output_size(self, size: tuple[int, ...]) -> tuple[int, ...]:
        """Spatial output size for a spatial input size."""
        spatial = len(self.strides)
        kernel = self.weight_shape[2:]
        return tuple(
            (
                size[a]
                + self.pads[a]
                + self.pads[a + spatial]
                - self.dilations[a] * (kernel[a] - 1)
                - 1
            )
            // self.strides[a]
            + 1
            for a in range(spatial)
        )


def conv_csr(weight: np.ndarray, index_dtype: IndexDtype = "auto") -> CsrWeight:
    """CSR of the filters W.reshape(M, -1); zeros dropped exactly."""
    if weight.ndim not in (3, 4):
        raise ValueError(
            f"expected a 1-D or 2-D Conv weight [M, C/group, k...], got shape {weight.shape}"
        )
    return to_csr(np.ascontiguousarray(weight.reshape(weight.shape[0], -1).T), index_dtype)


def dense_from_conv_csr(
    values: np.ndarray, col_indices: np.ndarray, row_ptr: np.ndarray, weight_shape: tuple[int, ...]
) -> np.ndarray:
    """The dense Conv weight the CSR arrays describe."""
    columns = int(np.prod(weight_shape[1:]))
    flat = dense_from_csr(
        values, col_indices, row_ptr, columns, int(weight_shape[0])
    )  # columns x M
    return np.ascontiguousarray(flat.T).reshape(weight_shape)


def sparse_conv_reference(
    x: np.ndarray,
    values: np.ndarray,
    col_indices: np.ndarray,
    row_ptr: np.ndarray,
    bias: np.ndarray | None,
    geometry: ConvGeometry,
) -> np.ndarray:
    """ONNX Conv of x with the dense weight in float64 (a strided slice per tap), as float32."""
    weight = dense_from_conv_csr(values, col_indices, row_ptr, geometry.weight_shape).astype(
        np.float64
    )
    spatial = weight.ndim - 2
    if x.ndim != spatial + 2 or x.shape[1] != geometry.group * weight.shape[1]:
        raise ValueError(
            f"X has shape {list(x.shape)}, expected {spatial + 2}-D with "
            f"{geometry.group * weight.shape[1]} channels"
        )
    out_size = geometry.output_size(tuple(x.shape[2:]))
    pad_width = [(0, 0), (0, 0)] + [
        (geometry.pads[a], geometry.pads[a + spatial]) for a in range(spatial)
    ]
    padded = np.pad(x.astype(np.float64), pad_width)
    filters, per_group = weight.shape[0], weight.shape[1]
    group_filters = filters // geometry.group
    y = np.zeros((x.shape[0], filters, *out_size))
    for tap in np.ndindex(*weight.shape[2:]):
        window = tuple(
            slice(
                tap[a] * geometry.dilations[a],
                tap[a] * geometry.dilations[a] + geometry.strides[a] * (out_size[a] - 1) + 1,
                geometry.strides[a],
            )
            for a in range(spatial)
        )
        taken = padded[(slice(None), slice(None), *window)]
        for g in range(geometry.group):
            w = weight[g * group_filters : (g + 1) * group_filters, :, *tap]  # (M/g, C/g)
            y[:, g * group_filters : (g + 1) * group_filters] += np.einsum(
                "mc,nc...->nm...", w, taken[:, g * per_group : (g + 1) * per_group]
            )
    if bias is not None:
        y += bias.astype(np.float64).reshape(1, filters, *([1] * spatial))
    return y.astype(np.float32)


def sparse_conv_op_reference(
    x: np.ndarray,
    values: np.ndarray,
    col_indices: np.ndarray,
    row_ptr: np.ndarray,
    bias: np.ndarray | None,
    weight_shape: tuple[int, ...],
    strides: tuple[int, ...],
    pads: tuple[int, ...],
    dilations: tuple[int, ...],
    group: int,
) -> np.ndarray:
    """`sparse_conv_reference` with the op's inputs and attributes in node order (the table's)."""
    geometry = ConvGeometry.of(weight_shape, strides, pads, dilations, group)
    return sparse_conv_reference(x, values, col_indices, row_ptr, bias, geometry)
