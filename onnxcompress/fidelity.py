"""Fidelity: how far a compressed model's outputs drift from the ORIGINAL model's.

Reference outputs are computed once, on the model as loaded, and every step is compared
against them, so drift cannot accumulate unseen.

Why not cosine of the outputs alone: a classifier whose softmax saturates gives p = 1.0 to
its class on every input, so a destroyed model that still says "class 0" everywhere keeps
cosine 0.999 and top-1 agreement 1.0. The comparison therefore looks where differences show:

- **Views.** An output produced by Softmax/LogSoftmax (through shape-only ops) is compared on
  the activation's INPUT, the logits, centred along the softmax axis (softmax ignores a shift);
  an output produced by Sigmoid on its log-odds. The graph is read for this; bare arrays that
  look like probabilities (in [0, 1], summing to 1) are compared on their logarithms.
- **Per output.** Each float output is scored on its own and the worst one counts, so a
  small output cannot hide behind a large one.
- **Rank correlation across samples.** For each output column (class, feature), Spearman's
  rho between the original's and the candidate's scores over the probe samples, averaged over
  the columns that vary. A model whose outputs collapse to a constant scores 0.
- **KL divergence** of the candidate's class distribution from the original's (softmax views).
- **Top-1 agreement** on the first softmax output (or a (samples, classes) / (time, 1, classes)
  output): a sample agrees only if all its decisions do.
- **String agreement** in its place where that output is CTC (one class, the blank, wins most
  steps: `onnxcompress.ctc`): a sample agrees when its greedy-decoded string does; step flips
  the decoding collapses away do not count. Its own bar, 0.95 by default: the bar issue 13 set
  for decoded strings, below top-1's 0.99 because a word's reading holds a dozen decisions
  where a class is one, and a near-tie word flips under any rounding (ddddocr: even float16).
- **Box F1** on a YOLO-style detector output (`onnxcompress.detection`): the boxes each model
  reports, matched by class and overlap. It replaces that output's rank correlation, which
  there measures the jitter of thousands of anchor scores no box shows.
- An optional **task metric** (a Python callback on both models' outputs, higher is better).

Non-finite values anywhere (the original's outputs, or the candidate's) fail every gate.
"""

from __future__ import annotations

__all__ = [
    "Metrics", "Gate", "DEFAULT_GATE", "tightened_share", "OutputView", "Outputs", "TaskMetric",
    "output_views", "exposed", "run", "run_model", "compare", "probe_inputs", "fixed_batch",
]

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pydantic
from scipy.stats import rankdata

from onnxcompress import ctc, detection, runtime
from onnxcompress.errors import UnsupportedModelError
from onnxcompress.io import serialized
from onnxcompress.probes import fixed_batch, probe_inputs

#: Higher is better; called with the original's and the candidate's outputs (graph order).
TaskMetric = Callable[[Sequence[np.ndarray], Sequence[np.ndarray]], float]

_SHAPE_ONLY = frozenset({"Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose"})
_MAX_COLUMNS = 4096  # columns scored for rank correlation (evenly spaced beyond that)
_TINY = 1e-30  # probability floor before taking logs


@dataclasses.dataclass(frozen=True)
class OutputView:
    """How one graph output is compared: as is, or on the pre-activation value behind it."""

    output: str
    kind: Literal["values", "logits", "log-odds"]
    source: str  # the value compared: the output itself, or the activation's input
    axis: int | None = None  # logits: the softmax axis (compared up to a shift along it)


@dataclasses.dataclass(frozen=True)
class Outputs:
    """A model's outputs on the probes, and the view each is compared on."""

    values: list[np.ndarray]
    scores: list[np.ndarray]
    views: tuple[OutputView, ...]
    samples: int | None = None  # probe samples behind them (a fixed-batch model's runs are stacked)


