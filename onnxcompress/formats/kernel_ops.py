"""The `ai.onnxcompress` kernel ops: ONE table of what each op is (`KERNEL_OPS`).

Everything that writes, runs, reads or registers these ops reads this table: the sparse pass
(`passes/sparse/csr.py`: op name, input order, attributes, initializer prefix, portable body),
`runtime` (the domain; its `available_ops()` must list exactly these names), `summary` and
`sites` (which nodes hold a weight and how to read it back dense), and the C++ library, which
`tests/formats/test_kernel_ops.py` holds to it: the names `OnnxCompressKernelOps()` returns and
registers (CPU and CUDA), each kernel's `Compute` inputs and their element types, its attributes.

Adding an op: write its portable body, numpy reference and dense-weight reader, add one
`KernelOp` to `KERNEL_OPS` (its `onnx.reference` op in `kernel_reference` follows from the
entry), register the C++ kernel under the same name with the same inputs, and list it in
`OnnxCompressKernelOps()`; the test names whatever disagrees. `SparseConv` (pruned Conv, layout
in `conv_layout`) is CPU only (`cuda=False`): the CUDA library registers it on the CPU provider.

Portable fallbacks: each op's `body` is a model-local ONNX function that rebuilds the dense
weight from the op's stored arrays with standard ONNX ops and then does an ordinary MatMul + Add.
Every size the body needs comes from the node's attributes (K, N) or from the stored arrays' own
shapes, never from `Shape(X)`, so after inlining onnxruntime constant-folds the dense weight once
at load: a stock onnxruntime runs the model at dense speed, and with our library registered the
kernel runs instead.

SparseMatMul body (CSR of W^T, see `kernel_arrays`):
    starts = row_ptr[1:-1]                                   first entry of rows 1 .. N-1
    marks  = ScatterElements(zeros[nnz + 1], starts, 1, reduction=add)
    rows   = CumSum(marks)[:nnz]                             row of every entry
    Wt     = ScatterElements(zeros[N·K], rows·K + cols, values, reduction=add).reshape(N, K)
    Y      = X · Wt^T + bias
SparseCodebookMatMul first gathers values = codebook[indices]; CodebookMatMul unpacks the
(4- or 8-bit) indices with integer Div/Mod and gathers the codebook (see its builder).
SparseConv rebuilds its filters the same way (N = weight_shape[0] rows of K = prod(rest)),
reshapes them to `weight_shape` and runs Conv with the caller's strides, pads, dilations and
group (attribute references).
Exact: the same dense weight as the numpy references in `kernel_arrays`, then dense MatMul (Conv).
Needs opset >= 16 (ScatterElements with reduction).
"""

from __future__ import annotations

__all__ = [
    "DOMAIN",
    "OPSET_VERSION",
    "MIN_ONNX_OPSET",
    "KernelInput",
    "KernelOp",
    "KERNEL_OPS",
    "INTS",
    "kernel_op",
    "function_for",
    "kernel_layer_name",
    "kernel_weight",
]

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper

from onnxcompress.formats.conv_layout import dense_from_conv_csr, sparse_conv_op_reference
from onnxcompress.formats.kernel_arrays import (
    codebook_matmul_reference,
    dense_from_csr,
    sparse_codebook_matmul_reference,
    sparse_matmul_reference,
    unpack_codebook_indices,
)

DOMAIN = "ai.onnxcompress"
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
        helper.make_node(
            "ScatterElements", ["marks_zero", "starts", "ones"], ["marks"], axis=0, reduction="add"
        ),
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
        helper.make_node(
            "ScatterElements",
            ["dense_zero", "flat", values],
            ["dense_flat"],
            axis=0,
            reduction="add",
        ),
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


def _sparse_codebook_body() -> list[onnx.NodeProto]:
    """SparseCodebookMatMul: values = codebook[indices], then the CSR body."""
    return [
        helper.make_node("Cast", ["indices"], ["indices64"], to=onnx.TensorProto.INT64),
        helper.make_node("Gather", ["codebook", "indices64"], ["values"], axis=0),
        *_csr_body("values"),
    ]


def _codebook_body() -> list[onnx.NodeProto]:
    """CodebookMatMul: W^T = codebook[unpacked indices], then Y = X · W + bias.

    One body serves both widths: column k of W^T's row is byte k // per (per = 8 / bits) of
    the packed row, shifted by divisor = 1 + (2^bits - 1) · (k mod per) (1 or 16), mod 2^bits.
    """
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
    return nodes


