"""Deep Compression on LeNet-300-100 and LeNet-5 (full MNIST), beside Han et al.'s Table 1.

Pipeline per network, all through onnxcompress passes on the exported ONNX model:

1. train in torch (`benchmarks.models.trained`, cached in build/models) and export;
2. `prune.magnitude` with the paper's per-layer rates (Han et al. 2015: LeNet-300-100 keeps
   8% / 9% / 26%; LeNet-5 keeps 66% / 12% / 8% / 19%);
3. `codebook.kmeans` with the paper's bits (LeNet-300-100: 6 bits; LeNet-5: conv 8, fc 5;
   `--fc-bits` / `--conv-bits` override), linear initialisation;
4. `pack` with `--coder` (Huffman, the paper's, by default) and `--index-bits` relative
   indices (5, the paper's Tables 2-3, by default; 'auto' picks the smallest archive per layer);
5. with `--finetune`: the `finetune` pass (labels, SGD) after pruning (zeros held) and after
   clustering (indices held, centroids trained: gradients summed per centroid).

Test accuracy is measured with onnxruntime on the 10,000 MNIST test images after every stage;
the unpacked model is checked to be byte-identical to the packed one. The final model is also
packed with every coder × index width, so the results show what each choice costs. The exact
command line is recorded with the results.

    .venv/bin/python benchmarks/codebook_lenet.py                  # no fine-tuning
    .venv/bin/python benchmarks/codebook_lenet.py --finetune       # with the bridge
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime

from onnxcompress.archive import compression_table, pack, table_markdown, unpack
from onnxcompress.pass_base import PassContext, get_pass

RESULTS = Path(__file__).parent / "results"
#: The fine-tune settings these figures were measured with (the pass's defaults have changed since).
SGD = {"optimizer": "sgd", "lr_schedule": "constant"}

#: name: (training epochs, lr, kept share per weight in graph order, bits per weight, paper)
NETWORKS = {
    "lenet300": {
        "title": "LeNet-300-100",
        "epochs": 20,
        "lr": 0.05,
        "kept": (0.08, 0.09, 0.26),
        "bits": (6, 6, 6),
        "paper": {
            "dense_kb": 1070,
            "compressed_kb": 27,
            "ratio": 40,
            "dense_error": 1.64,
            "compressed_error": 1.58,
        },
    },
    "lenet5": {
        "title": "LeNet-5",
        "epochs": 8,
        "lr": 0.05,
        "kept": (0.66, 0.12, 0.08, 0.19),
        "bits": (8, 8, 5, 5),
        "paper": {
            "dense_kb": 1720,
            "compressed_kb": 44,
            "ratio": 39,
            "dense_error": 0.80,
            "compressed_error": 0.74,
        },
    },
}


def weight_names(model: ir.Model) -> list[str]:
    """Weights of Conv / Gemm / MatMul in graph order."""
    names = []
    for node in model.graph:
        if node.op_type in ("Conv", "Gemm", "MatMul") and len(node.inputs) > 1:
            value = node.inputs[1]
            if (
                value is not None
                and value.name in model.graph.initializers
                and value.name not in names
            ):
                names.append(value.name)
    return names


def test_accuracy(model: ir.Model, x: np.ndarray, y: np.ndarray) -> float:
    # Plain onnxruntime: these models use standard ops only, so the kernel library is not needed.
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 2
    session = onnxruntime.InferenceSession(
        ir.to_proto(model).SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    name = session.get_inputs()[0].name
    correct = 0
    for start in range(0, len(x), 2000):
        logits = session.run(None, {name: x[start : start + 2000]})[0]
        correct += int((logits.argmax(1) == y[start : start + 2000]).sum())
    return correct / len(x)


def run_pass(
    model: ir.Model, name: str, data: dict[str, np.ndarray] | None = None, **options: object
) -> None:
    get_pass(name)(**options, context=PassContext(data=data))(model)


#: Packings of the final model shown side by side: (coder, relative-index width).
#: "paper" is the paper's width by op (conv 8, fc 5: its §2 text); ("ans", "auto") is the
#: archive's default.
PACKINGS = (("huffman", 5), ("ans", 5), ("huffman", "paper"), ("huffman", "auto"), ("ans", "auto"))


def _width_name(index_bits: object) -> str:
    """A packing's width as the table says it (None: results written before "paper" existed)."""
    return "conv 8, fc 5" if index_bits in (None, "paper") else str(index_bits)


def layer_bits(
    key: str, names: list[str], fc_bits: int | None, conv_bits: int | None
) -> dict[str, int]:
    """The paper's bits per weight, with the command line's overrides for fc and conv layers."""
    bits = {}
    for name, paper in zip(names, NETWORKS[key]["bits"], strict=True):
        conv = name.startswith("conv")
        override = conv_bits if conv else fc_bits
        bits[name] = override if override is not None else paper
    return bits


