"""The kernel-op table (`formats.kernel_ops.KERNEL_OPS`) against everything that implements it.

The C++ library is read from its sources (kernels/src for the CPU, kernels/cuda for the CUDA
build): the op names `OnnxCompressKernelOps()` returns, the names each kernel registers, each
kernel's `Compute` inputs with their element types (per registered column-index type), and the
attributes it reads. The built library, the sparse pass's output, the portable bodies and
`inspect` are checked against the same table.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnxcompress import runtime
from onnxcompress.formats.codebook import insert_codebook
from onnxcompress.formats.kernel_ops import DOMAIN, INTS, KERNEL_OPS, MIN_ONNX_OPSET, function_for
from onnxcompress.formats.kernel_reference import REFERENCE_OPS
from onnxcompress.pass_base import get_pass
from onnxcompress.summary import layer_table
from tests.builders import mlp

KERNELS = Path(__file__).resolve().parents[2] / "kernels"
_CPP_TYPES = {"float": "float32", "int32_t": "int32", "uint16_t": "uint16", "uint8_t": "uint8"}


def _body(text: str, start: int) -> str:
    """The brace-balanced block that opens at the first `{` after `start`."""
    open_at = text.index("{", start)
    depth = 0
    for at in range(open_at, len(text)):
        depth += {"{": 1, "}": -1}.get(text[at], 0)
        if depth == 0:
            return text[open_at : at + 1]
    raise AssertionError("unbalanced braces")


def _struct(text: str, name: str) -> tuple[str, str | None]:
    """(body of `struct name`, the name of its base struct or None)."""
    match = re.search(rf"struct {name}\b\s*(?::\s*(\w+))?[^;{{]*{{", text)
    assert match is not None, f"struct {name} not found"
    return _body(text, match.start()), match.group(1)


def _params(body: str) -> list[str]:
    """The parameters of the struct's `Compute(...)`, context and output excluded."""
    match = re.search(r"Compute\(OrtKernelContext\* context,(.*?)\)\s*{", body, re.S)
    assert match is not None, "no Compute(OrtKernelContext* context, ...)"
    params, depth, current = [], 0, ""
    for char in match.group(1):
        depth += {"<": 1, ">": -1}.get(char, 0)
        if char == "," and depth == 0:
            params.append(current.strip())
            current = ""
        else:
            current += char
    params.append(current.strip())
    assert re.fullmatch(r"Ort::Custom::Tensor<float>& \w+", params[-1]), params[-1]  # the output Y
    return params[:-1]


def _input(param: str, index_type: str | None) -> tuple[str, bool]:
    """(numpy element type, optional) of one `Compute` parameter."""
    element = re.search(r"Tensor<(\w+)>", param)
    assert element is not None, param
    cpp = index_type if element.group(1) == "Index" else element.group(1)
    assert cpp is not None, f"{param}: Index outside a template"
    return _CPP_TYPES[cpp], param.startswith("std::optional<")


def _attribute_helpers() -> dict[str, str]:
    """name -> body of each attribute-reading helper the kernels share (validate.h)."""
    text = (KERNELS / "src" / "validate.h").read_text()
    return {
        m.group(1): _body(text, m.start()) for m in re.finditer(r"inline std::string (\w+)\(", text)
    }


def _attributes(text: str, body: str, base: str | None) -> dict[str, int | str | None]:
    """Attribute name -> default (None: required, INTS: required ints) read by a kernel.

    The kernel's base struct and the shared helpers it calls are included.
    """
    if base is not None:
        body += _struct(text, base)[0]
    helpers = _attribute_helpers()
    found: dict[str, int | str | None] = {}
    for name, helper in helpers.items():
        if re.search(rf"\b{name}\(", body):
            body += helper
    # helpers calling helpers (ReadCodebookAttributes -> ReadSizes)
    for name, helper in helpers.items():
        if re.search(rf"\b{name}\(", body) and helper not in body:
            body += helper
    for name in re.findall(r"ReadIntAttribute\(info, (?:kOp|op), \"(\w+)\"", body):
        found[name] = None
    for name, default in re.findall(r"ReadIntAttributeOr\(info, \"(\w+)\", (\d+)\)", body):
        found[name] = int(default)
    for name in re.findall(r"ReadIntsAttribute\(info, kOp, \"(\w+)\"", body):
        found[name] = INTS
    return found