@dataclasses.dataclass(frozen=True)
class Metrics:
    """Worst case over the float outputs (per-output figures in `outputs`)."""

    cosine: float
    rel_l2: float
    max_abs: float
    top1_agreement: float | None
    rank_correlation: float | None = None
    kl: float | None = None
    task: float | None = None
    outputs: tuple[dict[str, Any], ...] = ()
    string_agreement: float | None = None  # in place of top1_agreement on a CTC output
    box_f1: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """The metrics as JSON-ready values, for the report files (per-output rows as a list)."""
        return {**dataclasses.asdict(self), "outputs": [dict(o) for o in self.outputs]}

    def __str__(self) -> str:
        def show(value: float | None, spec: str) -> str:
            return "n/a" if value is None else format(value, spec)

        decisions = (f"strings={self.string_agreement:.3f}" if self.string_agreement is not None
                     else f"top1={show(self.top1_agreement, '.3f')}")
        text = (f"cosine={self.cosine:.6f} rank={show(self.rank_correlation, '.4f')} "
                f"{decisions} rel_l2={self.rel_l2:.3g}")
        if self.kl is not None:
            text += f" kl={self.kl:.3g}"
        if self.box_f1 is not None:
            text += f" box_f1={self.box_f1:.4f}"
        return text + (f" task={self.task:.4f}" if self.task is not None else "")


class Gate(pydantic.BaseModel):
    """Thresholds a step's outputs must meet against the original model's.

    The defaults are THE default gate (`DEFAULT_GATE`), the same in `optimize`, in every
    one-pass command and in recipe steps that do not set their own.
    """

    model_config = pydantic.ConfigDict(frozen=True, extra="forbid")

    min_cosine: float | None = pydantic.Field(
        0.99, ge=-1, le=1, description="Lowest cosine of each output (logits for softmax outputs).")
    min_rank_correlation: float | None = pydantic.Field(
        0.98,
        ge=-1,
        le=1,
        description="Lowest rank correlation over samples (catches collapsed outputs).",
    )
    min_top1: float | None = pydantic.Field(
        0.99, ge=0, le=1, description="Lowest top-1 agreement allowed."
    )
    min_string_agreement: float | None = pydantic.Field(
        0.95, ge=0, le=1,
        description="Lowest share of CTC-decoded strings kept (a CTC output's top-1 agreement).")
    max_kl: float | None = pydantic.Field(
        None, ge=0, description="Highest KL divergence of class distributions."
    )
    max_rel_l2: float | None = pydantic.Field(
        None, ge=0, description="Highest relative L2 error allowed."
    )
    max_abs: float | None = pydantic.Field(
        None, ge=0, description="Highest absolute difference allowed."
    )
    min_task: float | None = pydantic.Field(
        None, description="Lowest task metric (a Python callback) allowed."
    )
    min_box_f1: float | None = pydantic.Field(
        0.9,
        ge=0,
        le=1,
        description="Lowest F1 of a detector's boxes against the original's (YOLO-style outputs; "
        "replaces their rank correlation).",
    )

    @classmethod
    def off(cls) -> Gate:
        """No threshold: only non-finite outputs fail (an intermediate step before retraining)."""
        return cls(min_cosine=None, min_rank_correlation=None, min_top1=None,
                   min_string_agreement=None, min_box_f1=None)

    def tightened(self, margin: float, samples: int | None = None) -> Gate:
        """This gate with `margin` of each similarity bound's headroom to 1 held back.

        0.75: cosine >= 0.99 becomes >= 0.9975, rank >= 0.98 becomes >= 0.995. The bounds whose
        ideal is 1 (`TIGHTENED`) move; task and error bounds have no such scale and stay, and so
        does a bound at its metric's lowest value (`--min-top1 0`: no check asked for). The
        string bar moves too, but never past all but one of `samples` (`tightened_share`).
        """
        update = {
            name: bound + (1.0 - bound) * margin
            for name, lowest in TIGHTENED.items()
            if (bound := getattr(self, name)) is not None and lowest < bound < 1.0
        }
        if (strings := self.min_string_agreement) is not None and 0.0 < strings < 1.0:
            update["min_string_agreement"] = tightened_share(strings, margin, samples)
        return self.model_copy(update=update)

    def failures(self, metrics: Metrics) -> list[str]:
        """Why the metrics miss this gate, each naming its metric (empty when they pass)."""
        if not math.isfinite(metrics.cosine):
            return ["outputs are not finite (NaN or inf), or the original's are not"]
        failed = []
        for field, (name, sign) in BOUNDS.items():
            value, bound = getattr(metrics, name), getattr(self, field)
            if bound is None or value is None:
                continue
            if not (value >= bound if sign > 0 else value <= bound):  # NaN fails too
                failed.append(f"{name} {value:.6g} {'<' if sign > 0 else '>'} {bound}")
        return failed