def packings(model: ir.Model) -> list[dict[str, object]]:
    """The final model packed with each coder and index width: coded and file sizes."""
    rows = []
    for coder, index_bits in PACKINGS:
        totals = compression_table(pack(model, coder=coder, index_bits=index_bits))["totals"]  # type: ignore[arg-type]
        rows.append({"coder": coder, "index_bits": index_bits, "bytes_coded": totals["bytes_coded"],
                     "ratio_coded": totals["ratio_coded"], "archive_bytes": totals["archive_bytes"],
                     "ratio_archive": totals["ratio_archive"]})
    return rows


def compress(key: str, args: argparse.Namespace, index_bits: int | str) -> dict[str, object]:
    import torch

    from benchmarks.data import load_mnist
    from benchmarks.models import export, trained

    torch.set_num_threads(2)
    spec = NETWORKS[key]
    images = key == "lenet5"
    x_train, y_train, x_test, y_test = load_mnist(images=images)
    started = time.perf_counter()
    module = trained(key, epochs=spec["epochs"], lr=spec["lr"])
    model = ir.from_proto(export(module))
    input_name = model.graph.inputs[0].name
    train_data = {input_name: x_train, "labels": y_train}
    names = weight_names(model)
    stages = {"dense": test_accuracy(model, x_test, y_test)}
    finetune, ft_epochs, coder = args.finetune, args.ft_epochs, args.coder

    overrides = {name: round(1.0 - kept, 4) for name, kept in zip(names, spec["kept"], strict=True)}
    run_pass(model, "prune.magnitude", sparsity=0.0, overrides=overrides, min_params=0)
    stages["pruned"] = test_accuracy(model, x_test, y_test)
    if finetune:
        run_pass(
            model, "finetune", train_data, epochs=ft_epochs, lr=args.ft_lr, batch_size=128, **SGD
        )
        stages["pruned + fine-tuned"] = test_accuracy(model, x_test, y_test)

    bits = layer_bits(key, names, args.fc_bits, args.conv_bits)
    run_pass(model, "codebook.kmeans", overrides=bits, min_params=0, init="linear")
    stages["pruned + shared"] = test_accuracy(model, x_test, y_test)
    if finetune:
        run_pass(
            model,
            "finetune",
            train_data,
            epochs=ft_epochs,
            lr=args.ft_lr_shared,
            batch_size=128,
            **SGD,
        )
        stages["pruned + shared + fine-tuned"] = test_accuracy(model, x_test, y_test)

    result = pack(model, coder=coder, index_bits=index_bits)  # type: ignore[arg-type]
    restored = unpack(result.data)
    assert restored.SerializeToString() == ir.to_proto(model).SerializeToString(), (
        "round trip not exact"
    )
    stages["unpacked archive"] = test_accuracy(ir.from_proto(restored), x_test, y_test)
    table = compression_table(result)
    return {
        "network": spec["title"],
        "finetune": finetune,
        "finetune_epochs": ft_epochs if finetune else 0,
        "finetune_lr": [args.ft_lr, args.ft_lr_shared] if finetune else None,
        "train_epochs": spec["epochs"],
        "kept": dict(zip(names, spec["kept"], strict=True)),
        "bits": bits,
        "coder": coder,
        "index_bits": index_bits,
        "accuracy": stages,
        "table": table,
        "packings": packings(model),
        "paper": spec["paper"],
        "seconds": round(time.perf_counter() - started, 1),
    }


def _bits_text(row: dict[str, object]) -> str:
    return "/".join(str(b) for b in row["bits"].values())  # type: ignore[attr-defined]


