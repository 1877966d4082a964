"""`finetune` without options: the rate from a range test, early stopping on held-out data."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from onnxcompress.cli import app
from onnxcompress.errors import RecipeError
from onnxcompress.finetune.config import FinetuneConfig, help_of
from onnxcompress.finetune.executor import OnnxModule, to_ir
from onnxcompress.finetune.train import _prepare, _split, evaluate, find_lr, finetune
from onnxcompress.pass_base import get_pass


def test_finetune_without_options_recovers_a_90_percent_pruned_mlp(digits_mlp, tmp_path) -> None:
    proto, train, test = digits_mlp
    model, data, pruned, tuned = (
        tmp_path / n for n in ("m.onnx", "train.npz", "p.onnx", "pf.onnx")
    )
    onnx.save(proto, model)
    np.savez(data, **train)
    runner = CliRunner()
    result = runner.invoke(
        app,
        [
            "prune",
            str(model),
            "-o",
            str(pruned),
            "--sparsity",
            "0.9",
            "--min-cosine",
            "-1",
            "--min-rank-corr",
            "-1",
            "--min-top1",
            "0",
        ],
    )
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["finetune", str(pruned), "--data", str(data), "-o", str(tuned),
                                 "--report", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output

    dense, after_pruning = (
        evaluate(OnnxModule(proto), test),
        evaluate(OnnxModule(onnx.load(pruned)), test),
    )
    recovered = evaluate(OnnxModule(onnx.load(tuned)), test)
    # pruning hurt: there is something to recover
    assert dense > 0.95 and after_pruning < dense - 0.1
    assert recovered >= dense - 0.01, (dense, after_pruning, recovered)
    for initializer in onnx.load(tuned).graph.initializer:
        if initializer.name.endswith("weight"):
            array = onnx.numpy_helper.to_array(initializer)
            assert np.count_nonzero(array) <= 0.1 * array.size + 1  # the zeros stayed

    notes = json.loads((tmp_path / "r.json").read_text())["steps"][0]["notes"]
    assert 1e-5 < notes["lr"] < 1.0 and 1 <= notes["best_epoch"] <= notes["epochs_run"]
    assert all("held_out_accuracy" in row for row in notes["history"])
    assert (tmp_path / "r.curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_range_test_returns_a_rate_and_leaves_the_weights_as_they_were(digits_mlp) -> None:
    proto, train, _ = digits_mlp
    run = _prepare(to_ir(proto), train, None, FinetuneConfig(seed=0), None, None)
    before = {n: v.copy() for n, v in run.module.arrays(run.names).items()}
    lines: list[str] = []
    run.progress = lines.append
    rate = find_lr(run)
    assert 1e-6 <= rate <= 0.1
    for name, array in run.module.arrays(run.names).items():
        np.testing.assert_array_equal(array, before[name])
    assert any("learning rate" in line for line in lines)


def test_held_out_split_is_seeded_and_disjoint() -> None:
    data = {"x": np.arange(200, dtype=np.float32)[:, None], "labels": np.arange(200) % 10}
    train, held = _split(data, FinetuneConfig(seed=4))
    again, _ = _split(data, FinetuneConfig(seed=4))
    assert held is not None and len(held["x"]) == 20 and len(train["x"]) == 180
    assert not set(held["x"][:, 0]) & set(train["x"][:, 0])
    np.testing.assert_array_equal(train["x"], again["x"])
    untouched, none = _split(data, FinetuneConfig(epochs=3))  # explicit epochs: every sample trains
    assert none is None and untouched is data


def test_weight_decay_is_read_as_l2() -> None:
    assert get_pass("finetune")(weight_decay=1e-4).config.l2 == 1e-4
    with pytest.raises(RecipeError, match="not both"):
        get_pass("finetune")(weight_decay=1e-4, l2=1e-4)


def test_cli_help_is_the_configs_description() -> None:
    result = CliRunner().invoke(app, ["finetune", "--help"], env={"COLUMNS": "400"})
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    for field in ("lr", "epochs", "group_lasso", "prior"):
        assert " ".join(help_of(field).split())[:40] in text


def _pruned(proto: onnx.ModelProto, sparsity: float) -> onnx.ModelProto:
    """`proto` with each weight matrix's smallest |w| set to zero (a hard round to recover from)."""
    pruned = onnx.ModelProto()
    pruned.CopyFrom(proto)
    for initializer in pruned.graph.initializer:
        array = onnx.numpy_helper.to_array(initializer).copy()
        if array.ndim == 2:
            array[np.abs(array) < np.quantile(np.abs(array), sparsity)] = 0.0
            initializer.CopyFrom(onnx.numpy_helper.from_array(array, initializer.name))
    return pruned


def test_a_cycle_that_still_improved_is_followed_by_one_at_half_the_rate(digits_mlp) -> None:
    proto, train, _ = digits_mlp
    model = to_ir(_pruned(proto, 0.95))
    options = {"seed": 0, "lr": 0.002, "max_steps": 1, "patience": 3}  # cycles of 3 epochs
    one = finetune(model, train, options=FinetuneConfig(max_cycles=1, **options))
    more = finetune(model, train, options=FinetuneConfig(max_cycles=2, **options))

    assert len(one.history) == 3
    assert more.history[:3] == one.history  # the same first cycle
    assert len(more.history) > 3  # it still improved, so training went on
    assert [row["epoch"] for row in more.history] == list(range(1, len(more.history) + 1))
    assert more.history[3]["lr"] == pytest.approx(0.001)  # the second cycle starts at half the rate
    score = max(row["held_out_accuracy"] for row in more.history)
    assert (
        more.history[more.best_epoch - 1]["held_out_accuracy"]
        == score
        >= one.history[-1]["held_out_accuracy"]
    )