DEFAULT_GATE = Gate()

#: Each bound of a `Gate`: the `Metrics` field it bounds and how (+1: at least, -1: at most).
BOUNDS: dict[str, tuple[str, int]] = {
    "min_cosine": ("cosine", 1),
    "min_rank_correlation": ("rank_correlation", 1),
    "min_top1": ("top1_agreement", 1),
    "min_string_agreement": ("string_agreement", 1),
    "min_task": ("task", 1),
    "min_box_f1": ("box_f1", 1),
    "max_kl": ("kl", -1),
    "max_rel_l2": ("rel_l2", -1),
    "max_abs": ("max_abs", -1),
}


def tightened_share(bound: float, margin: float, samples: int | None) -> float:
    """A CTC string bar with `margin` of its headroom held back, short of every sample.

    Agreement over n words moves in steps of 1/n; a bar above (n - 1) / n asks that no word
    change, and a word the original reads on a near tie flips under any rounding (ddddocr: one
    of 36 at gap 0.024, float16 included), so it would refuse every compressed model. 0.95 with
    0.75 held back is 0.9875; over 36 words, 35/36. Never below `bound`.
    """
    tightened = bound + (1.0 - bound) * margin
    if samples is None or samples < 2:
        return tightened
    return max(bound, min(tightened, (samples - 1) / samples))

#: The bounds `Gate.tightened` moves, similarities whose ideal value is 1, with their lowest.
TIGHTENED = {"min_cosine": -1.0, "min_rank_correlation": -1.0, "min_top1": 0.0, "min_box_f1": 0.0}

#: Share of each similarity bound's headroom every gated step is verified with held back
#: (`pipeline.Step.margin`). A step's result is chosen because it passed on the probes (a pruning
#: rung, a searched bit width, a rank): checked at the bare bar, it may miss it on other inputs.
#: On silero-vad, a pruning rung at rank correlation 0.985 on the calibration chunks held 0.978
#: on other speech; on open-nsfw a searched codebook at 0.985 held 0.975 on other images.
MARGIN = 0.75


# --- views: which value each output is compared on ---------------------------------------------


def _opset(model: ir.Model) -> int:
    return model.opset_imports.get("", model.opset_imports.get("ai.onnx", 13))


def _view(model: ir.Model, output: ir.Value) -> OutputView:
    plain = OutputView(output.name or "", "values", output.name or "")
    value = output
    while (node := value.producer()) is not None and node.op_type in _SHAPE_ONLY and node.inputs \
            and node.inputs[0] is not None:
        value = node.inputs[0]
    node = value.producer()
    if (
        node is None
        or node.domain not in ("", "ai.onnx")
        or not node.inputs
        or node.inputs[0] is None
    ):
        return plain
    source = node.inputs[0]
    if source.is_graph_input() or not source.name or source.graph is not model.graph:
        return plain
    if node.op_type in ("Softmax", "LogSoftmax"):
        default_axis = -1 if _opset(model) >= 13 else 1
        return OutputView(
            output.name or "", "logits", source.name, node.attributes.get_int("axis", default_axis)
        )
    if node.op_type == "Sigmoid":
        return OutputView(output.name or "", "log-odds", source.name)
    return plain


def output_views(model: ir.Model) -> tuple[OutputView, ...]:
    """One view per graph output, read from the graph (softmax/sigmoid walked back)."""
    return tuple(_view(model, output) for output in model.graph.outputs)


@contextlib.contextmanager
def exposed(model: ir.Model, names: Sequence[str]) -> Iterator[list[str]]:
    """Temporarily add the named main-graph values as graph outputs; yield those found."""
    by_name = {v.name: v for node in model.graph for v in node.outputs if v.name}
    present = {v.name for v in model.graph.outputs}
    added = [by_name[n] for n in dict.fromkeys(names) if n in by_name and n not in present]
    model.graph.outputs.extend(added)
    try:
        yield [v.name or "" for v in added]
    finally:
        for value in added:
            model.graph.outputs.remove(value)


