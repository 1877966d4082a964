"""optimize times the model on the gates' own probes, `batch` samples along each sample axis."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from onnxcompress.cli import app
from onnxcompress.cli.core import _samples_at
from onnxcompress.data import batch_axes, sample_axis
from tests.builders import finish, save_proto


def test_a_recurrent_state_takes_the_batch_on_its_own_axis():
    state = np.arange(2 * 5 * 4, dtype=np.float32).reshape(2, 5, 4)
    batch = _samples_at(state, 1, 3)
    assert batch.shape == (2, 3, 4)
    np.testing.assert_array_equal(batch, state[:, :3])


def test_fewer_probes_than_the_batch_are_repeated():
    chunk = np.arange(2 * 6, dtype=np.float32).reshape(2, 6)
    np.testing.assert_array_equal(_samples_at(chunk, 0, 3), chunk[[0, 1, 0]])


def test_a_scalar_input_keeps_its_real_value():
    rate = np.array(16000, dtype=np.int64)
    assert _samples_at(rate, None, 8) == 16000


def ocr_line(rng: np.random.Generator) -> ir.Model:
    """A conv over a text line as ddddocr takes it: [1, 1, 8, width], a batch of one."""
    weight = numpy_helper.from_array(
        rng.standard_normal((16, 1, 3, 3)).astype(np.float32), "conv.weight"
    )
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["line", "conv.weight"], ["features"], pads=[1, 1, 1, 1]),
            helper.make_node("ReduceMean", ["features"], ["columns"], axes=[2], keepdims=0),
        ],
        "ocr",
        [helper.make_tensor_value_info("line", TensorProto.FLOAT, [1, 1, 8, "width"])],
        [helper.make_tensor_value_info("columns", TensorProto.FLOAT, [1, 16, "width"])],
        [weight],
    )
    return ir.from_proto(finish(graph, opset=13))


def test_a_leading_one_is_a_batch_of_one_and_its_free_axis_a_size(rng):
    model = ocr_line(rng)
    assert batch_axes(model) == set()
    assert sample_axis(model, model.graph.inputs[0]) == 0


def test_optimize_times_a_batch_of_one_model_on_one_probe(rng, tmp_path):
    source = save_proto(ir.to_proto(ocr_line(rng)), tmp_path / "ocr.onnx")
    np.savez(tmp_path / "calib.npz", line=rng.standard_normal((6, 1, 8, 32)).astype(np.float32))
    result = CliRunner().invoke(
        app, ["optimize", str(source), "-o", str(tmp_path / "out.onnx"),
              "--data", str(tmp_path / "calib.npz")]
    )
    assert result.exit_code == 0, result.output
    assert "latency at batch 1" in result.output