def _registrations(folder: Path) -> list[tuple[str, str, str | None, str]]:
    """(op name, kernel struct, its Index type or None, source text) of every registered kernel."""
    found = []
    for path in sorted(folder.glob("*.cc")):
        text = path.read_text()
        for struct, index, op in re.findall(
            r"CreateLiteCustomOp<(\w+)(?:<(\w+)>)?>\(\s*\"(\w+)\"", text
        ):
            found.append((op, struct, index or None, text))
    return found


def _ops_of(folder: str) -> set[str]:
    """The table's ops a folder must register: all for the CPU, those marked `cuda` for CUDA."""
    return {name for name, op in KERNEL_OPS.items() if folder == "src" or op.cuda}


@pytest.mark.parametrize("folder", ["src", "cuda"])
def test_each_build_registers_exactly_the_table(folder: str):
    assert {op for op, *_ in _registrations(KERNELS / folder)} == _ops_of(folder)


@pytest.mark.parametrize("folder", ["src", "cuda"])
def test_each_kernel_takes_the_inputs_and_attributes_of_its_table_entry(folder: str):
    signatures: dict[str, list[list[tuple[str, bool]]]] = {}
    for op, struct, index, text in _registrations(KERNELS / folder):
        body, base = _struct(text, struct)
        signatures.setdefault(op, []).append([_input(p, index) for p in _params(body)])
        assert _attributes(text, body, base) == KERNEL_OPS[op].attributes, (
            f"{folder}: {struct} attributes"
        )
    for op, variants in signatures.items():
        table = KERNEL_OPS[op].inputs
        assert {len(v) for v in variants} == {len(table)}, f"{folder}: {op} input count"
        for position, expected in enumerate(table):
            dtypes = {v[position][0] for v in variants}
            assert dtypes == set(expected.dtypes), f"{folder}: {op} input {expected.name}: {dtypes}"
            assert {v[position][1] for v in variants} == {expected.optional}, (
                f"{op} {expected.name} optional"
            )


def test_the_op_list_the_library_reports_is_the_table():
    source = (KERNELS / "src" / "library.cc").read_text()
    body = _body(source, source.index("OnnxCompressKernelOps()"))
    cuda, cpu = re.findall(r'return "([^"]*)"', body)
    assert cpu.split(",") == list(KERNEL_OPS)
    on_gpu = [f"cuda:{op}" for op in KERNEL_OPS if KERNEL_OPS[op].cuda]
    assert cuda.split(",") == [*KERNEL_OPS, *on_gpu]
    if runtime.available_ops():  # built: the loaded library says the same
        assert runtime.available_ops() == list(KERNEL_OPS)


def test_every_op_has_its_reference_evaluator_op():
    assert [(cls.__name__, cls.op_domain) for cls in REFERENCE_OPS] == [
        (op, DOMAIN) for op in KERNEL_OPS
    ]


@pytest.mark.parametrize("op", list(KERNEL_OPS))
def test_the_portable_body_takes_the_table_inputs_and_checks(op: str):
    function = function_for(op, MIN_ONNX_OPSET)
    assert (function.domain, function.name) == (DOMAIN, op)
    assert list(function.input) == KERNEL_OPS[op].input_names
    assert set(function.attribute) == set(KERNEL_OPS[op].attributes)
    onnx.checker.check_function(function)
    with pytest.raises(ValueError, match=f"needs opset >= {MIN_ONNX_OPSET}"):
        function_for(op, MIN_ONNX_OPSET - 1)


