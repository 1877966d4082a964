"""Portable fallbacks: each `ai.onnxcompress` op as a model-local ONNX function.

The function body rebuilds the dense weight from the op's stored arrays with standard ONNX
ops and then does an ordinary MatMul + Add. Every size the body needs comes from the node's
attributes (K, N) or from the stored arrays' own shapes, never from `Shape(X)`, so after
inlining onnxruntime constant-folds the dense weight once at load: a stock onnxruntime runs
the model at dense speed, and with our library registered the kernel runs instead.

SparseMatMul body (CSR of W^T, see formats.py):
    starts = row_ptr[1:-1]                                   first entry of rows 1 .. N-1
    marks  = ScatterElements(zeros[nnz + 1], starts, 1, reduction=add)
    rows   = CumSum(marks)[:nnz]                             row of every entry
    Wt     = ScatterElements(zeros[N·K], rows·K + cols, values, reduction=add).reshape(N, K)
    Y      = X · Wt^T + bias
SparseCodebookMatMul first gathers values = codebook[indices]; CodebookMatMul unpacks the
(4- or 8-bit) indices with integer Div/Mod and gathers the codebook (see its builder).
SparseConv rebuilds its filters the same way, reshapes them to `weight_shape` and runs Conv
with the caller's strides, pads, dilations and group (attribute references).
Exact: the same dense weight as the numpy references in formats.py, then dense MatMul (Conv).
Needs opset >= 16 (ScatterElements with reduction).
"""

from __future__ import annotations

__all__ = [
    "DOMAIN",
    "OPSET_VERSION",
    "MIN_ONNX_OPSET",
    "sparse_matmul_function",
    "sparse_codebook_matmul_function",
    "codebook_matmul_function",
    "sparse_conv_function",
    "function_for",
]

from collections.abc import Callable

import onnx
from onnx import helper

from onnxcompress.runtime import DOMAIN

OPSET_VERSION = 1
MIN_ONNX_OPSET = 16


def _ref_attribute(name: str, attribute: str, kind: int) -> onnx.AttributeProto:
    """An attribute `name` whose value is the calling node's attribute `attribute`."""
    ref = onnx.AttributeProto()
    ref.name = name
    ref.ref_attr_name = attribute
    ref.type = kind  # type: ignore[assignment]
    return ref


def _ref_constant(output: str, attribute: str, kind: str = "value_int") -> onnx.NodeProto:
    """Constant(value_int=@attribute) (or value_ints): int64 values taken from the calling node."""
    node = helper.make_node("Constant", [], [output])
    ints = kind == "value_ints"
    attribute_type = onnx.AttributeProto.INTS if ints else onnx.AttributeProto.INT
    node.attribute.append(_ref_attribute(kind, attribute, attribute_type))
    return node


def _ints(output: str, values: list[int]) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [output], value_ints=values)


def _filled(output: str, shape: str, dtype: int, value: float | int) -> onnx.NodeProto:
    tensor = helper.make_tensor("value", dtype, [1], [value])
    return helper.make_node("ConstantOfShape", [shape], [output], value=tensor)


def _check_opset(op: str, onnx_opset: int) -> None:
    if onnx_opset < MIN_ONNX_OPSET:
        raise ValueError(f"the portable {op} needs opset >= {MIN_ONNX_OPSET}, model has {onnx_opset}")


def _csr_body(values: str) -> list[onnx.NodeProto]:
    """Nodes rebuilding W from CSR (`values`, col_indices, row_ptr), then Y = X · W + bias."""
    sizes = [_ref_constant("K", "K"), _ref_constant("N", "N")]
    return [*sizes, *_csr_dense(values), *_matmul_tail("wt")]


