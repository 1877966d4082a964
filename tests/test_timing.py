"""The one timing helper: alternation, warm-up, and the do-nothing model for the call overhead."""

from __future__ import annotations

import numpy as np

from onnxcompress import runtime
from onnxcompress.timing import call_overhead_model, interleaved_medians
from tests.builders import mlp_proto


class Recorder:
    """A stand-in session that records the order of calls (the order is what is under test)."""

    def __init__(self, name: str, calls: list[str]) -> None:
        self.name, self.calls = name, calls

    def run(self, names, feeds):
        self.calls.append(self.name)
        return []


def test_sessions_are_timed_alternately_after_a_warm_up():
    calls: list[str] = []
    medians = interleaved_medians(
        [Recorder("a", calls), Recorder("b", calls)],
        {"x": np.zeros(1)},
        repeats=3,
        warmup=1,
        cold_cache=True,
    )
    assert calls == ["a", "b"] * 4  # one warm-up round, then three timed rounds, A, B, A, B, ...
    assert len(medians) == 2 and all(seconds >= 0 for seconds in medians)


def test_the_call_overhead_model_takes_the_models_input_and_computes_nothing(rng):
    model = mlp_proto(rng, (16, 8, 4))
    x = rng.standard_normal((3, 16)).astype(np.float32)
    (out,) = runtime.session(call_overhead_model(model)).run(None, {model.graph.input[0].name: x})
    np.testing.assert_array_equal(out, x)
