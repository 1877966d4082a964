"""lowrank.svd on trained layers: parameters, FLOPs, onnxruntime latency and fidelity per rank.

Two blocks taken from models trained here on real data (MNIST through `benchmarks/data.py`
when it is available, else scikit-learn's digits; the JSON says which):

* `mlp_block` — the 1024→4096→1024 block (MatMul + Add, Relu, MatMul + Add) of an MLP
  `x → 1024 → [4096 → 1024] → 10`;
* `classifier_head` — the 8192→1024→10 head (Gemm transB=1, Relu, Gemm) of a small CNN whose
  conv features are 8192 wide; the 8192×1024 layer is the one that matters.

Both models train for a fixed number of epochs (seeded; not a wall-clock budget, so the
weights are the same on every run with the same thread count).

Each block is written as its own ONNX model (the layout torch exports: MatMul for the block,
Gemm transB=1 for the head) and compressed by the `lowrank.svd` pass at several target
ratios and energies, and by the fidelity-budget search (probes: block inputs of 256 *training*
images, so the search never sees the evaluation set). In the head, the ratio and energy
variants factorize the 8192×1024 layer only (`include`): the 10×1024 output layer has at
most rank 9 worth keeping, and one extra row shows what factorizing it too does. The budget
variant considers both layers and decides itself.

Per variant: weight parameters, FLOPs per sample, median onnxruntime latency at batch 1
and 64 (1 intra-op thread, all variants timed interleaved in one run, so ratios are side
by side), fidelity of the block's output on held-out activations — the pipeline's cosine
(over the flattened batch), the centered cosine (the reference's per-feature batch mean
removed from both, so a shared offset cannot inflate it) and the lowest per-sample
cosine — and the whole classifier's accuracy / top-1 agreement with the block replaced.

Target (issue 4): ≥ 2× fewer parameters and ≥ 1.5× lower latency at batch 64 where the
output cosine stays ≥ 0.99.

    # ~6 min on 2 shared cores
    flock /tmp/onnxcompress-heavy.lock .venv/bin/python benchmarks/lowrank_svd.py

`LOWRANK_EPOCHS` (default 1) sets the training length.
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
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from onnxcompress.fidelity import compare  # noqa: E402
from onnxcompress.pass_base import PassContext  # noqa: E402
from onnxcompress.passes.lowrank.svd import LowRankSVDPass  # noqa: E402
from onnxcompress.sites import find_weight_sites  # noqa: E402

RESULTS = Path(__file__).parent / "results"
SEED = 0
RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5)
ENERGIES = (0.9, 0.95)
REPEATS = {1: 200, 64: 40}  # per round
ROUNDS = 3
COMMAND = "flock /tmp/onnxcompress-heavy.lock .venv/bin/python benchmarks/lowrank_svd.py"


# ---- data and training --------------------------------------------------------------------
def load_images() -> tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(source, train images N×1×H×W in [0, 1], train labels, test images, test labels)."""
    try:
        from benchmarks.data import load_mnist  # written by the fine-tune helper

        x_train, y_train, x_test, y_test = load_mnist(images=True)
        return "mnist", x_train, y_train, x_test[:2000], y_test[:2000]
    except (ImportError, OSError, RuntimeError) as error:
        print(f"MNIST unavailable ({type(error).__name__}: {error}); using sklearn digits")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None]
    x_train, x_test, y_train, y_test = train_test_split(
        images,
        digits.target.astype(np.int64),
        test_size=0.25,
        random_state=SEED,
        stratify=digits.target,
    )
    return "sklearn-digits", x_train, y_train, x_test, y_test


def train(model, x: np.ndarray, y: np.ndarray, epochs: int, batch: int = 128):  # type: ignore[no-untyped-def]
    """AdamW with weight decay for a fixed number of epochs, seeded: the same weights every run."""
    import torch

    torch.manual_seed(SEED)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    xs, ys = torch.from_numpy(x), torch.from_numpy(y)
    generator = torch.Generator().manual_seed(SEED)
    steps, loss = 0, torch.zeros(())
    for _ in range(epochs):
        order = torch.randperm(len(xs), generator=generator)
        for index in range(0, len(xs), batch):
            chosen = order[index : index + batch]
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(xs[chosen]), ys[chosen])
            loss.backward()
            optimizer.step()
            steps += 1
    return steps, float(loss.item())


