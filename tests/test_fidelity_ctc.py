"""A CTC sequence output is judged on the strings it reads, not on every time step.

The reference below reads words as ddddocr's output does: per step, scores over classes where
class 0 (the blank) wins most steps, each character a run of 2-3 steps between blanks. Its
run edges are close calls between the character and the blank: a compressed model may flip
them without changing a single string, and the gate must let it.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcompress import ctc, fidelity
from onnxcompress.pipeline import Step, run_steps
from tests.builders import finish, mlp

SAMPLES, STEPS, CLASSES = 16, 32, 20
BLANK = 0


def read_words(
    rng: np.random.Generator, samples: int = SAMPLES
) -> tuple[np.ndarray, np.ndarray]:
    """Scores [samples * steps, 1, classes] (as stacked batch-1 runs) and each run's edge steps.

    Clear winners lead by 6; each run's first step is a close call (0.05) with the blank.
    """
    scores = rng.standard_normal((samples, STEPS, CLASSES))
    winners = np.full((samples, STEPS), BLANK)
    edges = np.zeros((samples, STEPS), bool)
    for sample in range(samples):
        step = 1
        while step + 3 < STEPS:
            length = 2 + rng.integers(2)
            winners[sample, step : step + length] = rng.integers(1, CLASSES)
            edges[sample, step] = True
            step += length + 3 + rng.integers(3)
    rows = np.arange(samples)[:, None], np.arange(STEPS)[None, :]
    scores[rows[0], rows[1], winners] = scores.max(-1) + 6.0
    scores[edges, BLANK] = scores[edges].max(-1) - 0.05
    return scores.reshape(samples * STEPS, 1, CLASSES), edges.reshape(-1)


def judged(reference: np.ndarray, candidate: np.ndarray) -> float | None:
    outputs = dataclasses.replace(fidelity.as_outputs([reference]), samples=SAMPLES)
    metrics = fidelity.compare(outputs, fidelity.as_outputs([candidate]))
    assert metrics.top1_agreement is None  # strings are the decisions of a CTC output
    return metrics.string_agreement


def test_reading_collapses_repeats_and_drops_the_blank():
    paths = np.array([[0, 5, 5, 0, 0, 5, 7, 7, 0]])
    same = np.array([[5, 5, 0, 0, 5, 5, 7, 0, 0]])
    assert ctc.same_strings(paths, same, blank=0).tolist() == [True]
    merged = np.array([[0, 5, 5, 5, 5, 5, 7, 7, 0]])  # the blank between the two 5s is gone
    assert ctc.same_strings(paths, merged, blank=0).tolist() == [False]


def test_a_flip_is_absorbed_only_at_a_run_edge_towards_its_neighbour():
    path = np.array([[0, 5, 5, 5, 0, 8]])
    to_blank = np.array([[0, 0, 0, 0, 0, 0]])
    assert ctc.absorbed_flips(path, to_blank, blank=0).tolist() == [
        [True, True, False, True, True, False]  # a run's edge may go blank, its middle not
    ]
    to_eight = np.full_like(path, 8)
    assert ctc.absorbed_flips(path, to_eight, blank=0).tolist() == [
        [False, False, False, False, True, True]  # the blank before the 8 may join its run
    ]


def test_the_blank_is_the_class_winning_most_steps():
    words, _ = read_words(np.random.default_rng(0))
    assert ctc.blank_class(words, SAMPLES) == BLANK
    no_blank = np.random.default_rng(1).standard_normal(words.shape)
    assert ctc.blank_class(no_blank, SAMPLES) is None  # 20 classes win about 5% each
    assert ctc.blank_class(words, SAMPLES * STEPS) is None  # one step per sample: not a sequence


def test_flipping_only_steps_that_ctc_collapses_away_passes(rng):
    """Every sample's run edges flip to the blank: the strings all stay, so the gate passes.

    A rule counting every step would fail each sample.
    """
    words, edges = read_words(rng)
    flipped = words.copy()
    flipped[edges, 0, BLANK] += 0.1
    flipped += rng.standard_normal(flipped.shape) * 0.01
    steps_same = (words.argmax(-1) == flipped.argmax(-1)).reshape(SAMPLES, -1).all(axis=1)
    assert not steps_same.any()
    agreement = judged(words, flipped)
    assert agreement == 1.0
    metrics = fidelity.compare(
        dataclasses.replace(fidelity.as_outputs([words]), samples=SAMPLES),
        fidelity.as_outputs([flipped]),
    )
    assert not fidelity.DEFAULT_GATE.failures(metrics)


def test_a_change_that_alters_one_decoded_string_fails(rng):
    words, edges = read_words(rng)
    changed = words.copy()
    middle = np.flatnonzero(~edges & (words.argmax(-1)[:, 0] == BLANK))[5]  # between two runs
    changed[middle, 0, 3] = words[middle, 0].max() + 1.0  # a character read where none was
    agreement = judged(words, changed)
    assert agreement == 1.0 - 1.0 / SAMPLES
    metrics = fidelity.compare(
        dataclasses.replace(fidelity.as_outputs([words]), samples=SAMPLES),
        fidelity.as_outputs([changed]),
    )
    assert [f.split()[0] for f in fidelity.DEFAULT_GATE.failures(metrics)] == ["string_agreement"]


def test_strings_have_their_own_bar_below_top1s(rng):
    """One word of 36 read differently passes the default gate (strings >= 0.95); two do not.

    Top-1's 0.99 would fail the one: a word holds a dozen decisions where a class is one.
    """
    words, _ = read_words(rng, samples=36)
    blank = (words.argmax(-1)[:, 0] == BLANK).reshape(36, STEPS)
    quiet = blank[:, :-2] & blank[:, 1:-1] & blank[:, 2:]  # a blank between two blanks
    middles = [word * STEPS + 1 + int(np.argmax(quiet[word])) for word in range(36)]
    reference = dataclasses.replace(fidelity.as_outputs([words]), samples=36)
    for changed_words, passes in ((1, True), (2, False)):
        changed = words.copy()
        for step in middles[:changed_words]:  # a character read where none was
            changed[step, 0, 3] = words[step, 0].max() + 1.0
        metrics = fidelity.compare(reference, fidelity.as_outputs([changed]))
        assert metrics.string_agreement == 1.0 - changed_words / 36
        assert not fidelity.DEFAULT_GATE.failures(metrics) == passes
    assert fidelity.DEFAULT_GATE.min_string_agreement == 0.95 < fidelity.DEFAULT_GATE.min_top1


def test_close_calls_that_would_change_a_string_still_predict_flips(rng):
    """No string changed here, but strings would on new inputs.

    Some steps that would insert a character are close calls, and the candidate moves the clear
    winners' gaps by 0.5.
    """
    words, edges = read_words(rng)
    blanks = np.flatnonzero(~edges & (words.argmax(-1)[:, 0] == BLANK))
    close = blanks[:: len(blanks) // 10]
    words[close, 0, 7] = words[close, 0, BLANK] - 0.1  # ... a character nearly read
    moved = words.copy()
    others = np.setdiff1d(np.flatnonzero(~edges), close)  # clear winners only
    moved[others, 0, :] -= 0.5 * (np.arange(CLASSES) == words[others, 0].argmax(-1)[:, None])
    assert np.all(moved.argmax(-1) == words.argmax(-1))
    agreement = judged(words, moved)
    assert agreement is not None and agreement < 0.9


def stacked_reader(rng: np.random.Generator) -> ir.Model:
    """x [1, steps, 8] -> MatMul [8, classes] -> Transpose -> [steps, 1, classes], batch 1."""
    weight = (rng.standard_normal((8, CLASSES)) * 0.1).astype(np.float32)
    weight[:, BLANK] += 1.0  # the blank wins wherever x leans positive
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["scores"]),
            helper.make_node("Transpose", ["scores"], ["steps"], perm=[1, 0, 2]),
        ],
        "reader",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, STEPS, 8])],
        [helper.make_tensor_value_info("steps", TensorProto.FLOAT, [STEPS, 1, CLASSES])],
        [numpy_helper.from_array(weight, "w")],
    )
    return ir.from_proto(finish(graph))


def test_a_batch_one_model_is_read_per_sample_through_onnxruntime(rng):
    """Probes run one sample at a time and stack; the gate still reads each sample's string."""
    model = stacked_reader(rng)
    x = (rng.standard_normal((SAMPLES, STEPS, 8)) + 0.3).astype(np.float32)
    reference = fidelity.run(model, {"x": x})
    assert reference.values[0].shape == (SAMPLES * STEPS, 1, CLASSES)
    assert ctc.blank_class(reference.scores[0], reference.samples) == BLANK
    assert fidelity.compare(reference, fidelity.run(model, {"x": x})).string_agreement == 1.0
    broken = model.clone()
    broken.graph.initializers["w"].const_value = ir.tensor(
        -np.asarray(model.graph.initializers["w"].const_value.numpy()), name="w"
    )
    agreement = fidelity.compare(reference, fidelity.run(broken, {"x": x})).string_agreement
    assert agreement is not None and agreement < 0.5


