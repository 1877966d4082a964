"""ddddocr's CTC output under weight changes: what the gate sees, and what the strings do.

For each weight change (fp16 rounding, k-means or GPTQ codebooks per layer group), on
ddddocr's calibration words (`benchmarks.real.cases`, the inputs `optimize --data` gets):

* the per-step rule (a sample agrees only if every time step's arg-max does) and its margin
  prediction, as the gate judged a (time, 1, classes) output before it read CTC strings;
* the gate's string agreement now (`onnxcompress.fidelity`: observed decoded label sequences,
  and the prediction from the gaps of the steps whose flip would change a string), split into
  observed and predicted;

and on the EVALUATION words (disjoint): the case's own decoded-string agreement (ddddocr's
charset), the size ratio of the written file (codebook graph form, indices bit-packed below 8
bits) and the batch-1 latency ratio (median of 30 interleaved single-sample runs, one thread).

    .venv/bin/python benchmarks/ctc_gate_ddddocr.py            # ~15 min on 2 busy cores

Results: benchmarks/results/ctc_gate_ddddocr.{json,md}.
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.real.cases import CASES  # noqa: E402
from onnxcompress import ctc, fidelity  # noqa: E402
from onnxcompress.calibration import layer_hessians  # noqa: E402
from onnxcompress.formats.codebook import insert_codebook  # noqa: E402
from onnxcompress.formats.packed import pack_codebook_indices  # noqa: E402
from onnxcompress.passes.codebook.kmeans import cluster_weights  # noqa: E402
from onnxcompress.passes.reconstruct.codebook_gptq import gptq_codebook  # noqa: E402
from onnxcompress.sites import WeightSite, find_weight_sites  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
#: name: bits per op type ("fp16": rounded weights, stored as float32 here) and the fitting method
PLANS: dict[str, tuple[str, dict[str, int | str]]] = {
    "fp16 weights": ("fp16", {"Conv": "fp16", "Gemm": "fp16", "LSTM": "fp16"}),
    "k-means 8 bits everywhere": ("kmeans", {"Conv": 8, "Gemm": 8, "LSTM": 8}),
    "GPTQ 8 bits everywhere": ("gptq", {"Conv": 8, "Gemm": 8, "LSTM": 8}),
    "GPTQ Gemm 7, rest 8": ("gptq", {"Conv": 8, "Gemm": 7, "LSTM": 8}),
    "GPTQ Gemm 7, LSTM 7, Conv 8": ("gptq", {"Conv": 8, "Gemm": 7, "LSTM": 7}),
}


def one_thread(path: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def per_sample(session: ort.InferenceSession, x: np.ndarray) -> list[list[np.ndarray]]:
    return [[session.run(None, {"input1": x[i : i + 1]})[0] for i in range(len(x))]]


def latency_ratio(base: ort.InferenceSession, other: ort.InferenceSession, x: np.ndarray) -> float:
    times: dict[int, list[float]] = {0: [], 1: []}
    for _ in range(3):
        base.run(None, {"input1": x}), other.run(None, {"input1": x})
    for _ in range(30):
        for key, session in ((0, base), (1, other)):
            start = time.perf_counter()
            session.run(None, {"input1": x})
            times[key].append(time.perf_counter() - start)
    return statistics.median(times[1]) / statistics.median(times[0])


def gate_figures(reference: fidelity.Outputs, candidate: fidelity.Outputs) -> dict[str, float]:
    """The per-step rule and the string rule, each observed and predicted."""
    samples = reference.samples or 1
    ref = np.asarray(reference.scores[0], np.float64)
    cand = np.asarray(candidate.scores[0], np.float64)
    steps = ref.shape[0] // samples
    paths, moved = (a.reshape(samples, steps, -1).argmax(-1) for a in (ref, cand))
    blank = ctc.blank_class(ref, samples)
    assert blank is not None, "ddddocr's output should read as CTC"
    gap, change, runner_up = fidelity._margins(ref, cand)
    reaches = ~ctc.absorbed_flips(paths, runner_up.reshape(paths.shape), blank).reshape(-1)
    string_flips = fidelity._flip_rate(gap[reaches], change)
    return {
        "steps_flipped": float(np.mean(paths != moved)),
        "per_step_observed": float(np.mean((paths == moved).all(axis=1))),
        "per_step_predicted": fidelity._predicted_agreement(ref, cand, samples),
        "strings_observed": float(np.mean(ctc.same_strings(paths, moved, blank))),
        "strings_predicted": float((1 - string_flips) ** (np.count_nonzero(reaches) / samples)),
        # the gate's decision metric on this output (reported as string_agreement since CTC
        # outputs have their own bar; the column keeps its name)
        "gate_top1": float(fidelity.compare(reference, candidate).string_agreement or 0.0),
    }


def fitted(model: ir.Model, method: str, bits: dict[str, int | str], probes: dict[str, np.ndarray],
           cache: dict) -> Iterator[tuple[WeightSite, np.ndarray, np.ndarray | None, int]]:
    """(site, indices, codebook, bits) per weight, or (site, rounded, None, 0) for fp16."""
    sites = [s for s in find_weight_sites(model, min_params=64).sites if s.op_type in bits]
    if method == "gptq" and "hessians" not in cache:
        cache["hessians"] = layer_hessians(model, probes, sites)
    for site in sites:
        width = bits[site.op_type]
        if width == "fp16":
            yield site, site.array().astype(np.float16).astype(np.float32), None, 0
            continue
        key = (site.name, method, int(width))
        if key not in cache:
            cache[key] = (
                gptq_codebook(model, site, cache["hessians"].get(site.name), int(width))[:2]
                if method == "gptq"
                else cluster_weights(site.array(), int(width), seed=0)[:2]
            )
        indices, codebook = cache[key]
        yield site, indices, codebook, int(width)


def main() -> None:
    case = CASES["ddddocr"](False)
    original = ir.load(case.model)
    calibration = {k: np.asarray(v) for k, v in case.calibration.items()}
    reference = fidelity.run(original, calibration)
    base = one_thread(str(case.model))
    evaluation = case.evaluation["input1"]
    ref_eval = per_sample(base, evaluation)
    rows, cache = [], {}
    for name, (method, bits) in PLANS.items():
        started = time.perf_counter()
        model = original.clone()
        for site, indices, codebook, width in fitted(model, method, bits, calibration, cache):
            if codebook is None:
                site.replace(indices)
            else:
                insert_codebook(model.graph, site.value, indices.astype(np.uint8), codebook,
                                bits=width, zero_entry=False, packed=False)
        pack_codebook_indices(model)
        row = {"plan": name, **gate_figures(reference, fidelity.run(model, calibration))}
        with tempfile.TemporaryDirectory() as folder:
            path = str(Path(folder) / "out.onnx")
            ir.save(model, path)
            session = one_thread(path)
            row["eval_strings"] = case.score(ref_eval, per_sample(session, evaluation))[
                "string_agreement"]
            row["size_ratio"] = case.model.stat().st_size / Path(path).stat().st_size
            row["latency_ratio"] = latency_ratio(base, session, evaluation[:1])
        row["seconds"] = time.perf_counter() - started
        print(json.dumps(row), flush=True)
        rows.append(row)
    write(rows)


def write(rows: list[dict]) -> None:
    machine = f"{platform.processor() or platform.machine()}, {platform.system()}"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ctc_gate_ddddocr.json").write_text(json.dumps({"machine": machine, "rows": rows},
                                                              indent=2))
    lines = [
        "# ddddocr (CTC) under weight changes: the gate's rules and the strings read",
        "",
        f"Machine: {machine}. Calibration: 36 words (what `optimize --data` sees); evaluation: "
        "36 other words, other fonts. fp16 weights are rounded but stored as float32 (ratio 1).",
        "",
        "| change | size | latency b1 | steps flipped | per-step obs / pred | strings obs / pred "
        "| gate top1 | eval strings |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['plan']} | {r['size_ratio']:.2f}x | {r['latency_ratio']:.2f}x "
            f"| {r['steps_flipped']:.4f} | {r['per_step_observed']:.3f} / "
            f"{r['per_step_predicted']:.3f} | {r['strings_observed']:.3f} / "
            f"{r['strings_predicted']:.4f} | {r['gate_top1']:.3f} | {r['eval_strings']:.3f} |"
        )
    (RESULTS / "ctc_gate_ddddocr.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