def markdown(rows: list[dict[str, object]], command: str, args: argparse.Namespace) -> str:
    machine = f"{os.cpu_count()} CPUs, {platform.platform()}"
    width = (
        "a per-layer width chosen for the smallest archive ('auto')"
        if args.index_bits == "auto"
        else f"{args.index_bits}-bit relative indices"
    )
    coder = {"huffman": "Huffman coding (the paper's)", "ans": "rANS coding"}[args.coder]
    bits = "; ".join(f"{row['network']} {_bits_text(row)}" for row in rows)
    tuning = (
        (
            f"fine-tuning {args.ft_epochs} epochs after pruning (lr {args.ft_lr}) and after "
            f"sharing (lr {args.ft_lr_shared})"
        )
        if args.finetune
        else "no fine-tuning"
    )
    lines = [
        "# Deep Compression on MNIST (LeNet-300-100, LeNet-5) — onnxcompress vs. Han et al. 2016",
        "",
        f"Machine: {machine}. Command: `{command}`.",
        f"Per-layer pruning rates as in the paper; weight bits per layer: {bits}; {width}; "
        f"{coder}; {tuning}.",
        "Accuracy: onnxruntime on the 10,000 MNIST test images.",
        "",
        "| network | fine-tuning | dense acc. | final acc. | Δ points | dense KB | coded KB | × | "
        "archive file KB | × (file) | paper: KB → KB (×), error dense → compressed |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        acc = row["accuracy"]
        totals = row["table"]["totals"]
        paper = row["paper"]
        final = acc["unpacked archive"]
        epochs = f"yes, {row['finetune_epochs']} epochs per stage"
        retrained = epochs if row["finetune"] else "no"
        lines.append(
            f"| {row['network']} | {retrained} "
            f"| {100 * acc['dense']:.2f}% | {100 * final:.2f}% | "
            f"{100 * (final - acc['dense']):+.2f} "
            f"| {totals['bytes_dense'] / 1000:.0f} | {totals['bytes_coded'] / 1000:.1f} | "
            f"{totals['ratio_coded']:.1f} "
            f"| {totals['archive_bytes'] / 1000:.1f} | {totals['ratio_archive']:.1f} "
            f"| {paper['dense_kb']} → {paper['compressed_kb']} ({paper['ratio']}×), "
            f"{paper['dense_error']}% → {paper['compressed_error']}% |"
        )
    lines += [
        "",
        'KB = 1000 bytes. "coded" counts the coded streams, codebooks and the other tensors '
        '(biases) raw, as the paper\'s totals do; "archive file" adds the zlib-compressed graph, '
        'manifest and header.',
        "",
    ]
    for row in rows:
        lines += [
            f"## {row['network']} ({'with' if row['finetune'] else 'without'} fine-tuning)",
            "",
        ]
        lines += ["| stage | test accuracy |", "|---|---:|"]
        lines += [f"| {stage} | {100 * value:.2f}% |" for stage, value in row["accuracy"].items()]
        lines += ["", table_markdown(row["table"]), ""]
        lines += ["Same final model, packed with each coder and relative-index width:", "",
                  "| coder | index bits | coded KB | × (coded) | archive file KB | × (file) |",
                  "|---|---|---:|---:|---:|---:|"]
        lines += [
            f"| {p['coder']} | {_width_name(p['index_bits'])} | {p['bytes_coded'] / 1000:.1f} "
            f"| {p['ratio_coded']:.1f} | {p['archive_bytes'] / 1000:.1f} | "
            f"{p['ratio_archive']:.1f} |"
            for p in row["packings"]
        ]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--finetune", action="store_true", help="fine-tune after pruning and after sharing"
    )
    parser.add_argument("--ft-epochs", type=int, default=2, help="fine-tuning epochs per stage")
    parser.add_argument("--networks", nargs="+", default=list(NETWORKS), choices=list(NETWORKS))
    parser.add_argument("--coder", default="huffman", choices=["huffman", "ans"])
    parser.add_argument("--index-bits", default="5", help="relative-index width, or 'auto'")
    parser.add_argument(
        "--fc-bits", type=int, default=None, help="weight bits of fc layers (default: the paper's)"
    )
    parser.add_argument(
        "--conv-bits", type=int, default=None, help="weight bits of conv layers (default: 8)"
    )
    parser.add_argument("--ft-lr", type=float, default=0.01, help="fine-tuning lr after pruning")
    parser.add_argument(
        "--ft-lr-shared", type=float, default=0.001, help="fine-tuning lr of the centroids"
    )
    parser.add_argument("--tag", default="", help="suffix of the results files, for a variant run")
    args = parser.parse_args()
    index_bits = args.index_bits if args.index_bits == "auto" else int(args.index_bits)
    command = shlex.join([".venv/bin/python", "benchmarks/codebook_lenet.py", *sys.argv[1:]])
    suffix = ("_finetuned" if args.finetune else "") + (f"_{args.tag}" if args.tag else "")
    rows = []
    for key in args.networks:
        rows.append(compress(key, args, index_bits))
        print(json.dumps({k: rows[-1][k] for k in ("network", "accuracy", "seconds")}))
        print({k: round(v, 2) for k, v in rows[-1]["table"]["totals"].items()})
    RESULTS.mkdir(exist_ok=True)
    out = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
           "command": command, "arguments": vars(args), "rows": rows}
    (RESULTS / f"codebook_lenet{suffix}.json").write_text(json.dumps(out, indent=2) + "\n")
    (RESULTS / f"codebook_lenet{suffix}.md").write_text(markdown(rows, command, args))


if __name__ == "__main__":
    main()
