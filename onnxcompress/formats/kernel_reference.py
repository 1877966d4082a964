"""numpy references of the `ai.onnxcompress` ops for `onnx.reference.ReferenceEvaluator`.

    from onnx.reference import ReferenceEvaluator
    ReferenceEvaluator(model, new_ops=REFERENCE_OPS).run(None, feeds)

They compute densely in float64 from the stored arrays (`onnxcompress.formats.kernel_arrays`), independently of the
C++ kernels, and reject malformed arrays with the same messages. Tests use them as oracles.
"""

from __future__ import annotations

__all__ = ["SparseMatMul", "CodebookMatMul", "SparseCodebookMatMul", "REFERENCE_OPS"]

import numpy as np
from onnx.reference.op_run import OpRun

from onnxcompress.formats.kernel_arrays import (
    codebook_matmul_reference,
    sparse_codebook_matmul_reference,
    sparse_matmul_reference,
)


class SparseMatMul(OpRun):
    """Y = X · W (+ bias), W given as CSR of W^T with attributes K and N."""

    op_domain = "ai.onnxcompress"

    def _run(  # type: ignore[override]
        self,
        x: np.ndarray,
        values: np.ndarray,
        col_indices: np.ndarray,
        row_ptr: np.ndarray,
        bias: np.ndarray | None = None,
        K: int | None = None,  # noqa: N803 - ONNX attribute names
        N: int | None = None,  # noqa: N803
    ) -> tuple[np.ndarray]:
        if K is None or N is None:
            raise ValueError("SparseMatMul needs the attributes K and N")
        return (sparse_matmul_reference(x, values, col_indices, row_ptr, bias, int(K), int(N)),)



class CodebookMatMul(OpRun):
    """Y = X · codebook[indices] (+ bias); indices are W^T rows, 4-bit pairs packed."""

    op_domain = "ai.onnxcompress"

    def _run(  # type: ignore[override]
        self,
        x: np.ndarray,
        indices: np.ndarray,
        codebook: np.ndarray,
        bias: np.ndarray | None = None,
        K: int | None = None,  # noqa: N803
        N: int | None = None,  # noqa: N803
        bits: int | None = None,
    ) -> tuple[np.ndarray]:
        if K is None or N is None:
            raise ValueError("CodebookMatMul needs the attributes K and N")
        width = 8 if bits is None else int(bits)
        return (codebook_matmul_reference(x, indices, codebook, bias, int(K), int(N), width),)


class SparseCodebookMatMul(OpRun):
    """SparseMatMul with values = codebook[indices]."""

    op_domain = "ai.onnxcompress"

    def _run(  # type: ignore[override]
        self,
        x: np.ndarray,
        indices: np.ndarray,
        col_indices: np.ndarray,
        row_ptr: np.ndarray,
        codebook: np.ndarray,
        bias: np.ndarray | None = None,
        K: int | None = None,  # noqa: N803
        N: int | None = None,  # noqa: N803
    ) -> tuple[np.ndarray]:
        if K is None or N is None:
            raise ValueError("SparseCodebookMatMul needs the attributes K and N")
        return (sparse_codebook_matmul_reference(x, indices, col_indices, row_ptr, codebook, bias, int(K), int(N)),)


REFERENCE_OPS = [SparseMatMul, CodebookMatMul, SparseCodebookMatMul]
