"""`make demo`: train a real model in seconds, export it to ONNX, compress it, show before/after.

An MLP (64→128→64→10) learns scikit-learn's bundled digits (8×8 images, no download);
its weights are written as an ONNX graph (MatMul + Add + Relu, Gemm head), then the CLI's
`optimize` runs the built-in `deep-compression` recipe on it (gated magnitude pruning, then
k-means weight sharing; no retraining, so it needs only the base install). Test accuracy is measured in onnxruntime on the
held-out digits, before and after.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxcompress import runtime
from onnxcompress.io import ir_version_for


def train_digits_mlp(seed: int = 0) -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    """A trained MLP as ONNX, and the held-out test images and labels."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import MLPClassifier

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(x, digits.target, test_size=0.3, random_state=seed)
    classifier = MLPClassifier((128, 64), max_iter=300, random_state=seed).fit(x_train, y_train)
    return to_onnx(classifier.coefs_, classifier.intercepts_), x_test, y_test


def to_onnx(weights: list[np.ndarray], biases: list[np.ndarray]) -> onnx.ModelProto:
    nodes, initializers, current = [], [], "pixels"
    for index, (w, b) in enumerate(zip(weights[:-1], biases[:-1], strict=True)):
        initializers += [numpy_helper.from_array(w.astype(np.float32), f"fc{index}.weight"),
                         numpy_helper.from_array(b.astype(np.float32), f"fc{index}.bias")]
        nodes += [helper.make_node("MatMul", [current, f"fc{index}.weight"], [f"fc{index}"]),
                  helper.make_node("Add", [f"fc{index}", f"fc{index}.bias"], [f"fc{index}.biased"]),
                  helper.make_node("Relu", [f"fc{index}.biased"], [f"relu{index}"])]
        current = f"relu{index}"
    initializers += [numpy_helper.from_array(weights[-1].T.astype(np.float32), "head.weight"),
                     numpy_helper.from_array(biases[-1].astype(np.float32), "head.bias")]
    nodes.append(helper.make_node("Gemm", [current, "head.weight", "head.bias"], ["logits"], transB=1))
    graph = helper.make_graph(
        nodes, "digits_mlp",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], producer_name="onnxcompress-demo")
    model.ir_version = ir_version_for(21)
    return model


def accuracy(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    (logits,) = runtime.session(path).run(None, {"pixels": x})
    return float(np.mean(logits.argmax(1) == y))


def main(folder: Path | None = None) -> int:
    from onnxcompress.cli import app

    folder = folder or Path(tempfile.mkdtemp(prefix="onnxcompress-demo-"))
    model, x_test, y_test = train_digits_mlp()
    original = folder / "digits_mlp.onnx"
    onnx.save(model, str(original))
    np.savez(folder / "calibration.npz", pixels=x_test[:64])
    print(f"trained a digits MLP: {original}")
    for args in (
        ["inspect", str(original)],
        ["optimize", str(original), "--recipe", "deep-compression", "--data", str(folder / "calibration.npz"),
         "--report", str(folder / "report.md")],
        ["inspect", str(folder / "digits_mlp.compressed.onnx")],
    ):
        print(f"\n$ onnxcompress {' '.join(args)}")
        try:
            app(args, standalone_mode=False)
        except SystemExit as stop:
            if stop.code:
                return int(stop.code)
    before = accuracy(original, x_test, y_test)
    after = accuracy(folder / "digits_mlp.compressed.onnx", x_test, y_test)
    print(f"\ntest accuracy (onnxruntime, {len(y_test)} held-out digits): {before:.2%} before, {after:.2%} after")
    print(f"files: {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else None))
