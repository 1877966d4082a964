"""The shared benchmark helpers: data loaders (IDX parsing, checksums) and the LeNet models."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest

from benchmarks import data as bench_data
from benchmarks import models
from onnxcompress.finetune.executor import OnnxModule
from tests.finetune.conftest import ort_run, torch


def _idx(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    return header + array.astype(np.uint8).tobytes()


def test_idx_parser_round_trip_and_rejections(rng) -> None:
    images = rng.integers(0, 256, (5, 4, 3))
    np.testing.assert_array_equal(bench_data._parse_idx(_idx(images)), images)
    labels = rng.integers(0, 10, 7)
    np.testing.assert_array_equal(bench_data._parse_idx(_idx(labels)), labels)
    with pytest.raises(RuntimeError, match="not an unsigned-byte IDX"):
        bench_data._parse_idx(b"\x00\x00\x0d\x01" + _idx(labels)[4:])
    with pytest.raises(RuntimeError, match="IDX body has"):
        bench_data._parse_idx(_idx(images)[:-1])


def test_mnist_tarball_with_wrong_checksum_is_refused_and_removed(tmp_path) -> None:
    fake = io.BytesIO()
    with tarfile.open(fileobj=fake, mode="w:gz") as archive:
        payload = _idx(np.zeros((1, 28, 28)))
        info = tarfile.TarInfo("package/data/train-images-idx3-ubyte")
        info.size = len(payload)
        archive.addfile(info, io.BytesIO(payload))
    (tmp_path / bench_data.MNIST_TARBALL).write_bytes(fake.getvalue())
    with pytest.raises(RuntimeError, match="sha256 .* != recorded"):
        bench_data.load_mnist(folder=tmp_path)
    assert not (tmp_path / bench_data.MNIST_TARBALL).exists()


def test_digits_split_is_seeded_stratified_and_scaled() -> None:
    x_train, y_train, x_test, y_test = bench_data.load_digits_split(images=True)
    again = bench_data.load_digits_split(images=True)
    np.testing.assert_array_equal(x_train, again[0])
    assert (
        x_train.shape[1:] == (1, 8, 8) and x_train.dtype == np.float32 and y_train.dtype == np.int64
    )
    assert 0.0 <= x_train.min() and x_train.max() <= 1.0
    per_class = np.bincount(np.concatenate([y_train, y_test]))
    assert len(x_test) == 450 and np.all(np.abs(np.bincount(y_test) - 0.25 * per_class) <= 1)


@pytest.mark.parametrize("name, shape", [("lenet300", (3, 784)), ("lenet5", (3, 1, 28, 28))])
def test_lenet_models_export_and_run_in_the_executor(name, shape, rng) -> None:
    module = models.build(name)
    weights = sum(p.numel() for n, p in module.named_parameters() if n.endswith("weight"))
    assert weights == {"lenet300": 266_200, "lenet5": 430_500}[name]
    proto = models.export(module)
    x = rng.random(shape, dtype=np.float32)
    input_name = proto.graph.input[0].name
    want = ort_run(proto, {input_name: x})[0]
    np.testing.assert_allclose(OnnxModule(proto).run({input_name: x})[0], want, rtol=0,
                               atol=1e-5 * np.abs(want).max())
    with torch.no_grad():
        np.testing.assert_allclose(
            module(torch.from_numpy(x)).numpy(), want, rtol=0, atol=1e-5 * np.abs(want).max()
        )


def test_train_is_seeded_and_learns_digits() -> None:
    x_train, y_train, x_test, y_test = bench_data.load_digits_split()

    class Small(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(64, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x)

    def run() -> torch.nn.Module:
        torch.manual_seed(0)
        return models.train(Small(), x_train, y_train, epochs=5, lr=0.1, batch_size=64)

    first, second = run(), run()
    assert torch.equal(first.fc.weight, second.fc.weight)
    assert models.accuracy(first, x_test, y_test) > 0.9
