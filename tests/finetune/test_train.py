"""Training and write-back: the gated `finetune` pass, distillation, data sources, the CLI."""

from __future__ import annotations

import sys
import textwrap

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from typer.testing import CliRunner

from onnxcompress.cli import app
from onnxcompress.errors import DataError, RecipeError
from onnxcompress.fidelity import Gate
from onnxcompress.finetune.data import load_data
from onnxcompress.finetune.executor import OnnxModule, to_ir
from onnxcompress.finetune.train import TrainOptions, dropout_ratio, evaluate, finetune
from onnxcompress.pass_base import get_pass
from onnxcompress.pipeline import Step, run_steps
from tests.finetune.conftest import ort_run

NO_GATE = Gate.off()
#: The settings these tests were written for (the defaults now pick the rate and the length).
SGD = {"optimizer": "sgd", "lr_schedule": "constant"}


def _digits(proto, digits, n=600):
    x, y = digits
    name = proto.graph.input[0].name
    return {name: x[:n], "labels": y[:n]}, {name: x[1200:], "labels": y[1200:]}


def _prune_then_finetune(proto, train, **options):
    steps = [
        Step(pass_name="prune.magnitude", options={"sparsity": 0.8}, gate=NO_GATE),
        Step(pass_name="finetune", options={"epochs": 4, "lr": 0.01, "optimizer": "adam", "lr_schedule": "constant", "batch_size": 32,
                      **options},
             gate=NO_GATE),
    ]
    return run_steps(to_ir(proto), steps, data=train, seed=3)


def test_write_back_round_trip_keeps_structure_and_recovers_accuracy(mlp_pair, digits) -> None:
    _, proto = mlp_pair
    train, test = _digits(proto, digits)
    pruned = run_steps(to_ir(proto), [Step(pass_name="prune.magnitude", options={"sparsity": 0.8}, gate=NO_GATE)])
    result = _prune_then_finetune(proto, train)
    tuned = result.model
    assert result.steps[1].status == "applied"

    def tensors(model):
        return {n: v.const_value.numpy() for n, v in model.graph.initializers.items()}

    before, after = tensors(pruned.model), tensors(tuned)
    assert set(before) == set(after)
    for name in before:
        assert after[name].shape == before[name].shape and after[name].dtype == before[name].dtype
        if name.endswith("weight"):
            np.testing.assert_array_equal(after[name] == 0, before[name] == 0)  # zeros stay, none added
    assert [n.op_type for n in tuned.graph] == [n.op_type for n in pruned.model.graph]
    assert [v.name for v in tuned.graph.inputs] == [v.name for v in pruned.model.graph.inputs]
    changed = {c.name for c in result.steps[1].report.changes}
    assert changed == set(before)  # every float tensor was retrained

    out_proto = ir.to_proto(tuned)
    out_proto.ir_version = 10
    name = proto.graph.input[0].name
    x = test[name][:50]
    np.testing.assert_allclose(ort_run(out_proto, {name: x})[0], OnnxModule(out_proto).run({name: x})[0],
                               rtol=0, atol=1e-5 * 10)
    accuracy_pruned = evaluate(OnnxModule(pruned.model), test)
    accuracy_tuned = evaluate(OnnxModule(tuned), test)
    assert accuracy_tuned > accuracy_pruned + 0.2, (accuracy_pruned, accuracy_tuned)


def test_same_seed_same_bytes(mlp_pair, digits) -> None:
    _, proto = mlp_pair
    train, _ = _digits(proto, digits, n=200)
    first = ir.to_proto(_prune_then_finetune(proto, train).model).SerializeToString()
    second = ir.to_proto(_prune_then_finetune(proto, train).model).SerializeToString()
    third = ir.to_proto(_prune_then_finetune(proto, train, seed=11).model).SerializeToString()
    assert first == second and first != third


def test_distillation_without_labels_moves_toward_the_teacher(mlp_pair, digits) -> None:
    _, proto = mlp_pair
    train, _ = _digits(proto, digits, n=300)
    del train["labels"]
    teacher = to_ir(proto)
    pruned = run_steps(to_ir(proto), [Step(pass_name="prune.magnitude", options={"sparsity": 0.7}, gate=NO_GATE)]).model
    options = TrainOptions(epochs=30, lr=0.05, batch_size=50, target_cosine=0.999, probe_samples=300, **SGD)
    start = finetune(pruned, train, original=teacher, options=TrainOptions(epochs=1, lr=1e-12, target_cosine=0.0))
    result = finetune(pruned, train, original=teacher, options=options)
    assert result.loss_kind == "kl"
    assert result.history[-1]["loss"] < 0.5 * result.history[0]["loss"]
    assert result.history[-1]["cosine"] > start.history[0]["cosine"]
    assert result.stopped_early == (len(result.history) < 30)
    if result.stopped_early:
        assert result.history[-1]["cosine"] >= 0.999


