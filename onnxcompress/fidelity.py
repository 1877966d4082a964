"""Fidelity: how far a compressed model's outputs drift from the ORIGINAL model's.

Probe inputs come from the user's data or are drawn (seeded) from the input signature,
with symbolic dimensions resolved. Reference outputs are computed once, on the model as
loaded, and every step is compared against them, so drift cannot accumulate unseen.

Metrics over all float outputs, flattened and concatenated:
  cosine = <a, b> / (|a| |b|),  rel_l2 = |a - b| / |a|,  max_abs = max |a - b|,
  top1_agreement = share of samples whose arg-max over the last axis of the first
  output is unchanged (classification models; None when the output is not 2-D or more).
"""

from __future__ import annotations

__all__ = ["Metrics", "Gate", "probe_inputs", "run_model", "compare"]

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pydantic

from onnxcompress import runtime
from onnxcompress.data import LABELS, model_inputs
from onnxcompress.errors import UnsupportedModelError

_NUMPY_DTYPES = {
    ir.DataType.FLOAT: np.float32,
    ir.DataType.DOUBLE: np.float64,
    ir.DataType.FLOAT16: np.float16,
    ir.DataType.INT64: np.int64,
    ir.DataType.INT32: np.int32,
    ir.DataType.BOOL: np.bool_,
    ir.DataType.UINT8: np.uint8,
    ir.DataType.INT8: np.int8,
}


@dataclasses.dataclass(frozen=True)
class Metrics:
    cosine: float
    rel_l2: float
    max_abs: float
    top1_agreement: float | None

    def to_dict(self) -> dict[str, float | None]:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        top1 = "n/a" if self.top1_agreement is None else f"{self.top1_agreement:.3f}"
        return f"cosine={self.cosine:.6f} rel_l2={self.rel_l2:.3g} max_abs={self.max_abs:.3g} top1={top1}"


class Gate(pydantic.BaseModel):
    """Thresholds a step's outputs must meet against the original model's."""

    model_config = pydantic.ConfigDict(frozen=True, extra="forbid")

    min_cosine: float | None = pydantic.Field(0.99, ge=-1, le=1, description="Lowest cosine similarity allowed.")
    max_rel_l2: float | None = pydantic.Field(None, ge=0, description="Highest relative L2 error allowed.")
    max_abs: float | None = pydantic.Field(None, ge=0, description="Highest absolute difference allowed.")
    min_top1: float | None = pydantic.Field(None, ge=0, le=1, description="Lowest top-1 agreement allowed.")

    def failures(self, metrics: Metrics) -> list[str]:
        """Human-readable reasons the metrics miss this gate (empty when they pass)."""
        failed = []
        if metrics.cosine != metrics.cosine:  # NaN: non-finite outputs fail every gate
            return ["outputs are not finite where the original's are (NaN or inf)"]
        if self.min_cosine is not None and not metrics.cosine >= self.min_cosine:
            failed.append(f"cosine {metrics.cosine:.6f} < {self.min_cosine}")
        if self.max_rel_l2 is not None and not metrics.rel_l2 <= self.max_rel_l2:
            failed.append(f"rel_l2 {metrics.rel_l2:.4g} > {self.max_rel_l2}")
        if self.max_abs is not None and not metrics.max_abs <= self.max_abs:
            failed.append(f"max_abs {metrics.max_abs:.4g} > {self.max_abs}")
        if self.min_top1 is not None and metrics.top1_agreement is not None and not metrics.top1_agreement >= self.min_top1:
            failed.append(f"top1_agreement {metrics.top1_agreement:.4f} < {self.min_top1}")
        return failed


def _index_bound(model: ir.Model, value: ir.Value) -> int:
    """Exclusive upper bound for an integer input: the smallest table it indexes, else 10."""
    bounds = [
        int(node.inputs[0].const_value.shape[node.attributes.get_int("axis", 0)])
        for node in value.consumers()
        if node.op_type == "Gather" and node.inputs[0] is not None and node.inputs[0].const_value is not None
        and node.inputs[1] is value
    ]
    return min(bounds) if bounds else 10


