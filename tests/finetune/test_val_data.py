"""`--val-data`: gates, sensitivity curves and early stopping on samples the model never saw.

A net that memorised its training samples scores ~100% on them whatever a round removes,
so a gate read on them refuses rungs that the held-out error would accept.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from onnxcompress.cli import app
from onnxcompress.finetune.config import FinetuneConfig
from onnxcompress.finetune.train import _split
from tests.finetune.conftest import PruningFiles


def _optimize_argv(files: PruningFiles, *extra: object) -> list[str]:
    return ["optimize", str(files.model), "-o", str(files.out), "--recipe", str(files.recipe),
            "--data", str(files.data), "--finetune", "--report", str(files.report),
            *map(str, extra)]


def test_val_data_gates_on_held_out_samples_and_retrains_on_all_of_data(
    digits_mlp, pruning_files
) -> None:
    proto, train, held_out = digits_mlp
    files = pruning_files(0.9)
    out, report = files.out, files.report
    result = CliRunner().invoke(app, _optimize_argv(files, "--val-data", files.val))
    assert result.exit_code == 0, result.output
    assert "note: the gates judge" not in result.output
    rounds = [s for s in json.loads(report.read_text())["steps"] if s["pass"] == "finetune"]
    for step in rounds:
        notes = step["notes"]
        # every training sample is trained on; early stopping reads the held-out file whole
        assert notes["train_samples"] == len(train["labels"])
        assert notes["held_out_samples"] == len(held_out["labels"])
    # the gate's accuracy change is the one on the held-out samples (450 of them)
    pruned = ort_accuracy(onnx.load(out), held_out)
    dense = ort_accuracy(proto, held_out)
    judged = [s for s in rounds if s["status"] == "applied"][-1]["metrics"]["task"]
    assert judged == pytest.approx(pruned - dense, abs=1e-9)


def test_without_val_data_the_output_says_the_gate_reads_training_samples(
    pruning_files,
) -> None:
    files = pruning_files(0.3)
    report = files.report
    result = CliRunner().invoke(app, _optimize_argv(files))
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("note: the gates")]
    assert len(lines) == 1 and "first 269 samples" in lines[0] and "--val-data" in lines[0]
    notes = next(s for s in json.loads(report.read_text())["steps"] if s["pass"] == "finetune")
    # the gate's 269 left out; early stopping on a tenth of the rest
    assert notes["notes"]["train_samples"] + notes["notes"]["held_out_samples"] == 1347 - 269


def test_val_data_without_labels_or_data_is_one_line(pruning_files) -> None:
    files = pruning_files(0.3, val_labels=False)
    model, val, out = files.model, files.val, files.out
    result = CliRunner().invoke(app, _optimize_argv(files, "--val-data", val))
    assert result.exit_code != 0 and f"{val} has no 'labels' array" in result.output
    assert "Traceback" not in result.output and not out.exists()
    result = CliRunner().invoke(
        app, ["optimize", str(model), "-o", str(out), "--val-data", str(val)]
    )
    assert result.exit_code == 2 and "give --data train.npz as well" in result.output


def ort_accuracy(proto: onnx.ModelProto, data: dict[str, np.ndarray]) -> float:
    from onnxcompress import runtime

    name = proto.graph.input[0].name
    logits = runtime.session(proto, threads=1).run(None, {name: data[name]})[0]
    return float(np.mean(logits.argmax(1) == data["labels"]))


def test_sensitivity_measures_its_curves_on_val_data(digits_mlp, tmp_path) -> None:
    proto, train, held_out = digits_mlp
    model, data, val = (tmp_path / n for n in ("m.onnx", "d.npz", "v.npz"))
    onnx.save(proto, model)
    np.savez(data, **train)
    np.savez(val, **held_out)
    argv = ["sensitivity", str(model), "--data", str(data), "--ratios", "0.5", "--no-cache"]
    result = CliRunner().invoke(app, [*argv, "-o", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    assert "note: accuracy is measured on" in result.output
    on_train = json.loads((tmp_path / "a" / "sensitivity.json").read_text())["baseline"]
    result = CliRunner().invoke(app, [*argv, "--val-data", str(val), "-o", str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    assert "note: accuracy is measured on" not in result.output
    on_val = json.loads((tmp_path / "b" / "sensitivity.json").read_text())["baseline"]
    assert on_train == pytest.approx(ort_accuracy(proto, train))  # 100%: memorised
    assert on_val == pytest.approx(ort_accuracy(proto, held_out)) and on_val < on_train


def test_given_held_out_samples_replace_the_split_only_with_automatic_epochs() -> None:
    data = {"x": np.arange(200, dtype=np.float32)[:, None], "labels": np.arange(200) % 3}
    given = {"x": np.zeros((7, 1), np.float32), "labels": np.zeros(7, np.int64)}
    train, held = _split(data, FinetuneConfig(), given)
    assert train is data and held is not None and len(held["x"]) == 7
    train, held = _split(data, FinetuneConfig(), None)  # a seeded tenth held out
    assert held is not None and len(held["x"]) == 20 and len(train["x"]) == 180  # type: ignore[arg-type]
    assert _split(data, FinetuneConfig(epochs=2), given) == (data, None)
    # other arrays than the data's: not a held-out set of it
    assert len(_split(data, FinetuneConfig(), {"x": given["x"]})[1]["x"]) == 20  # type: ignore[index]


def test_finetune_stops_early_on_val_data(digits_mlp, tmp_path) -> None:
    proto, train, held_out = digits_mlp
    model, data, val, out, report = (
        tmp_path / n for n in ("m.onnx", "d.npz", "v.npz", "o.onnx", "r.json")
    )
    onnx.save(proto, model)
    np.savez(data, **train)
    np.savez(val, **held_out)
    argv = ["finetune", str(model), "--data", str(data), "-o", str(out), "--report", str(report),
            "--max-steps", "60", "--max-cycles", "1", "--lr", "1e-3"]
    result = CliRunner().invoke(app, [*argv, "--val-data", str(val)])
    assert result.exit_code == 0, result.output
    notes = json.loads(report.read_text())["steps"][0]["notes"]
    assert notes["train_samples"] == len(train["labels"])
    assert notes["held_out_samples"] == len(held_out["labels"])
    last = notes["history"][-1]
    assert "held_out_accuracy" in last
    result = CliRunner().invoke(app, [*argv[:3], "tests.nowhere:batches", *argv[4:],
                                      "--val-data", str(val)])
    assert result.exit_code == 2 and "--val-data goes with --data train.npz" in result.output
