"""Side-by-side comparison of two models: file size, onnxruntime latency, fidelity.

Latency is measured interleaved (A, B, A, B, …) after warm-up, so drift on a shared machine
hits both alike; the median is reported. Fidelity is computed on every sample of the user's
data (or on 64 seeded probes drawn from the first model's signature), not only on the
latency batch; with `labels` in the data, both models' accuracy is reported too.
"""

from __future__ import annotations

__all__ = ["ModelComparison", "compare_models", "file_bytes", "interleaved_latency"]

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from onnxcompress import fidelity, io, runtime
from onnxcompress.data import LABELS, check_label_shape, model_inputs
from onnxcompress.errors import UserError
from onnxcompress.pipeline import reference_probes
from onnxcompress.timing import interleaved_medians

FIDELITY_PROBES = 64  # seeded random samples when no data is given


@dataclasses.dataclass(frozen=True)
class ModelComparison:
    """What `compare` measured for models A and B, ratios A/B so that above 1 favours B."""

    bytes_a: int
    bytes_b: int
    latency_ms_a: float
    latency_ms_b: float
    metrics: fidelity.Metrics
    batch: int
    samples: int = 0
    accuracy_a: float | None = None
    accuracy_b: float | None = None

    @property
    def size_ratio(self) -> float:
        """A's bytes over B's: how many times smaller B is."""
        return self.bytes_a / self.bytes_b

    @property
    def speedup(self) -> float:
        """A's median latency over B's: how many times faster B is."""
        return self.latency_ms_a / self.latency_ms_b


def file_bytes(path: Path) -> int:
    """The model file plus every external-data file it references."""
    model = io.load(path)
    data_files = {
        Path(t.path).resolve() for t in io.iter_tensors(model) if isinstance(t, ir.ExternalTensor)
    }
    return path.stat().st_size + sum(f.stat().st_size for f in data_files)


def _signature(model: ir.Model) -> dict[str, str]:
    return {
        value.name or "": value.dtype.name if value.dtype is not None else "?"
        for value in model_inputs(model)
    }


def _check_same_signature(model_a: ir.Model, model_b: ir.Model, path_a: Path, path_b: Path) -> None:
    """Both models must take the same inputs: each is fed the same probes."""
    inputs_a, inputs_b = _signature(model_a), _signature(model_b)
    if inputs_a != inputs_b:
        raise UserError(f"{path_a} and {path_b} take different inputs ({inputs_a} vs {inputs_b}); "
                        "bench compares a model with its own compressed version")


def _run(
    session: ort.InferenceSession, probes: Mapping[str, np.ndarray], path: Path
) -> list[np.ndarray]:
    try:
        return session.run(None, dict(probes))
    except runtime.ORT_ERRORS as error:
        raise UserError(f"onnxruntime cannot run {path}: {str(error).splitlines()[0]}") from None


def compare_models(
    path_a: Path,
    path_b: Path,
    *,
    batch: int = 1,
    runs: int = 50,
    data: Mapping[str, np.ndarray] | None = None,
    threads: int | None = None,
    input_sizes: Mapping[tuple[str, int], int] | None = None,
) -> ModelComparison:
    """Size, interleaved latency and fidelity of two files with the same signature."""
    model_a, model_b = io.load(path_a), io.load(path_b)
    _check_same_signature(model_a, model_b, path_a, path_b)
    count = len(next(v for k, v in data.items() if k != LABELS)) if data else FIDELITY_PROBES
    samples = reference_probes(model_a, count=count, data=data, input_sizes=input_sizes)
    reference = _outputs(model_a, samples, path_a)
    candidate = _outputs(model_b, samples, path_b, reference.views)
    try:
        metrics = fidelity.compare(reference, candidate)
    except ValueError as error:
        raise UserError(f"{path_a} and {path_b} are not comparable: {error}") from None
    accuracy = [_accuracy(o.values, data) for o in (reference, candidate)]
    sizes = {(name, axis): size for name, array in samples.items()
             for axis, size in enumerate(np.shape(array)) if axis > 0}
    probes = fidelity.probe_inputs(model_a, count=batch, data=data, sizes=sizes)
    sessions = [runtime.session(str(p), threads=threads) for p in (path_a, path_b)]
    for session, path in zip(sessions, (path_a, path_b), strict=True):
        _run(session, probes, path)
    seconds_a, seconds_b = interleaved_medians(sessions, probes, repeats=runs, warmup=3)
    return ModelComparison(
        bytes_a=file_bytes(path_a),
        bytes_b=file_bytes(path_b),
        latency_ms_a=seconds_a * 1e3,
        latency_ms_b=seconds_b * 1e3,
        metrics=metrics,
        batch=batch,
        samples=len(next(iter(samples.values()))) if samples else 0,
        accuracy_a=accuracy[0],
        accuracy_b=accuracy[1],
    )


def interleaved_latency(
    models: Sequence[ir.Model],
    inputs: Mapping[str, np.ndarray],
    *,
    runs: int = 20,
    threads: int | None = 1,
) -> list[float]:
    """Median milliseconds per run of each model on `inputs`, timed A, B, A, B, … after warm-up."""
    sessions = []
    for model in models:
        with io.serialized(model) as model_file:
            sessions.append(runtime.session(model_file, threads=threads))
    return [
        seconds * 1e3 for seconds in interleaved_medians(sessions, inputs, repeats=runs, warmup=3)
    ]


def _outputs(model: ir.Model, samples: Mapping[str, np.ndarray], path: Path,
             views: tuple[fidelity.OutputView, ...] | None = None) -> fidelity.Outputs:
    try:
        return fidelity.run(model, samples, views)
    except UserError as error:
        raise UserError(f"{path}: {error}") from None


def _accuracy(outputs: list[np.ndarray], data: Mapping[str, np.ndarray] | None) -> float | None:
    """Top-1 accuracy of the first output against `labels`, when the data has them."""
    if not data or LABELS not in data or not outputs or np.ndim(outputs[0]) < 2:
        return None
    labels = np.asarray(data[LABELS])
    check_label_shape(labels.shape, np.shape(outputs[0]))
    predicted = np.asarray(outputs[0]).argmax(-1)
    return float(np.mean(predicted[: len(labels)] == labels[: len(predicted)]))