def build_models(channels_hw: tuple[int, int, int]):  # type: ignore[no-untyped-def]
    import torch
    from torch import nn

    torch.manual_seed(SEED)
    c, h, w = channels_hw
    mlp = nn.Sequential(
        nn.Flatten(),
        nn.LazyLinear(1024),
        nn.ReLU(),
        nn.Linear(1024, 4096),
        nn.ReLU(),
        nn.Linear(4096, 1024),
        nn.ReLU(),
        nn.Linear(1024, 10),
    )
    features = nn.Sequential(nn.Conv2d(1, c, 3, padding=1), nn.ReLU())
    if h > 16:  # MNIST 28×28 → pad to 32×32 → pool to 16×16 with 32 channels = 8192
        features = nn.Sequential(
            nn.ZeroPad2d(2), nn.Conv2d(1, c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)
        )
    cnn = nn.Sequential(
        features, nn.Flatten(), nn.Linear(8192, 1024), nn.ReLU(), nn.Linear(1024, 10)
    )
    return mlp, cnn


# ---- the two blocks as ONNX models --------------------------------------------------------
def finish(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model


def mlp_block_proto(
    w1: np.ndarray, b1: np.ndarray, w2: np.ndarray, b2: np.ndarray
) -> onnx.ModelProto:
    """x[batch,1024] → MatMul(1024×4096) + b → Relu → MatMul(4096×1024) + b."""
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for a, n in
             ((w1, "up.weight"), (b1, "up.bias"), (w2, "down.weight"), (b2, "down.bias"))]
    nodes = [
        helper.make_node("MatMul", ["x", "up.weight"], ["u"]),
        helper.make_node("Add", ["u", "up.bias"], ["ub"]),
        helper.make_node("Relu", ["ub"], ["r"]),
        helper.make_node("MatMul", ["r", "down.weight"], ["d"]),
        helper.make_node("Add", ["d", "down.bias"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp_block",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1024])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1024])],
        inits,
    )
    return finish(graph)


def head_proto(w1: np.ndarray, b1: np.ndarray, w2: np.ndarray, b2: np.ndarray) -> onnx.ModelProto:
    """x[batch,8192] → Gemm(1024×8192, transB) → Relu → Gemm(10×1024, transB): logits."""
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for a, n in
             ((w1, "fc1.weight"), (b1, "fc1.bias"), (w2, "fc2.weight"), (b2, "fc2.bias"))]
    nodes = [helper.make_node("Gemm", ["x", "fc1.weight", "fc1.bias"], ["h"], transB=1),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "fc2.weight", "fc2.bias"], ["y"], transB=1)]
    graph = helper.make_graph(
        nodes,
        "classifier_head",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8192])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 10])],
        inits,
    )
    return finish(graph)


