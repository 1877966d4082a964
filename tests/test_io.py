"""Model I/O: round trips, refusals with one clear line, the IR-version rule, atomic saves."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcompress import io
from onnxcompress.errors import ModelLoadError, UnsafeExternalDataError, UserError
from tests.builders import finish, mlp_proto, save_proto


def weights_of(model: ir.Model) -> dict[str, np.ndarray]:
    return {
        name: value.const_value.numpy().copy() for name, value in model.graph.initializers.items()
    }


def test_round_trip_inline_is_bit_exact(rng, tmp_path):
    source = save_proto(mlp_proto(rng), tmp_path / "m.onnx")
    model = io.load(source)
    before = weights_of(model)
    io.save(model, tmp_path / "copy.onnx")
    after = weights_of(io.load(tmp_path / "copy.onnx"))
    assert before.keys() == after.keys()
    for name in before:
        assert before[name].tobytes() == after[name].tobytes()


def test_initializers_carry_no_value_info_that_repeats_their_tensor(rng, tmp_path):
    """Their dtype and dims are in the tensor; a reload gives the values the same types."""
    model = io.load(save_proto(mlp_proto(rng), tmp_path / "m.onnx"))
    proto = ir.to_proto(model)
    assert {info.name for info in proto.graph.value_info} >= set(model.graph.initializers)
    io.save(model, tmp_path / "copy.onnx")
    written = onnx.load(tmp_path / "copy.onnx")
    assert not {info.name for info in written.graph.value_info} & set(model.graph.initializers)
    assert written.ByteSize() < proto.ByteSize()
    reloaded = io.load(tmp_path / "copy.onnx")
    for name, value in model.graph.initializers.items():
        again = reloaded.graph.initializers[name]
        assert (again.type, again.shape) == (value.type, value.shape)


def test_round_trip_external_data_is_lazy_and_bit_exact(rng, tmp_path):
    source = save_proto(mlp_proto(rng, (64, 128, 10)), tmp_path / "m.onnx")
    model = io.load(source)
    before = weights_of(model)
    out = io.save(model, tmp_path / "ext.onnx", external_data=True)
    assert (tmp_path / "ext.onnx.data").is_file()
    reloaded = io.load(out)
    assert isinstance(reloaded.graph.initializers["fc0.weight"].const_value, ir.ExternalTensor)
    # Saving the externally held model inline embeds the weights into one standalone file.
    io.save(reloaded, tmp_path / "inline.onnx")
    (tmp_path / "ext.onnx.data").unlink()
    inline = weights_of(io.load(tmp_path / "inline.onnx"))
    for name in before:
        assert before[name].tobytes() == inline[name].tobytes()


def test_same_model_saves_to_the_same_bytes(rng, tmp_path):
    source = save_proto(mlp_proto(rng), tmp_path / "m.onnx")
    io.save(io.load(source), tmp_path / "a.onnx")
    io.save(io.load(source), tmp_path / "b.onnx")
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no such file"),
        (b"", "the file is empty"),
        (b"\x08\x07\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01garbage", "not an ONNX model"),
        (b"hello, I am a text file\n", "not an ONNX model"),
        (onnx.ModelProto(ir_version=10).SerializeToString(), "no graph outputs"),
    ],
    ids=["missing", "empty", "corrupt", "text", "no-graph"],
)
def test_bad_files_are_refused_with_one_line(tmp_path, content, message):
    path = tmp_path / "bad.onnx"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ModelLoadError, match=message) as caught:
        io.load(path)
    assert "\n" not in str(caught.value)


def _external_model(location: str) -> onnx.ModelProto:
    weight = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    weight.ClearField("raw_data")
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "64")):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_external_data_escaping_the_folder_is_refused(tmp_path, kind):
    outside = tmp_path / "secret.bin"
    outside.write_bytes(np.ones(16, np.float32).tobytes())
    folder = tmp_path / "model"
    folder.mkdir()
    location = {"dotdot": "../secret.bin", "absolute": str(outside), "symlink": "link.bin"}[kind]
    if kind == "symlink":
        os.symlink(outside, folder / "link.bin")
    onnx.save(_external_model(location), str(folder / "m.onnx"))
    with pytest.raises(UnsafeExternalDataError, match="model's folder"):
        io.load(folder / "m.onnx")


def test_external_data_inside_the_folder_loads(tmp_path):
    (tmp_path / "w.bin").write_bytes(np.arange(16, dtype=np.float32).tobytes())
    onnx.save(_external_model("w.bin"), str(tmp_path / "m.onnx"))
    model = io.load(tmp_path / "m.onnx")
    assert model.graph.initializers["w"].const_value.numpy()[3, 3] == 15


def test_truncated_external_data_is_refused(tmp_path):
    (tmp_path / "w.bin").write_bytes(b"\0" * 10)
    onnx.save(_external_model("w.bin"), str(tmp_path / "m.onnx"))
    with pytest.raises(ModelLoadError, match="truncated"):
        io.load(tmp_path / "m.onnx")


@pytest.mark.parametrize(("opset", "expected"), [(8, 4), (13, 7), (17, 8), (18, 8), (21, 10)])
def test_ir_version_is_the_lowest_the_opset_allows(rng, tmp_path, opset, expected):
    proto = mlp_proto(rng)
    proto.opset_import[0].version = opset
    proto.ir_version = 14  # what onnx 1.23 stamps by default
    model = ir.from_proto(proto)
    assert io.minimum_ir_version(model) == expected
    io.save(model, tmp_path / "m.onnx")
    assert onnx.load(str(tmp_path / "m.onnx")).ir_version == expected


def test_model_local_functions_need_ir_8(rng):
    proto = mlp_proto(rng)
    proto.opset_import[0].version = 13
    proto.functions.append(
        helper.make_function(
            "local",
            "Twice",
            ["a"],
            ["b"],
            [helper.make_node("Add", ["a", "a"], ["b"])],
            [helper.make_opsetid("", 13)],
        )
    )
    assert io.minimum_ir_version(ir.from_proto(proto)) == 8


def test_layer_models_follow_the_same_rule():
    """The one rule also dates the layer models the passes time (sparse.csr, lowrank --speed)."""
    assert io.ir_version_for(17) == 8 and io.ir_version_for(21) == 10
    assert io.ir_version_for(13, functions=True) == 8
    assert io.ir_version_for(13, dtypes=[ir.DataType.UINT4]) == 10
    assert io.ir_version_for(13, dtypes=[ir.DataType.FLOAT8E4M3FN]) == 9


def test_save_refuses_the_input_and_mapped_data(rng, tmp_path):
    source = save_proto(mlp_proto(rng, (64, 128, 10)), tmp_path / "m.onnx")
    with pytest.raises(UserError, match="overwrite the input"):
        io.save(io.load(source), source)
    io.save(io.load(source), tmp_path / "ext.onnx", external_data=True)
    # b.onnx reads ext.onnx.data; saving it as ext.onnx would rewrite the data it maps.
    (tmp_path / "b.onnx").write_bytes((tmp_path / "ext.onnx").read_bytes())
    mapped = io.load(tmp_path / "b.onnx")
    data_before = (tmp_path / "ext.onnx.data").read_bytes()
    with pytest.raises(UserError, match="still reads"):
        io.save(mapped, tmp_path / "ext.onnx", external_data=True)
    # Embedded, the same name is safe: nothing is written to ext.onnx.data.
    io.save(mapped, tmp_path / "ext.onnx", external_data=False)
    assert (tmp_path / "ext.onnx.data").read_bytes() == data_before
    np.testing.assert_array_equal(
        onnx.numpy_helper.to_array(onnx.load(str(tmp_path / "ext.onnx")).graph.initializer[0]),
        mapped.graph.initializers[
            onnx.load(str(tmp_path / "ext.onnx")).graph.initializer[0].name
        ].const_value.numpy(),
    )


def test_failed_save_leaves_no_partial_file(rng, tmp_path, monkeypatch):
    model = io.load(save_proto(mlp_proto(rng), tmp_path / "m.onnx"))

    def explode(model, path, **kwargs):
        Path(path).write_bytes(b"half a model")
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(ir, "save", explode)  # the external-data path
    monkeypatch.setattr(onnx, "save", explode)  # the embedded one
    with pytest.raises(UserError, match="out.onnx: No space left on device"):
        io.save(model, tmp_path / "out.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_weights_in_constant_and_subgraph_survive_round_trip(tmp_path):
    proto = finish(
        helper.make_graph(
            [
                helper.make_node(
                    "Constant",
                    [],
                    ["w"],
                    value=numpy_helper.from_array(np.eye(4, dtype=np.float32)),
                )
            ]
            + [helper.make_node("MatMul", ["x", "w"], ["y"])],
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        )
    )
    io.save(ir.from_proto(proto), tmp_path / "c.onnx")
    assert onnx.load(str(tmp_path / "c.onnx")).graph.node[0].op_type == "Constant"


def test_external_data_of_a_constant_node_is_carried_into_the_output(tmp_path):
    """onnx_ir re-homes initializers only: a Constant's external tensor must not name the input."""
    weight = np.arange(16, dtype=np.float32).reshape(4, 4)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "w.bin").write_bytes(weight.tobytes())
    tensor = numpy_helper.from_array(weight, "w")
    onnx.external_data_helper.set_external_data(tensor, "w.bin", offset=0, length=weight.nbytes)
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    graph = helper.make_graph(
        [
            helper.make_node("Constant", [], ["w"], value=tensor),
            helper.make_node("MatMul", ["x", "w"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    onnx.save(proto, str(tmp_path / "in" / "m.onnx"))
    (tmp_path / "out").mkdir()
    io.save(io.load(tmp_path / "in" / "m.onnx"), tmp_path / "out" / "m.onnx")
    (tmp_path / "in" / "w.bin").unlink()  # the output stands alone
    saved = onnx.load(str(tmp_path / "out" / "m.onnx"))
    np.testing.assert_array_equal(numpy_helper.to_array(saved.graph.node[0].attribute[0].t), weight)
