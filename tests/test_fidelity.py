"""The fidelity signal: a destroyed model cannot pass the default gate.

The classifier below saturates its softmax, as real ones do: cosine of its probabilities and
top-1 agreement stay perfect when its weights are gone. The gate must still refuse it.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcompress import fidelity
from onnxcompress.errors import FidelityGateError, UnsupportedModelError
from onnxcompress.pipeline import Step, run_steps
from tests.builders import finish

FEATURES = 64


def saturated_classifier(rng: np.random.Generator, *, sigmoid: bool = False) -> ir.Model:
    """64 -> 32 (relu) -> 2 logits, scaled and biased so class 0 wins by a wide margin."""
    w1 = rng.standard_normal((FEATURES, 32)).astype(np.float32) / 8
    w2 = rng.standard_normal((32, 2 if not sigmoid else 1)).astype(np.float32) * 8
    bias = np.array([60.0, -60.0] if not sigmoid else [60.0], np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["z"]),
        helper.make_node("Add", ["z", "b"], ["logits"]),
        helper.make_node("Sigmoid" if sigmoid else "Softmax", ["logits"], ["probabilities"],
                         **({} if sigmoid else {"axis": -1})),
    ]
    graph = helper.make_graph(
        nodes,
        "classifier",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", FEATURES])],
        [
            helper.make_tensor_value_info(
                "probabilities", TensorProto.FLOAT, ["n", 1 if sigmoid else 2]
            )
        ],
        [
            numpy_helper.from_array(w1, "w1"),
            numpy_helper.from_array(w2, "w2"),
            numpy_helper.from_array(bias, "b"),
        ],
    )
    return ir.from_proto(finish(graph))


def collapsed(model: ir.Model) -> ir.Model:
    """The same graph with every weight zeroed: its output is a constant."""
    copy = model.clone()
    for name in ("w1", "w2"):
        tensor = copy.graph.initializers[name].const_value
        copy.graph.initializers[name].const_value = ir.Tensor(
            np.zeros(tensor.shape.numpy(), np.float32), name=name
        )
    return copy


def digits() -> np.ndarray:
    """Real-looking inputs: scikit-learn's 8x8 handwritten digits, scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    return (load_digits().data[:64] / 16.0).astype(np.float32)


def test_views_walk_back_to_logits_and_log_odds(rng):
    (softmax,) = fidelity.output_views(saturated_classifier(rng))
    assert (softmax.kind, softmax.source, softmax.axis) == ("logits", "logits", -1)
    (sigmoid,) = fidelity.output_views(saturated_classifier(rng, sigmoid=True))
    assert (sigmoid.kind, sigmoid.source) == ("log-odds", "logits")


@pytest.mark.parametrize("inputs", ["random probes", "digits"])
def test_a_collapsed_saturated_classifier_fails_the_default_gate(rng, inputs):
    model = saturated_classifier(rng)
    x = digits() if inputs == "digits" else rng.standard_normal((64, FEATURES)).astype(np.float32)
    reference = fidelity.run(model, {"x": x})
    candidate = fidelity.run(collapsed(model), {"x": x}, reference.views)
    # What fooled the old gate: the probabilities barely move and every class is kept.
    p, q = reference.values[0].ravel(), candidate.values[0].ravel()
    assert np.dot(p, q) / (np.linalg.norm(p) * np.linalg.norm(q)) > 0.99
    assert np.all(reference.values[0].argmax(-1) == 0)

    assert np.all(candidate.values[0].argmax(-1) == 0)  # every decision kept: top-1 agreement 1.0
    metrics = fidelity.compare(reference, candidate)
    assert metrics.rank_correlation == 0.0  # a constant scores nothing
    assert any(f.startswith("rank_correlation") for f in fidelity.DEFAULT_GATE.failures(metrics))


def test_the_pipeline_refuses_to_write_a_pruned_away_classifier(rng):
    model = saturated_classifier(rng)
    step = Step(pass_name="prune.magnitude", options={"sparsity": 0.99, "min_params": 0})
    for data in (None, {"x": digits()}):
        with pytest.raises(FidelityGateError, match="rank_correlation"):
            run_steps(model, [step], data=data)


def test_a_sigmoid_output_is_compared_on_its_log_odds(rng):
    model = saturated_classifier(rng, sigmoid=True)
    x = rng.standard_normal((64, FEATURES)).astype(np.float32)
    reference = fidelity.run(model, {"x": x})
    weights = {
        name: model.graph.initializers[name].const_value.numpy() for name in ("w1", "w2", "b")
    }
    log_odds = np.maximum(x @ weights["w1"], 0) @ weights["w2"] + weights["b"]
    # the Sigmoid's input, not log(p)
    assert np.allclose(reference.scores[0], log_odds, rtol=1e-4, atol=1e-3)
    metrics = fidelity.compare(reference, fidelity.run(collapsed(model), {"x": x}, reference.views))
    assert fidelity.DEFAULT_GATE.failures(metrics)