def probe_inputs(
    model: ir.Model,
    *,
    count: int = 8,
    seed: int = 0,
    data: Mapping[str, np.ndarray] | None = None,
    dims: Mapping[str, int] | None = None,
) -> dict[str, np.ndarray]:
    """Inputs to compare models on: the first `count` samples of `data`, or seeded random ones.

    Symbolic dimensions take `dims[name]` when given; the first axis takes `count`; any other
    symbolic dimension takes 8.
    """
    batch = fixed_batch(model)  # a model exported for batch B gets whole batches, run B at a time
    if data is not None:
        rows = max(batch, count // batch * batch) if batch else count
        return {name: np.asarray(array[:rows]) for name, array in data.items() if name != LABELS}
    rng = np.random.default_rng(seed)
    dims = dict(dims or {})
    rows = max(batch, -(-count // batch) * batch) if batch else None
    probes = {}
    for value in model_inputs(model):
        shape = []
        for axis, dim in enumerate(value.shape or ()):
            if axis == 0 and rows is not None:
                shape.append(rows)
            elif isinstance(dim, int):
                shape.append(dim)
            elif dim is not None and dim.value in dims:
                shape.append(dims[dim.value])
            else:
                shape.append(count if axis == 0 else 8)
        _check_probe_size(value.name, shape)
        dtype = _NUMPY_DTYPES.get(value.dtype, np.float32)
        if np.issubdtype(dtype, np.floating):
            probes[value.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            probes[value.name] = np.asarray(rng.random(shape) < 0.5)  # a 0-d draw is a numpy scalar
        else:
            probes[value.name] = rng.integers(0, _index_bound(model, value), size=shape).astype(dtype)
    return probes


#: Values in one drawn probe tensor (256 MiB of float32): a model may declare any fixed size.
MAX_PROBE_VALUES = 1 << 26


def _check_probe_size(name: str, shape: list[int]) -> None:
    """Refuse, before allocating, a probe a huge fixed dimension (or --batch) would make."""
    values = int(np.prod(shape, dtype=object)) if shape else 1
    if values > MAX_PROBE_VALUES:
        raise UnsupportedModelError(
            f"input {name!r}: a probe of shape {shape} would hold {values:,} values, over the cap of "
            f"{MAX_PROBE_VALUES:,}; give real samples with --data (or a smaller --batch)"
        )


def fixed_batch(model: ir.Model) -> int | None:
    """The batch size every input fixes on its first axis (a model exported for batch 1), or None."""
    firsts = {v.shape[0] if v.shape and isinstance(v.shape[0], int) else None for v in model_inputs(model)}
    return firsts.pop() if len(firsts) == 1 and None not in firsts else None


def _in_batches(session: ort.InferenceSession, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray] | None:
    """Outputs over `inputs` run batch by batch, when the session fixes a smaller batch size."""
    firsts = {i.shape[0] if i.shape and isinstance(i.shape[0], int) else None for i in session.get_inputs()}
    counts = {np.shape(a)[0] if np.ndim(a) else None for a in inputs.values()}
    if len(firsts) != 1 or len(counts) != 1:
        return None
    batch, count = firsts.pop(), counts.pop()
    if batch is None or count is None or count == batch or count % batch:
        return None
    runs = [session.run(None, {k: v[i : i + batch] for k, v in inputs.items()}) for i in range(0, count, batch)]
    return [np.concatenate(parts) for parts in zip(*runs, strict=True)]


def run_model(model: str | bytes, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """All outputs of `model` on `inputs`, through onnxruntime with our kernels registered.

    A model with a fixed batch size runs the probes one batch at a time.
    """
    session = runtime.session(model)
    try:
        batched = _in_batches(session, inputs)
        return batched if batched is not None else session.run(None, dict(inputs))
    except runtime.ORT_ERRORS as error:
        raise UnsupportedModelError(f"onnxruntime cannot run the model: {str(error).splitlines()[0]}") from None


def _float_outputs(outputs: Sequence[np.ndarray]) -> list[np.ndarray]:
    return [np.asarray(o, dtype=np.float64) for o in outputs if np.issubdtype(np.asarray(o).dtype, np.floating)]


def compare(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> Metrics:
    """Metrics of `candidate` outputs against `reference` outputs (same order and shapes)."""
    if len(reference) != len(candidate):
        raise ValueError(f"output count differs: {len(reference)} vs {len(candidate)}")
    for index, (r, c) in enumerate(zip(reference, candidate, strict=True)):
        if np.shape(r) != np.shape(c):
            raise ValueError(f"output {index} shape differs: {np.shape(r)} vs {np.shape(c)}")
    ref_floats, cand_floats = _float_outputs(reference), _float_outputs(candidate)
    if not ref_floats:
        exact = all(np.array_equal(r, c) for r, c in zip(reference, candidate, strict=True))
        return Metrics(1.0 if exact else 0.0, 0.0 if exact else 1.0, 0.0 if exact else float("inf"), None)
    a = np.concatenate([r.ravel() for r in ref_floats])
    b = np.concatenate([c.ravel() for c in cand_floats])
    finite_a, finite_b = np.isfinite(a), np.isfinite(b)
    if not np.array_equal(finite_a, finite_b):  # NaN/inf where the original had none, or the reverse
        return Metrics(float("nan"), float("inf"), float("inf"), None)
    a, b = a[finite_a], b[finite_b]  # both non-finite at the same places (e.g. Log of a negative probe)
    norm_a, norm_b = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    diff = float(np.linalg.norm(a - b))
    if norm_a == 0.0 and norm_b == 0.0:
        cosine = 1.0
    elif norm_a == 0.0 or norm_b == 0.0:
        cosine = 0.0
    else:
        cosine = float(np.dot(a, b) / (norm_a * norm_b))
    rel_l2 = diff / norm_a if norm_a > 0 else (0.0 if diff == 0 else float("inf"))
    max_abs = float(np.max(np.abs(a - b))) if a.size else 0.0
    first_ref, first_cand = ref_floats[0], cand_floats[0]
    top1 = None
    if first_ref.ndim >= 2 and first_ref.shape[-1] > 1:
        top1 = float(np.mean(first_ref.argmax(-1) == first_cand.argmax(-1)))
    return Metrics(cosine, rel_l2, max_abs, top1)
