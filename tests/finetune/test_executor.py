"""The ONNX→torch executor against onnxruntime: exported models and single-op graphs."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcompress.errors import UnsupportedModelError
from onnxcompress.finetune.executor import OnnxModule
from tests.finetune.conftest import ort_run, torch

RTOL = 1e-5


def assert_close(got: np.ndarray, want: np.ndarray, rtol: float = RTOL) -> None:
    """Relative to the largest magnitude of the reference (elementwise near-zeros allowed)."""
    assert got.shape == want.shape and got.dtype == want.dtype
    scale = max(float(np.max(np.abs(want))), 1e-30) if want.size else 1.0
    np.testing.assert_allclose(got, want, rtol=0, atol=rtol * scale)


@pytest.mark.parametrize(
    "pair, shape", [("mlp_pair", (5, 64)), ("cnn_pair", (3, 1, 8, 8)), ("encoder_pair", (2, 5, 16))]
)
def test_exported_models_match_onnxruntime(request, rng, pair, shape) -> None:
    torch_module, proto = request.getfixturevalue(pair)
    x = rng.standard_normal(shape).astype(np.float32)
    name = proto.graph.input[0].name
    want = ort_run(proto, {name: x})
    module = OnnxModule(proto)
    got = module.run({name: x})
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert_close(g, w)
    with torch.no_grad():
        native = torch_module.eval()(torch.from_numpy(x)).numpy()
    assert_close(got[0], native, rtol=1e-4)  # the exporter itself rewrites (BN folding)


@pytest.mark.parametrize("opset", [17, 21])
@pytest.mark.parametrize(
    "pair, shape", [("mlp_pair", (4, 64)), ("cnn_pair", (4, 1, 8, 8)), ("encoder_pair", (4, 5, 16))]
)
def test_torchscript_exporter_models_match_onnxruntime(request, rng, pair, shape, opset) -> None:
    """The other exporter (dynamo=False) writes other ops (Mod, Shape arithmetic, Constants)."""
    import io
    import warnings

    torch_module, _ = request.getfixturevalue(pair)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            torch_module.eval(),
            (torch.zeros(shape),),
            buffer,
            dynamo=False,
            opset_version=opset,
            input_names=["x"],
            dynamic_axes={"x": {0: "batch"}},
        )
    proto = onnx.load_from_string(buffer.getvalue())
    proto.ir_version = 10
    x = rng.standard_normal((3, *shape[1:])).astype(np.float32)
    assert_close(OnnxModule(proto).run({"x": x})[0], ort_run(proto, {"x": x})[0])


def test_cnn_keeps_batchnorm_node_and_statistics_frozen(cnn_pair) -> None:
    _, proto = cnn_pair
    assert "BatchNormalization" in [n.op_type for n in proto.graph.node]
    module = OnnxModule(proto)
    bn = next(n for n in proto.graph.node if n.op_type == "BatchNormalization")
    trainable = set(module.trainable_names())
    assert bn.input[1] in trainable and bn.input[2] in trainable
    assert bn.input[3] not in trainable and bn.input[4] not in trainable


def test_parameters_keyed_by_exact_onnx_names(mlp_pair) -> None:
    torch_module, proto = mlp_pair
    module = OnnxModule(proto)
    params = module.onnx_parameters()
    assert set(params) == {
        i.name for i in proto.graph.initializer if i.data_type == TensorProto.FLOAT
    }
    for name, tensor in torch_module.state_dict().items():
        np.testing.assert_array_equal(params[name].detach().numpy(), tensor.numpy())


def test_gradients_match_native_torch(mlp_pair, rng) -> None:
    torch_module, proto = mlp_pair
    module = OnnxModule(proto)
    x = torch.from_numpy(rng.standard_normal((7, 64)).astype(np.float32))
    module(x).square().mean().backward()
    torch_module.zero_grad()
    torch_module(x).square().mean().backward()
    for name, param in torch_module.named_parameters():
        np.testing.assert_allclose(
            module.parameter(name).grad.numpy(), param.grad.numpy(), rtol=1e-5, atol=1e-7
        )


def test_unsupported_op_names_op_and_node() -> None:
    graph = helper.make_graph(
        [helper.make_node("Det", ["x"], ["y"], name="determinant_7")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    with pytest.raises(UnsupportedModelError, match=r"op Det \(node 'determinant_7'\)"):
        OnnxModule(model)


def test_custom_domain_op_is_unsupported() -> None:
    graph = helper.make_graph(
        [helper.make_node("SparseMatMul", ["x"], ["y"], name="sp", domain="ai.onnxcompress")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 3])],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("ai.onnxcompress", 1)],
    )
    with pytest.raises(UnsupportedModelError, match=r"ai.onnxcompress::SparseMatMul \(node 'sp'\)"):
        OnnxModule(model)


# --- one node at a time, against onnxruntime ----------------------------------------------------

def _init(name: str, array: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def _case(op, inputs, attrs=None, inits=(), opset=18, outputs=1):
    """(model, feeds): one `op` node; `inputs` maps names to arrays (fed) or None (absent)."""
    feeds = {k: v for k, v in inputs.items() if v is not None}
    names = list(inputs) + [i.name for i in inits]
    node = helper.make_node(
        op,
        [n if (n in feeds or n in {i.name for i in inits}) else "" for n in names],
        [f"y{i}" for i in range(outputs)],
        name=f"{op.lower()}_node",
        **(attrs or {}),
    )
    graph = helper.make_graph(
        [node],
        "g",
        [
            helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
            for k, v in feeds.items()
        ],
        [onnx.ValueInfoProto(name=f"y{i}") for i in range(outputs)],
        initializer=list(inits),
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    return model, feeds


def _cases(rng):
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    i64 = lambda *v: np.array(v, dtype=np.int64)  # noqa: E731
    x4 = f(2, 3, 7, 6)
    return {
        "Add": _case("Add", {"a": f(2, 3), "b": f(3)}),
        "Sub": _case("Sub", {"a": f(2, 3), "b": f(2, 1)}),
        "Div": _case("Div", {"a": f(2, 3), "b": f(2, 3) + 3.0}),
        "Pow": _case("Pow", {"a": np.abs(f(4)) + 0.5, "b": np.float32([1.5])}),
        "Mod_int": _case("Mod", {"a": i64(7, -7, 5, -5), "b": i64(3, 3, -2, -2)}),
        "Mod_fmod": _case("Mod", {"a": f(6) * 4, "b": np.float32([1.5])}, {"fmod": 1}),
        "Sqrt": _case("Sqrt", {"x": np.abs(f(5))}),
        "Erf": _case("Erf", {"x": f(5)}),
        "Gelu": _case("Gelu", {"x": f(5)}, opset=20),
        "Gelu_tanh": _case("Gelu", {"x": f(5)}, {"approximate": "tanh"}, opset=20),
        "Tanh": _case("Tanh", {"x": f(5)}),
        "Sigmoid": _case("Sigmoid", {"x": f(5)}),
        "LeakyRelu": _case("LeakyRelu", {"x": f(5)}, {"alpha": 0.2}),
        "Clip": _case(
            "Clip", {"x": f(9), "lo": np.array(-0.3, np.float32), "hi": np.array(0.4, np.float32)}
        ),
        "Clip_max_only": _case("Clip", {"x": f(9), "lo": None, "hi": np.array(0.4, np.float32)}),
        "Clip_no_bounds": _case("Clip", {"x": f(9)}),
        "Softmax": _case("Softmax", {"x": f(2, 3, 4)}, {"axis": 1}),
        "Softmax_opset11": _case("Softmax", {"x": f(2, 3, 4)}, {"axis": 1}, opset=11),
        "LogSoftmax": _case("LogSoftmax", {"x": f(2, 5)}),
        "LayerNormalization": _case(
            "LayerNormalization", {"x": f(2, 3, 4), "s": f(3, 4), "b": f(3, 4)}, {"axis": -2}
        ),
        "BatchNormalization": _case(
            "BatchNormalization",
            {"x": f(2, 3, 4)},
            inits=[
                _init("s", f(3)),
                _init("b", f(3)),
                _init("m", f(3)),
                _init("v", np.abs(f(3)) + 0.5),
            ],
        ),
        "ReduceMean_input": _case(
            "ReduceMean", {"x": f(2, 3, 4)}, {"keepdims": 0}, inits=[_init("axes", i64(-1, 0))]
        ),
        "ReduceMean_attr17": _case("ReduceMean", {"x": f(2, 3, 4)}, {"axes": [1]}, opset=17),
        "ReduceSum_all": _case("ReduceSum", {"x": f(2, 3, 4)}),
        "Reshape_allowzero": _case(
            "Reshape", {"x": f(2, 0, 4)}, {"allowzero": 1}, inits=[_init("s", i64(0, 8))]
        ),
        "Reshape_copy": _case("Reshape", {"x": f(2, 3, 4)}, inits=[_init("s", i64(0, -1))]),
        "Transpose": _case("Transpose", {"x": f(2, 3, 4)}, {"perm": [2, 0, 1]}),
        "Gather_negative": _case(
            "Gather", {"x": f(5, 3)}, {"axis": 0}, inits=[_init("i", i64(-1, 2, 0))]
        ),
        "Gather_scalar": _case(
            "Gather", {"x": f(5, 3)}, {"axis": 1}, inits=[_init("i", np.int64(1))]
        ),
        "Slice": _case(
            "Slice",
            {"x": f(6, 8)},
            inits=[
                _init("st", i64(1, -2)),
                _init("en", i64(100, 0)),
                _init("ax", i64(0, 1)),
                _init("sp", i64(2, -3)),
            ],
        ),
        "Concat": _case("Concat", {"a": f(2, 3), "b": f(2, 2)}, {"axis": -1}),
        "Split": _case(
            "Split", {"x": f(7, 2)}, {"axis": 0}, inits=[_init("sp", i64(3, 4))], outputs=2
        ),
        "Split_num_outputs": _case(
            "Split", {"x": f(7, 2)}, {"axis": 0, "num_outputs": 3}, outputs=3
        ),
        "Squeeze": _case("Squeeze", {"x": f(1, 3, 1)}, inits=[_init("a", i64(-1))]),
        "Unsqueeze": _case("Unsqueeze", {"x": f(3, 2)}, inits=[_init("a", i64(0, -1))]),
        "Shape": _case("Shape", {"x": f(2, 3, 4)}, {"start": 1}),
        "Cast": _case("Cast", {"x": f(5) * 3}, {"to": TensorProto.INT64}),
        "Where": _case("Where", {"c": f(4) > 0, "a": f(4), "b": f(1)}),
        "Equal": _case("Equal", {"a": i64(1, 2, 3), "b": i64(1, 0, 3)}),
        "Expand": _case("Expand", {"x": f(3, 1)}, inits=[_init("s", i64(2, 1, 4))]),
        "ConstantOfShape": _case(
            "ConstantOfShape",
            {},
            {"value": numpy_helper.from_array(np.float32([1.5]))},
            inits=[_init("s", i64(2, 3))],
        ),
        "ConstantOfShape_scalar": _case(
            "ConstantOfShape",
            {},
            {"value": numpy_helper.from_array(np.float32([1.5]))},
            inits=[_init("s", np.array([], np.int64))],
        ),
        "Flatten": _case("Flatten", {"x": f(2, 3, 4)}, {"axis": 2}),
        "Dropout": _case("Dropout", {"x": f(2, 3)}),
        "Identity": _case("Identity", {"x": f(2, 3)}),
        "MatMul_batched": _case("MatMul", {"a": f(2, 3, 4), "b": f(4, 5)}),
        "Gemm": _case(
            "Gemm",
            {"a": f(3, 4), "b": f(5, 4), "c": f(1, 5)},
            {"transA": 0, "transB": 1, "alpha": 0.5, "beta": 2.0},
        ),
        "Gemm_transA": _case("Gemm", {"a": f(4, 3), "b": f(4, 5)}, {"transA": 1}),
        "Conv_asymmetric": _case(
            "Conv",
            {"x": x4},
            {"pads": [1, 0, 2, 1], "strides": [2, 1], "dilations": [1, 2]},
            inits=[_init("w", f(4, 3, 3, 2)), _init("b", f(4))],
        ),
        "Conv_same_group": _case(
            "Conv",
            {"x": x4},
            {"auto_pad": "SAME_UPPER", "group": 3, "strides": [2, 2]},
            inits=[_init("w", f(6, 1, 3, 3))],
        ),
        "Conv1d": _case(
            "Conv", {"x": f(2, 3, 9)}, {"pads": [1, 1]}, inits=[_init("w", f(4, 3, 3))]
        ),
        "ConvTranspose": _case(
            "ConvTranspose",
            {"x": x4},
            {"strides": [2, 2], "pads": [1, 0, 0, 1], "output_padding": [1, 0]},
            inits=[_init("w", f(3, 2, 3, 3)), _init("b", f(2))],
        ),
        "MaxPool": _case(
            "MaxPool", {"x": x4}, {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}
        ),
        "MaxPool_ceil": _case(
            "MaxPool", {"x": x4}, {"kernel_shape": [2, 2], "strides": [2, 2], "ceil_mode": 1}
        ),
        "AveragePool": _case(
            "AveragePool", {"x": x4}, {"kernel_shape": [3, 2], "pads": [1, 0, 1, 0]}
        ),
        "AveragePool_asymmetric": _case(
            "AveragePool",
            {"x": x4},
            {"kernel_shape": [2, 2], "pads": [0, 0, 1, 1], "count_include_pad": 1},
        ),
        "GlobalAveragePool": _case("GlobalAveragePool", {"x": x4}),
    }


CASES = list(_cases(np.random.default_rng(0)))


@pytest.mark.parametrize("case", CASES)
def test_single_op_matches_onnxruntime(case) -> None:
    model, feeds = _cases(np.random.default_rng(0))[case]
    want = ort_run(model, feeds)
    got = OnnxModule(model).run(feeds)
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert_close(g, w)


def test_constant_node_weights_are_parameters(rng) -> None:
    w = rng.standard_normal((4, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(w)),
         helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    module = OnnxModule(model)
    assert module.trainable_names() == ["w"]
    np.testing.assert_array_equal(module.parameter("w").detach().numpy(), w)
    x = rng.standard_normal((2, 4)).astype(np.float32)
    assert_close(module.run({"x": x})[0], ort_run(model, {"x": x})[0])


def test_shape_errors_name_the_node(encoder_pair, rng) -> None:
    from onnxcompress.errors import DataError

    _, proto = encoder_pair  # exported with a fixed batch of 2
    module = OnnxModule(proto)
    with pytest.raises(
        DataError, match=r"Reshape node .* failed on inputs of shapes .*fixed batch size"
    ):
        module.run({proto.graph.input[0].name: rng.standard_normal((3, 5, 16)).astype(np.float32)})


def test_value_floats_constants_are_literals_not_parameters(rng) -> None:
    """Constant(value_floats) is not trained: write-back only knows tensors."""
    from onnxcompress.finetune.executor import default_trainable

    graph = helper.make_graph(
        [
            helper.make_node("Constant", [], ["bias"], value_floats=[0.1, 0.2, 0.3, 0.4]),
            helper.make_node("MatMul", ["x", "W"], ["mm"]),
            helper.make_node("Add", ["mm", "bias"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 4])],
        [numpy_helper.from_array(rng.standard_normal((3, 4)).astype(np.float32), "W")],
    )
    model = ir.serde.deserialize_model(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    )
    assert default_trainable(model) == {"W"}
