"""Structured pruning (prune.structured) and sensitivity-chosen rates on models trained here.

Two networks are trained with torch on scikit-learn's digits (8×8; `benchmarks/data.py`)
and exported with torch's default ONNX exporter (BatchNorm folded into the convs, flatten
as Reshape — the graphs real users have):

* `mlp`  64 → 1024 → 1024 → 10, ReLU (MatMul + Add / Gemm);
* `cnn`  conv 64 + BN + ReLU → conv 64 + BN, residual Add, ReLU → conv 128 + BN + ReLU →
  max-pool 2 → flatten (128·4·4) → fc 10.

Part 1 — `prune.structured --ratio 0.5` (L1 criterion) through the gated pipeline: every
hidden neuron / conv channel group loses half its channels (the residual pair is one
group). Recorded: parameters, onnxruntime latency at batch 1 and 32 (1 intra-op thread,
original and pruned timed interleaved in one run, median of rounds), test accuracy of the
original, right after pruning, and after fine-tuning with the `finetune` pass (Han's
recipe: lr 1/10 of the training one, L2, zeros held). Target: latency ≥ 1.6× lower.

Part 2 — per-layer rates from `prune.sensitivity` against the best uniform rate, both for
`prune.magnitude` and both chosen on a calibration split (512 training samples) under the
same budget (output cosine ≥ 0.99; and accuracy drop ≤ 0.5 points), then measured on the
test split. Ratios 0.05 … 0.95 in steps of 0.05 for both.

    .venv/bin/python benchmarks/prune_structured.py        # ~2–3 min on 2 shared cores
"""

from __future__ import annotations

import json
import logging
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
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.data import load_digits_split  # noqa: E402
from benchmarks.models import export, train  # noqa: E402
from onnxcompress.fidelity import Gate, compare  # noqa: E402
from onnxcompress.passes.prune.magnitude import MagnitudePrunePass  # noqa: E402
from onnxcompress.passes.prune.sensitivity import Budget, sensitivity  # noqa: E402
from onnxcompress.pipeline import Step, run_steps  # noqa: E402
from onnxcompress.sites import find_weight_sites  # noqa: E402

RESULTS = Path(__file__).parent / "results"
SEED = 0
RATIOS = tuple(round(0.05 * k, 2) for k in range(1, 20))
ROUNDS = {1: 20, 32: 8}
REPEATS = 3  # whole interleaved measurements; the speedup reported is their median
CALLS = {1: 40, 32: 10}


