"""1-D k-means speed: a 4096×4096 layer at 5 bits (target < 0.5 s), and scikit-learn side by side.

Times `cluster_weights` (what `codebook.kmeans` does per layer: sort, Lloyd, labels for every
weight) on a dense and on a 90%-pruned 4096×4096 float32 layer, median of 5 runs, for the
linear (paper) and optimal initialisations. Then, on 1 M values and 32 clusters, our
k-means against scikit-learn's KMeans (k-means++, n_init=1, lloyd), time and inertia, in
one run so the ratio is fair on a shared machine.

    .venv/bin/python benchmarks/codebook_kmeans.py
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from onnxcompress.passes.codebook.kmeans import cluster_weights
from onnxcompress.passes.codebook.kmeans1d import kmeans_1d

RESULTS = Path(__file__).parent / "results"
REPEATS = 5


def median_seconds(function, repeats: int = REPEATS) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    rng = np.random.default_rng(0)
    layer = (rng.standard_normal((4096, 4096), dtype=np.float32) / 64).astype(np.float32)
    pruned = np.where(np.abs(layer) < np.quantile(np.abs(layer), 0.9), np.float32(0), layer)
    rows = []
    for label, weights in (("dense", layer), ("90% pruned", pruned)):
        for init in ("linear", "optimal"):
            seconds = median_seconds(lambda w=weights, i=init: cluster_weights(w, 5, init=i))
            rows.append(
                {
                    "layer": f"4096×4096 {label}",
                    "init": init,
                    "bits": 5,
                    "median_s": round(seconds, 4),
                }
            )
            print(rows[-1])

    from sklearn.cluster import KMeans

    sample = rng.standard_normal(1_000_000).astype(np.float32)
    ours = {}
    start = time.perf_counter()
    result = kmeans_1d(sample, 32, init="optimal")
    ours["seconds"] = time.perf_counter() - start
    ours["inertia"] = result.inertia
    start = time.perf_counter()
    reference = KMeans(32, n_init=1, random_state=0, algorithm="lloyd").fit(sample.reshape(-1, 1))
    sklearn_seconds = time.perf_counter() - start
    side = {
        "values": sample.size,
        "k": 32,
        "ours_s": round(ours["seconds"], 4),
        "sklearn_s": round(sklearn_seconds, 4),
        "speedup": round(sklearn_seconds / ours["seconds"], 1),
        "inertia_ratio_ours_over_sklearn": round(ours["inertia"] / float(reference.inertia_), 5),
    }
    print(side)
    machine = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
    }
    out = {
        "machine": machine,
        "command": "benchmarks/codebook_kmeans.py",
        "layers": rows,
        "vs_sklearn": side,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "codebook_kmeans.json").write_text(json.dumps(out, indent=2) + "\n")
    lines = [
        "# 1-D k-means (codebook.kmeans per layer)",
        "",
        f"Machine: {machine['cpus']} CPUs, {machine['platform']}, numpy {machine['numpy']}. "
        "Command: `.venv/bin/python benchmarks/codebook_kmeans.py`. Median of 5 runs; the machine "
        "is shared.",
        "",
        "| layer | init | bits | seconds (sort + Lloyd + labels) | target |",
        "|---|---|---:|---:|---|",
    ]
    lines += [
        f"| {r['layer']} | {r['init']} | {r['bits']} | {r['median_s']:.3f} | < 0.5 s |"
        for r in rows
    ]
    lines += [
        "",
        f"Side by side on {side['values']:,} normal values, k = 32: ours (optimal init) "
        f"{side['ours_s']:.3f} s, scikit-learn KMeans (k-means++, n_init=1) "
        f"{side['sklearn_s']:.3f} s ({side['speedup']}× faster); inertia ours / sklearn = "
        f"{side['inertia_ratio_ours_over_sklearn']}.",
        "",
    ]
    (RESULTS / "codebook_kmeans.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
