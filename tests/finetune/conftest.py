"""Fixtures of the fine-tune bridge tests: torch (1 thread), exported models, onnxruntime runs."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")

from onnxcompress import runtime  # noqa: E402

logging.getLogger("torch.onnx").setLevel(logging.ERROR)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def export(
    module: torch.nn.Module, example: torch.Tensor, *, dynamic: bool = True
) -> onnx.ModelProto:
    """torch 2.13's default exporter (dynamo), batch axis dynamic; an IR version ORT accepts."""
    module.eval()
    shapes = ({0: torch.export.Dim("batch")},) if dynamic else None
    program = torch.onnx.export(module, (example,), None, dynamic_shapes=shapes, verbose=False)
    proto = program.model_proto
    proto.ir_version = 10
    return proto


def ort_run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = runtime.session(model, threads=1)
    return session.run(None, feeds)


class MLP(torch.nn.Module):
    def __init__(self, sizes: tuple[int, ...] = (64, 32, 16, 10)) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(
            torch.nn.Linear(a, b) for a, b in zip(sizes, sizes[1:], strict=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers[:-1]:
            x = torch.relu(layer(x))
        return self.layers[-1](x)


class SmallCNN(torch.nn.Module):
    """Input BatchNorm (kept as a BatchNormalization node) and a Conv→BN pair (folded)."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = torch.nn.BatchNorm2d(1)
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.pool = torch.nn.MaxPool2d(2)
        self.conv2 = torch.nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.head = torch.nn.Linear(6 * 2 * 2, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.bn(self.conv(self.norm(x)))))
        x = torch.nn.functional.gelu(self.conv2(x))
        return self.head(torch.flatten(x, 1))


def randomize_batchnorm(module: torch.nn.Module, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    for layer in module.modules():
        if isinstance(layer, torch.nn.BatchNorm2d):
            with torch.no_grad():
                layer.running_mean.copy_(torch.rand(layer.num_features, generator=generator) - 0.5)
                layer.running_var.copy_(torch.rand(layer.num_features, generator=generator) + 0.5)
                layer.weight.copy_(torch.rand(layer.num_features, generator=generator) + 0.5)
                layer.bias.copy_(torch.rand(layer.num_features, generator=generator) - 0.5)


@pytest.fixture(scope="session")
def mlp_pair() -> tuple[torch.nn.Module, onnx.ModelProto]:
    torch.manual_seed(0)
    module = MLP()
    return module, export(module, torch.zeros(2, 64))


@pytest.fixture(scope="session")
def cnn_pair() -> tuple[torch.nn.Module, onnx.ModelProto]:
    torch.manual_seed(1)
    module = SmallCNN()
    randomize_batchnorm(module)
    return module, export(module, torch.zeros(2, 1, 8, 8))


@pytest.fixture(scope="session")
def encoder_pair() -> tuple[torch.nn.Module, onnx.ModelProto]:
    torch.manual_seed(2)
    layer = torch.nn.TransformerEncoderLayer(
        16, 2, 32, dropout=0.1, batch_first=True, activation="gelu"
    )
    module = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    return module, export(module, torch.zeros(2, 5, 16), dynamic=False)


@pytest.fixture(scope="session")
def digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return (x / 16.0).astype(np.float32), y.astype(np.int64)


@pytest.fixture(scope="session")
def digits_mlp() -> tuple[onnx.ModelProto, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """An MLP 64-256-128-10 trained on 3/4 of scikit-learn's digits (about 97% on the rest)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    torch.set_num_threads(1)
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        (x / 16.0).astype(np.float32),
        y.astype(np.int64),
        test_size=0.25,
        random_state=0,
        stratify=y,
    )
    torch.manual_seed(0)
    module = MLP((64, 256, 128, 10))
    optimizer = torch.optim.Adam(module.parameters(), 1e-3)
    generator = torch.Generator().manual_seed(0)
    inputs, labels = torch.from_numpy(x_train), torch.from_numpy(y_train)
    for _ in range(40):
        order = torch.randperm(len(inputs), generator=generator)
        for start in range(0, len(inputs), 32):
            picks = order[start:start + 32]
            loss = torch.nn.functional.cross_entropy(module(inputs[picks]), labels[picks])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    proto = export(module, torch.zeros(2, 64))
    name = proto.graph.input[0].name
    return proto, {name: x_train, "labels": y_train}, {name: x_test, "labels": y_test}


@dataclasses.dataclass(frozen=True)
class PruningFiles:
    """The files of an `optimize --finetune` run on the digits MLP with a one-rung recipe."""

    model: Path
    data: Path
    val: Path
    out: Path
    report: Path
    recipe: Path


@pytest.fixture
def pruning_files(digits_mlp, tmp_path) -> Callable[..., PruningFiles]:  # type: ignore[no-untyped-def]
    """Writes the model, its training data, a held-out file and a magnitude rung at `sparsity`."""

    def write(sparsity: float, *, val_labels: bool = True) -> PruningFiles:
        proto, train, held_out = digits_mlp
        files = PruningFiles(*(tmp_path / n for n in ("m.onnx", "d.npz", "v.npz", "o.onnx",
                                                      "r.json", "r.yaml")))
        onnx.save(proto, files.model)
        np.savez(files.data, **train)
        np.savez(files.val, **{k: v for k, v in held_out.items() if val_labels or k != "labels"})
        files.recipe.write_text(
            "steps:\n  - {pass: prune.magnitude, options: {sparsity: "
            f"{sparsity}" "}, on_fail: rollback}\n"
        )
        return files

    return write