def _every_kind_of_layer() -> ir.Model:
    """An MLP whose fc0 is pruned (-> SparseMatMul).

    Fc1 shared by a 16-entry codebook (-> CodebookMatMul) and head pruned and shared (->
    SparseCodebookMatMul), beside a pruned Conv on a second input (-> SparseConv).
    """
    rng = np.random.default_rng(0)
    model = mlp(rng, sizes=(64, 96, 48, 32))
    weights = model.graph.initializers
    fc0 = weights["fc0.weight"].const_value.numpy()
    weights["fc0.weight"].const_value = ir.tensor(
        np.where(rng.random(fc0.shape) < 0.85, 0, fc0), name="fc0.weight"
    )
    codebook = np.linspace(-0.5, 0.5, 16, dtype=np.float32)
    for name, keep in (("fc1.weight", 1.0), ("head.weight", 0.15)):
        shape = weights[name].const_value.shape
        indices = rng.integers(1, 16, size=tuple(shape)) * (rng.random(tuple(shape)) < keep)
        insert_codebook(
            model.graph,
            weights[name],
            indices,
            np.concatenate([[0], codebook[1:]]).astype(np.float32),
            bits=4,
            zero_entry=True,
            packed=False,
        )
    image = ir.Value(name="image", shape=ir.Shape([1, 4, 8, 8]),
                     type=ir.TensorType(ir.DataType.FLOAT))
    filters = rng.standard_normal((6, 4, 3, 3)).astype(np.float32)
    filters[rng.random(filters.shape) < 0.8] = 0.0
    conv_weight = ir.Value(name="conv.weight", const_value=ir.tensor(filters, name="conv.weight"))
    model.graph.register_initializer(conv_weight)
    conv = ir.node("Conv", [image, conv_weight], attributes={"pads": [1, 1, 1, 1]}, name="conv")
    conv.outputs[0].name = "features"
    conv.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    conv.outputs[0].shape = ir.Shape([1, 6, 8, 8])
    model.graph.append(conv)
    model.graph.inputs.append(image)
    model.graph.outputs.append(conv.outputs[0])
    return model


def test_the_sparse_pass_writes_nodes_the_table_describes_and_inspect_reads_them():
    model = _every_kind_of_layer()
    dense = {row.name: row for row in layer_table(model)}
    assert get_pass("sparse.csr")(decide="always", min_params=0, min_sparsity=0.5)(model).modified
    nodes = {node.op_type: node for node in model.graph if node.domain == DOMAIN}
    assert set(nodes) == set(KERNEL_OPS)
    for node in nodes.values():
        op = KERNEL_OPS[node.op_type]
        assert len(node.inputs) == len(op.inputs)
        for value, expected in zip(node.inputs[1:], op.inputs[1:], strict=True):
            assert value is not None and value.const_value is not None and value.name is not None
            assert value.const_value.numpy().dtype.name in expected.dtypes, (op.name, expected.name)
            assert value.name.endswith(f".{op.prefix}_{expected.name}")
        assert set(node.attributes) <= set(op.attributes)
        assert {n for n, d in op.attributes.items() if d in (None, INTS)} <= set(node.attributes)
    rows = {row.name: row for row in layer_table(model) if row.holder == "kernel"}
    assert {row.op for row in rows.values()} == set(KERNEL_OPS)
    for name, row in rows.items():
        # K x N
        assert (sorted(row.shape), row.nonzero) == (
            sorted(dense[name].shape),
            dense[name].nonzero,
        ), name
    features = {"x": np.zeros((1, 64), np.float32), "image": np.ones((1, 4, 8, 8), np.float32)}
    assert runtime.session(model).run(["features"], features)[0].shape == (1, 6, 8, 8)


def test_the_cuda_kernels_check_their_inputs_with_the_cpu_rules():
    """One validation header (validate.h) for both builds.

    The CUDA bindings word no input error of their own, so a malformed input gets the same message
    on either provider.
    """
    cuda = (KERNELS / "cuda" / "cuda_ops.cc").read_text()
    assert '#include "../src/validate.h"' in cuda
    assert "Error(Message(" not in cuda
    for name in ("CheckX", "CheckCsrShapes", "CheckCodebook", "CheckPackedIndices", "ReadSizes",
                 "ReadCodebookAttributes", "RowPtrStartError", "ColumnError", "CodebookIndexError"):
        assert re.search(rf"\b{name}\(", cuda), name
