"""numpy references of the `ai.onnxcompress` ops for `onnx.reference.ReferenceEvaluator`.

    from onnx.reference import ReferenceEvaluator
    ReferenceEvaluator(model, new_ops=REFERENCE_OPS).run(None, feeds)

They compute densely in float64 from the stored arrays (formats.py), independently of the
C++ kernels, and reject malformed arrays with the same messages. Tests use them as oracles.
"""

from __future__ import annotations

__all__ = ["SparseMatMul", "REFERENCE_OPS"]

import numpy as np
from onnx.reference.op_run import OpRun

from onnxcompress.passes.sparse.formats import sparse_matmul_reference


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


REFERENCE_OPS = [SparseMatMul]