class MLP(nn.Module):
    input_shape = (64,)

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = (
            nn.Linear(64, 1024),
            nn.Linear(1024, 1024),
            nn.Linear(1024, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class CNN(nn.Module):
    input_shape = (1, 8, 8)

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 64, 3, padding=1), nn.BatchNorm2d(64)
        self.conv2, self.bn2 = nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64)
        self.conv3, self.bn3 = nn.Conv2d(64, 128, 3, padding=1), nn.BatchNorm2d(128)
        self.fc = nn.Linear(128 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        h = torch.relu(self.bn2(self.conv2(h)) + h)
        h = torch.relu(self.bn3(self.conv3(h)))
        h = nn.functional.max_pool2d(h, 2)
        return self.fc(torch.flatten(h, 1))


def onnx_accuracy(model: ir.Model | bytes, x: np.ndarray, y: np.ndarray) -> float:
    logits = run(model, x)
    return float(np.mean(logits.argmax(1) == y))


def serialise(model: ir.Model) -> bytes:
    proto = ir.to_proto(model)
    proto.ir_version = 10
    return proto.SerializeToString()


def ort_session(data: bytes) -> ort.InferenceSession:
    """Plain onnxruntime, 1 intra-op thread (the models use standard ops only)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def run(model: ir.Model | bytes, x: np.ndarray) -> np.ndarray:
    data = serialise(model) if isinstance(model, ir.Model) else model
    return ort_session(data).run(None, {"x": x})[0]


def weight_count(model: ir.Model) -> int:
    return sum(site.size for site in find_weight_sites(model, min_params=0).sites)


def latency(models: dict[str, bytes], x: np.ndarray, batch: int) -> dict[str, float]:
    """Median ms per call; the models are timed in alternation so that load hits both."""
    sessions = {name: ort_session(data) for name, data in models.items()}
    feed = {"x": np.ascontiguousarray(x[:batch])}
    for session in sessions.values():
        for _ in range(5):
            session.run(None, feed)
    samples: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(ROUNDS[batch]):
        for name, session in sessions.items():
            start = time.perf_counter()
            for _ in range(CALLS[batch]):
                session.run(None, feed)
            samples[name].append((time.perf_counter() - start) / CALLS[batch] * 1e3)
    return {name: statistics.median(values) for name, values in samples.items()}


def structured(name: str, model: ir.Model, data: dict[str, np.ndarray]) -> dict[str, Any]:
    x_train, y_train, x_test, y_test = (
        data["x_train"],
        data["y_train"],
        data["x_test"],
        data["y_test"],
    )
    train_data = {"x": x_train, "labels": y_train}
    started = time.perf_counter()
    pruned = run_steps(model, [Step(pass_name="prune.structured", options={"ratio": 0.5},
                                    gate=Gate.off())], data=train_data, probe_count=64).model
    prune_seconds = time.perf_counter() - started
    plan = [g for g in (pruned_plan(model))]
    started = time.perf_counter()
    finetuned = run_steps(
        pruned,
        [
            Step(
                pass_name="finetune",
                options={
                    "epochs": 8,
                    "lr": 0.005,
                    "l2": 1e-4,
                    "batch_size": 64,
                    "optimizer": "sgd",
                    "lr_schedule": "constant",
                },
                gate=Gate.off(),
            )
        ],
        data=train_data,
        probe_count=64,
    ).model
    finetune_seconds = time.perf_counter() - started
    blobs = {
        "original": serialise(model),
        "pruned": serialise(pruned),
        "finetuned": serialise(finetuned),
    }
    timing = {}
    for batch in (1, 32):
        repeats = [latency(blobs, x_test, batch) for _ in range(REPEATS)]
        ms = {k: statistics.median(r[k] for r in repeats) for k in blobs}
        speedups = sorted(r["original"] / r["finetuned"] for r in repeats)
        timing[f"batch{batch}"] = {
            **{f"{k}_ms": round(v, 4) for k, v in ms.items()},
            "speedup": round(statistics.median(speedups), 3),
            "speedup_repeats": [round(v, 3) for v in speedups],
            "speedup_before_finetune": round(ms["original"] / ms["pruned"], 3),
        }
    return {
        "model": name,
        "weights_before": weight_count(model),
        "weights_after": weight_count(finetuned),
        "groups": plan,
        "accuracy_original": onnx_accuracy(model, x_test, y_test),
        "accuracy_pruned": onnx_accuracy(pruned, x_test, y_test),
        "accuracy_finetuned": onnx_accuracy(finetuned, x_test, y_test),
        "prune_seconds": round(prune_seconds, 3),
        "finetune_seconds": round(finetune_seconds, 3),
        "latency": timing,
    }


def pruned_plan(model: ir.Model) -> list[dict[str, Any]]:
    from onnxcompress.passes.prune.structured import plan_structured

    plan = plan_structured(model.clone(), ratio=0.5)
    return [{"group": g.name, "channels": g.channels,
             "kept": len(g.keep) if g.skip_reason is None else g.channels, "skip": g.skip_reason}
            for g in plan.groups]


def uniform_best(model: ir.Model, x: np.ndarray, y: np.ndarray | None, budget: Budget) -> float:
    """The largest uniform sparsity (same grid) meeting the budget on the calibration data."""
    reference = run(model, x)
    baseline = float(np.mean(reference.argmax(1) == y)) if y is not None else 1.0
    best = 0.0
    for ratio in RATIOS:
        candidate = model.clone()
        MagnitudePrunePass(sparsity=ratio)(candidate)
        outputs = run(candidate, x)
        if y is not None:
            ok = baseline - float(np.mean(outputs.argmax(1) == y)) <= budget.max_accuracy_drop
        else:
            ok = compare([reference], [outputs]).cosine >= budget.min_cosine
        if ok:
            best = ratio
    return best


def measure(
    model: ir.Model, options: dict[str, Any], x: np.ndarray, y: np.ndarray
) -> dict[str, float]:
    candidate = model.clone()
    MagnitudePrunePass(**options)(candidate)
    sites = find_weight_sites(candidate).sites
    zeros = sum(int(np.count_nonzero(s.array() == 0)) for s in sites)
    reference, outputs = run(model, x), run(candidate, x)
    return {"zeros": zeros, "test_cosine": round(compare([reference], [outputs]).cosine, 5),
            "test_accuracy": round(float(np.mean(outputs.argmax(1) == y)), 4)}


def chosen_vs_uniform(
    name: str, model: ir.Model, data: dict[str, np.ndarray]
) -> list[dict[str, Any]]:
    rows = []
    calib_x, calib_y = data["x_train"][:512], data["y_train"][:512]
    # cosine only, on both sides: `uniform_best` holds the uniform rate to the same single number
    cosine_only = Budget(min_cosine=0.99, min_rank_correlation=None, min_top1=None)
    for budget_name, budget, labels in (
        ("cosine >= 0.99", cosine_only, None),
        ("accuracy drop <= 0.5 pt", Budget(max_accuracy_drop=0.005), calib_y),
    ):
        calib = {"x": calib_x} if labels is None else {"x": calib_x, "labels": labels}
        started = time.perf_counter()
        result = sensitivity(model, data=calib, ratios=RATIOS, budget=budget, probes=len(calib_x))
        seconds = time.perf_counter() - started
        uniform = uniform_best(model, calib_x, labels, budget)
        chosen = measure(model, result.plan()["options"], data["x_test"], data["y_test"])
        flat = measure(model, {"sparsity": uniform}, data["x_test"], data["y_test"])
        rows.append(
            {
                "model": name,
                "budget": budget_name,
                "total_weights": result.total_params,
                "sensitivity_rates": {c.name: c.chosen for c in result.curves},
                "sensitivity_removed": chosen["zeros"],
                "sensitivity_calibration_value": round(result.joint_value, 5),
                "sensitivity_test_cosine": chosen["test_cosine"],
                "sensitivity_test_accuracy": chosen["test_accuracy"],
                "uniform_rate": uniform,
                "uniform_removed": flat["zeros"],
                "uniform_test_cosine": flat["test_cosine"],
                "uniform_test_accuracy": flat["test_accuracy"],
                "analysis_seconds": round(seconds, 2),
            }
        )
    return rows


def trained_models(data: dict[str, np.ndarray]) -> dict[str, tuple[ir.Model, float]]:
    torch.manual_seed(SEED)
    torch.set_num_threads(1)
    out = {}
    for name, module, x, epochs, lr in (
        ("mlp", MLP(), data["x_train"], 30, 0.05),
        ("cnn", CNN(), data["x_train_images"], 20, 0.05),
    ):
        train(module, x, data["y_train"], epochs=epochs, lr=lr, batch_size=64, seed=SEED)
        proto = export(module, example=torch.zeros((2, *module.input_shape)))
        onnx.checker.check_model(proto)
        out[name] = (ir.from_proto(proto), 0.0)
    return out


def _span(timing: dict[str, Any]) -> str:
    return f"{timing['speedup_repeats'][0]:.2f}–{timing['speedup_repeats'][-1]:.2f}"


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# Structured pruning and sensitivity-chosen rates (digits, models trained here)",
        "",
        f"Machine: {result['machine']['cpus']} CPUs ({result['machine']['platform']}), shared with "
        "other jobs; onnxruntime with 1 intra-op thread; original and pruned timed interleaved in "
        "one run, median of rounds.",
        "Command: `.venv/bin/python benchmarks/prune_structured.py`.",
        "",
        "## prune.structured, ratio 0.5 (L1), then `finetune` (8 epochs, lr 0.005, L2 1e-4, zeros "
        "held)",
        "",
        "Latency of the shipped (pruned + fine-tuned) model: median ms over 3 interleaved "
        "measurements; speedup = their median (range in brackets). The JSON also has the pruned "
        "model before fine-tuning.",
        "",
        "| model | weights before → after | acc. original | acc. pruned | acc. fine-tuned | batch "
        "1 ms (orig → pruned) | speedup | batch 32 ms (orig → pruned) | speedup |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["structured"]:
        b1, b32 = row["latency"]["batch1"], row["latency"]["batch32"]
        lines.append(
            f"| {row['model']} | {row['weights_before']:,} → {row['weights_after']:,} | "
            f"{row['accuracy_original']:.4f} | {row['accuracy_pruned']:.4f} | "
            f"{row['accuracy_finetuned']:.4f} | {b1['original_ms']:.4f} → {b1['finetuned_ms']:.4f} "
            f"| {b1['speedup']:.2f}× ({_span(b1)}) | {b32['original_ms']:.4f} → "
            f"{b32['finetuned_ms']:.4f} | {b32['speedup']:.2f}× ({_span(b32)}) |"
        )
    lines += ["", "Channel groups (kept / channels):", ""]
    for row in result["structured"]:
        groups = ", ".join(
            f"{g['group']}: {g['kept']}/{g['channels']}"
            + (f" (skipped: {g['skip']})" if g["skip"] else "")
            for g in row["groups"]
        )
        lines.append(f"* {row['model']}: {groups}")
    lines += [
        "",
        "## Sensitivity-chosen vs uniform rates (prune.magnitude), same budget",
        "",
        "Both chosen on 512 calibration samples (training split) from the grid 0.05…0.95; measured "
        "on the test split.",
        "",
        "| model | budget | weights | sensitivity: removed | test cosine | test acc. | uniform: "
        "rate | removed | test cosine | test acc. | removed ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["sensitivity"]:
        gain = row["sensitivity_removed"] / max(row["uniform_removed"], 1)
        lines.append(
            f"| {row['model']} | {row['budget']} | {row['total_weights']:,} | "
            f"{row['sensitivity_removed']:,} | {row['sensitivity_test_cosine']:.4f} | "
            f"{row['sensitivity_test_accuracy']:.4f} | {row['uniform_rate']:.2f} | "
            f"{row['uniform_removed']:,} | {row['uniform_test_cosine']:.4f} | "
            f"{row['uniform_test_accuracy']:.4f} | {gain:.2f}× |"
        )
    lines += ["", "Per-layer rates chosen:", ""]
    for row in result["sensitivity"]:
        rates = ", ".join(f"{k}: {v:.2f}" for k, v in row["sensitivity_rates"].items())
        lines.append(f"* {row['model']} ({row['budget']}): {rates}")
    return "\n".join(lines) + "\n"


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    x_train, y_train, x_test, y_test = load_digits_split(seed=SEED)
    data = {
        "x_train": x_train,
        "y_train": y_train,
        "x_test": x_test,
        "y_test": y_test,
        "x_train_images": x_train.reshape(-1, 1, 8, 8),
        "x_test_images": x_test.reshape(-1, 1, 8, 8),
    }
    models = trained_models(data)
    result: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_average": os.getloadavg(),
        },
        "data": "sklearn digits 8x8, stratified split (1347 train / 450 test), seed 0",
        "structured": [],
        "sensitivity": [],
    }
    for name, (model, _) in models.items():
        suffix = "_images" if name == "cnn" else ""
        view = {"x_train": data[f"x_train{suffix}"], "y_train": y_train,
                "x_test": data[f"x_test{suffix}"], "y_test": y_test}
        result["structured"].append(structured(name, model, view))
        print(
            json.dumps(result["structured"][-1]["latency"]),
            result["structured"][-1]["accuracy_finetuned"],
        )
        result["sensitivity"] += chosen_vs_uniform(name, model, view)
        print(json.dumps(result["sensitivity"][-2:], indent=1))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "prune_structured.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "prune_structured.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
