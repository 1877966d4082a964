"""One-node models calling the ai.onnxcompress ops, for the kernel and fallback tests."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxcompress.formats.conv_layout import ConvGeometry
from onnxcompress.formats.kernel_arrays import CsrWeight
from onnxcompress.formats.kernel_ops import DOMAIN, function_for

OPSET = 21
_TYPES = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.uint16): TensorProto.UINT16,
          np.dtype(np.int32): TensorProto.INT32, np.dtype(np.uint8): TensorProto.UINT8}


def sparse_matmul_model(
    csr: CsrWeight,
    x_shape: list[int | str],
    bias: np.ndarray | None = None,
    *,
    fed: bool = False,
    portable: bool = False,
) -> onnx.ModelProto:
    """Y = SparseMatMul(X, values, col_indices, row_ptr[, bias]).

    `fed`: the CSR arrays (and bias) are graph inputs instead of initializers, so malformed
    arrays reach the kernel at run time. `portable`: add the model-local function.
    """
    arrays = {"values": csr.values, "col_indices": csr.col_indices, "row_ptr": csr.row_ptr}
    if bias is not None:
        arrays["bias"] = bias
    node = helper.make_node(
        "SparseMatMul", ["X", *arrays], ["Y"], domain=DOMAIN, K=csr.in_features, N=csr.out_features
    )
    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, x_shape)]
    initializers = []
    for name, array in arrays.items():
        if fed:
            inputs.append(helper.make_tensor_value_info(name, _TYPES[array.dtype], [None]))
        else:
            initializers.append(numpy_helper.from_array(array, name))
    output = helper.make_tensor_value_info(
        "Y", TensorProto.FLOAT, [*x_shape[:-1], csr.out_features]
    )
    graph = helper.make_graph([node], "sparse_matmul", inputs, [output], initializer=initializers)
    functions = [function_for("SparseMatMul", OPSET)] if portable else []
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(DOMAIN, 1)],
        functions=functions,
    )
    model.ir_version = 10
    return model


def pruned(rng: np.random.Generator, shape: tuple[int, int], sparsity: float) -> np.ndarray:
    """A random float32 weight with a `sparsity` share of exact zeros (at random positions)."""
    weight = rng.standard_normal(shape).astype(np.float32)
    weight[rng.random(shape) < sparsity] = 0.0
    return weight


def _model(
    node: onnx.NodeProto,
    arrays: dict[str, np.ndarray],
    x_shape: list[int | str],
    n: int,
    fed: bool,
    functions: list[onnx.FunctionProto],
) -> onnx.ModelProto:
    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, x_shape)]
    initializers = []
    for name, array in arrays.items():
        if fed:
            inputs.append(
                helper.make_tensor_value_info(name, _TYPES[array.dtype], [None] * array.ndim)
            )
        else:
            initializers.append(numpy_helper.from_array(array, name))
    output = helper.make_tensor_value_info("Y", TensorProto.FLOAT, [*x_shape[:-1], n])
    graph = helper.make_graph([node], node.op_type, inputs, [output], initializer=initializers)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(DOMAIN, 1)],
        functions=functions,
    )
    model.ir_version = 10
    return model


def codebook_matmul_model(
    packed: np.ndarray, codebook: np.ndarray, k: int, n: int, bits: int, x_shape: list[int | str],
    bias: np.ndarray | None = None, *, fed: bool = False, portable: bool = False,
) -> onnx.ModelProto:
    """Y = CodebookMatMul(X, indices, codebook[, bias]; K, N, bits)."""
    arrays = {"indices": packed, "codebook": codebook}
    if bias is not None:
        arrays["bias"] = bias
    node = helper.make_node(
        "CodebookMatMul", ["X", *arrays], ["Y"], domain=DOMAIN, K=k, N=n, bits=bits
    )
    functions = [function_for("CodebookMatMul", OPSET)] if portable else []
    return _model(node, arrays, x_shape, n, fed, functions)


def sparse_codebook_model(
    indices: np.ndarray, csr: CsrWeight, codebook: np.ndarray, x_shape: list[int | str],
    bias: np.ndarray | None = None, *, fed: bool = False, portable: bool = False,
) -> onnx.ModelProto:
    """Y = SparseCodebookMatMul(X, indices, col_indices, row_ptr, codebook[, bias]; K, N)."""
    arrays = {
        "indices": indices,
        "col_indices": csr.col_indices,
        "row_ptr": csr.row_ptr,
        "codebook": codebook,
    }
    if bias is not None:
        arrays["bias"] = bias
    node = helper.make_node("SparseCodebookMatMul", ["X", *arrays], ["Y"], domain=DOMAIN,
                            K=csr.in_features, N=csr.out_features)
    functions = [function_for("SparseCodebookMatMul", OPSET)] if portable else []
    return _model(node, arrays, x_shape, csr.out_features, fed, functions)


def shared(rng: np.random.Generator, shape: tuple[int, int], entries: int, sparsity: float = 0.0
           ) -> tuple[np.ndarray, np.ndarray]:
    """(K × N indices, codebook): a weight-shared layer; index 0 is an exact 0 when sparsity > 0."""
    codebook = rng.standard_normal(entries).astype(np.float32)
    indices = rng.integers(0, entries, size=shape).astype(np.uint8)
    if sparsity > 0:
        codebook[0] = 0.0
        indices[rng.random(shape) < sparsity] = 0
    return indices, codebook


def sparse_conv_model(
    csr: CsrWeight,
    geometry: ConvGeometry,
    x_shape: list[int | str] | None,
    bias: np.ndarray | None = None,
    *,
    fed: bool = False,
    portable: bool = False,
) -> onnx.ModelProto:
    """Y = SparseConv(X, values, col_indices, row_ptr[, bias]) with `geometry`'s attributes.

    `fed`: the CSR arrays (and bias) are graph inputs; `portable`: add the model-local function.
    """
    arrays = {"values": csr.values, "col_indices": csr.col_indices, "row_ptr": csr.row_ptr}
    if bias is not None:
        arrays["bias"] = bias
    attributes = geometry.attributes()
    node = helper.make_node("SparseConv", ["X", *arrays], ["Y"], domain=DOMAIN, **attributes)
    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, x_shape)]
    initializers = []
    for name, array in arrays.items():
        if fed:
            inputs.append(helper.make_tensor_value_info(name, _TYPES[array.dtype], [None]))
        else:
            initializers.append(numpy_helper.from_array(array, name))
    output = helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)
    graph = helper.make_graph([node], "sparse_conv", inputs, [output], initializer=initializers)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(DOMAIN, 1)],
        functions=[function_for("SparseConv", OPSET)] if portable else [],
    )
    model.ir_version = 10
    return model


def dense_conv_model(weight: np.ndarray, geometry: ConvGeometry, x_shape: list[int | str],
                     bias: np.ndarray | None = None) -> onnx.ModelProto:
    """The same layer as onnxruntime's own Conv."""
    attributes = geometry.attributes()
    del attributes["weight_shape"]
    inputs = ["X", "W"] + (["B"] if bias is not None else [])
    initializers = [numpy_helper.from_array(weight, "W")]
    if bias is not None:
        initializers.append(numpy_helper.from_array(bias, "B"))
    kernel = list(weight.shape[2:])
    node = helper.make_node("Conv", inputs, ["Y"], kernel_shape=kernel, **attributes)
    graph = helper.make_graph(
        [node], "dense_conv", [helper.make_tensor_value_info("X", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 10
    return model
