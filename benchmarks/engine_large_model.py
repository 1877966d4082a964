"""Engine at scale: `inspect` and `prune --sparsity 0.9` on a ~100 M-parameter model.

The model: 12 blocks of MatMul(1024→4096) → Relu → MatMul(4096→1024), weights in an
external-data file (~403 MB). Each command runs as its own process; wall time and that
process's peak RSS (from wait4) are recorded. Targets (issue 2): inspect < 3 s with peak
RSS < 1.5 × the model's size; prune < 10 s.

    .venv/bin/python benchmarks/engine_large_model.py
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

RESULTS = Path(__file__).parent / "results"
BLOCKS, WIDTH, HIDDEN = 12, 1024, 4096


def external(name: str, shape: tuple[int, ...], offset: int, location: str) -> onnx.TensorProto:
    tensor = onnx.TensorProto(name=name, data_type=TensorProto.FLOAT, dims=shape)
    tensor.data_location = TensorProto.EXTERNAL
    nbytes = int(np.prod(shape)) * 4
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(nbytes))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def build(folder: Path) -> tuple[Path, int]:
    """Write the model and its data file block by block (never all weights in memory)."""
    rng = np.random.default_rng(0)
    nodes, initializers, current, offset = [], [], "x", 0
    data_path = folder / "big.onnx.data"
    with open(data_path, "wb") as data:
        for block in range(BLOCKS):
            for part, shape in (("up", (WIDTH, HIDDEN)), ("down", (HIDDEN, WIDTH))):
                name = f"block{block}.{part}.weight"
                weights = (rng.standard_normal(shape, dtype=np.float32) / np.sqrt(shape[0])).astype(
                    np.float32
                )
                data.write(weights.tobytes())
                initializers.append(external(name, shape, offset, data_path.name))
                offset += weights.nbytes
                output = f"block{block}.{part}"
                nodes.append(helper.make_node("MatMul", [current, name], [output]))
                current = output
                if part == "up":
                    nodes.append(helper.make_node("Relu", [current], [f"{output}.relu"]))
                    current = f"{output}.relu"
    graph = helper.make_graph(
        nodes, "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", WIDTH])],
        [helper.make_tensor_value_info(current, TensorProto.FLOAT, ["batch", WIDTH])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    path = folder / "big.onnx"
    onnx.save(model, str(path))
    return path, offset


def timed(command: list[str]) -> dict[str, float]:
    """Wall seconds and peak RSS (MB) of one child process."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command)} failed: {process.stderr.read().decode()}")
    return {"seconds": round(seconds, 3), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}


def main() -> None:
    cli = [sys.executable, "-m", "onnxcompress"]
    with tempfile.TemporaryDirectory(prefix="onnxcompress-bench-") as tmp:
        folder = Path(tmp)
        path, data_bytes = build(folder)
        params = data_bytes // 4
        baseline = timed([sys.executable, "-c", "import onnxcompress.cli"])
        inspect = timed([*cli, "inspect", str(path)])
        prune = timed(
            [*cli, "prune", str(path), "-o", str(folder / "pruned.onnx"), "--sparsity", "0.9"]
        )
        pruned_size = sum(f.stat().st_size for f in folder.glob("pruned.onnx*"))
    model_mb = data_bytes / 2**20
    result = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "model": {"params": params, "external_data_mb": round(model_mb, 1)},
        "import_only": baseline,
        "inspect": {**inspect, "rss_over_model": round(inspect["peak_rss_mb"] / model_mb, 3)},
        "prune_0.9": {**prune, "output_mb": round(pruned_size / 2**20, 1)},
        "targets": {"inspect_seconds": 3, "inspect_rss_over_model": 1.5, "prune_seconds": 10},
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "engine_large_model.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# Engine on a ~100 M-parameter model (external data)",
        "",
        f"Machine: {os.cpu_count()} CPUs, {platform.platform()}. Command: `.venv/bin/python "
        "benchmarks/engine_large_model.py`.",
        "",
        "| command | wall s | peak RSS MB | target |",
        "|---|---:|---:|---|",
        f"| python -c 'import onnxcompress.cli' (floor) | {baseline['seconds']} | "
        f"{baseline['peak_rss_mb']} | |",
        f"| inspect ({params / 1e6:.1f} M params, {model_mb:.0f} MB) | {inspect['seconds']} | "
        f"{inspect['peak_rss_mb']} ({result['inspect']['rss_over_model']}× model) | < 3 s, < 1.5× "
        "|",
        f"| prune --sparsity 0.9 (gated, written) | {prune['seconds']} | {prune['peak_rss_mb']} | "
        "< 10 s |",
        "",
    ]
    (RESULTS / "engine_large_model.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