def run(model: ir.Model, probes: Mapping[str, np.ndarray],
        views: Sequence[OutputView] | None = None) -> Outputs:
    """Outputs of `model` on `probes`, with the pre-activation values its views compare.

    `views` default to the model's own; the pipeline passes the ORIGINAL's, so a candidate is
    compared on the same values.
    """
    views = tuple(views) if views is not None else output_views(model)
    count = len(model.graph.outputs)
    with exposed(model, [v.source for v in views if v.kind != "values"]) as extra:
        with serialized(model) as model_file:
            arrays = run_model(model_file, probes)
    values, sources = list(arrays[:count]), dict(zip(extra, arrays[count:], strict=True))
    scores = [
        _score(view, value, sources.get(view.source))
        for view, value in zip(views, values, strict=False)
    ]
    return Outputs(values, scores, views, _sample_count(probes))


def _sample_count(probes: Mapping[str, np.ndarray]) -> int | None:
    counts = {np.shape(a)[0] for a in probes.values() if np.ndim(a)}
    return counts.pop() if len(counts) == 1 else None


def _score(view: OutputView, value: np.ndarray, source: np.ndarray | None) -> np.ndarray:
    """The array compared for one output: its logits (centred), log-odds, or itself."""
    array = np.asarray(value)
    if not np.issubdtype(array.dtype, np.floating) or view.kind == "values":
        return array
    if view.kind == "logits":
        logits = (
            np.asarray(source, np.float64)
            if source is not None
            else np.log(np.maximum(array, _TINY))
        )
        axis = view.axis if source is not None else -1
        return _centred(logits, axis)
    if source is not None:
        return np.asarray(source, np.float64)
    p = np.clip(np.asarray(array, np.float64), _TINY, 1 - 1e-16)
    return np.log(p) - np.log1p(-p)


def _centred(logits: np.ndarray, axis: int | None) -> np.ndarray:
    if axis is None or logits.ndim == 0 or not -logits.ndim <= axis < logits.ndim:
        return logits
    with np.errstate(invalid="ignore"):
        return logits - logits.mean(axis=axis, keepdims=True)


def _looks_like_probabilities(array: np.ndarray) -> bool:
    if (
        array.ndim < 1
        or array.shape[-1] < 2
        or not np.issubdtype(array.dtype, np.floating)
        or not array.size
    ):
        return False
    finite = np.isfinite(array).all()
    return bool(finite and array.min() >= 0 and array.max() <= 1
                and np.allclose(array.sum(-1, dtype=np.float64), 1.0, atol=1e-3))


def as_outputs(arrays: Sequence[np.ndarray]) -> Outputs:
    """Bare output arrays as `Outputs`: probabilities (rows summing to 1) compared on their logs."""
    views = tuple(
        OutputView(str(i), "logits", str(i), -1)
        if _looks_like_probabilities(np.asarray(a))
        else OutputView(str(i), "values", str(i))
        for i, a in enumerate(arrays)
    )
    values = [np.asarray(a) for a in arrays]
    return Outputs(values, [_score(v, a, None) for v, a in zip(views, values, strict=True)], views)


# --- running -----------------------------------------------------------------------------------


def _in_batches(
    session: ort.InferenceSession, inputs: Mapping[str, np.ndarray]
) -> list[np.ndarray] | None:
    """Outputs over `inputs` run batch by batch, when the session fixes a smaller batch size."""
    firsts = {
        i.shape[0] if i.shape and isinstance(i.shape[0], int) else None
        for i in session.get_inputs()
    }
    counts = {np.shape(a)[0] if np.ndim(a) else None for a in inputs.values()}
    if len(firsts) != 1 or len(counts) != 1:
        return None
    batch, count = firsts.pop(), counts.pop()
    if batch is None or count is None or count == batch or count % batch:
        return None
    runs = [
        session.run(None, {k: v[i : i + batch] for k, v in inputs.items()})
        for i in range(0, count, batch)
    ]
    return [np.concatenate(parts) for parts in zip(*runs, strict=True)]


