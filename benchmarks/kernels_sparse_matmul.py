"""SparseMatMul against onnxruntime's dense MatMul, and a pruned MLP end to end.

    .venv/bin/python benchmarks/kernels_sparse_matmul.py [--quick]

* 4096×4096 fp32 weight pruned at random to 50/80/90/95%, batch 1/8/64: dense MatMul and
  SparseMatMul (uint16 columns) in the same process, each in its own onnxruntime session
  with the machine's threads, timed alternately, the CPU caches flushed before every call
  (a 96 MiB buffer is rewritten: weights of a real model are not cache resident between
  calls). Median of the runs; ratio = dense / sparse.
* Effective bandwidth of the kernel at batch 1 = bytes it must read (values, columns, row
  pointers) / time, against the machine's read bandwidth measured here with onnxruntime
  (ReduceSum over 256 MiB, and dense MatMul over a 8192×8192 weight at batch 1; the larger).
  The shared machine's bandwidth drifts by 2-3× within minutes, so the ReduceSum probe also
  runs interleaved with every batch-1 comparison and each row's share is against that probe.
* Weight sharing: CodebookMatMul (4-bit and 8-bit indices) on a dense shared layer and
  SparseCodebookMatMul at 90%, against dense MatMul on the same decoded weights.
* End to end: an MLP 2048-4096-4096-2048-10 pruned to 92% per layer (prune.magnitude), then
  sparse.csr at batch 1 (measured decision); original dense model vs result at batch 1.

Writes benchmarks/results/kernels_sparse_matmul.{json,md}. The machine is shared with other
jobs: the figures are medians of interleaved runs, and the load average is recorded.
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

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from onnxcompress import runtime
from onnxcompress.formats.kernel_arrays import to_csr
from onnxcompress.pass_base import get_pass

RESULTS = Path(__file__).parent / "results"
NAME = "kernels_sparse_matmul"
K = N = 4096
FLUSH = np.zeros((96 << 20) // 4, dtype=np.float32)
TARGETS = {
    (0.9, 1): 3.5,
    (0.95, 1): 6.0,
    (0.9, 64): 2.5,
}


def flush_caches() -> None:
    FLUSH[:] += 1.0


def model(nodes, initializers, inputs, domain_opset: bool = True) -> bytes:
    opsets = [helper.make_opsetid("", 17)]
    if domain_opset:
        opsets.append(helper.make_opsetid("ai.onnxcompress", 1))
    graph = helper.make_graph(
        nodes,
        "bench",
        inputs,
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
        initializer=initializers,
    )
    proto = helper.make_model(graph, opset_imports=opsets)
    proto.ir_version = 8
    return proto.SerializeToString()


def x_input(k: int) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", k])


def interleaved(
    sessions: dict[str, ort.InferenceSession],
    feeds: dict[str, np.ndarray],
    repeats: int,
    extra_feeds: dict[str, dict[str, np.ndarray]] | None = None,
) -> dict[str, float]:
    """Median seconds per session; calls alternate and every call starts with cold caches.

    `extra_feeds` gives some sessions their own feeds (the bandwidth probe).
    """
    feeds_of = {name: (extra_feeds or {}).get(name, feeds) for name in sessions}
    for name, session in sessions.items():
        for _ in range(3):
            session.run(None, feeds_of[name])
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(repeats):
        for name, session in sessions.items():
            flush_caches()
            start = time.perf_counter()
            session.run(None, feeds_of[name])
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def bandwidth_probe(threads: int) -> tuple[ort.InferenceSession, dict[str, np.ndarray], int]:
    """onnxruntime ReduceSum over a fed 256 MiB array: the machine's read bandwidth right now."""
    big = np.random.default_rng(1).standard_normal((8192, 8192), dtype=np.float32)
    proto = model(
        [helper.make_node("ReduceSum", ["W"], ["Y"], keepdims=0)],
        [],
        [helper.make_tensor_value_info("W", TensorProto.FLOAT, [8192, 8192])],
        domain_opset=False,
    )
    return runtime.session(proto, threads=threads), {"W": big}, big.nbytes


