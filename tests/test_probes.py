"""Probes at shapes the original model runs on: detectors, streaming models, --input-shape."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from onnxcompress import probes
from onnxcompress.cli import app
from onnxcompress.data import validate_data
from onnxcompress.errors import DataError
from onnxcompress.pipeline import Step, reference_probes, run_steps
from tests.builders import finish, save_proto


def detector(rng: np.random.Generator) -> ir.Model:
    """Four stride-2 convs, the last level upsampled and concatenated with the one before.

    As a feature pyramid does: it runs only where H and W survive four halvings evenly.
    """
    nodes, inits, previous = [], [], "images"
    for level, channels_in in enumerate((3, 8, 8, 8)):
        weight = numpy_helper.from_array(
            rng.standard_normal((8, channels_in, 3, 3)).astype(np.float32) / 4,
            f"conv{level}.weight",
        )
        inits.append(weight)
        nodes.append(
            helper.make_node(
                "Conv", [previous, weight.name], [f"p{level}"], pads=[1, 1, 1, 1], strides=[2, 2]
            )
        )
        previous = f"p{level}"
    inits.append(numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"))
    nodes += [
        helper.make_node("Resize", ["p3", "", "scales"], ["up"], mode="nearest"),
        helper.make_node("Concat", ["p2", "up"], ["features"], axis=1),
        helper.make_node("Flatten", ["features"], ["boxes"], axis=1),
    ]
    graph = helper.make_graph(
        nodes, "detector",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["n", 3, "h", "w"])],
        [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, ["n", None])], inits)
    return ir.from_proto(finish(graph))


def streaming(rng: np.random.Generator) -> ir.Model:
    """Inputs as silero-vad takes them: a padded chunk, a state, a scalar sample rate.

    The chunk is reflect-padded by 32 (so it must be longer than 32), and the recurrent state
    carries the batch on its second axis.
    """
    weight = numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), "state.weight")
    pads = numpy_helper.from_array(np.array([0, 32, 0, 32], np.int64), "pads")
    nodes = [
        helper.make_node("Pad", ["chunk", "pads"], ["padded"], mode="reflect"),
        helper.make_node("ReduceMean", ["padded"], ["level"], axes=[1], keepdims=1),
        helper.make_node("MatMul", ["state", "state.weight"], ["mixed"]),
        helper.make_node("Cast", ["sr"], ["rate"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["mixed", "rate"], ["scaled"]),
        helper.make_node("Add", ["scaled", "level"], ["new_state"]),
    ]
    graph = helper.make_graph(
        nodes,
        "vad",
        [
            helper.make_tensor_value_info("chunk", TensorProto.FLOAT, [None, None]),
            helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, None, 4]),
            helper.make_tensor_value_info("sr", TensorProto.INT64, []),
        ],
        [helper.make_tensor_value_info("new_state", TensorProto.FLOAT, [2, None, 4])],
        [weight, pads],
    )
    return ir.from_proto(finish(graph, opset=17))


def test_a_detector_is_probed_at_an_image_size_it_runs_on(rng):
    model = detector(rng)
    drawn = reference_probes(model, count=4)
    assert drawn["images"].shape == (4, 3, 224, 224)
    result = run_steps(model, [Step(pass_name="codebook.kmeans", options={"bits": 8})])
    assert result.steps[0].status == "applied"


def test_ultralytics_imgsz_metadata_sets_the_probe_size(rng):
    model = detector(rng)
    model.metadata_props["imgsz"] = "[320, 320]"
    assert reference_probes(model, count=2)["images"].shape == (2, 3, 320, 320)


def test_a_streaming_model_gets_a_chunk_longer_than_its_padding(rng):
    model = streaming(rng)
    drawn = reference_probes(model, count=8)
    assert drawn["chunk"].shape == (8, 64)  # 8, 16 and 32 are too short for a reflect pad of 32
    assert drawn["state"].shape == (2, 8, 4)  # the batch rides on the state's second axis
    assert drawn["sr"].shape == ()


def test_input_shape_fixes_the_probe_size(rng):
    model = detector(rng)
    sizes = probes.shapes_as_sizes(probes.parse_input_shapes(["images=1x3x96x128"], model))
    assert reference_probes(model, count=2, input_sizes=sizes)["images"].shape == (2, 3, 96, 128)


@pytest.mark.parametrize(("text", "message"), [
    ("images", "is not NAME=DxDx"),
    ("images=1x3xAx8", "is not NAME=DxDx"),
    ("images=0x3x8x8", "positive sizes"),
    ("pixels=1x3x8x8", "'pixels' is not an input"),
    ("images=1x3x8", "has rank 4"),
    ("images=1x1x64x64", "does not fit"),
])
def test_input_shape_errors_name_the_problem(rng, text, message):
    with pytest.raises(DataError, match=message):
        probes.parse_input_shapes([text], detector(rng))


def test_a_bad_input_shape_is_one_error_line_on_the_command_line(rng, tmp_path):
    path = save_proto(ir.to_proto(detector(rng)), tmp_path / "detector.onnx")
    result = CliRunner().invoke(
        app, ["cluster", str(path), "--bits", "8", "--input-shape", "images=1x3"]
    )
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --input-shape:")
    assert not (tmp_path / "detector.compressed.onnx").exists()


def test_a_model_that_runs_at_no_candidate_size_says_how_to_fix_it(rng):
    model = streaming(rng)
    model.graph.node(0).inputs[1].const_value = ir.tensor(np.array([0, 5000, 0, 5000], np.int64))
    with pytest.raises(Exception, match="--input-shape"):
        reference_probes(model, count=2)


def test_mask_and_type_id_inputs_get_their_valid_values():
    graph = helper.make_graph(
        [helper.make_node("Add", ["attention_mask", "token_type_ids"], ["y"])],
        "ids",
        [
            helper.make_tensor_value_info(n, TensorProto.INT64, ["n", "t"])
            for n in ("attention_mask", "token_type_ids")
        ],
        [helper.make_tensor_value_info("y", TensorProto.INT64, ["n", "t"])],
    )
    drawn = probes.probe_inputs(ir.from_proto(finish(graph)), count=3)
    assert np.all(drawn["attention_mask"] == 1) and np.all(drawn["token_type_ids"] == 0)


def test_data_may_carry_samples_on_a_state_axis_and_hold_a_scalar(rng):
    model = streaming(rng)
    data = {
        "chunk": rng.standard_normal((5, 96)).astype(np.float32),
        "state": rng.standard_normal((2, 5, 4)).astype(np.float32),
        "sr": np.array(16000, np.int64),
    }
    validated = validate_data(model, data)
    drawn = probes.probe_inputs(model, count=3, data=validated)
    assert (
        drawn["chunk"].shape == (3, 96)
        and drawn["state"].shape == (2, 3, 4)
        and drawn["sr"].shape == ()
    )
    with pytest.raises(DataError, match="disagree on the sample count"):
        validate_data(model, {**data, "state": data["state"][:, :4]})


def batchnorm_cnn(rng: np.random.Generator) -> ir.Model:
    """Conv -> BatchNorm (statistics far from what noise gives) -> Relu -> global pool."""
    inits = [
        numpy_helper.from_array(
            rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "conv.weight"
        ),
        numpy_helper.from_array(np.ones(4, np.float32), "bn.scale"),
        numpy_helper.from_array(np.zeros(4, np.float32), "bn.bias"),
        numpy_helper.from_array(np.array([2.0, -1.0, 0.5, 3.0], np.float32), "bn.mean"),
        numpy_helper.from_array(np.array([0.25, 4.0, 1.0, 0.5], np.float32), "bn.var"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "conv.weight"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node(
            "BatchNormalization", ["c", "bn.scale", "bn.bias", "bn.mean", "bn.var"], ["b"]
        ),
        helper.make_node("Relu", ["b"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "bn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4, 1, 1])],
        inits,
    )
    return ir.from_proto(finish(graph))


def test_probes_of_a_batchnorm_model_match_its_statistics(rng):
    pytest.importorskip("torch")
    from onnxcompress.finetune.synthetic import batchnorm_statistics

    model = batchnorm_cnn(rng)
    (_, mean, var), = batchnorm_statistics(model)
    weight = model.graph.initializers["conv.weight"].const_value.numpy()

    def conv_statistics(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import torch

        c = torch.nn.functional.conv2d(
            torch.from_numpy(x), torch.from_numpy(weight.copy()), padding=1
        ).numpy()
        return c.mean(axis=(0, 2, 3)), c.std(axis=(0, 2, 3))

    noise = probes.probe_inputs(model, count=16)
    matched = reference_probes(model, count=16)
    assert matched["x"].shape == noise["x"].shape
    noise_error = np.abs(
        np.concatenate(conv_statistics(noise["x"])) - np.concatenate([mean, np.sqrt(var)])
    ).mean()
    matched_error = np.abs(
        np.concatenate(conv_statistics(matched["x"])) - np.concatenate([mean, np.sqrt(var)])
    ).mean()
    assert matched_error < noise_error / 3
