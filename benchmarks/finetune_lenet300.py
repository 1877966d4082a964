"""LeNet-300-100 on full MNIST: prune to Han's 8% of weights, recover accuracy by fine-tuning.

Han et al. 2015, Table 1/2: LeNet-300-100 keeps 8% of its weights (fc1 8%, fc2 9%, fc3 26%:
12× fewer) at 1.59% test error against 1.64% dense, with iterative pruning and retraining.
Here, all through onnxcompress on the ONNX model that torch exports:

1. train the dense network in torch (`benchmarks/models.py`), export it to ONNX;
2. iterative pruning (Han's schedule, in rounds that halve the remaining weights toward the
   per-layer targets): each round is a `prune.magnitude` step followed by a `finetune` step
   (SGD + momentum 0.9, L2 1e-4, learning rate 0.02 with cosine decay per round -- the dense
   run started at 0.05 with cosine decay; pruned weights held at zero by masks) run by the
   gated pipeline on the full training set; 4+4+4+20 epochs;
3. test accuracy of the ONNX result in onnxruntime, before and after fine-tuning.

Also measured: training throughput (samples/s) of the ONNX→torch executor against the same
network written natively in torch, both dense and with masks, in one run, interleaved,
median of repeats (target: executor >= 0.7× native); and the same for LeNet-5 (a CNN).

    .venv/bin/python benchmarks/finetune_lenet300.py     # ~2-4 min on 2 shared cores

Writes benchmarks/results/finetune_lenet300.json and .md.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import models  # noqa: E402
from benchmarks.data import load_mnist  # noqa: E402
from onnxcompress import runtime  # noqa: E402
from onnxcompress.fidelity import Gate  # noqa: E402
from onnxcompress.finetune import parametrize  # noqa: E402
from onnxcompress.finetune.executor import OnnxModule, to_ir  # noqa: E402
from onnxcompress.pipeline import Step, run_steps  # noqa: E402

RESULTS = Path(__file__).parent / "results"
SEED = 0
DENSE_EPOCHS, DENSE_LR = 20, 0.05
#: Han et al. 2015, Table 2: weights kept per layer.
KEEP = {"fc1.weight": 0.08, "fc2.weight": 0.09, "fc3.weight": 0.26}
ROUNDS = 4  # kept share per round: 1 - (1 - keep) * (1 - 0.5**r) / (1 - 0.5**ROUNDS)
ROUND_EPOCHS = (4, 4, 4, 20)
FINETUNE = {"lr": 0.02, "optimizer": "sgd", "lr_schedule": "cosine", "momentum": 0.9, "l2": 1e-4, "batch_size": 128}
THROUGHPUT = {"batch_size": 128, "steps": 40, "repeats": 7}


def machine() -> dict[str, object]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def ort_accuracy(model: ir.Model, x: np.ndarray, y: np.ndarray) -> float:
    proto = ir.to_proto(model)
    proto.ir_version = 10
    session = runtime.session(proto, threads=1)
    name = session.get_inputs()[0].name
    logits = np.concatenate([session.run(None, {name: x[i : i + 2000]})[0] for i in range(0, len(x), 2000)])
    return float((logits.argmax(1) == y).mean())


def kept_share(model: ir.Model) -> dict[str, float]:
    out = {}
    for name in KEEP:
        array = model.graph.initializers[name].const_value.numpy()
        out[name] = float(np.count_nonzero(array) / array.size)
    return out


def round_targets(round_index: int) -> dict[str, float]:
    """Sparsity per layer after round r (1-based): geometric approach to the final share."""
    progress = (1 - 0.5**round_index) / (1 - 0.5**ROUNDS)
    return {name: round((1 - keep) * progress, 6) for name, keep in KEEP.items()}


def prune_and_finetune(dense: ir.Model, data: dict[str, np.ndarray], x_test: np.ndarray, y_test: np.ndarray) -> dict:
    no_gate = Gate(min_cosine=None)
    model = dense
    rounds = []
    for r in range(1, ROUNDS + 1):
        targets = round_targets(r)
        started = time.perf_counter()
        pruned = run_steps(
            model,
            [Step(pass_name="prune.magnitude", options={"sparsity": 0.0, "overrides": targets}, gate=no_gate)],
        ).model
        accuracy_pruned = ort_accuracy(pruned, x_test, y_test)
        tuned = run_steps(
            pruned,
            [Step(pass_name="finetune", options={"epochs": ROUND_EPOCHS[r - 1], **FINETUNE}, gate=no_gate)],
            data=data,
            seed=SEED + r,
        )
        model = tuned.model
        accuracy_tuned = ort_accuracy(model, x_test, y_test)
        record = {
            "round": r,
            "target_sparsity": targets,
            "kept": kept_share(model),
            "test_accuracy_pruned": accuracy_pruned,
            "test_accuracy_finetuned": accuracy_tuned,
            "epochs": ROUND_EPOCHS[r - 1],
            "train_loss": [h["loss"] for h in tuned.steps[0].report.notes["history"]],
            "seconds": time.perf_counter() - started,
        }
        print(f"round {r}: kept {record['kept']}, accuracy pruned {accuracy_pruned:.4f} -> tuned {accuracy_tuned:.4f}"
              f" ({record['seconds']:.0f}s)")
        rounds.append(record)
    one_shot = run_steps(
        dense,
        [Step(pass_name="prune.magnitude", options={"sparsity": 0.0, "overrides": round_targets(ROUNDS)}, gate=no_gate)],
    ).model
    return {"rounds": rounds, "final": model, "one_shot_accuracy": ort_accuracy(one_shot, x_test, y_test)}


def _native_masked(module: torch.nn.Module, masks: dict[str, torch.Tensor]) -> None:
    from torch.nn.utils import parametrize as tp

    for name, mask in masks.items():
        layer = getattr(module, name.split(".")[0])
        tp.register_parametrization(layer, "weight", parametrize.Mask(mask))


def _steps_per_second(module: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, batch: int) -> float:
    optimizer = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=0.005, momentum=0.9,
                                weight_decay=1e-4)
    module.train()
    started = time.perf_counter()
    for i in range(steps):
        start = (i * batch) % (len(x) - batch)
        loss = torch.nn.functional.cross_entropy(module(x[start : start + batch]), y[start : start + batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return steps * batch / (time.perf_counter() - started)


def throughput(dense_torch: torch.nn.Module, final: ir.Model, x: np.ndarray, y: np.ndarray) -> dict:
    """Samples/s of training steps: executor vs native, dense and masked, interleaved."""
    import copy

    batch, steps = THROUGHPUT["batch_size"], THROUGHPUT["steps"]
    xt, yt = torch.from_numpy(x[:20000]), torch.from_numpy(y[:20000])
    proto = models.export(dense_torch)
    masks = {n: torch.from_numpy(final.graph.initializers[n].const_value.numpy() != 0) for n in KEEP}
    variants = {
        "native_dense": copy.deepcopy(dense_torch),
        "executor_dense": OnnxModule(proto),
        "native_masked": copy.deepcopy(dense_torch),
        "executor_masked": OnnxModule(proto),
    }
    _native_masked(variants["native_masked"], masks)
    for name, mask in masks.items():
        parametrize.add_mask(variants["executor_masked"], name, mask)
    samples: dict[str, list[float]] = {k: [] for k in variants}
    for module in variants.values():  # warm-up
        _steps_per_second(module, xt, yt, 5, batch)
    for _ in range(THROUGHPUT["repeats"]):
        for name, module in variants.items():
            samples[name].append(_steps_per_second(module, xt, yt, steps, batch))
    medians = {k: statistics.median(v) for k, v in samples.items()}
    return {
        "samples_per_second": medians,
        "all_samples_per_second": samples,
        "ratio_dense": medians["executor_dense"] / medians["native_dense"],
        "ratio_masked": medians["executor_masked"] / medians["native_masked"],
        **THROUGHPUT,
    }


def throughput_lenet5(x: np.ndarray, y: np.ndarray) -> dict:
    """The same comparison on a CNN (Conv, MaxPool, Gemm): LeNet-5, dense, batch 64."""
    batch, steps = 64, 15
    native = models.build("lenet5", seed=SEED)
    executor = OnnxModule(models.export(native))
    xt, yt = torch.from_numpy(x[:5000].reshape(-1, 1, 28, 28)), torch.from_numpy(y[:5000])
    variants = {"native_dense": native, "executor_dense": executor}
    samples: dict[str, list[float]] = {k: [] for k in variants}
    for module in variants.values():
        _steps_per_second(module, xt, yt, 3, batch)
    for _ in range(THROUGHPUT["repeats"]):
        for name, module in variants.items():
            samples[name].append(_steps_per_second(module, xt, yt, steps, batch))
    medians = {k: statistics.median(v) for k, v in samples.items()}
    return {"samples_per_second": medians, "all_samples_per_second": samples,
            "ratio_dense": medians["executor_dense"] / medians["native_dense"], "batch_size": batch, "steps": steps,
            "repeats": THROUGHPUT["repeats"]}


def main() -> None:
    torch.set_num_threads(1)
    started = time.perf_counter()
    x_train, y_train, x_test, y_test = load_mnist()
    dense_torch = models.trained("lenet300", epochs=DENSE_EPOCHS, lr=DENSE_LR, seed=SEED)
    dense = to_ir(models.export(dense_torch))
    dense_accuracy = ort_accuracy(dense, x_test, y_test)
    print(f"dense test accuracy {dense_accuracy:.4f}")
    data = {dense.graph.inputs[0].name: x_train, "labels": y_train}
    pruning = prune_and_finetune(dense, data, x_test, y_test)
    final = pruning.pop("final")
    final_accuracy = pruning["rounds"][-1]["test_accuracy_finetuned"]
    weights = sum(int(np.prod(dense.graph.initializers[n].const_value.shape)) for n in KEEP)
    kept = sum(int(np.count_nonzero(final.graph.initializers[n].const_value.numpy())) for n in KEEP)
    speed = throughput(dense_torch, final, x_train, y_train)
    speed_cnn = throughput_lenet5(x_train, y_train)
    result = {
        "benchmark": "finetune_lenet300",
        "command": "python benchmarks/finetune_lenet300.py",
        "machine": machine(),
        "dense": {"epochs": DENSE_EPOCHS, "lr": DENSE_LR, "test_accuracy": dense_accuracy},
        "pruning": {"keep_per_layer": KEEP, "round_count": ROUNDS, "finetune": FINETUNE, **pruning},
        "final": {
            "weights": weights,
            "kept": kept,
            "kept_share": kept / weights,
            "compression": weights / kept,
            "test_accuracy": final_accuracy,
            "accuracy_gap_points": 100 * (dense_accuracy - final_accuracy),
            "target_met": 100 * (dense_accuracy - final_accuracy) <= 0.1,
        },
        "paper": {"dense_error": 1.64, "pruned_error": 1.59, "kept_share": 0.08},
        "throughput": speed,
        "throughput_lenet5": speed_cnn,
        "throughput_target_met": speed["ratio_dense"] >= 0.7 and speed["ratio_masked"] >= 0.7,
        "seconds": time.perf_counter() - started,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "finetune_lenet300.json").write_text(json.dumps(result, indent=2))
    (RESULTS / "finetune_lenet300.md").write_text(markdown(result))
    print(markdown(result))


def markdown(r: dict) -> str:
    f, d, t = r["final"], r["dense"], r["throughput"]
    lines = [
        "# LeNet-300-100 on MNIST: prune to 8% and fine-tune through the ONNX bridge",
        "",
        f"Command: `{r['command']}` — {r['machine']['processor']}, {r['machine']['cpus']} CPUs, "
        f"torch {r['machine']['torch']} ({r['machine']['torch_threads']} thread), {r['seconds']:.0f} s in all.",
        "",
        "| model | weights kept | test error | paper (Han et al. 2015) |",
        "| --- | ---: | ---: | ---: |",
        f"| dense | 100% | {100 * (1 - d['test_accuracy']):.2f}% | 1.64% |",
        f"| pruned, one shot, no fine-tuning | {100 * f['kept_share']:.2f}% | "
        f"{100 * (1 - r['pruning']['one_shot_accuracy']):.2f}% | — |",
        f"| pruned iteratively + fine-tuned ({r['pruning']['round_count']} rounds) | {100 * f['kept_share']:.2f}% "
        f"({f['compression']:.1f}×) | {100 * (1 - f['test_accuracy']):.2f}% | 1.59% (8%) |",
        "",
        f"Gap to dense: {f['accuracy_gap_points']:+.2f} points (target ≤ 0.1): "
        f"**{'met' if f['target_met'] else 'not met'}**.",
        "",
        "| round | kept fc1 / fc2 / fc3 | accuracy after pruning | after fine-tuning | epochs |",
        "| ---: | --- | ---: | ---: | ---: |",
    ]
    for rd in r["pruning"]["rounds"]:
        kept = " / ".join(f"{100 * v:.1f}%" for v in rd["kept"].values())
        lines.append(f"| {rd['round']} | {kept} | {100 * rd['test_accuracy_pruned']:.2f}% | "
                     f"{100 * rd['test_accuracy_finetuned']:.2f}% | {rd['epochs']} |")
    s = t["samples_per_second"]
    c = r["throughput_lenet5"]
    cs = c["samples_per_second"]
    lines += [
        "",
        f"Training throughput (batch {t['batch_size']}, SGD, {t['steps']} steps × {t['repeats']} interleaved "
        "repeats, median samples/s):",
        "",
        "| | native torch | ONNX executor | executor / native |",
        "| --- | ---: | ---: | ---: |",
        f"| dense | {s['native_dense']:,.0f} | {s['executor_dense']:,.0f} | {t['ratio_dense']:.2f}× |",
        f"| masked (8%) | {s['native_masked']:,.0f} | {s['executor_masked']:,.0f} | {t['ratio_masked']:.2f}× |",
        f"| LeNet-5 dense (batch {c['batch_size']}, {c['steps']} steps) | {cs['native_dense']:,.0f} | "
        f"{cs['executor_dense']:,.0f} | {c['ratio_dense']:.2f}× |",
        "",
        f"Target executor ≥ 0.7× native: **{'met' if r['throughput_target_met'] else 'not met'}**.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