def test_a_faithful_copy_passes_with_perfect_scores(rng):
    model = saturated_classifier(rng)
    x = digits()
    reference = fidelity.run(model, {"x": x})
    metrics = fidelity.compare(reference, fidelity.run(model.clone(), {"x": x}, reference.views))
    assert not fidelity.DEFAULT_GATE.failures(metrics)
    assert metrics.cosine == pytest.approx(1.0) and metrics.rank_correlation == pytest.approx(1.0)
    assert metrics.kl == pytest.approx(0.0, abs=1e-12)


def test_bare_probability_arrays_are_compared_on_their_logs(rng):
    logits = rng.standard_normal((32, 5)) * 40
    probabilities = np.exp(logits - logits.max(-1, keepdims=True))
    probabilities /= probabilities.sum(-1, keepdims=True)
    constant = np.tile(probabilities.mean(0), (32, 1))
    metrics = fidelity.compare([probabilities], [constant])
    assert metrics.outputs[0]["view"] == "logits"
    assert fidelity.DEFAULT_GATE.failures(metrics)


def test_each_output_is_judged_on_its_own():
    big = np.linspace(1, 1000, 64).reshape(32, 2)
    small = np.linspace(0, 1, 64).reshape(32, 2)
    metrics = fidelity.compare([big, small], [big, small[::-1]])
    assert [round(o["rank_correlation"], 6) for o in metrics.outputs] == [1.0, -1.0]
    # concatenated, the large output would have hidden it
    assert metrics.rank_correlation == pytest.approx(-1.0)


def test_non_finite_candidate_outputs_fail_even_without_thresholds():
    reference = [np.ones((4, 3))]
    broken = [np.array([[1.0, np.nan, 1.0]] * 4)]
    assert fidelity.Gate.off().failures(fidelity.compare(reference, broken))


def test_an_original_with_non_finite_outputs_is_refused(rng):
    model = saturated_classifier(rng)
    x = digits()
    x[3, 5] = np.nan
    with pytest.raises(UnsupportedModelError, match="NaN or inf"):
        run_steps(
            model, [Step(pass_name="prune.magnitude", options={"sparsity": 0.1})], data={"x": x}
        )


def test_a_task_metric_gates_too(rng):
    model = saturated_classifier(rng)
    step = Step(
        pass_name="prune.magnitude", options={"sparsity": 0.01}, gate=fidelity.Gate(min_task=2.0)
    )

    def never_enough(reference: list[np.ndarray], candidate: list[np.ndarray]) -> float:
        return 1.0

    with pytest.raises(FidelityGateError, match="task 1 < 2.0"):
        run_steps(model, [step], data={"x": digits()}, task=never_enough)


def test_failures_name_the_metric_that_decided():
    metrics = fidelity.Metrics(
        cosine=0.5, rel_l2=1.0, max_abs=1.0, top1_agreement=0.5, rank_correlation=0.1
    )
    failed = fidelity.DEFAULT_GATE.failures(metrics)
    assert [f.split()[0] for f in failed] == ["cosine", "rank_correlation", "top1_agreement"]


def test_a_model_proto_round_trip_keeps_its_outputs(rng):
    """Exposing the logits for a run leaves the model's own outputs as they were."""
    model = saturated_classifier(rng)
    fidelity.run(model, {"x": digits()})
    assert [v.name for v in model.graph.outputs] == ["probabilities"]
    onnx.checker.check_model(ir.to_proto(model))


def test_a_ctc_sequence_agrees_only_if_every_time_step_does(rng):
    """(time, 1, classes) logits of 4 samples run one at a time, stacked.

    One flipped step in sample 2 is one changed string out of four, though 127 of 128 steps
    still agree.
    """
    logits = rng.standard_normal((4 * 32, 1, 50))
    changed = logits.copy()
    row = 2 * 32 + 7
    changed[row, 0, logits[row, 0].argmin()] = logits[row, 0].max() + 1.0
    reference = fidelity.as_outputs([logits])
    candidate = fidelity.as_outputs([changed])
    reference = dataclasses.replace(reference, samples=4)
    assert fidelity.compare(reference, candidate).top1_agreement == 0.75


def test_decision_margins_predict_flips_that_the_samples_did_not_show(rng):
    """16 samples x 64 steps: no decision flips here, yet most strings would on new inputs.

    1 step in 50 is a close call (gap 0.1) the candidate leaves alone; elsewhere it moves the
    clear winners' gaps by 0.5. On new inputs a close call will meet such a change: about 1
    step in 50 flips, and most strings change.
    """
    steps = rng.standard_normal((16 * 64, 1, 30))
    steps[:, 0, 0] = steps.max(axis=-1)[:, 0] + 3.0  # a clear winner ...
    near = rng.random(16 * 64) < 0.02
    steps[near, 0, 1] = steps[near, 0, 0] - 0.1  # ... except for a few close calls
    moved = steps.copy()
    moved[~near, 0, 0] -= 0.5
    assert np.all(moved.argmax(-1) == steps.argmax(-1))
    reference = dataclasses.replace(fidelity.as_outputs([steps]), samples=16)
    metrics = fidelity.compare(reference, fidelity.as_outputs([moved]))
    agreement = metrics.string_agreement  # class 0 wins every step: read as CTC, 0 the blank
    assert agreement is not None and agreement < 0.9