def machine_bandwidth(threads: int) -> dict[str, float]:
    """Read bandwidth (GB/s) onnxruntime reaches on this machine, two ways."""
    rng = np.random.default_rng(1)
    big = rng.standard_normal((8192, 8192), dtype=np.float32)
    results = {}
    # W is fed, not an initializer: onnxruntime would constant-fold a ReduceSum of a constant
    reduce = model(
        [helper.make_node("ReduceSum", ["W"], ["Y"], keepdims=0)],
        [],
        [helper.make_tensor_value_info("W", TensorProto.FLOAT, [8192, 8192])],
        domain_opset=False,
    )
    gemv = model(
        [helper.make_node("MatMul", ["X", "W"], ["Y"])],
        [numpy_helper.from_array(big, "W")],
        [x_input(8192)],
        domain_opset=False,
    )
    for label, proto, feeds in (
        ("reduce_sum", reduce, {"W": big}),
        ("dense_gemv", gemv, {"X": rng.standard_normal((1, 8192), dtype=np.float32)}),
    ):
        session = runtime.session(proto, threads=threads)
        seconds = interleaved({label: session}, feeds, 15)[label]
        results[label] = big.nbytes / seconds / 1e9
    results["numpy_sum_1_thread"] = (
        big.nbytes / min(_timeit(lambda: big.sum()) for _ in range(5)) / 1e9
    )
    results["reference"] = max(results["reduce_sum"], results["dense_gemv"])
    return results


