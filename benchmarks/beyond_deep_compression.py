r"""The README's pipelines, run as a user runs them, on LeNet-300-100 and LeNet-5 (full MNIST).

Each row is a sequence of `onnxcompress` commands with no hand-set rate, bit width, learning
rate or epoch count (the commands are recorded verbatim with the results):

* ``default``:  ``optimize --recipe deep-compression --data train.npz --finetune`` (a magnitude
  ladder 30% → 97.5% with a fine-tune round after each rung and after k-means, each round
  gated on ≤ 0.3 points of accuracy lost on ``val.npz``), then ``pack``;
* ``sws`` (soft weight-sharing on the default pipeline's result): the default row's
  ``optimize`` (reused when its files are there), then ``finetune --prior gmm`` on its pruned +
  clustered model (Ullrich et al. 2017: the codebooks expanded, every kept weight re-shared onto
  the mixture's means, which become the new codebook; pruned weights stay zero), ``finetune``
  again (centroids), then ``pack``; ``sws-999`` the same with the paper's zero-component share
  ``--prior-zero-mass 0.999`` (one option set), which prunes further;
* ``sws-dense``: the prior on the dense net (the earlier sws row), then ``finetune``, ``pack``;
* ``sws-long``: a diagnostic, not a default (hand-set numbers, said so in the table): the
  prior trained 30 epochs at Ullrich et al.'s constant 5e-4 on the dense net;
* ``ladder``: ``sensitivity --finetune`` (per-layer rungs from the measured curves), then
  ``optimize --recipe sens/recipe.yaml --data train.npz --finetune`` and ``pack``.

The dense network trains on the first 55,000 MNIST training images (``train.npz``); the last
5,000 (``val.npz``, ``--val-data``) are never trained on, by the dense net or any fine-tune:
the gates, the sensitivity curves and early stopping read them, as a user with a held-out
split would. The test set is read only for the reported figure.

Figures: test accuracy (onnxruntime, the 10,000 MNIST test images) of the model the archive
restores, and compression = dense float32 weight + bias bytes / archive file bytes (and
/ coded bytes, the paper's count). Networks are trained here (`benchmarks.models`, cached);
the published figures are quoted beside ours. The machine's load is recorded: the runs share
2 cores with other jobs, so the seconds are not comparable between runs.

    .venv/bin/python benchmarks/beyond_deep_compression.py \
        [--networks lenet300 lenet5] [--rows default sws sws-999]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's benchmarks package (and its build/ caches)
RESULTS = ROOT / "benchmarks" / "results"
WORK = ROOT / "build" / "beyond_deep_compression"

#: Dense training of each network (as in codebook_lenet.py) and the published records.
NETWORKS = {
    "lenet300": {"title": "LeNet-300-100", "epochs": 20, "lr": 0.05, "images": False},
    "lenet5": {"title": "LeNet-5 (Caffe 20-50-500-10)", "epochs": 8, "lr": 0.05, "images": True},
}
PUBLISHED = {
    "lenet300": [("Deep Compression (Han et al. 2016)", "40×", "1.58%"),
                 ("Soft weight-sharing (Ullrich et al. 2017)", "64×", "1.94%"),
                 ("EPR (Oktay et al. 2020)", "124×", "—")],
    "lenet5": [("Deep Compression (Han et al. 2016)", "39×", "0.74%"),
               ("Soft weight-sharing (Ullrich et al. 2017)", "162×", "0.97%"),
               ("Bayesian compression (Louizos et al. 2017)", "771×", "—"),
               ("EPR (Oktay et al. 2020)", "606×", "—")],
}
#: The default pipeline's one command; the sws row starts from its model (reused when present).
DEFAULT_OPTIMIZE = [
    "optimize", "{dense}", "-o", "{root}/default/dc.onnx", "--recipe", "deep-compression",
    "--data", "{train}", "--val-data", "{val}", "--finetune", "--report", "{root}/default/dc.json",
]


def sws_on_default(*prior_options: str) -> list[list[str]]:
    """Soft weight-sharing on the default pipeline's pruned + clustered model, then pack."""
    return [
        DEFAULT_OPTIMIZE,
        [
            "finetune", "{root}/default/dc.onnx", "--data", "{train}", "--val-data", "{val}",
            "-o", "{out}/sws.onnx", "--prior", "gmm", *prior_options, "--report", "{out}/sws.json",
        ],
        [
            "finetune", "{out}/sws.onnx", "--data", "{train}", "--val-data", "{val}",
            "-o", "{out}/sws_ft.onnx", "--report", "{out}/sws_ft.json",
        ],
        ["pack", "{out}/sws_ft.onnx", "-o", "{out}/sws.onnxc", "--report", "{out}/sws.pack.json",
         "-q"],
    ]