def _csr_dense(values: str) -> list[onnx.NodeProto]:
    """Nodes rebuilding the dense N × K matrix `wt` from CSR, given int64 scalars `K` and `N`."""
    i32, i64, f32 = onnx.TensorProto.INT32, onnx.TensorProto.INT64, onnx.TensorProto.FLOAT
    return [
        _ints("one", [1]),
        _ints("minus_one", [-1]),
        _ints("zero", [0]),
        helper.make_node("Constant", [], ["zero_scalar"], value_int=0),
        # row of every stored entry
        helper.make_node("Shape", [values], ["nnz"]),
        helper.make_node("Add", ["nnz", "one"], ["nnz_plus_one"]),
        _filled("marks_zero", "nnz_plus_one", i32, 0),
        helper.make_node("Slice", ["row_ptr", "one", "minus_one"], ["starts32"]),
        helper.make_node("Cast", ["starts32"], ["starts"], to=i64),
        helper.make_node("Shape", ["starts"], ["starts_count"]),
        _filled("ones", "starts_count", i32, 1),
        helper.make_node("ScatterElements", ["marks_zero", "starts", "ones"], ["marks"], axis=0, reduction="add"),
        helper.make_node("CumSum", ["marks", "zero_scalar"], ["rows_all"]),
        helper.make_node("Slice", ["rows_all", "zero", "minus_one"], ["rows32"]),
        helper.make_node("Cast", ["rows32"], ["rows"], to=i64),
        # flat position rows * K + cols in W^T (N x K)
        helper.make_node("Mul", ["rows", "K"], ["row_offsets"]),
        helper.make_node("Cast", ["col_indices"], ["cols"], to=i64),
        helper.make_node("Add", ["row_offsets", "cols"], ["flat"]),
        helper.make_node("Mul", ["N", "K"], ["size_scalar"]),
        helper.make_node("Unsqueeze", ["size_scalar", "zero"], ["size"]),
        _filled("dense_zero", "size", f32, 0.0),
        helper.make_node("ScatterElements", ["dense_zero", "flat", values], ["dense_flat"], axis=0, reduction="add"),
        helper.make_node("Unsqueeze", ["N", "zero"], ["N1"]),
        helper.make_node("Unsqueeze", ["K", "zero"], ["K1"]),
        helper.make_node("Concat", ["N1", "K1"], ["wt_shape"], axis=0),
        helper.make_node("Reshape", ["dense_flat", "wt_shape"], ["wt"]),
    ]


def _matmul_tail(transposed_weight: str) -> list[onnx.NodeProto]:
    return [
        helper.make_node("Transpose", [transposed_weight], ["w"], perm=[1, 0]),
        helper.make_node("MatMul", ["X", "w"], ["product"]),
        helper.make_node("Add", ["product", "bias"], ["Y"]),
    ]


def _function(name: str, inputs: list[str], nodes: list[onnx.NodeProto], attributes: list[str], onnx_opset: int,
              doc: str) -> onnx.FunctionProto:
    return helper.make_function(
        DOMAIN, name, inputs, ["Y"], nodes, [helper.make_opsetid("", onnx_opset)], attributes=attributes,
        doc_string=doc,
    )


def sparse_matmul_function(onnx_opset: int) -> onnx.FunctionProto:
    """The SparseMatMul(X, values, col_indices, row_ptr, bias) body for a model at `onnx_opset`."""
    _check_opset("SparseMatMul", onnx_opset)
    return _function(
        "SparseMatMul", ["X", "values", "col_indices", "row_ptr", "bias"], _csr_body("values"), ["K", "N"],
        onnx_opset, "Y = X . W + bias, W (K x N) stored as CSR of W^T; see onnxcompress passes/sparse/formats.py",
    )


def sparse_codebook_matmul_function(onnx_opset: int) -> onnx.FunctionProto:
    """SparseCodebookMatMul(X, indices, col_indices, row_ptr, codebook, bias): values = codebook[indices]."""
    _check_opset("SparseCodebookMatMul", onnx_opset)
    nodes = [
        helper.make_node("Cast", ["indices"], ["indices64"], to=onnx.TensorProto.INT64),
        helper.make_node("Gather", ["codebook", "indices64"], ["values"], axis=0),
        *_csr_body("values"),
    ]
    return _function(
        "SparseCodebookMatMul", ["X", "indices", "col_indices", "row_ptr", "codebook", "bias"], nodes, ["K", "N"],
        onnx_opset, "SparseMatMul whose values are codebook[indices] (EIE layout)",
    )