def _timeit(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def layer_sweep(threads: int, repeats: int, sparsities, batches) -> list[dict[str, object]]:
    rng = np.random.default_rng(0)
    base = rng.standard_normal((K, N), dtype=np.float32)
    dense_session = runtime.session(
        model(
            [helper.make_node("MatMul", ["X", "W"], ["Y"])],
            [numpy_helper.from_array(base, "W")],
            [x_input(K)],
        ),
        threads=threads,
    )
    probe, probe_feeds, probe_bytes = bandwidth_probe(threads)
    rows = []
    for sparsity in sparsities:
        weight = np.where(rng.random((K, N)) < sparsity, np.float32(0), base)
        # the dense baseline's speed does not depend on the zeros: reuse one session
        for index_dtype in ("uint16", "int32") if sparsity == 0.9 else ("uint16",):
            csr = to_csr(weight, index_dtype)
            sparse_session = runtime.session(
                model(
                    [
                        helper.make_node(
                            "SparseMatMul",
                            ["X", "v", "c", "r"],
                            ["Y"],
                            domain="ai.onnxcompress",
                            K=K,
                            N=N,
                        )
                    ],
                    [
                        numpy_helper.from_array(csr.values, "v"),
                        numpy_helper.from_array(csr.col_indices, "c"),
                        numpy_helper.from_array(csr.row_ptr, "r"),
                    ],
                    [x_input(K)],
                ),
                threads=threads,
            )
            for batch in batches if index_dtype == "uint16" else (1,):
                x = rng.standard_normal((batch, K), dtype=np.float32)
                check = sparse_session.run(None, {"X": x})[0]
                np.testing.assert_allclose(check, x @ weight, rtol=1e-3, atol=1e-3)
                sessions = {"dense": dense_session, "sparse": sparse_session}
                if batch == 1:
                    sessions["probe"] = probe
                timing = interleaved(sessions, {"X": x}, repeats, {"probe": probe_feeds})
                sparse_bytes = csr.nbytes + x.nbytes + batch * N * 4
                row = {
                    "sparsity": sparsity,
                    "batch": batch,
                    "index": index_dtype,
                    "nnz": csr.nnz,
                    "dense_ms": round(timing["dense"] * 1e3, 4),
                    "sparse_ms": round(timing["sparse"] * 1e3, 4),
                    "speedup": round(timing["dense"] / timing["sparse"], 2),
                    "sparse_GBps": round(sparse_bytes / timing["sparse"] / 1e9, 1),
                    "dense_GBps": round(weight.nbytes / timing["dense"] / 1e9, 1),
                    "machine_GBps": round(probe_bytes / timing["probe"] / 1e9, 1)
                    if batch == 1
                    else None,
                    "share_of_machine_BW": round(
                        sparse_bytes / timing["sparse"] / (probe_bytes / timing["probe"]), 2
                    )
                    if batch == 1
                    else None,
                    "target": TARGETS.get((sparsity, batch)) if index_dtype == "uint16" else None,
                }
                rows.append(row)
                print(row, flush=True)
    return rows


def codebook_sweep(threads: int, repeats: int, batches) -> list[dict[str, object]]:
    """The codebook kernels against dense MatMul on the same weights.

    CodebookMatMul on a dense shared 4096×4096 layer (4 and 8 bits) and SparseCodebookMatMul
    at 90% (16 entries, entry 0 the exact zero).
    """
    from onnxcompress.passes.sparse.csr import codebook_arrays

    rng = np.random.default_rng(3)
    rows = []
    for label, entries, sparsity in (
        ("dense, 16 entries", 16, 0.0),
        ("dense, 256 entries", 256, 0.0),
        ("90% pruned, 16 entries", 16, 0.9),
    ):
        codebook = rng.standard_normal(entries, dtype=np.float32)
        indices = rng.integers(0, entries, size=(K, N)).astype(np.uint8)
        if sparsity:
            codebook[0] = 0.0
            indices[rng.random((K, N)) < sparsity] = 0
        weight = codebook[indices.astype(np.int64)]
        op, arrays, attributes = codebook_arrays(indices, codebook, weight, sparse=bool(sparsity))
        dense_session = runtime.session(
            model(
                [helper.make_node("MatMul", ["X", "W"], ["Y"])],
                [numpy_helper.from_array(weight, "W")],
                [x_input(K)],
            ),
            threads=threads,
        )
        op_session = runtime.session(
            model(
                [
                    helper.make_node(
                        op, ["X", *arrays], ["Y"], domain="ai.onnxcompress", **attributes
                    )
                ],
                [numpy_helper.from_array(a, name) for name, a in arrays.items()],
                [x_input(K)],
            ),
            threads=threads,
        )
        stored = sum(a.nbytes for a in arrays.values())
        for batch in batches:
            x = rng.standard_normal((batch, K), dtype=np.float32)
            np.testing.assert_allclose(
                op_session.run(None, {"X": x})[0], x @ weight, rtol=1e-3, atol=1e-3
            )
            timing = interleaved({"dense": dense_session, "op": op_session}, {"X": x}, repeats)
            row = {
                "layer": label,
                "op": op,
                "bits": attributes.get("bits", 8),
                "batch": batch,
                "stored_MB": round(stored / 1e6, 2),
                "dense_ms": round(timing["dense"] * 1e3, 4),
                "op_ms": round(timing["op"] * 1e3, 4),
                "speedup": round(timing["dense"] / timing["op"], 2),
                "op_GBps": round((stored + x.nbytes) / timing["op"] / 1e9, 1),
            }
            rows.append(row)
            print(row, flush=True)
    return rows


def end_to_end(threads: int, repeats: int) -> dict[str, object]:
    """A 2048-4096-4096-2048-10 MLP, pruned to 92% per layer, then sparse.csr at batch 1."""
    rng = np.random.default_rng(2)
    sizes = (2048, 4096, 4096, 2048, 10)
    nodes, initializers, current = [], [], "X"
    for index, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        w = (rng.standard_normal((fan_in, fan_out), dtype=np.float32) / np.sqrt(fan_in)).astype(
            np.float32
        )
        b = (rng.standard_normal(fan_out, dtype=np.float32) * 0.1).astype(np.float32)
        initializers += [
            numpy_helper.from_array(w, f"fc{index}.weight"),
            numpy_helper.from_array(b, f"fc{index}.bias"),
        ]
        nodes += [helper.make_node("MatMul", [current, f"fc{index}.weight"], [f"h{index}"]),
                  helper.make_node("Add", [f"h{index}", f"fc{index}.bias"], [f"a{index}"])]
        current = f"a{index}"
        if index < len(sizes) - 2:
            nodes.append(helper.make_node("Relu", [current], [f"r{index}"]))
            current = f"r{index}"
    nodes[-1].output[0] = "Y"
    graph = helper.make_graph(
        nodes,
        "mlp",
        [x_input(sizes[0])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
        initializer=initializers,
    )
    original = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    original.ir_version = 8
    pruned = get_pass("prune.magnitude")(sparsity=0.92)(ir.serde.deserialize_model(original)).model
    conversion = get_pass("sparse.csr")(batch=1, threads=threads)(pruned)
    converted = conversion.model
    proto = ir.to_proto(converted)
    sessions = {"dense_original": runtime.session(original, threads=threads),
                "sparse": runtime.session(proto, threads=threads)}
    x = rng.standard_normal((1, sizes[0]), dtype=np.float32)
    timing = interleaved(sessions, {"X": x}, repeats)
    converted_layers = [c.name for c in conversion.report.changes]
    result = {
        "sizes": sizes,
        "sparsity": 0.92,
        "converted": converted_layers,
        "left_dense": {s.name: s.reason for s in conversion.report.skipped},
        "dense_ms": round(timing["dense_original"] * 1e3, 4),
        "sparse_ms": round(timing["sparse"] * 1e3, 4),
        "speedup": round(timing["dense_original"] / timing["sparse"], 2),
        "target": 2.5,
    }
    print(result, flush=True)
    return result


def machine_info(threads: int) -> dict[str, object]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cpus": os.cpu_count(), "threads": threads, "platform": platform.platform(),
            "onnxruntime": ort.__version__, "python": platform.python_version(),
            "kernel_library": str(runtime.kernel_library_path())}


def write_markdown(out: dict[str, object]) -> None:
    machine = out["machine"]
    bandwidth = out["bandwidth_GBps"]
    lines = [
        "# SparseMatMul vs onnxruntime dense MatMul (4096×4096 fp32)",
        "",
        f"Machine: {machine['cpu']}, {machine['cpus']} CPUs, {machine['threads']} onnxruntime "
        f"threads, onnxruntime {machine['onnxruntime']}; load average before/after "
        f"{out['load_before']} / {out['load_after']} (shared machine). Command: `.venv/bin/python "
        "benchmarks/kernels_sparse_matmul.py`.",
        "Caches flushed (96 MiB rewrite) before every call; calls of both variants alternate; "
        "medians.",
        "",
        f"Machine read bandwidth measured here: {bandwidth['reference']:.1f} GB/s (onnxruntime "
        f"ReduceSum {bandwidth['reduce_sum']:.1f}, dense GEMV 8192² {bandwidth['dense_gemv']:.1f}, "
        f"numpy sum 1 thread {bandwidth['numpy_sum_1_thread']:.1f}).",
        "",
        "Batch-1 rows also time that ReduceSum probe interleaved with the two variants (machine "
        "GB/s, the",
        "bandwidth while the row ran); the share is the kernel's effective bandwidth against it "
        "(target ≥ 60%).",
        "",
        "| sparsity | batch | columns | dense ms | sparse ms | speedup | target | sparse GB/s | "
        "machine GB/s | share |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in out["layers"]:
        machine_bw = row["machine_GBps"] if row["machine_GBps"] else ""
        share = f"{100 * row['share_of_machine_BW']:.0f}%" if row["share_of_machine_BW"] else ""
        target = f"≥ {row['target']}×" if row["target"] else ""
        lines.append(
            f"| {row['sparsity']:.0%} | {row['batch']} | {row['index']} | {row['dense_ms']:.3f} | "
            f"{row['sparse_ms']:.3f} | {row['speedup']:.2f}× | {target} | {row['sparse_GBps']} | "
            f"{machine_bw} | {share} |"
        )
    e2e = out["end_to_end"]
    lines += [
        "",
        f"End to end: MLP {'-'.join(map(str, e2e['sizes']))} pruned to {e2e['sparsity']:.0%} per "
        f"layer, `sparse.csr` at batch 1 converted {len(e2e['converted'])} layers "
        f"({', '.join(e2e['converted'])}); left dense: {e2e['left_dense'] or 'none'}. Batch 1: "
        f"dense original {e2e['dense_ms']:.3f} ms, sparse {e2e['sparse_ms']:.3f} ms: "
        f"**{e2e['speedup']:.2f}×** (target ≥ {e2e['target']}×).",
    ]
    lines += [
        "",
        "## Weight-shared layers (4096×4096)",
        "",
        "CodebookMatMul holds W^T's codebook indices (4-bit packed when the codebook has <= 16 "
        "entries);",
        "SparseCodebookMatMul is CSR with uint8 codebook indices as values. Same flushing and "
        "interleaving.",
        "",
        "| layer | op | bits | batch | stored MB | dense ms | op ms | speedup | op GB/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in out["codebook"]:  # type: ignore[union-attr]
        lines.append(
            f"| {row['layer']} | {row['op']} | {row['bits']} | {row['batch']} | {row['stored_MB']} "
            f"| {row['dense_ms']:.3f} | {row['op_ms']:.3f} | {row['speedup']:.2f}× | "
            f"{row['op_GBps']} |"
        )
    (RESULTS / f"{NAME}.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="fewer repeats and configurations (smoke run)"
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    if "SparseMatMul" not in runtime.available_ops():
        sys.exit("the kernel library is not built; see docs/kernels.md")
    repeats = 7 if args.quick else 31
    sparsities = (0.9,) if args.quick else (0.5, 0.8, 0.9, 0.95)
    batches = (1, 64) if args.quick else (1, 8, 64)
    load_before = round(os.getloadavg()[0], 2)
    out: dict[str, object] = {
        "machine": machine_info(args.threads),
        "command": f"benchmarks/{NAME}.py",
        "load_before": load_before,
    }
    out["bandwidth_GBps"] = {k: round(v, 1) for k, v in machine_bandwidth(args.threads).items()}
    print(out["bandwidth_GBps"], flush=True)
    out["layers"] = layer_sweep(args.threads, repeats, sparsities, batches)
    out["codebook"] = codebook_sweep(args.threads, repeats, batches)
    out["end_to_end"] = end_to_end(args.threads, repeats)
    out["load_after"] = round(os.getloadavg()[0], 2)
    if not args.quick:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"{NAME}.json").write_text(json.dumps(out, indent=2) + "\n")
        write_markdown(out)


if __name__ == "__main__":
    main()