ROWS = {
    "default": [
        DEFAULT_OPTIMIZE,
        ["pack", "{out}/dc.onnx", "-o", "{out}/dc.onnxc", "--report", "{out}/dc.pack.json", "-q"],
    ],
    "sws": sws_on_default(),
    # the zero component at the paper's pi_0 = 0.999 (one option set): prunes further
    "sws-999": sws_on_default("--prior-zero-mass", "0.999"),
    "sws-dense": [
        [
            "finetune",
            "{dense}",
            "--data",
            "{train}",
            "--val-data",
            "{val}",
            "-o",
            "{out}/sws.onnx",
            "--prior",
            "gmm",
            "--report",
            "{out}/sws.json",
        ],
        [
            "finetune",
            "{out}/sws.onnx",
            "--data",
            "{train}",
            "--val-data",
            "{val}",
            "-o",
            "{out}/sws_ft.onnx",
            "--report",
            "{out}/sws_ft.json",
        ],
        [
            "pack",
            "{out}/sws_ft.onnx",
            "-o",
            "{out}/sws.onnxc",
            "--report",
            "{out}/sws.pack.json",
            "-q",
        ],
    ],
    # a diagnostic with hand-set numbers, not a default: the prior trained longer at a constant rate
    "sws-long": [
        [
            "finetune", "{dense}", "--data", "{train}", "--val-data", "{val}",
            "-o", "{out}/sws.onnx", "--prior", "gmm", "--epochs", "30", "--lr", "5e-4",
            "--lr-schedule", "constant", "--report", "{out}/sws.json",
        ],
        [
            "finetune", "{out}/sws.onnx", "--data", "{train}", "--val-data", "{val}",
            "-o", "{out}/sws_ft.onnx", "--report", "{out}/sws_ft.json",
        ],
        ["pack", "{out}/sws_ft.onnx", "-o", "{out}/sws.onnxc", "--report", "{out}/sws.pack.json",
         "-q"],
    ],
    "ladder": [
        [
            "sensitivity",
            "{dense}",
            "-o",
            "{out}/sens",
            "--data",
            "{train}",
            "--val-data",
            "{val}",
            "--finetune",
            "--workers",
            "1",
        ],
        [
            "optimize",
            "{dense}",
            "-o",
            "{out}/dc.onnx",
            "--recipe",
            "{out}/sens/recipe.yaml",
            "--data",
            "{train}",
            "--val-data",
            "{val}",
            "--finetune",
            "--report",
            "{out}/dc.json",
        ],
        ["pack", "{out}/dc.onnx", "-o", "{out}/dc.onnxc", "--report", "{out}/dc.pack.json", "-q"],
    ],
}
ARCHIVES = {"default": ("dc.onnxc", "dc.pack.json"), "sws": ("sws.onnxc", "sws.pack.json"),
            "sws-dense": ("sws.onnxc", "sws.pack.json"), "sws-999": ("sws.onnxc", "sws.pack.json"),
            "sws-long": ("sws.onnxc", "sws.pack.json"),
            "ladder": ("dc.onnxc", "dc.pack.json")}