def codebook_matmul_function(onnx_opset: int) -> onnx.FunctionProto:
    """CodebookMatMul(X, indices, codebook, bias) with attributes K, N, bits (4 or 8).

    One body serves both widths: column k of W^T's row is byte k // per (per = 8 / bits) of
    the packed row, shifted by divisor = 1 + (2^bits - 1) · (k mod per) (1 or 16), mod 2^bits.
    """
    _check_opset("CodebookMatMul", onnx_opset)
    i64, f32 = onnx.TensorProto.INT64, onnx.TensorProto.FLOAT
    scalar = helper.make_tensor
    nodes = [
        _ref_constant("K", "K"),
        _ref_constant("bits", "bits"),
        helper.make_node("Constant", [], ["eight"], value_int=8),
        helper.make_node("Constant", [], ["one"], value_int=1),
        helper.make_node("Constant", [], ["zero"], value_int=0),
        helper.make_node("Constant", [], ["two"], value=scalar("two", f32, [], [2.0])),
        helper.make_node("Cast", ["bits"], ["bits_f"], to=f32),
        helper.make_node("Pow", ["two", "bits_f"], ["levels_f"]),
        helper.make_node("Cast", ["levels_f"], ["levels"], to=i64),
        helper.make_node("Div", ["eight", "bits"], ["per"]),
        helper.make_node("Range", ["zero", "K", "one"], ["k"]),
        helper.make_node("Div", ["k", "per"], ["byte"]),
        helper.make_node("Mod", ["k", "per"], ["slot"]),
        helper.make_node("Sub", ["levels", "one"], ["levels_minus_one"]),
        helper.make_node("Mul", ["levels_minus_one", "slot"], ["shift_scale"]),
        helper.make_node("Add", ["one", "shift_scale"], ["divisor"]),
        helper.make_node("Cast", ["indices"], ["packed"], to=i64),
        helper.make_node("Gather", ["packed", "byte"], ["bytes"], axis=1),
        helper.make_node("Div", ["bytes", "divisor"], ["shifted"]),
        helper.make_node("Mod", ["shifted", "levels"], ["codes"]),
        helper.make_node("Gather", ["codebook", "codes"], ["wt"], axis=0),
        *_matmul_tail("wt"),
    ]
    return _function(
        "CodebookMatMul", ["X", "indices", "codebook", "bias"], nodes, ["K", "N", "bits"], onnx_opset,
        "Y = X . codebook[indices] + bias; indices are W^T rows, 4-bit pairs packed low nibble first",
    )


def sparse_conv_function(onnx_opset: int) -> onnx.FunctionProto:
    """SparseConv(X, values, col_indices, row_ptr, bias): the filters rebuilt from CSR, then Conv.

    N = weight_shape[0] filters of K = prod(weight_shape[1:]) columns; the dense N × K matrix is
    reshaped to weight_shape and Conv reads strides, pads, dilations and group from the caller.
    """
    _check_opset("SparseConv", onnx_opset)
    ints, one = onnx.AttributeProto.INTS, onnx.AttributeProto.INT
    conv = helper.make_node("Conv", ["X", "w", "bias"], ["Y"])
    conv.attribute.extend([
        _ref_attribute("strides", "strides", ints),
        _ref_attribute("pads", "pads", ints),
        _ref_attribute("dilations", "dilations", ints),
        _ref_attribute("group", "group", one),
    ])
    nodes = [
        _ref_constant("weight_shape", "weight_shape", "value_ints"),
        _ints("head_start", [0]),
        _ints("head_end", [1]),
        _ints("tail_end", [8]),
        helper.make_node("Slice", ["weight_shape", "head_start", "head_end"], ["filters"]),
        helper.make_node("Slice", ["weight_shape", "head_end", "tail_end"], ["filter_dims"]),
        helper.make_node("ReduceProd", ["filters"], ["N"], keepdims=0),
        helper.make_node("ReduceProd", ["filter_dims"], ["K"], keepdims=0),
        *_csr_dense("values"),
        helper.make_node("Reshape", ["wt", "weight_shape"], ["w"]),
        conv,
    ]
    return _function(
        "SparseConv", ["X", "values", "col_indices", "row_ptr", "bias"], nodes,
        ["weight_shape", "strides", "pads", "dilations", "group"], onnx_opset,
        "Y = Conv(X, W) + bias, W (weight_shape) stored as CSR of W.reshape(M, -1); "
        "see passes/sparse/conv_layout.py",
    )


_BUILDERS: dict[str, Callable[[int], onnx.FunctionProto]] = {
    "SparseMatMul": sparse_matmul_function,
    "SparseCodebookMatMul": sparse_codebook_matmul_function,
    "CodebookMatMul": codebook_matmul_function,
    "SparseConv": sparse_conv_function,
}


def function_for(op_type: str, onnx_opset: int) -> onnx.FunctionProto:
    """The portable body of one of our ops."""
    try:
        return _BUILDERS[op_type](onnx_opset)
    except KeyError:
        raise ValueError(f"no portable function for {DOMAIN}.{op_type}") from None
