"""Fine-tuning on Ray Train (TorchTrainer, DDP over gloo, CPU workers): with 2 workers the
compressed structure holds exactly as with 1, and the written model has the local format."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from onnxcompress import io
from onnxcompress.fidelity import Gate
from onnxcompress.finetune.distributed import Replica
from onnxcompress.finetune.executor import OnnxModule, to_ir
from onnxcompress.finetune.train import evaluate
from onnxcompress.pipeline import Step, run_steps
from tests.run_cli import run_cli

NO_GATE = Gate.off()


def test_a_replica_takes_every_nth_row_and_skips_a_batch_too_small_to_share() -> None:
    batch = {"x": np.arange(10).reshape(5, 2), "labels": np.arange(5)}
    first, second = Replica(0, 2).shard(batch), Replica(1, 2).shard(batch)
    assert first is not None and second is not None
    np.testing.assert_array_equal(first["labels"], [0, 2, 4])
    np.testing.assert_array_equal(second["x"], [[2, 3], [6, 7]])
    assert Replica(2, 3).shard({"x": np.zeros((2, 4))}) is None


@pytest.fixture(scope="module")
def compressed(mlp_pair, digits):
    """Pruned (masks), one layer low-rank (two factors), one clustered (codebook + indices)."""
    _, proto = mlp_pair
    x, y = digits
    name = proto.graph.input[0].name
    model = run_steps(
        to_ir(proto),
        [
            Step(
                pass_name="lowrank.svd",
                options={"ratio": 0.5, "min_params": 0, "exclude": ("*layers.1*", "*layers.2*")},
                gate=NO_GATE,
            ),
            Step(pass_name="prune.magnitude", options={"sparsity": 0.7}, gate=NO_GATE),
            Step(
                pass_name="codebook.kmeans",
                options={"bits": 4, "exclude": ("*layers.0*", "*layers.2*")},
                gate=NO_GATE,
            ),
        ],
    ).model
    return model, {name: x[:512], "labels": y[:512]}, {name: x[1200:], "labels": y[1200:]}


def finetune_file(model_path: Path, data_path: Path, out: Path, *placement: object) -> ir.Model:
    outcome = run_cli(
        [
            "finetune",
            model_path,
            "--data",
            data_path,
            "-o",
            out,
            "--epochs",
            "3",
            "--lr",
            "0.01",
            "--optimizer",
            "adam",
            "--lr-schedule",
            "constant",
            "--batch-size",
            "32",
            *placement,
        ]
    )
    assert outcome.code == 0, outcome.stderr
    return io.load(out)


def tensors(model: ir.Model) -> dict[str, np.ndarray]:
    return {name: value.const_value.numpy() for name, value in model.graph.initializers.items()}


def assert_structure_kept(before: ir.Model, after: ir.Model) -> None:
    old, new = tensors(before), tensors(after)
    assert set(new) == set(old)
    assert [n.op_type for n in after.graph] == [n.op_type for n in before.graph]
    for name, array in old.items():
        assert new[name].dtype == array.dtype and new[name].shape == array.shape, name
        if name.endswith("codebook_indices") or array.dtype.kind != "f":
            np.testing.assert_array_equal(new[name], array)  # indices are never trained
        else:
            np.testing.assert_array_equal(new[name] == 0, array == 0)  # zeros stay, none added


def test_two_ddp_workers_keep_masks_codebooks_and_factors_as_one_does(
    ray_cluster, compressed, tmp_path
):
    model, train, test = compressed
    names = set(model.graph.initializers)
    assert {"layers.0.weight.lowrank_first", "layers.0.weight.lowrank_second"} <= names
    assert "layers.1.weight.codebook_indices" in names
    model_path, data_path = tmp_path / "compressed.onnx", tmp_path / "train.npz"
    io.save(model, model_path)
    np.savez(data_path, **train)
    local = finetune_file(model_path, data_path, tmp_path / "local.onnx")
    distributed = finetune_file(
        model_path,
        data_path,
        tmp_path / "ddp.onnx",
        "--executor",
        "ray",
        "--workers",
        "2",
        "--checkpoint-dir",
        tmp_path / "shared",
    )
    assert_structure_kept(model, local)
    assert_structure_kept(
        model, distributed
    )  # the local format: same tensors, dtypes, shapes, nodes
    assert evaluate(OnnxModule(distributed), test) > evaluate(OnnxModule(model), test) + 0.1
    for name, array in tensors(local).items():  # the same batches, gradients averaged by all-reduce
        np.testing.assert_allclose(tensors(distributed)[name], array, rtol=0, atol=1e-4)
    assert list(
        (tmp_path / "shared").glob("onnxcompress-finetune/checkpoint_*/arrays.npz")
    )  # rank 0's


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--workers", "2"], "--workers above 1 trains on Ray: add --executor ray"),
        (["--executor", "spark"], "--executor must be local or ray, not 'spark'"),
    ],
)
def test_bad_placement_is_one_error_line(compressed, tmp_path, options, message):
    model, train, _ = compressed
    io.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "train.npz", **train)
    outcome = run_cli(["finetune", tmp_path / "m.onnx", "--data", tmp_path / "train.npz", *options])
    assert outcome.code == 2 and outcome.error_lines == [f"error: {message}"]
