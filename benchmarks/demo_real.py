"""`make demo`, part two: `onnxcompress optimize` on a real model shipped in a PyPI package.

magika 1.0.3 (Google's file-type classifier: a byte CNN with a 214-way softmax) is fetched from
PyPI (the wheel only), calibrated on files of Python's standard library and judged on other files
(/usr/share, /usr/bin, /etc) against the original model's answers, as a user would:

    onnxcompress optimize model.onnx -o small.onnx --data calib.npz --report report.html

Prints the command's summary, then sizes, batch-1 latency and fidelity on the held-apart files.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from real.cases import CASES, session  # noqa: E402

from onnxcompress.compare import file_bytes  # noqa: E402

REPORT = Path(__file__).resolve().parent / "results" / "demo_real.html"


def main() -> int:
    case = CASES["magika"](True)
    with tempfile.TemporaryDirectory() as tmp:
        calibration, small = Path(tmp) / "calib.npz", Path(tmp) / "small.onnx"
        np.savez(calibration, **case.calibration)
        command = [
            sys.executable,
            "-m",
            "onnxcompress",
            "optimize",
            str(case.model),
            "-o",
            str(small),
            "--data",
            str(calibration),
            "--report",
            str(REPORT),
        ]
        print(
            "$ onnxcompress optimize model.onnx -o small.onnx --data calib.npz --report",
            REPORT.name,
            flush=True,
        )
        if subprocess.run(command).returncode != 0:
            return 1
        reference, candidate = case.outputs(case.model), case.outputs(small)
        metrics = case.score(reference, candidate)
        before, after = file_bytes(case.model), file_bytes(small)
        session(small)  # loads in stock onnxruntime
    print(
        f"\nmagika ({case.package}): {before:,} -> {after:,} bytes on disk ({before / after:.2f}x "
        "smaller)"
    )
    print(f"on {len(next(iter(case.evaluation.values())))} held-apart files: "
          + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
          + f" (bar: {', '.join(f'{k} >= {v}' for k, v in case.bar.items())}: "
          + ("met" if case.passes(metrics) else "NOT met") + ")")
    print(f"report: {REPORT}")
    return 0 if case.passes(metrics) else 1


if __name__ == "__main__":
    raise SystemExit(main())
