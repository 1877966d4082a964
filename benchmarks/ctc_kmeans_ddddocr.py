"""ddddocr's OCR model under k-means codebooks: why `optimize` needs GPTQ there, and where.

Per plan (a fitting method and width per layer group; a group left out stays dense), fitted as
`codebook.search` fits its candidates (`Fitter`: k-means over the tensor, k-means over output
channels divided by their RMS, or GPTQ under the calibration Gram matrix; biases corrected for the
mean output shift), on ddddocr's calibration words (what `optimize --data` sees):

* the gate's string agreement on the calibration words, observed and predicted from the margins
  (`onnxcompress.fidelity`; the lower is the gate's figure);
* the decoded-string agreement on the EVALUATION words (disjoint, other fonts), ddddocr's charset;
* the size ratio of the written file (indices bit-packed below 8 bits).

And, for the 8210 x 1024 projection at 7 bits, GPTQ's calibration error and fit time with and
without the least-squares centroid refit.

    .venv/bin/python benchmarks/ctc_kmeans_ddddocr.py        # ~5 min on 2 quiet cores

Results: benchmarks/results/ctc_kmeans_ddddocr.{json,md}.
"""

from __future__ import annotations

import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.ctc_gate_ddddocr import gate_figures, one_thread, per_sample  # noqa: E402
from benchmarks.real.cases import CASES  # noqa: E402
from onnxcompress import fidelity  # noqa: E402
from onnxcompress.calibration import layer_hessians  # noqa: E402
from onnxcompress.formats.codebook import insert_codebook  # noqa: E402
from onnxcompress.formats.packed import pack_codebook_indices  # noqa: E402
from onnxcompress.pass_base import PassContext  # noqa: E402
from onnxcompress.passes.codebook.search import PER_CHANNEL, Fitter  # noqa: E402
from onnxcompress.passes.reconstruct import layers  # noqa: E402
from onnxcompress.passes.reconstruct.codebook_gptq import GptqCodebookPass  # noqa: E402
from onnxcompress.sites import find_weight_sites  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
KM, PC, GPTQ = "kmeans", PER_CHANNEL, "gptq"
#: name: (method, bits) per op type; an op type left out stays dense
PLANS: dict[str, dict[str, tuple[str, int]]] = {
    "k-means 8 everywhere": {"Gemm": (KM, 8), "LSTM": (KM, 8), "Conv": (KM, 8)},
    "k-means per channel 8 everywhere": {"Gemm": (PC, 8), "LSTM": (PC, 8), "Conv": (PC, 8)},
    "k-means per channel, Gemm 7, rest 8": {"Gemm": (PC, 7), "LSTM": (PC, 8), "Conv": (PC, 8)},
    "Gemm k-means 8 only": {"Gemm": (KM, 8)},
    "LSTM k-means 8 only": {"LSTM": (KM, 8)},
    "Conv k-means per channel 8 only": {"Conv": (PC, 8)},
    "Gemm GPTQ 7, rest k-means 8": {"Gemm": (GPTQ, 7), "LSTM": (KM, 8), "Conv": (PC, 8)},
    "GPTQ: Gemm 7, rest 8": {"Gemm": (GPTQ, 7), "LSTM": (GPTQ, 8), "Conv": (GPTQ, 8)},
}


def planned(original: ir.Model, fitter: Fitter, plan: dict[str, tuple[str, int]]) -> ir.Model:
    model = original.clone()
    for site in find_weight_sites(model, min_params=64, derived=True).sites:
        if site.op_type not in plan:
            continue
        method, bits = plan[site.op_type]
        fitter.correct_bias(site, method, bits)
        fit = fitter.fit(site.name, method, bits)
        insert_codebook(model.graph, site.value, fit.indices, fit.codebook, bits=bits,
                        zero_entry=fit.zero_entry, packed=False, scales=fit.scales)
    pack_codebook_indices(model)
    return model


def refit_figures(model: ir.Model, hessians: dict) -> list[dict]:
    """The projection at 7 bits by GPTQ, with and without the centroid refit: error, seconds."""
    site = next(s for s in find_weight_sites(model, min_params=64).sites if s.op_type == "Gemm")
    stats = hessians[site.name]
    rows = []
    for refine in (False, True):
        started = time.perf_counter()
        planner = GptqCodebookPass(bits=7, refine=refine, context=PassContext(seed=0))
        _, _, _, indices, codebook, _, label = planner._plan(model, site, stats, {
            "gptq_error": 0.0, "kmeans_error": 0.0})
        seconds = time.perf_counter() - started
        values = layers.matrix_form(site, codebook[indices].astype(np.float64))
        error = layers.layer_error(layers.matrix_form(site, site.array()), values, stats)
        rows.append({"refit": refine, "error": error, "seconds": seconds, "label": label})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    case = CASES["ddddocr"](False)
    original = ir.load(case.model)
    calibration = {k: np.asarray(v) for k, v in case.calibration.items()}
    reference = fidelity.run(original, calibration)
    sites = find_weight_sites(original, min_params=0, derived=True).sites
    hessians = layer_hessians(original, calibration, sites, seed=0)
    fitter = Fitter(original, hessians, 0, keep=True)
    base = one_thread(str(case.model))
    evaluation = case.evaluation["input1"]
    ref_eval = per_sample(base, evaluation)
    rows = []
    for name, plan in PLANS.items():
        model = planned(original, fitter, plan)
        row = {"plan": name, **gate_figures(reference, fidelity.run(model, calibration))}
        with tempfile.TemporaryDirectory() as folder:
            path = str(Path(folder) / "out.onnx")
            ir.save(model, path)
            row["eval_strings"] = case.score(ref_eval, per_sample(one_thread(path), evaluation))[
                "string_agreement"]
            row["size_ratio"] = case.model.stat().st_size / Path(path).stat().st_size
        print(json.dumps(row), flush=True)
        rows.append(row)
    write(rows, refit_figures(original, hessians))


def write(rows: list[dict], refits: list[dict]) -> None:
    machine = f"{platform.processor() or platform.machine()}, {platform.system()}"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ctc_kmeans_ddddocr.json").write_text(
        json.dumps({"machine": machine, "rows": rows, "refit": refits}, indent=2))
    lines = [
        "# ddddocr (CTC) under k-means and GPTQ codebooks, as codebook.search fits them",
        "",
        f"Machine: {machine}. Calibration: 36 words (what `optimize --data` sees); evaluation: "
        "36 other words, other fonts. Biases corrected; layers a plan leaves out stay dense. The "
        "gate's figure is the lower of strings observed / predicted (bar 0.95, searched at 35/36).",
        "",
        "| plan | size | strings obs / pred (calibration) | eval strings |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {r['plan']} | {r['size_ratio']:.2f}x | {r['strings_observed']:.3f} / "
        f"{r['strings_predicted']:.3f} | {r['eval_strings']:.3f} |"
        for r in rows
    ]
    lines += ["", "The 8210 x 1024 projection at 7 bits by GPTQ (layer error tr(D H D^T)):", "",
              "| centroid refit | calibration error | seconds |", "|---|---|---|"]
    lines += [f"| {'yes' if r['refit'] else 'no'} | {r['error']:.4g} | {r['seconds']:.0f} |"
              for r in refits]
    (RESULTS / "ctc_kmeans_ddddocr.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
