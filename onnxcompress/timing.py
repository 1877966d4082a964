"""Timing onnxruntime calls against each other, the one way every comparison here is timed.

`bench` (two models), `lowrank --speed` (a node against its factor pair) and `sparse.csr` (dense
MatMul against a sparse kernel) all ask "is B faster than A on this machine?". Load from other
processes hits A and B alike only when they are timed alternately (A, B, A, B, ...) in one
process, after a warm-up (arena allocation, thread-pool start), and compared by medians.

Two corrections are optional. `cold_cache` touches a buffer larger than the last-level cache
before each call, so a small weight is not served from cache on every repeat as it never is
inside a whole model; with `warm_inputs` the feeds are then rewritten, so the input is in cache as
an activation the previous layer has just written would be (weights cold, input warm: how
`sparse.csr` times a Conv layer). `call_overhead_model` is a graph that does nothing: the fixed
cost of a `run` call, which a layer inside a model does not pay, timed so callers can subtract
it.
Only wall-clock time of `run` is measured; tests never assert a time.
"""

from __future__ import annotations

__all__ = ["FLUSH_BYTES", "Runnable", "interleaved_medians", "call_overhead_model"]

import statistics
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import onnx
from onnx import helper

from onnxcompress.io import ir_version_for

FLUSH_BYTES = 96 << 20  # larger than the L3 of the machines we measured on


class Runnable(Protocol):
    """What is timed: an onnxruntime session, or anything with its `run`."""

    def run(self, output_names: Any, input_feed: Mapping[str, Any], /) -> Any:
        """Run the outputs named (None: all) on `input_feed`, as InferenceSession.run does."""


def interleaved_medians(
    sessions: Sequence[Runnable],
    feeds: Mapping[str, np.ndarray],
    *,
    repeats: int,
    warmup: int = 2,
    cold_cache: bool = False,
    warm_inputs: bool = False,
) -> list[float]:
    """Median seconds per `run` of each session on `feeds`, timed A, B, A, B, ... after warm-up."""
    originals = dict(feeds)
    feeds = (
        {name: np.array(array, copy=True) for name, array in originals.items()}
        if warm_inputs
        else originals
    )
    for _ in range(warmup):
        for session in sessions:
            session.run(None, feeds)
    flush = np.zeros(FLUSH_BYTES // 4, dtype=np.float32) if cold_cache else None
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(repeats):
        for index, session in enumerate(sessions):
            if flush is not None:
                flush += 1  # touch every line: evicts the weights from all cache levels
                if warm_inputs:
                    for name, array in feeds.items():
                        array[...] = originals[name]
            started = time.perf_counter()
            session.run(None, feeds)
            times[index].append(time.perf_counter() - started)
    return [statistics.median(values) for values in times]


def call_overhead_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """A model with `model`'s first input that computes nothing (Identity): the cost of a call."""
    source = model.graph.input[0]
    graph = helper.make_graph(
        [helper.make_node("Identity", [source.name], ["nothing"])],
        "call_overhead",
        [source],
        [helper.make_tensor_value_info("nothing", source.type.tensor_type.elem_type, None)],
    )
    overhead = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    overhead.ir_version = ir_version_for(17)
    return overhead
