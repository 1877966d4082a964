"""The one set of float element types a weight may have (sites, detector, fine-tune bridge)."""

from __future__ import annotations

__all__ = ["FLOAT_DTYPES", "INTEGER_DTYPES"]

import onnx_ir as ir

#: Float types a learned weight (or a codebook) may be stored in.
FLOAT_DTYPES = frozenset(
    {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE}
)
#: Integer types codebook indices may be stored in.
INTEGER_DTYPES = frozenset({
    ir.DataType.UINT8, ir.DataType.INT8, ir.DataType.UINT16, ir.DataType.INT16,
    ir.DataType.INT32, ir.DataType.INT64, ir.DataType.UINT4, ir.DataType.INT4,
})