def accuracy(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 2
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    hits = sum(int((session.run(None, {name: x[i:i + 2000]})[0].argmax(1) == y[i:i + 2000]).sum())
               for i in range(0, len(x), 2000))
    return hits / len(x)


#: MNIST training images the dense net trains on; the rest are val.npz (the 55k/5k split).
TRAIN_SAMPLES = 55_000


def prepare(
    key: str, epochs: int | None, threads: int
) -> tuple[Path, Path, Path, np.ndarray, np.ndarray]:
    """The dense ONNX model, train.npz (55,000 samples) and val.npz (5,000), written once."""
    import torch

    from benchmarks.data import load_mnist
    from benchmarks.models import export, trained

    torch.set_num_threads(threads)
    spec = NETWORKS[key]
    epochs = epochs or spec["epochs"]
    x_train, y_train, x_test, y_test = load_mnist(images=spec["images"])
    folder = WORK / f"{key}-e{epochs}-55k"
    folder.mkdir(parents=True, exist_ok=True)
    dense, train, val = folder / "dense.onnx", folder / "train.npz", folder / "val.npz"
    split = TRAIN_SAMPLES
    if not dense.is_file():
        module = trained(key, epochs=epochs, lr=spec["lr"], data=(x_train[:split], y_train[:split]))
        export(module, dense)
    name = onnx.load(dense).graph.input[0].name
    if not train.is_file():
        np.savez(train, **{name: x_train[:split], "labels": y_train[:split]})
    if not val.is_file():
        np.savez(val, **{name: x_train[split:], "labels": y_train[split:]})
    return dense, train, val, x_test, y_test


def run_row(
    row: str, dense: Path, train: Path, val: Path, threads: int
) -> tuple[list[str], float]:
    """Run the row's commands; the default row's `optimize` is reused when its files are there.

    Its outputs are the same command's (`DEFAULT_OPTIMIZE`), so the sws row, which starts from
    them, does not repeat a 30-minute run; the commands listed are still all of them.
    """
    out = dense.parent / row
    out.mkdir(parents=True, exist_ok=True)
    commands, started = [], time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    for template in ROWS[row]:
        argv = [part.format(dense=dense, train=train, val=val, out=out, root=dense.parent)
                for part in template]
        commands.append(shlex.join(["onnxcompress", *argv]).replace(str(ROOT) + "/", ""))
        if template is DEFAULT_OPTIMIZE and row != "default" and _outputs_exist(argv):
            print(commands[-1], "(reused: the default row's files)", flush=True)
            continue
        print(commands[-1], flush=True)
        log = out / f"{len(commands)}.{argv[0]}.log"  # the command's progress lines
        with log.open("w") as sink:
            done = subprocess.run([sys.executable, "-m", "onnxcompress", *argv], cwd=ROOT,
                                  env=env, stdout=sink, stderr=subprocess.STDOUT, check=False)
        if done.returncode != 0:
            tail = log.read_text()[-2000:]
            raise RuntimeError(f"{commands[-1]} exited {done.returncode}: {tail}")
    return commands, time.perf_counter() - started


def repack_row(row: str, dense: Path, train: Path, val: Path, threads: int) -> None:
    """Run only the row's `pack` on the model its earlier run left: `pack` changed, not the row.

    The row's commands and minutes stay those of the run that trained it (`main` keeps them
    from the results file and notes the re-pack).
    """
    out = dense.parent / row
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    for template in (t for t in ROWS[row] if t[0] == "pack"):
        argv = [part.format(dense=dense, train=train, val=val, out=out, root=dense.parent)
                for part in template]
        print(shlex.join(["onnxcompress", *argv]), "(re-pack)", flush=True)
        subprocess.run([sys.executable, "-m", "onnxcompress", *argv], cwd=ROOT, env=env,
                       check=True, capture_output=True)


def _outputs_exist(argv: list[str]) -> bool:
    """Whether the files a command writes (-o, --report) are all there."""
    return all(Path(argv[i + 1]).is_file() for i, a in enumerate(argv) if a in ("-o", "--report"))


def measure(row: str, dense: Path, x_test: np.ndarray, y_test: np.ndarray) -> dict[str, object]:
    out = dense.parent / row
    archive, table = (out / name for name in ARCHIVES[row])
    restored = out / "restored.onnx"
    subprocess.run(
        [sys.executable, "-m", "onnxcompress", "unpack", str(archive), "-o", str(restored)],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    totals = json.loads(table.read_text())["totals"]
    report = out / "dc.json"
    return {
        "rounds": rounds(report) if report.is_file() else [],
        "accuracy": accuracy(restored, x_test, y_test),
        "ratio_archive": totals["ratio_archive"],
        "ratio_coded": totals["ratio_coded"],
        "archive_bytes": totals["archive_bytes"],
        "bytes_dense": totals["bytes_dense"],
        "kept_percent": totals["kept_percent"],
    }


def rounds(report: Path) -> list[dict[str, object]]:
    """optimize --finetune's rounds: each lossy step, its gate after retraining."""
    steps = json.loads(report.read_text())["steps"]
    out = []
    for lossy, retrain in zip(steps[::2], steps[1::2], strict=False):
        if retrain["pass"] != "finetune":
            continue
        details = [c.get("detail", "") for c in lossy.get("changes", [])]
        notes = retrain.get("notes", {})
        out.append({"step": lossy["pass"], "detail": details[0] if details else "",
                    "gate": (retrain.get("metrics") or {}).get("task"),
                    "epochs": notes.get("epochs_run"), "kept_epoch": notes.get("best_epoch"),
                    "status": retrain["status"]})
    return out


def rounds_markdown(row: dict[str, Any]) -> list[str]:
    lines = ["", f"{row['network']}, {row['row']}: rounds (gate = accuracy change against the "
             "original on val.npz after retraining, bar −0.003)", "",
             "| step | gate | epochs (kept) | status |", "|---|---:|---:|---|"]
    for r in row["rounds"]:
        gate = "—" if r["gate"] is None else f"{r['gate']:+.4f}"
        lines.append(f"| {r['step']} ({r['detail']}) | {gate} | {r['epochs']} ({r['kept_epoch']}) "
                     f"| {r['status']} |")
    return lines


def markdown(result: dict[str, object]) -> str:
    lines = [
        "# Beyond Deep Compression: the README's pipelines on MNIST, no hand-set numbers",
        "",
        f"Machine: {result['machine']}. Load average at start / end: {result['load_start']} / "
        f"{result['load_end']} (2 cores shared with other jobs).",
        "",
        "| network | pipeline | test error dense → compressed | Δ points | × (archive file) | × "
        "(coded) | kept weights | minutes |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:  # type: ignore[attr-defined]
        lines.append(
            f"| {row['network']} | {row['row']} | {100 * (1 - row['dense_accuracy']):.2f}% → "
            f"{100 * (1 - row['accuracy']):.2f}% | "
            f"{100 * (row['dense_accuracy'] - row['accuracy']):+.2f} | {row['ratio_archive']:.1f} "
            f"| {row['ratio_coded']:.1f} | {row['kept_percent']:.1f}% | {row['seconds'] / 60:.1f} |"
        )
    repacked = [f"{r['network']} {r['row']}" for r in result["rows"] if r.get("repacked")]  # type: ignore[attr-defined]
    lines += ["", "Minutes: the row's own commands; the sws rows (not sws-dense, sws-long) start "
              "from the default row's model, whose `optimize` they list first and reuse."
              + (f" Re-packed with the current `pack` defaults (`--repack`: only `pack` re-run on "
                 f"the model the recorded run left; minutes are that run's): "
                 f"{', '.join(repacked)}." if repacked else ""),
              "", "Published (their own dense baselines; × = their storage count):", "",
              "| network | method | × | test error |", "|---|---|---:|---:|"]
    for key in dict.fromkeys(r["key"] for r in result["rows"]):  # type: ignore[attr-defined]
        lines += [f"| {NETWORKS[key]['title']} | {m} | {x} | {e} |" for m, x, e in PUBLISHED[key]]
    for row in result["rows"]:  # type: ignore[attr-defined]
        lines += rounds_markdown(row) if row.get("rounds") else []
    lines += ["", "Commands (in order, per row):", ""]
    for row in result["rows"]:  # type: ignore[attr-defined]
        lines += [f"* {row['network']}, {row['row']}:"] + [f"  `{c}`" for c in row["commands"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--networks", nargs="+", default=["lenet300"], choices=list(NETWORKS))
    parser.add_argument("--rows", nargs="+", default=["default"], choices=list(ROWS))
    parser.add_argument(
        "--dense-epochs",
        type=int,
        default=None,
        help="training epochs of the dense network (default: 20 for LeNet-300, 8 for LeNet-5)",
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (the machine is shared)"
    )
    parser.add_argument(
        "--repack", action="store_true",
        help="re-run only each row's `pack` on the models its recorded run left (after a change "
        "to `pack`); commands and minutes stay the recorded run's",
    )
    args = parser.parse_args()
    result: dict[str, object] = {
        "machine": f"{os.cpu_count()} CPUs, {platform.platform()}",
        "load_start": " ".join(f"{v:.1f}" for v in os.getloadavg()),
        "command": shlex.join(["python", "benchmarks/beyond_deep_compression.py", *sys.argv[1:]]),
        "rows": [],
    }
    for key in args.networks:
        dense, train, val, x_test, y_test = prepare(key, args.dense_epochs, args.threads)
        dense_accuracy = accuracy(dense, x_test, y_test)
        for row in args.rows:
            recorded = {}
            if args.repack:
                recorded = _recorded_row(args, key, row)
                repack_row(row, dense, train, val, args.threads)
                commands, seconds = recorded["commands"], recorded["seconds"]
            else:
                commands, seconds = run_row(row, dense, train, val, args.threads)
            figures = measure(row, dense, x_test, y_test)
            result["rows"].append({"key": key, "network": NETWORKS[key]["title"], "row": row,  # type: ignore[attr-defined]
                                   "dense_epochs": args.dense_epochs or NETWORKS[key]["epochs"],
                                   "dense_accuracy": dense_accuracy, "commands": commands,
                                   "split": TRAIN_SAMPLES,
                                   "load_start": recorded.get("load_start", result["load_start"]),
                                   "repacked": bool(recorded),
                                   "seconds": round(seconds, 1), **figures})
            print(json.dumps(result["rows"][-1]), flush=True)  # type: ignore[index]
    result["load_end"] = " ".join(f"{v:.1f}" for v in os.getloadavg())
    RESULTS.mkdir(exist_ok=True)
    result = merged(result, _results_path(args))
    target = _results_path(args)
    target.write_text(json.dumps(result, indent=2) + "\n")
    target.with_suffix(".md").write_text(markdown(result))


def _results_path(args: argparse.Namespace) -> Path:
    suffix = "_".join(args.networks) + (f"_e{args.dense_epochs}" if args.dense_epochs else "")
    return RESULTS / f"beyond_deep_compression_{suffix}.json"


def _recorded_row(args: argparse.Namespace, key: str, row: str) -> dict[str, Any]:
    """The results file's record of a row run earlier; --repack needs one."""
    target = _results_path(args)
    rows = json.loads(target.read_text())["rows"] if target.is_file() else []
    found = [r for r in rows if (r["key"], r["row"]) == (key, row)]
    if not found:
        raise SystemExit(f"--repack: {target.name} holds no {key} {row} row to re-pack")
    return found[-1]


def merged(result: dict[str, Any], target: Path) -> dict[str, Any]:
    """This run's rows over those of an earlier run of the same networks (rows run apart)."""
    if not target.is_file():
        return result
    earlier = json.loads(target.read_text())
    ours = {(r["key"], r["row"]): r for r in result["rows"]}
    rows = [ours.pop((r["key"], r["row"]), r) for r in earlier.get("rows", [])
            if r.get("split") == TRAIN_SAMPLES]  # a row run again keeps its place
    return {**result, "rows": rows + list(ours.values())}


if __name__ == "__main__":
    main()
