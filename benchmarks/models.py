"""The networks of Han et al.'s MNIST experiments, in torch: definition, training, ONNX export.

* `LeNet300` -- LeNet-300-100: 784 → 300 → 100 → 10, ReLU (266,200 weights + 410 biases;
  Han et al. 2015 Table 1: 1.64% dense error).
* `LeNet5` -- Caffe's LeNet-5 as Han et al. use it: conv 20@5×5 → max-pool 2 → conv 50@5×5 →
  max-pool 2 → fc 500 → ReLU → fc 10 (430,500 weights; 0.80% dense error).

Stable API used by the other benchmark scripts (keep names and signatures):

* `build(name)` -- a fresh, seeded module (``"lenet300"`` or ``"lenet5"``).
* `train(module, x, y, *, epochs, lr, batch_size=128, momentum=0.9, weight_decay=0.0,
  seed=0, lr_decay=True)` -- SGD with momentum, cosine-annealed learning rate when
  ``lr_decay``; deterministic for a given seed on one thread.
* `accuracy(module, x, y)` -- top-1 accuracy in [0, 1].
* `export(module, path=None, example=None)` -- ``torch.onnx.export`` with torch's default
  exporter, batch axis dynamic, IR version 10 (onnxruntime-loadable); returns the
  ModelProto and writes it when ``path`` is given.
* `trained(name, *, epochs, lr, seed=0, data=None)` -- build + train on full MNIST (or the
  ``data`` tuple given), cached in ``build/models/<name>-e<epochs>-lr<lr>-s<seed>.pt``; returns
  the module in eval mode. Inputs: LeNet-300 takes [n, 784], LeNet-5 takes [n, 1, 28, 28].
"""

from __future__ import annotations

__all__ = ["LeNet300", "LeNet5", "build", "train", "accuracy", "export", "trained", "MODELS_DIR"]

import logging
import math
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

logger = logging.getLogger(__name__)

MODELS_DIR = Path(__file__).resolve().parents[1] / "build" / "models"


class LeNet300(nn.Module):
    """LeNet-300-100: three fully connected layers, ReLU."""

    input_shape = (784,)

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(784, 300)
        self.fc2 = nn.Linear(300, 100)
        self.fc3 = nn.Linear(100, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class LeNet5(nn.Module):
    """Caffe's LeNet-5 (no activation after the convolutions, as in Caffe's example)."""

    input_shape = (1, 28, 28)

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 20, 5)
        self.conv2 = nn.Conv2d(20, 50, 5)
        self.fc1 = nn.Linear(50 * 4 * 4, 500)
        self.fc2 = nn.Linear(500, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.max_pool2d(self.conv1(x), 2)
        x = torch.max_pool2d(self.conv2(x), 2)
        return self.fc2(torch.relu(self.fc1(torch.flatten(x, 1))))


_BUILDERS = {"lenet300": LeNet300, "lenet5": LeNet5}


def build(name: str, seed: int = 0) -> nn.Module:
    """A freshly initialised network, seeded."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(_BUILDERS)}")
    torch.manual_seed(seed)
    return _BUILDERS[name]()


def train(
    module: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    lr: float,
    batch_size: int = 128,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    seed: int = 0,
    lr_decay: bool = True,
) -> nn.Module:
    """SGD + momentum on (x, y); cosine learning-rate decay per step when `lr_decay`."""
    generator = torch.Generator().manual_seed(seed)
    inputs, labels = torch.from_numpy(x), torch.from_numpy(y)
    optimizer = torch.optim.SGD(
        module.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay
    )
    steps = epochs * math.ceil(len(x) / batch_size)
    scheduler = (
        torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps))
        )
        if lr_decay
        else None
    )
    module.train()
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        total = 0.0
        for start in range(0, len(x), batch_size):
            picks = order[start : start + batch_size]
            loss = nn.functional.cross_entropy(module(inputs[picks]), labels[picks])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            total += float(loss) * len(picks)
        logger.info("epoch %d/%d: loss %.4f", epoch + 1, epochs, total / len(x))
    module.eval()
    return module


def accuracy(module: nn.Module, x: np.ndarray, y: np.ndarray, batch_size: int = 1000) -> float:
    """Top-1 accuracy of `module` on (x, y)."""
    module.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            logits = module(torch.from_numpy(x[start : start + batch_size]))
            correct += int((logits.argmax(1).numpy() == y[start : start + batch_size]).sum())
    return correct / len(x)


def export(
    module: nn.Module, path: str | Path | None = None, example: torch.Tensor | None = None
) -> onnx.ModelProto:
    """torch's default ONNX exporter, dynamic batch axis, IR version 10."""
    module.eval()
    if example is None:
        example = torch.zeros((2, *module.input_shape))  # type: ignore[attr-defined]
    program = torch.onnx.export(
        module, (example,), None, dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False
    )
    proto = program.model_proto
    proto.ir_version = 10
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        onnx.save(proto, str(path))
    return proto


def trained(
    name: str,
    *,
    epochs: int,
    lr: float,
    seed: int = 0,
    data: tuple[np.ndarray, np.ndarray] | None = None,
) -> nn.Module:
    """`build` + `train` on MNIST's training set (or `data`), cached by name, epochs and seed."""
    cache = MODELS_DIR / f"{name}-e{epochs}-lr{lr:g}-s{seed}.pt"
    module = build(name, seed)
    if cache.is_file() and data is None:
        module.load_state_dict(torch.load(cache, weights_only=True))
        return module.eval()
    if data is None:
        from benchmarks.data import load_mnist

        x_train, y_train, _, _ = load_mnist(images=name == "lenet5")
    else:
        x_train, y_train = data
    train(module, x_train, y_train, epochs=epochs, lr=lr, seed=seed)
    if data is None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(module.state_dict(), cache)
    return module.eval()