def run_model(model: runtime.ModelLike, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """All outputs of `model` on `inputs`, through onnxruntime with our kernels registered.

    A model with a fixed batch size runs the probes one batch at a time.
    """
    session = runtime.session(model)
    try:
        batched = _in_batches(session, inputs)
        return batched if batched is not None else session.run(None, dict(inputs))
    except runtime.ORT_ERRORS as error:
        raise UnsupportedModelError(
            f"onnxruntime cannot run the model: {str(error).splitlines()[0]}"
        ) from None


# --- metrics -----------------------------------------------------------------------------------


def _norm(a: np.ndarray) -> float:
    """The 2-norm summed by numpy's pairwise sum.

    Unlike BLAS (np.linalg.norm, np.dot), the same bits whatever the thread count, so a metric is
    the same on every worker.
    """
    return math.sqrt(float(np.sum(np.square(a, dtype=np.float64))))


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    norm_a, norm_b = _norm(a), _norm(b)
    if norm_a == 0.0 and norm_b == 0.0:
        return 1.0
    if norm_a == 0.0 or norm_b == 0.0:
        return 0.0
    return float(np.sum(np.multiply(a, b, dtype=np.float64)) / (norm_a * norm_b))


def _columns(array: np.ndarray) -> np.ndarray:
    """Samples x columns (at most _MAX_COLUMNS, evenly spaced), as float64."""
    flat = np.asarray(array, np.float64).reshape(array.shape[0], -1)
    if flat.shape[1] > _MAX_COLUMNS:
        flat = flat[:, np.linspace(0, flat.shape[1] - 1, _MAX_COLUMNS).astype(np.int64)]
    return flat


def rank_correlation(reference: np.ndarray, candidate: np.ndarray) -> float | None:
    """Mean Spearman rho over output columns, across samples; None when nothing varies.

    Columns constant in the original are skipped; a candidate column that is constant where
    the original's varies scores 0. With fewer than 3 samples, rho over all the values.
    """
    if reference.ndim == 0 or reference.shape[0] < 3:
        ref, cand = reference.reshape(-1, 1), candidate.reshape(-1, 1)
    else:
        ref, cand = _columns(reference), _columns(candidate)
    varying = np.ptp(ref, axis=0) > 0
    if not varying.any():
        return None
    ranks_ref = rankdata(ref[:, varying], axis=0)
    ranks_cand = rankdata(cand[:, varying], axis=0)
    ranks_ref -= ranks_ref.mean(axis=0)
    ranks_cand -= ranks_cand.mean(axis=0)
    norms = np.linalg.norm(ranks_ref, axis=0) * np.linalg.norm(ranks_cand, axis=0)
    dots = (ranks_ref * ranks_cand).sum(axis=0)
    rho = np.divide(dots, norms, out=np.zeros_like(dots), where=norms > 0)
    return float(rho.mean())


def _kl(reference: np.ndarray, candidate: np.ndarray, axis: int) -> float:
    """Mean KL(p_ref || p_cand) of the softmax distributions along `axis`."""
    log_p = reference - _logsumexp(reference, axis)
    log_q = candidate - _logsumexp(candidate, axis)
    return float(np.mean(np.sum(np.exp(log_p) * (log_p - log_q), axis=axis)))


def _logsumexp(x: np.ndarray, axis: int) -> np.ndarray:
    peak = x.max(axis=axis, keepdims=True)
    return peak + np.log(np.exp(x - peak).sum(axis=axis, keepdims=True))


def _output_metrics(view: OutputView, ref_value: np.ndarray, cand_value: np.ndarray,
                    ref_score: np.ndarray, cand_score: np.ndarray) -> dict[str, Any]:
    a, b = np.asarray(ref_score, np.float64), np.asarray(cand_score, np.float64)
    if not (np.isfinite(a).all() and np.isfinite(b).all()
            and np.isfinite(np.asarray(ref_value, np.float64)).all()
            and np.isfinite(np.asarray(cand_value, np.float64)).all()):
        nan = float("nan")
        return {"output": view.output, "view": view.kind, "cosine": nan, "rel_l2": float("inf"),
                "max_abs": float("inf"), "rank_correlation": nan, "kl": None, "box_f1": None}
    norm_a = _norm(a)
    diff = _norm(a - b)
    rel_l2 = diff / norm_a if norm_a > 0 else (0.0 if diff == 0 else float("inf"))
    raw_diff = np.abs(np.asarray(ref_value, np.float64) - np.asarray(cand_value, np.float64))
    kl = (
        _kl(a, b, view.axis) if view.kind == "logits" and view.axis is not None and a.ndim else None
    )
    f1 = detection.box_f1(ref_value, cand_value) if view.kind == "values" else None
    return {
        "output": view.output,
        "view": view.kind,
        "cosine": _cosine(a.ravel(), b.ravel()),
        "rel_l2": rel_l2,
        "max_abs": float(raw_diff.max()) if raw_diff.size else 0.0,
        "rank_correlation": rank_correlation(a, b) if f1 is None else None,
        "kl": kl,
        "box_f1": f1,
    }


def _check_comparable(reference: Outputs, candidate: Outputs) -> None:
    if len(reference.values) != len(candidate.values):
        raise ValueError(
            f"output count differs: {len(reference.values)} vs {len(candidate.values)}"
        )
    for index, (r, c) in enumerate(zip(reference.values, candidate.values, strict=True)):
        if np.shape(r) != np.shape(c):
            raise ValueError(f"output {index} shape differs: {np.shape(r)} vs {np.shape(c)}")


def compare(
    reference: Outputs | Sequence[np.ndarray],
    candidate: Outputs | Sequence[np.ndarray],
    *,
    task: TaskMetric | None = None,
) -> Metrics:
    """Metrics of `candidate` against `reference` (same outputs, same order and shapes)."""
    reference = reference if isinstance(reference, Outputs) else as_outputs(reference)
    candidate = candidate if isinstance(candidate, Outputs) else as_outputs(candidate)
    _check_comparable(reference, candidate)
    rows = [
        _output_metrics(view, rv, cv, rs, cs)
        for view, rv, cv, rs, cs in zip(reference.views, reference.values, candidate.values,
                                        reference.scores, candidate.scores, strict=False)
        if np.issubdtype(np.asarray(rv).dtype, np.floating)
    ]
    task_score = float(task(reference.values, candidate.values)) if task is not None else None
    if not rows:
        exact = all(
            np.array_equal(r, c) for r, c in zip(reference.values, candidate.values, strict=True)
        )
        return Metrics(
            1.0 if exact else 0.0,
            0.0 if exact else 1.0,
            0.0 if exact else float("inf"),
            None,
            task=task_score,
        )
    ranks = [r["rank_correlation"] for r in rows if r["rank_correlation"] is not None]
    kls = [r["kl"] for r in rows if r["kl"] is not None]
    f1s = [r["box_f1"] for r in rows if r["box_f1"] is not None]
    cosines = [r["cosine"] for r in rows]
    agreement, on_strings = _top1(reference, candidate)
    return Metrics(
        cosine=float("nan") if any(c != c for c in cosines) else min(cosines),
        rel_l2=max(r["rel_l2"] for r in rows),
        max_abs=max(r["max_abs"] for r in rows),
        top1_agreement=None if on_strings else agreement,
        rank_correlation=min(ranks) if ranks else None,
        kl=max(kls) if kls else None,
        task=task_score,
        outputs=tuple(rows),
        string_agreement=agreement if on_strings else None,
        box_f1=min(f1s) if f1s else None,
    )


def _top1(reference: Outputs, candidate: Outputs) -> tuple[float | None, bool]:
    """(share of samples whose decisions ALL stay the same, whether read as CTC strings).

    Scored on the first softmax output (its class axis); else on a first float output of shape
    (samples, classes), or (time, 1, classes) as CTC sequence models emit their logits. None
    otherwise: the arg-max over a detector's anchors is no class. The lower of the observed share
    and the share predicted from the decision margins (`_predicted_agreement`) counts. A
    (time, 1, classes) output whose blank `ctc.blank_class` finds is scored on its decoded strings
    (`_string_agreement`, reported as `Metrics.string_agreement`); without one, a sample agrees
    only if every time step does.
    """
    pairs = list(zip(reference.views, reference.scores, candidate.scores, strict=True))
    for view, ref, cand in pairs:
        if (
            view.kind == "logits"
            and view.axis is not None
            and np.ndim(ref) >= 1
            and np.shape(ref)[view.axis] > 1
        ):
            ref, cand = (
                np.moveaxis(np.asarray(ref), view.axis, -1),
                np.moveaxis(np.asarray(cand), view.axis, -1),
            )
            return _decision_agreement(ref, cand, reference.samples)
    floats = [
        (np.asarray(r), np.asarray(c))
        for _, r, c in pairs
        if np.issubdtype(np.asarray(r).dtype, np.floating)
    ]
    if not floats:
        return None, False
    ref, cand = floats[0]
    if ref.shape[-1] > 1 and (ref.ndim == 2 or (ref.ndim == 3 and ref.shape[1] == 1)):
        return _decision_agreement(ref, cand, reference.samples)
    return None, False


def _decision_agreement(
    ref: np.ndarray, cand: np.ndarray, samples: int | None
) -> tuple[float, bool]:
    blank = ctc.blank_class(ref, samples)
    if blank is not None and samples is not None:
        return _string_agreement(ref, cand, samples, blank), True
    observed = _agreement(ref.argmax(-1), cand.argmax(-1), samples)
    return min(observed, _predicted_agreement(ref, cand, samples)), False


def _margins(ref: np.ndarray, cand: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row: the original's top-1 minus top-2 score (gap), its change, the runner-up class.

    The change is the absolute change of that difference in the candidate; the runner-up is
    where a flip would go.
    """
    rows = ref.reshape(-1, ref.shape[-1]).astype(np.float64)
    moved = cand.reshape(-1, cand.shape[-1]).astype(np.float64)
    order = np.argsort(rows, axis=-1)
    top, second = order[:, -1], order[:, -2]
    index = np.arange(rows.shape[0])
    gap = rows[index, top] - rows[index, second]
    change = np.abs((moved[index, top] - moved[index, second]) - gap)
    return gap, change, second


def _flip_rate(gaps: np.ndarray, changes: np.ndarray) -> float:
    """P(g < |d|) with every gap paired with every change, as if they were independent."""
    if not gaps.size or not changes.size:
        return 0.0
    return float(np.mean(np.searchsorted(np.sort(gaps), changes, side="left"))) / gaps.size


def _predicted_agreement(ref: np.ndarray, cand: np.ndarray, samples: int | None) -> float:
    """Agreement expected on inputs like these but unseen, from the decision margins.

    A decision flips where the change d of the gap between the original's top-1 and top-2 scores
    exceeds the gap g. Pairing every gap with every change (as if they were independent) gives the
    flip rate e = P(g < |d|) from all rows at once, so a few dozen samples of a sequence model
    resolve rates far below 1/samples; a sample of r rows keeps all its decisions with (1 - e)^r.
    """
    gap, change, _ = _margins(ref, cand)
    flips = _flip_rate(gap, change)
    per_sample = gap.size // samples if samples and gap.size % samples == 0 else 1
    return float((1.0 - flips) ** per_sample)


def _string_agreement(ref: np.ndarray, cand: np.ndarray, samples: int, blank: int) -> float:
    """Share of samples whose greedy CTC reading stays the same (observed or predicted: lower).

    Observed: the decoded label sequences compared (`ctc`). Predicted as for other decisions,
    counting only the steps whose flip to their runner-up would change the reading: their
    gaps are paired with every step's change, and a sample keeps its string with (1 - e)^r,
    r its mean count of such steps. Steps whose flip CTC collapses away do not count, so a
    confident model judged on its strings is not failed by its ambiguous boundary steps.
    """
    steps = ref.shape[0] // samples
    paths = ref.reshape(samples, steps, -1).argmax(-1)
    moved = cand.reshape(samples, steps, -1).argmax(-1)
    observed = float(np.mean(ctc.same_strings(paths, moved, blank)))
    gap, change, runner_up = _margins(ref, cand)
    reaches = ~ctc.absorbed_flips(paths, runner_up.reshape(samples, steps), blank).reshape(-1)
    flips = _flip_rate(gap[reaches], change)
    predicted = float((1.0 - flips) ** (np.count_nonzero(reaches) / samples))
    return min(observed, predicted)


def _agreement(ref: np.ndarray, cand: np.ndarray, samples: int | None) -> float:
    """Share of samples whose decisions all agree.

    Rows are grouped per sample when they stack time steps: a sample agrees only if all do.
    """
    same = np.asarray(ref == cand)
    if same.ndim == 0:
        return float(same)
    rows = same.shape[0]
    groups = samples if samples and rows % samples == 0 else rows
    return float(np.mean(same.reshape(groups, -1).all(axis=1)))