@pytest.mark.parametrize("loss", ["mse", "cosine"])
def test_embedding_losses_reduce_their_distance(mlp_pair, digits, loss) -> None:
    _, proto = mlp_pair
    train, _ = _digits(proto, digits, n=200)
    del train["labels"]
    pruned = run_steps(to_ir(proto), [Step(pass_name="prune.magnitude", options={"sparsity": 0.7}, gate=NO_GATE)]).model
    result = finetune(pruned, train, original=to_ir(proto), options=TrainOptions(epochs=5, lr=0.05, loss=loss, batch_size=40, **SGD))
    assert result.loss_kind == loss and result.history[-1]["loss"] < result.history[0]["loss"]


def test_early_stop_on_accuracy_target(mlp_pair, digits) -> None:
    _, proto = mlp_pair
    train, _ = _digits(proto, digits)
    result = finetune(to_ir(proto), train, options=TrainOptions(epochs=50, lr=0.1, batch_size=32, target_accuracy=0.8, **SGD))
    assert result.stopped_early and result.history[-1]["accuracy"] >= 0.8
    assert all(h["accuracy"] < 0.8 for h in result.history[:-1])


def test_l1_regularisation_shrinks_weights(mlp_pair, digits) -> None:
    _, proto = mlp_pair
    train, _ = _digits(proto, digits, n=200)
    plain = finetune(to_ir(proto), train, options=TrainOptions(epochs=2, lr=0.05, **SGD))
    sparse = finetune(to_ir(proto), train, options=TrainOptions(epochs=2, lr=0.05, l1=1e-3, **SGD))
    assert np.abs(sparse.arrays["layers.0.weight"]).sum() < np.abs(plain.arrays["layers.0.weight"]).sum()


def test_dropout_ratio_follows_han_eq_2() -> None:
    assert dropout_ratio(0.5, 1000, 90) == pytest.approx(0.5 * np.sqrt(0.09))
    assert dropout_ratio(0.5, 0, 10) == 0.5


def test_dropout_node_is_rescaled_from_connection_counts(rng) -> None:
    from onnx import TensorProto, helper, numpy_helper

    w = rng.standard_normal((8, 8)).astype(np.float32)
    pruned = np.where(np.abs(w) > np.quantile(np.abs(w), 0.75), w, 0).astype(np.float32)

    def model(weight):
        graph = helper.make_graph(
            [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Dropout", ["r", "ratio"], ["y"], name="drop")],
            "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])],
            initializer=[numpy_helper.from_array(weight, "w"), numpy_helper.from_array(np.float32(0.5), "ratio")],
        )
        return to_ir(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))

    data = {"x": rng.standard_normal((16, 8)).astype(np.float32)}
    result = finetune(model(pruned), data, original=model(w), options=TrainOptions(epochs=1, loss="mse"))
    assert result.structure["dropout:drop"] == f"ratio {0.5 * np.sqrt(16 / 64):.4f}"


def test_pass_without_data_is_a_data_error(mlp_pair) -> None:
    with pytest.raises(DataError, match="finetune needs training data"):
        run_steps(to_ir(mlp_pair[1]), [Step(pass_name="finetune", gate=NO_GATE)])


def test_pass_config_is_validated() -> None:
    with pytest.raises(RecipeError, match="lr"):
        get_pass("finetune")(lr=-1.0)
    with pytest.raises(RecipeError, match="epochs"):
        get_pass("finetune")(epochs=0)