# ---- measuring ----------------------------------------------------------------------------
def session(proto: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(
        proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def latencies(
    protos: dict[str, onnx.ModelProto], width: int, batch: int, repeats: int
) -> list[dict[str, float]]:
    """Median ms per variant in each of ROUNDS rounds; variants interleaved within every repeat."""
    rng = np.random.default_rng(SEED)
    feed = {"x": rng.standard_normal((batch, width)).astype(np.float32)}
    sessions = {name: session(proto) for name, proto in protos.items()}
    for s in sessions.values():
        for _ in range(3):
            s.run(None, feed)
    rounds = []
    for _ in range(ROUNDS):
        times: dict[str, list[float]] = {name: [] for name in sessions}
        for _ in range(repeats):
            for name, s in sessions.items():
                start = time.perf_counter()
                s.run(None, feed)
                times[name].append((time.perf_counter() - start) * 1e3)
        rounds.append({name: statistics.median(t) for name, t in times.items()})
    return rounds


def weight_params(proto: onnx.ModelProto) -> int:
    return sum(site.size for site in find_weight_sites(ir.from_proto(proto), min_params=0).sites)


def compress(
    proto: onnx.ModelProto, data: dict | None = None, **options: object
) -> tuple[onnx.ModelProto, dict]:
    model = ir.from_proto(proto)
    compression = LowRankSVDPass(min_params=0, **options, context=PassContext(data=data))
    started = time.perf_counter()
    result = compression(model)
    print(f"  {options}: {time.perf_counter() - started:.1f} s", flush=True)
    return ir.to_proto(model), result.report.notes["plan"]


def centered_cosine(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Cosine after removing the reference's per-feature batch mean from both (offsets cancel)."""
    mean = reference.mean(axis=0, keepdims=True)
    a, b = (reference - mean).ravel(), (candidate - mean).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def min_sample_cosine(reference: np.ndarray, candidate: np.ndarray) -> float:
    dots = np.sum(reference * candidate, axis=1)
    return float(
        np.min(dots / (np.linalg.norm(reference, axis=1) * np.linalg.norm(candidate, axis=1)))
    )


def evaluate_block(
    name: str,
    proto: onnx.ModelProto,
    activations: np.ndarray,
    calibration: np.ndarray,
    finish_logits,
    labels: np.ndarray,
    width: int,
    only: tuple[str, ...] = (),
    also_all: float | None = None,
) -> dict:
    """Every variant of one block: sizes, FLOPs, fidelity, accuracy; then latencies side by side."""
    print(f"{name}:", flush=True)
    variants: dict[str, tuple[onnx.ModelProto, dict | None]] = {"original": (proto, None)}
    for ratio in RATIOS:
        variants[f"ratio {ratio}"] = compress(proto, ratio=ratio, include=only)
    if also_all is not None:  # the same ratio on every layer, the small output layer included
        variants[f"ratio {also_all}, all layers"] = compress(proto, ratio=also_all)
    for energy in ENERGIES:
        variants[f"energy {energy}"] = compress(proto, energy=energy, include=only)
    # the greedy search on real activations of training images; evaluated on held-out ones
    variants["budget 0.99"] = compress(
        proto, data={"x": calibration}, budget=0.99, probes=len(calibration)
    )
    reference = session(proto).run(None, {"x": activations})
    base_logits = finish_logits(reference[0])
    rows = []
    for label, (variant, plan) in variants.items():
        outputs = session(variant).run(None, {"x": activations})
        metrics = compare(reference, outputs)
        logits = finish_logits(outputs[0])
        layers = plan["layers"] if plan else []
        skipped = plan["skipped"] if plan else []
        flops = plan["totals"] if plan else {"flops_before": 0, "flops_after": 0}
        rows.append(
            {
                "variant": label,
                "ranks": {
                    layer["name"]: f"{layer['kind']} r={layer['rank']}/{layer['max_rank']}"
                    for layer in layers
                },
                "skipped": {item["name"]: item["reason"] for item in skipped},
                "weight_params": weight_params(variant),
                "flops_per_sample_saved": flops["flops_before"] - flops["flops_after"],
                "cosine": metrics.cosine,
                "centered_cosine": centered_cosine(reference[0], outputs[0]),
                "min_sample_cosine": min_sample_cosine(reference[0], outputs[0]),
                "rel_l2": metrics.rel_l2,
                "accuracy": float(np.mean(logits.argmax(1) == labels)),
                "top1_agreement": float(np.mean(logits.argmax(1) == base_logits.argmax(1))),
            }
        )
    original_flops = 2 * rows[0]["weight_params"]  # MatMul/Gemm: 2 FLOPs per weight per sample
    for row in rows:
        row["flops_per_sample"] = original_flops - row.pop("flops_per_sample_saved")
    for batch, repeats in REPEATS.items():
        print(f"  timing batch {batch} (load average {os.getloadavg()[0]:.2f})", flush=True)
        rounds = latencies({k: v[0] for k, v in variants.items()}, width, batch, repeats)
        for row in rows:
            variant = row["variant"]
            speedups = sorted(r["original"] / r[variant] for r in rounds)
            row[f"latency_ms_batch{batch}"] = statistics.median(r[variant] for r in rounds)
            row[f"speedup_batch{batch}"] = statistics.median(speedups)  # the median round's ratio
            row[f"speedup_batch{batch}_range"] = [speedups[0], speedups[-1]]
    for row in rows:
        row["param_reduction"] = rows[0]["weight_params"] / row["weight_params"]
        fast_and_small = row["param_reduction"] >= 2 and row["speedup_batch64"] >= 1.5
        row["meets_target"] = bool(fast_and_small and row["cosine"] >= 0.99)
        row["meets_target_centered"] = bool(fast_and_small and row["centered_cosine"] >= 0.99)
    return {"block": name, "rows": rows}


def rank_for(values: np.ndarray, fraction: float) -> int:
    """Smallest r whose top r singular values hold `fraction` of the squared total."""
    energy = np.cumsum(values**2) / np.sum(values**2)
    return int(np.searchsorted(energy, fraction) + 1)


def spectrum_summary(weight: np.ndarray, initial: np.ndarray, inputs: np.ndarray) -> dict:
    """Why energy misleads: W = W₀ (the random init, flat spectrum) + the learned update.

    Weights in×out (x @ W); `inputs` are the layer's held-out inputs.
    """
    weight, initial, inputs = (a.astype(np.float64) for a in (weight, initial, inputs))
    s = np.linalg.svd(weight, compute_uv=False)
    update = np.linalg.svd(weight - initial, compute_uv=False)
    centered = np.linalg.svd(inputs - inputs.mean(0), compute_uv=False)
    return {
        "shape": list(weight.shape),
        "sigma_1_over_sigma_mid": float(s[0] / s[len(s) // 2]),
        "rank_for_90pct_energy": rank_for(s, 0.9),
        "rank_for_99pct_energy": rank_for(s, 0.99),
        "full_rank": len(s),
        "init_share_of_energy": float(np.sum(initial**2) / np.sum(weight**2)),
        "init_share_of_output": float(
            np.linalg.norm(inputs @ initial) / np.linalg.norm(inputs @ weight)
        ),
        "update_rank_for_90pct_energy": rank_for(update, 0.9),
        "input_dims_for_90pct_variance": rank_for(centered, 0.9),
    }


# ---- main -----------------------------------------------------------------------------------
def machine() -> dict:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in open("/proc/cpuinfo")
            if line.startswith("model name")
        ),
        "?",
    )
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "load_average": os.getloadavg(),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "numpy": np.__version__,
        "threads": 1,
        "note": "2 cores shared with other jobs: absolute times are noisy; "
        "ratios are measured side by side",
    }


def main() -> None:
    import torch

    torch.set_num_threads(2)
    source, x_train, y_train, x_test, y_test = load_images()
    hw = x_train.shape[-1]
    mlp, cnn = build_models((32, hw, hw) if hw > 16 else (128, hw, hw))
    started = time.perf_counter()
    mlp(torch.from_numpy(x_train[:2]))  # materialize the lazy layer
    initial = {f"mlp.{n}": p.detach().numpy().copy() for n, p in mlp.named_parameters()}
    initial |= {f"cnn.{n}": p.detach().numpy().copy() for n, p in cnn.named_parameters()}
    epochs = int(os.environ.get("LOWRANK_EPOCHS", 1 if source == "mnist" else 10))
    print(f"training both models for {epochs} epoch(s) on {source}", flush=True)
    mlp_steps, mlp_loss = train(mlp, x_train, y_train, epochs)
    cnn_steps, cnn_loss = train(cnn, x_train, y_train, epochs)
    training = {
        "data": source,
        "train_samples": len(x_train),
        "test_samples": len(x_test),
        "epochs": epochs,
        "mlp": {"steps": mlp_steps, "final_loss": mlp_loss},
        "cnn": {"steps": cnn_steps, "final_loss": cnn_loss},
        "seconds": time.perf_counter() - started,
    }
    mlp.eval()
    cnn.eval()
    with torch.no_grad():
        xt, xc = torch.from_numpy(x_test), torch.from_numpy(x_train[:256])
        # the block's input: after the first Linear + Relu
        block_in = mlp[2](mlp[1](mlp[0](xt))).numpy()
        block_calibration = mlp[2](mlp[1](mlp[0](xc))).numpy()
        head_in = cnn[1](cnn[0](xt)).numpy()  # 8192 conv features
        head_calibration = cnn[1](cnn[0](xc)).numpy()
        training["mlp_test_accuracy"] = float((mlp(xt).argmax(1).numpy() == y_test).mean())
        training["cnn_test_accuracy"] = float((cnn(xt).argmax(1).numpy() == y_test).mean())
    params = {n: p.detach().numpy() for n, p in mlp.named_parameters()}
    head = {n: p.detach().numpy() for n, p in cnn.named_parameters()}
    # torch stores out×in; MatMul wants in×out
    up, down = params["3.weight"].T, params["5.weight"].T
    block = mlp_block_proto(up, params["3.bias"], down, params["5.bias"])
    last_w, last_b = params["7.weight"], params["7.bias"]

    def mlp_logits(y: np.ndarray) -> np.ndarray:
        return np.maximum(y, 0) @ last_w.T + last_b

    head_model = head_proto(head["2.weight"], head["2.bias"], head["4.weight"], head["4.bias"])
    hidden = np.maximum(block_in @ up + params["3.bias"], 0)
    spectra = {
        "mlp up 1024×4096": spectrum_summary(up, initial["mlp.3.weight"].T, block_in),
        "mlp down 4096×1024": spectrum_summary(down, initial["mlp.5.weight"].T, hidden),
        "head fc1 8192×1024": spectrum_summary(
            head["2.weight"].T, initial["cnn.2.weight"].T, head_in
        ),
    }
    results = [
        evaluate_block(
            "mlp_block 1024→4096→1024", block, block_in, block_calibration, mlp_logits, y_test, 1024
        ),
        evaluate_block(
            "classifier_head 8192→1024→10",
            head_model,
            head_in,
            head_calibration,
            lambda y: y,
            y_test,
            8192,
            only=("fc1.weight",),
            also_all=0.5,
        ),
    ]
    report = {
        "machine": machine(),
        "training": training,
        "spectra": spectra,
        "results": results,
        "command": COMMAND,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "lowrank_svd.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / "lowrank_svd.md").write_text(markdown(report))
    print(markdown(report))


def speedup(row: dict, batch: int) -> str:
    low, high = row[f"speedup_batch{batch}_range"]
    return f"{row[f'speedup_batch{batch}']:.2f} ({low:.2f}–{high:.2f})"


def markdown(report: dict) -> str:
    m, t = report["machine"], report["training"]
    lines = [
        "# lowrank.svd on trained layers",
        "",
        f"`{report['command']}` — {m['cpu']}, {m['cores']} cores (shared), onnxruntime "
        f"{m['onnxruntime']}, 1 intra-op thread, load average at the end "
        f"{tuple(round(v, 2) for v in m['load_average'])}.",
        f"Trained on {t['data']} ({t['train_samples']} train / {t['test_samples']} test, "
        f"{t['epochs']} epoch(s), {t['seconds']:.0f} s): MLP {t['mlp']['steps']} steps of 128, "
        f"test accuracy {t['mlp_test_accuracy']:.4f}; CNN {t['cnn']['steps']} steps of 128, test "
        f"accuracy {t['cnn_test_accuracy']:.4f}.",
        "Latency: all variants of a block timed side by side, interleaved within every repeat; "
        f"{ROUNDS} rounds of {REPEATS[1]} (batch 1) / {REPEATS[64]} (batch 64) repeats; ms is the "
        "median over rounds of each round's",
        "median, × the median round's speedup over the original, with the lowest–highest round in "
        "brackets.",
        "Fidelity: block output vs the original block on held-out activations — cosine over the "
        "flattened",
        "batch (the pipeline's metric, the one the target names), centered cosine (the reference's",
        "per-feature batch mean removed from both) and the lowest per-sample cosine; accuracy and "
        "top-1",
        "agreement: the whole classifier with the block replaced. Target: ≥ 2× fewer parameters, ≥ "
        "1.5×",
        "lower latency at batch 64, cosine ≥ 0.99 (the last column also asks centered cosine ≥ "
        "0.99).",
        "",
        "Spectra of the trained weights:",
        "",
        "| weight | σ₁/σ_mid | rank for 90% energy | rank for 99% energy | full rank | ‖W₀‖² / "
        "‖W‖² | ‖xW₀‖ / ‖xW‖ | rank of W − W₀ for 90% | input dims for 90% variance |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, s in report["spectra"].items():
        lines.append(
            f"| {name} | {s['sigma_1_over_sigma_mid']:.1f} | {s['rank_for_90pct_energy']} | "
            f"{s['rank_for_99pct_energy']} | {s['full_rank']} | {s['init_share_of_energy']:.1%} | "
            f"{s['init_share_of_output']:.1%} | {s['update_rank_for_90pct_energy']} | "
            f"{s['input_dims_for_90pct_variance']} |"
        )
    lines += [
        "",
        "W₀ is the weight at initialization, x the layer's held-out inputs: energy counts W₀, the "
        "output hardly does.",
    ]
    for result in report["results"]:
        lines += [
            "",
            f"## {result['block']}",
            "",
            "| variant | ranks | params | ×fewer | MFLOP/sample | b1 ms | b1 × | b64 ms | b64 × | "
            "cosine | centered | min sample | accuracy | top-1 agree | target | target (centered) "
            "|",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | "
            "---: | ---: | :---: | :---: |",
        ]
        for row in result["rows"]:
            ranks = ", ".join(row["ranks"].values()) or "—"
            if row["skipped"]:
                ranks += (
                    " (skipped: " + "; ".join(f"{k}: {v}" for k, v in row["skipped"].items()) + ")"
                )
            lines.append(
                f"| {row['variant']} | {ranks} | {row['weight_params']:,} | "
                f"{row['param_reduction']:.2f} | {row['flops_per_sample'] / 1e6:.2f} | "
                f"{row['latency_ms_batch1']:.3f} | {speedup(row, 1)} | "
                f"{row['latency_ms_batch64']:.2f} | {speedup(row, 64)} | {row['cosine']:.5f} | "
                f"{row['centered_cosine']:.5f} | {row['min_sample_cosine']:.4f} | "
                f"{row['accuracy']:.4f} | {row['top1_agreement']:.4f} | "
                f"{'yes' if row['meets_target'] else 'no'} | "
                f"{'yes' if row['meets_target_centered'] else 'no'} |"
            )
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
