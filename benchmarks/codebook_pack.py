"""Pack / unpack throughput of the .onnxc archive, Huffman against rANS, side by side.

Each coder runs at the paper's relative-index widths ("paper") and at `pack`'s default, the
width per layer estimated smallest of 9 ("auto"); rANS + auto is
what `onnxcompress pack` does without options.

Model: MatMul 2048→2048 → Relu → MatMul 2048→1024 (6.3 M weights, 25.2 MB float32),
clustered at 5 bits by `codebook.kmeans`, once dense and once after 90% magnitude pruning.
Pack (relative indices, entropy coding, checksums) and unpack (verify, decode, rebuild the
ModelProto) are timed in memory, median of 3 runs; MB/s counts the float32 weights the archive
stands for (25.2 MB). The round trip is checked byte for byte on every run.

    .venv/bin/python benchmarks/codebook_pack.py
"""

from __future__ import annotations

import itertools
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from onnxcompress.archive import pack, unpack
from onnxcompress.pass_base import get_pass

RESULTS = Path(__file__).parent / "results"
SHAPES = ((2048, 2048), (2048, 1024))


def build(rng: np.random.Generator, sparsity: float) -> ir.Model:
    initializers, nodes, current = [], [], "x"
    for index, shape in enumerate(SHAPES):
        name = f"fc{index}.weight"
        weights = (rng.standard_normal(shape, dtype=np.float32) / np.sqrt(shape[0])).astype(
            np.float32
        )
        initializers.append(numpy_helper.from_array(weights, name))
        nodes.append(helper.make_node("MatMul", [current, name], [f"h{index}"]))
        current = f"h{index}"
        if index + 1 < len(SHAPES):
            nodes.append(helper.make_node("Relu", [current], [f"r{index}"]))
            current = f"r{index}"
    graph = helper.make_graph(
        nodes, "pack_bench",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, SHAPES[0][0]])],
        [helper.make_tensor_value_info(current, TensorProto.FLOAT, [1, SHAPES[-1][1]])],
        initializers,
    )
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))
    if sparsity:
        get_pass("prune.magnitude")(sparsity=sparsity)(model)
    get_pass("codebook.kmeans")(bits=5)(model)
    return model


def median(function, repeats: int = 3) -> tuple[float, object]:
    times, value = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        value = function()
        times.append(time.perf_counter() - start)
    return statistics.median(times), value


def main() -> None:
    rng = np.random.default_rng(0)
    dense_mb = sum(a * b for a, b in SHAPES) * 4 / 1e6
    rows = []
    for sparsity in (0.0, 0.9):
        model = build(rng, sparsity)
        source = ir.to_proto(model).SerializeToString()
        for coder, width in itertools.product(("huffman", "ans"), ("paper", "auto")):
            pack_s, result = median(
                lambda m=model, c=coder, w=width: pack(m, coder=c, index_bits=w)
            )
            unpack_s, restored = median(lambda r=result: unpack(r.data))
            assert restored.SerializeToString() == source, "round trip is not byte-exact"
            rows.append({
                "model": f"{'90% pruned, ' if sparsity else ''}5-bit codebooks",
                "coder": coder,
                "index_bits": width,
                "onnx_bytes": len(source),
                "archive_bytes": len(result.data),
                "pack_s": round(pack_s, 4),
                "unpack_s": round(unpack_s, 4),
                "pack_mb_s": round(dense_mb / pack_s, 1),
                "unpack_mb_s": round(dense_mb / unpack_s, 1),
            })
            print(rows[-1])
    machine = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "codebook_pack.json").write_text(
        json.dumps(
            {
                "machine": machine,
                "command": "benchmarks/codebook_pack.py",
                "dense_float32_mb": dense_mb,
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )
    lines = [
        "# .onnxc pack / unpack throughput",
        "",
        f"Machine: {machine['cpus']} CPUs, {machine['platform']}. Command: `.venv/bin/python "
        f"benchmarks/codebook_pack.py`. Median of 3 runs, in memory; MB/s of the {dense_mb:.1f} MB "
        "of float32 weights represented. Round trips checked byte for byte.",
        "",
        "| model | coder | index bits | clustered .onnx bytes | archive bytes | pack s | unpack s "
        "| pack MB/s | unpack MB/s |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['model']} | {r['coder']} | {r['index_bits']} | {r['onnx_bytes']:,} | "
        f"{r['archive_bytes']:,} | "
        f"{r['pack_s']:.3f} | {r['unpack_s']:.3f} | {r['pack_mb_s']} | {r['unpack_mb_s']} |"
        for r in rows
    ]
    (RESULTS / "codebook_pack.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