def test_a_step_is_said_decided_by_the_metrics_it_has(rng):
    """A CTC reader's report names string agreement, not top-1; a classifier's the reverse."""
    model = stacked_reader(rng)
    x = (rng.standard_normal((SAMPLES, STEPS, 8)) + 0.3).astype(np.float32)
    loose = fidelity.Gate(min_cosine=0.5, min_rank_correlation=None, min_top1=0.0,
                          min_string_agreement=0.0)  # both decision bounds set, both pass
    step = Step(pass_name="codebook.kmeans", options={"bits": 4, "min_params": 0}, gate=loose)
    (result,) = run_steps(model, [step], data={"x": x}).steps
    assert "string_agreement" in result.decided_by and "top1" not in result.decided_by
    classifier = mlp(rng, (8, 16, 10))
    data = {"x": rng.standard_normal((32, 8)).astype(np.float32)}
    (result,) = run_steps(classifier, [step], data=data).steps
    assert "top1" in result.decided_by and "string_agreement" not in result.decided_by


@pytest.mark.parametrize(
    ("samples", "verified"),
    [(36, 35 / 36), (400, 0.9875), (10, 0.95), (None, 0.9875)],
)
def test_the_verified_string_bar_never_asks_every_word_to_stay(samples, verified):
    """0.95 with 0.75 of its headroom held back is 0.9875: 36 of 36 words. 35 of 36 is asked.

    Never below the bar itself (10 words at 0.95 still ask all 10).
    """
    gate = fidelity.DEFAULT_GATE.tightened(0.75, samples)
    assert gate.min_string_agreement == pytest.approx(verified)
    assert gate.min_top1 == pytest.approx(0.9975)  # classes: 0.75 of the headroom, as before


def test_a_pipeline_step_verifies_strings_over_its_probe_samples(rng):
    """36 words: one may read differently after the step, two may not."""
    step = Step(pass_name="codebook.kmeans", options={"bits": 8})
    assert step.verified_gate_on(36).min_string_agreement == 35 / 36