def _sparse_conv_body() -> list[onnx.NodeProto]:
    """SparseConv: the filters rebuilt from CSR, reshaped to `weight_shape`, then Conv + bias."""
    ints, one = onnx.AttributeProto.INTS, onnx.AttributeProto.INT
    conv = helper.make_node("Conv", ["X", "w", "bias"], ["Y"])
    conv.attribute.extend([
        _ref_attribute("strides", "strides", ints),
        _ref_attribute("pads", "pads", ints),
        _ref_attribute("dilations", "dilations", ints),
        _ref_attribute("group", "group", one),
    ])
    return [
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


# ---- reading the dense weight back (inspect) ------------------------------------------------


WeightRead = tuple[np.ndarray, int | None, int | None]


def _csr_weight(arrays: Sequence[np.ndarray], attributes: dict[str, Any]) -> WeightRead:
    values, columns, row_ptr = arrays[:3]
    return dense_from_csr(values, columns, row_ptr, attributes["K"], attributes["N"]), None, None


def _sparse_codebook_weight(
    arrays: Sequence[np.ndarray], attributes: dict[str, Any]
) -> tuple[np.ndarray, int | None, int | None]:
    indices, columns, row_ptr, codebook = arrays[:4]
    weight = dense_from_csr(codebook[indices], columns, row_ptr, attributes["K"], attributes["N"])
    return weight, 8, int(codebook.size)


def _codebook_weight(arrays: Sequence[np.ndarray], attributes: dict[str, Any]) -> WeightRead:
    packed, codebook = arrays[:2]
    bits = attributes["bits"]
    return (
        codebook[unpack_codebook_indices(packed, attributes["K"], bits)],
        bits,
        int(codebook.size),
    )


def _conv_weight(
    arrays: Sequence[np.ndarray], attributes: dict[str, Any]
) -> tuple[np.ndarray, int | None, int | None]:
    values, columns, row_ptr = arrays[:3]
    shape = tuple(attributes["weight_shape"])
    return dense_from_conv_csr(values, columns, row_ptr, shape), None, None


# ---- the table --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class KernelInput:
    """One input of a kernel op: its name in the portable body and the element types it takes."""

    name: str
    dtypes: tuple[str, ...]  # numpy names: "float32", "int32", "uint16", "uint8"
    optional: bool = False


WeightReader = Callable[[Sequence[np.ndarray], dict[str, Any]], WeightRead]
#: An int attribute's default (None: required), or INTS for a required list of ints.
INTS = "ints"


@dataclasses.dataclass(frozen=True)
class KernelOp:
    """What one `ai.onnxcompress` op is: enough to write it, run it portably and read it back.

    `inputs` are in node order: X first, an optional bias last, the stored arrays between them
    (the weight's layout). `attributes` maps each int attribute to its default (None: required;
    `INTS`: a required list of ints). `prefix` names the initializers the sparse pass writes
    (`<weight>.<prefix>_<input>`). `body` builds the portable function's nodes; `reference` is
    the numpy definition of the result; `read_weight(stored arrays, attributes)` returns (the
    weight: K × N, or a Conv's shape; bits; codebook size). `cuda`: the CUDA build has a kernel.
    """

    name: str
    inputs: tuple[KernelInput, ...]
    attributes: dict[str, int | str | None]
    prefix: str
    body: Callable[[], list[onnx.NodeProto]]
    reference: Callable[..., np.ndarray]
    read_weight: WeightReader
    doc: str
    cuda: bool = True

    @property
    def input_names(self) -> list[str]:
        """The op's input names in order, as the C++ registration and the portable body use them."""
        return [i.name for i in self.inputs]

    @property
    def stored_inputs(self) -> list[str]:
        """The weight's arrays: every input but X and the bias."""
        return [i.name for i in self.inputs[1:] if i.name != "bias"]

    def attribute_values(self, node: ir.Node) -> dict[str, Any]:
        """The node's attributes (ints, or tuples for `INTS`), defaults filled in."""
        found: dict[str, Any] = {}
        for name, default in self.attributes.items():
            attribute = node.attributes.get(name)
            if default == INTS:
                found[name] = tuple(attribute.as_ints()) if attribute is not None else ()
            else:
                found[name] = attribute.as_int() if attribute is not None else int(default or 0)
        return found

    def function(self, onnx_opset: int) -> onnx.FunctionProto:
        """The portable body as a model-local function for a model at `onnx_opset`."""
        if onnx_opset < MIN_ONNX_OPSET:
            raise ValueError(
                f"the portable {self.name} needs opset >= {MIN_ONNX_OPSET}, model has {onnx_opset}"
            )
        return helper.make_function(
            DOMAIN,
            self.name,
            self.input_names,
            ["Y"],
            self.body(),
            [helper.make_opsetid("", onnx_opset)],
            attributes=list(self.attributes),
            doc_string=self.doc,
        )


_FLOAT = ("float32",)
_COLUMNS = ("int32", "uint16")
_X = KernelInput("X", _FLOAT)
_BIAS = KernelInput("bias", _FLOAT, optional=True)

#: Every op of the domain, by name. Extend it here (see the module docstring).
KERNEL_OPS: dict[str, KernelOp] = {
    op.name: op
    for op in (
        KernelOp(
            name="SparseMatMul",
            inputs=(
                _X,
                KernelInput("values", _FLOAT),
                KernelInput("col_indices", _COLUMNS),
                KernelInput("row_ptr", ("int32",)),
                _BIAS,
            ),
            attributes={"K": None, "N": None},
            prefix="csr",
            body=lambda: _csr_body("values"),
            reference=sparse_matmul_reference,
            read_weight=_csr_weight,
            doc="Y = X . W + bias, W (K x N) stored as CSR of W^T; see "
            "onnxcompress/formats/kernel_arrays.py",
        ),
        KernelOp(
            name="SparseCodebookMatMul",
            inputs=(
                _X,
                KernelInput("indices", ("uint8",)),
                KernelInput("col_indices", _COLUMNS),
                KernelInput("row_ptr", ("int32",)),
                KernelInput("codebook", _FLOAT),
                _BIAS,
            ),
            attributes={"K": None, "N": None},
            prefix="csr_codebook",
            body=_sparse_codebook_body,
            reference=sparse_codebook_matmul_reference,
            read_weight=_sparse_codebook_weight,
            doc="SparseMatMul whose values are codebook[indices] (EIE layout)",
        ),
        KernelOp(
            name="CodebookMatMul",
            inputs=(_X, KernelInput("indices", ("uint8",)), KernelInput("codebook", _FLOAT), _BIAS),
            attributes={"K": None, "N": None, "bits": 8},
            prefix="codebook_packed",
            body=_codebook_body,
            reference=codebook_matmul_reference,
            read_weight=_codebook_weight,
            doc="Y = X . codebook[indices] + bias; indices are W^T rows, 4-bit pairs packed low "
            "nibble first",
        ),
        KernelOp(
            name="SparseConv",
            inputs=(
                _X,
                KernelInput("values", _FLOAT),
                KernelInput("col_indices", _COLUMNS),
                KernelInput("row_ptr", ("int32",)),
                _BIAS,
            ),
            attributes={
                "weight_shape": INTS,
                "strides": INTS,
                "pads": INTS,
                "dilations": INTS,
                "group": 1,
            },
            prefix="csr_conv",
            body=_sparse_conv_body,
            reference=sparse_conv_op_reference,
            read_weight=_conv_weight,
            doc="Y = Conv(X, W) + bias, W (weight_shape) stored as CSR of W.reshape(M, -1); "
            "see onnxcompress/formats/conv_layout.py",
            cuda=False,
        ),
    )
}


def kernel_op(node: ir.Node) -> KernelOp | None:
    """The table entry of a node of our domain, or None for any other node."""
    return KERNEL_OPS.get(node.op_type) if node.domain == DOMAIN else None


def function_for(op_type: str, onnx_opset: int) -> onnx.FunctionProto:
    """The portable body of one of our ops."""
    op = KERNEL_OPS.get(op_type)
    if op is None:
        raise ValueError(f"no portable function for {DOMAIN}.{op_type}")
    return op.function(onnx_opset)


def kernel_layer_name(node: ir.Node) -> str:
    """The weight's name from the kernel's first stored array (`<weight>.<prefix>_<input>`)."""
    names = [
        v.name for v in node.inputs[1:] if v is not None and v.const_value is not None and v.name
    ]
    return names[0].rsplit(".", 1)[0] if names else node.name or node.op_type


def kernel_weight(node: ir.Node) -> tuple[np.ndarray, int | None, int | None, int] | None:
    """(K × N weight, bits, codebook size, stored bytes) held by a kernel node, or None.

    None when the node is not one of ours or its stored arrays are not constants.
    """
    op = kernel_op(node)
    if op is None:
        return None
    stored = [
        v
        for v in node.inputs[1 : 1 + len(op.stored_inputs)]
        if v is not None and v.const_value is not None
    ]
    if len(stored) != len(op.stored_inputs):
        return None
    arrays = [np.asarray(v.const_value.numpy()) for v in stored]  # type: ignore[union-attr]
    weight, bits, codebook_size = op.read_weight(arrays, op.attribute_values(node))
    return weight, bits, codebook_size, int(sum(a.nbytes for a in arrays))