def test_data_from_npz_and_from_a_callable(tmp_path, monkeypatch) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=np.ones((3, 2), np.float32), labels=np.arange(3))
    loaded = load_data(path)
    assert set(loaded) == {"x", "labels"}
    (tmp_path / "my_batches.py").write_text(textwrap.dedent("""
        import numpy as np
        def batches():
            return [{"x": np.ones((2, 2), np.float32)}]
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    factory = load_data("my_batches:batches")
    assert list(factory())[0]["x"].shape == (2, 2)
    with pytest.raises(DataError, match="cannot import data callable"):
        load_data("no_such_module_xyz:f")
    sys.modules.pop("my_batches", None)


def test_cli_finetune_writes_a_model(mlp_pair, digits, tmp_path) -> None:
    _, proto = mlp_pair
    train, test = _digits(proto, digits, n=300)
    model_path, data_path, out = tmp_path / "m.onnx", tmp_path / "d.npz", tmp_path / "out.onnx"
    onnx.save(proto, model_path)
    np.savez(data_path, **train)
    result = CliRunner().invoke(app, ["finetune", str(model_path), "--data", str(data_path), "-o", str(out)])
    assert result.exit_code == 0, result.output
    tuned = onnx.load(out)
    assert [i.name for i in tuned.graph.initializer] == [i.name for i in proto.graph.initializer]
    assert evaluate(OnnxModule(tuned), test) > evaluate(OnnxModule(proto), test) + 0.3


def test_cli_distill_without_teacher_or_labels_exits_2(mlp_pair, digits, tmp_path) -> None:
    _, proto = mlp_pair
    model_path, data_path = tmp_path / "m.onnx", tmp_path / "d.npz"
    onnx.save(proto, model_path)
    np.savez(data_path, **{proto.graph.input[0].name: digits[0][:10]})
    result = CliRunner().invoke(app, ["finetune", str(model_path), "--data", str(data_path), "-o", str(tmp_path / "o.onnx")])
    assert result.exit_code == 2
    assert "distillation needs a teacher" in result.output


def test_recipe_with_a_finetune_step_runs(mlp_pair, digits) -> None:
    from onnxcompress.recipe import parse_recipe

    _, proto = mlp_pair
    train, test = _digits(proto, digits, n=400)
    recipe = parse_recipe(textwrap.dedent("""
        steps:
          - pass: prune.magnitude
            options: {sparsity: 0.5}
            gate: {min_cosine: null, min_rank_correlation: null, min_top1: null}
          - pass: finetune
            options: {epochs: 3, lr: 0.01, optimizer: adam, lr_schedule: cosine, batch_size: 32}
            gate: {min_cosine: null, min_rank_correlation: null, min_top1: null}
    """), "inline")
    result = run_steps(to_ir(proto), recipe.steps, data=train, seed=recipe.seed)
    assert [s.status for s in result.steps] == ["applied", "applied"]
    assert evaluate(OnnxModule(result.model), test) > 0.3  # chance is 0.1; untrained ~0.1
    with pytest.raises(RecipeError, match=r"step 1 \(finetune\).*lr_schedule"):
        parse_recipe("steps:\n  - pass: finetune\n    options: {lr_schedule: linear}\n", "bad")


def test_cosine_schedule_decays_to_zero() -> None:
    import torch

    from onnxcompress.finetune.train import _scheduler

    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=0.1)
    scheduler = _scheduler(optimizer, TrainOptions(epochs=2, batch_size=30, lr=0.1, lr_schedule="cosine"), 8)
    rates = []
    for _ in range(8):  # 2 epochs x ceil(100 / 30) steps
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[0] == pytest.approx(0.1) and rates[4] == pytest.approx(0.05)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_training_from_a_batch_callable(mlp_pair, digits) -> None:
    _, proto = mlp_pair
    train, test = _digits(proto, digits, n=480)
    name = proto.graph.input[0].name

    def batches():
        return ({name: train[name][i:i + 48], "labels": train["labels"][i:i + 48]} for i in range(0, 480, 48))

    result = finetune(to_ir(proto), batches, options=TrainOptions(epochs=4, lr=0.01, optimizer="adam",
                                                                   lr_schedule="cosine"))
    assert result.loss_kind == "cross_entropy" and len(result.history) == 4
    assert result.history[-1]["loss"] < result.history[0]["loss"]

    def misnamed():
        return iter([{"pixels_typo": train[name][:48], "labels": train["labels"][:48]}])

    with pytest.raises(DataError, match=r"lacks model inputs \['" + name + r"'\]; it has \['pixels_typo'\]"):
        finetune(to_ir(proto), misnamed, options=TrainOptions(epochs=1))


def test_finetune_after_codebook_kmeans_keeps_indices_and_the_zero_entry(mlp_pair, digits) -> None:
    from onnxcompress.pass_base import pass_names

    if "codebook.kmeans" not in pass_names():
        pytest.skip("codebook.kmeans is not registered")
    _, proto = mlp_pair
    train, test = _digits(proto, digits, n=400)
    clustered = run_steps(to_ir(proto), [
        Step(pass_name="prune.magnitude", options={"sparsity": 0.6}, gate=NO_GATE),
        Step(pass_name="codebook.kmeans", options={"bits": 4}, gate=NO_GATE),
    ]).model
    tuned = run_steps(clustered, [Step(pass_name="finetune", options={"epochs": 3, "lr": 0.01, "optimizer": "adam",
                                                                                "lr_schedule": "constant"},
                                       gate=NO_GATE)], data=train).model
    books = [n for n in clustered.graph.initializers if n.endswith(".codebook")]
    assert books, "expected in-graph codebooks"
    for name, value in clustered.graph.initializers.items():
        before, after = value.const_value.numpy(), tuned.graph.initializers[name].const_value.numpy()
        assert after.dtype == before.dtype and after.shape == before.shape
        if name.endswith(".codebook_indices"):
            np.testing.assert_array_equal(after, before)
        if name in books:
            assert before[0] == 0.0 and after[0] == 0.0  # the reserved exact zero
            assert not np.array_equal(after[1:], before[1:])
    assert [n.op_type for n in tuned.graph] == [n.op_type for n in clustered.graph]
    assert evaluate(OnnxModule(tuned), test) > evaluate(OnnxModule(clustered), test) + 0.1


def test_write_back_into_constant_nodes(rng) -> None:
    from onnx import TensorProto, helper, numpy_helper

    w = rng.standard_normal((4, 3)).astype(np.float32)
    w[0, 0] = 0.0
    graph = helper.make_graph(
        [helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(w)),
         helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    proto.ir_version = 10
    model = to_ir(proto)
    data = {"x": rng.standard_normal((32, 4)).astype(np.float32)}
    teacher = to_ir(proto)
    teacher.graph.node(0).attributes["value"] = ir.AttrTensor("value", ir.tensor(w * 2, name="w"))
    result = run_steps(model, [Step(pass_name="finetune", options={"epochs": 20, "lr": 0.05, "loss": "mse",
                                                                      "teacher": None, **SGD}, gate=NO_GATE)], data=data)
    assert result.steps[0].status == "unchanged"  # teacher = the model itself: nothing to learn
    trained = finetune(model, data, original=teacher, options=TrainOptions(epochs=20, lr=0.05, loss="mse", **SGD))
    from onnxcompress.finetune.train import write_back

    changed = write_back(model, trained.arrays)
    assert [name for name, _, _ in changed] == ["w"]
    stored = model.graph.node(0).attributes["value"].as_tensor().numpy()
    assert stored[0, 0] == 0.0 and not np.allclose(stored, w)
    out = ir.to_proto(model)
    out.ir_version = 10
    np.testing.assert_allclose(ort_run(out, data)[0], data["x"] @ stored, rtol=1e-5, atol=1e-6)


def test_a_diverging_run_is_reported(mlp_pair, digits, caplog) -> None:
    _, proto = mlp_pair
    train, _ = _digits(proto, digits)
    with caplog.at_level("WARNING", logger="onnxcompress.finetune.train"):
        finetune(to_ir(proto), train, options=TrainOptions(epochs=2, lr=10.0, batch_size=32, **SGD))
    assert "fine-tuning diverged" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="onnxcompress.finetune.train"):
        finetune(to_ir(proto), train, options=TrainOptions(epochs=2, lr=0.05, batch_size=32, **SGD))
    assert "diverged" not in caplog.text


def test_dropout_rescale_as_torch_writes_it(rng) -> None:
    """Ratio in a Constant node, bias Add with the bias first; and never past a layer without a constant weight."""
    from onnx import TensorProto, helper, numpy_helper

    w = rng.standard_normal((8, 8)).astype(np.float32)
    pruned = np.where(np.abs(w) > np.quantile(np.abs(w), 0.75), w, 0).astype(np.float32)

    def model(weight):
        graph = helper.make_graph(
            [helper.make_node("Constant", [], ["ratio"], value=numpy_helper.from_array(np.float32(0.1))),
             helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["b", "h"], ["hb"]),
             helper.make_node("Relu", ["hb"], ["r"]), helper.make_node("Dropout", ["r", "ratio"], ["d"], name="drop"),
             helper.make_node("Transpose", ["w2"], ["w2t"]), helper.make_node("MatMul", ["d", "w2t"], ["m"]),
             helper.make_node("Dropout", ["m", "ratio"], ["y"], name="after_transposed")],
            "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])],
            initializer=[numpy_helper.from_array(weight, "w"), numpy_helper.from_array(np.zeros(8, np.float32), "b"),
                         numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "w2")],
        )
        return to_ir(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))

    data = {"x": rng.standard_normal((16, 8)).astype(np.float32)}
    result = finetune(model(pruned), data, original=model(w), options=TrainOptions(epochs=1, loss="mse"))
    assert result.structure["dropout:drop"] == f"ratio {0.1 * np.sqrt(16 / 64):.4f}"
    assert "dropout:after_transposed" not in result.structure  # w2 reaches it through Transpose: left alone
