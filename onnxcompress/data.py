"""Calibration and training data: `.npz` files keyed by graph input name, plus optional `labels`.

The first axis of every array is the sample axis. Problems are reported all at once
(missing inputs, unknown keys, wrong ranks or sample counts), each with how to fix it.
"""

from __future__ import annotations

__all__ = [
    "LABELS",
    "load_npz",
    "read_npz",
    "validate_data",
    "model_inputs",
    "check_label_shape",
    "batch_symbols",
    "batch_axes",
    "sample_axis",
    "take_samples",
]

import math
import os
import zipfile
import zlib
from pathlib import Path

import numpy as np
import onnx_ir as ir

from onnxcompress.errors import DataError

LABELS = "labels"


def model_inputs(model: ir.Model) -> list[ir.Value]:
    """Graph inputs fed at run time (initializers that are also inputs are excluded)."""
    return [value for value in model.graph.inputs if value.const_value is None]


def batch_symbols(model: ir.Model) -> set[str]:
    """Names of the symbolic dimensions on the first axis of some input: the sample axis.

    A recurrent model may carry the batch on another axis of its state (silero's [2, batch, 128]).
    """
    return {dim.value for v in model_inputs(model) if v.shape and len(v.shape) > 0
            for dim in [v.shape[0]] if not isinstance(dim, int) and dim is not None and dim.value}


def batch_axes(model: ir.Model) -> set[tuple[str, int]]:
    """(input, axis) pairs that carry the samples besides axis 0.

    That is a batch symbol on another axis, or the one free axis of an input whose first axis
    is fixed above 1 (a state [2, ?, 128]). A leading 1 is a batch of one, and its free axis a
    size (an OCR line [1, 1, 64, width]).
    """
    symbols = batch_symbols(model)
    found: set[tuple[str, int]] = set()
    for value in model_inputs(model):
        shape = list(value.shape or ())
        free = [axis for axis, dim in enumerate(shape) if not isinstance(dim, int)]
        for axis in free:
            named = getattr(shape[axis], "value", None)
            fixed_first = isinstance(shape[0], int) and shape[0] > 1
            if axis > 0 and (named in symbols or (fixed_first and free == [axis])):
                found.add((value.name or "", axis))
    return found


def sample_axis(model: ir.Model, value: ir.Value) -> int | None:
    """The axis of `value` that indexes samples: 0, a state's batch axis, or None for a scalar."""
    shape = value.shape
    if shape is not None and len(shape) == 0:
        return None
    moved = [axis for name, axis in batch_axes(model)
             if name == value.name and shape is not None and isinstance(shape[0], int)]
    return moved[0] if moved else 0


def take_samples(array: np.ndarray, axis: int | None, rows: int) -> np.ndarray:
    """The first `rows` samples of `array` along its sample axis (a scalar is kept whole)."""
    array = np.asarray(array)
    return (
        array
        if axis is None
        else np.take(array, np.arange(min(rows, array.shape[axis])), axis=axis)
    )


def validate_data(model: ir.Model, data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Check `data` against the model's inputs; raise one DataError listing every problem."""
    problems = []
    inputs = {value.name or "": value for value in model_inputs(model)}
    missing = sorted(set(inputs) - set(data))
    if missing:
        problems.append(f"missing arrays for inputs {missing}")
    unknown = sorted(set(data) - set(inputs) - {LABELS})
    if unknown:
        problems.append(f"arrays {unknown} match no graph input (inputs: {sorted(inputs)})")
    axes = {name: sample_axis(model, inputs[name]) if name in inputs else 0 for name in data}
    counts = {name: array.shape[axis] if array.ndim > axis else 0
              for name, array in data.items() if (axis := axes[name]) is not None}
    if len(set(counts.values())) > 1:
        problems.append(
            f"arrays disagree on the sample count (first axis; a state's batch axis): {counts}"
        )
    if data and not any(counts.values()):
        problems.append("the data carries no samples")
    data = {name: _float_as_expected(array, inputs.get(name)) for name, array in data.items()}
    problems += _non_finite_problems(data)
    if LABELS in data and data[LABELS].dtype.kind not in "iu":
        problems.append(f"labels must be integer class indices, got {data[LABELS].dtype}")
    for name, value in inputs.items():
        if name in data:
            problems += _fit_problems(name, data[name], value)
    if problems:
        raise DataError("data does not fit the model: " + "; ".join(problems))
    return data


def _non_finite_problems(data: dict[str, np.ndarray]) -> list[str]:
    """NaN or inf in a probe makes every output NaN, and a NaN output passes no gate honestly."""
    problems = []
    for name, array in data.items():
        if array.dtype.kind in "fc":
            bad = int(array.size - np.count_nonzero(np.isfinite(array)))
            if bad:
                problems.append(
                    f"{name!r} holds {bad:,} non-finite values (NaN or inf) of {array.size:,}"
                )
    return problems


def _numpy_dtype(value: ir.Value | None) -> np.dtype | None:
    if value is None or value.dtype is None or value.dtype == ir.DataType.STRING:
        return None
    return np.dtype(value.dtype.numpy())


def _float_as_expected(array: np.ndarray, value: ir.Value | None) -> np.ndarray:
    """numpy saves float64 by default: floats are cast to the float type the input expects."""
    want = _numpy_dtype(value)
    if want is None or want.kind != "f" or array.dtype.kind != "f":
        return array
    return array.astype(want) if array.dtype != want else array


def _fit_problems(name: str, array: np.ndarray, value: ir.Value) -> list[str]:
    """What keeps `array` from feeding input `value`: its rank, a fixed dimension, its dtype."""
    if value.shape is not None and array.ndim != len(value.shape):
        return [
            f"{name!r} has rank {array.ndim}, the model expects {len(value.shape)} "
            f"(shape {value.shape})"
        ]
    problems = []
    expected = [d if isinstance(d, int) else None for d in value.shape or ()]
    if any(
        want is not None and want != got
        for want, got in zip(expected[1:], array.shape[1:], strict=True)
    ):
        problems.append(f"{name!r} has shape {list(array.shape)}, the model expects {value.shape}")
    dtype = _numpy_dtype(value)
    if dtype is not None and array.dtype != dtype:
        problems.append(
            f"{name!r} is {array.dtype}, the model expects {dtype} "
            f"(save it with .astype(np.{dtype}))"
        )
    return problems


def check_label_shape(labels: tuple[int, ...], logits: tuple[int, ...]) -> None:
    """One class index per row of the first output: (N,) for (N, C) logits, (N, T) for (N, T, C).

    Any other count would pair labels with the wrong rows, or fail deep inside torch or numpy.
    """
    if not labels or math.prod(labels[1:]) != math.prod(logits[1:-1]):
        raise DataError(
            f"labels have shape {list(labels)}; the model's first output {list(logits)} "
            f"needs one class index per row: shape {[labels[0] if labels else 'N', *logits[1:-1]]}"
        )


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """The arrays of an .npz, each header checked against its stored size before any is read.

    A crafted header can declare shape (10**12, 16): numpy would allocate it before reading.
    """
    try:
        with path.open("rb") as file:
            magic = np.lib.format.MAGIC_PREFIX
            if file.read(len(magic)) == magic:  # a bare .npy
                raise DataError(
                    f"{path}: not an .npz archive (save arrays with np.savez(path, x=...))"
                )
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                _check_header(path, info, archive)
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except (
        OSError,
        ValueError,
        EOFError,
        zipfile.BadZipFile,
        zlib.error,
        NotImplementedError,
        RuntimeError,
    ) as error:
        # RuntimeError: an encrypted member; NotImplementedError: an unknown compression method
        raise DataError(f"{path}: not a readable .npz file ({error or 'empty file'})") from None


def _check_header(path: Path, info: zipfile.ZipInfo, archive: zipfile.ZipFile) -> None:
    """Refuse a member that is not an array, or whose shape needs more bytes than it stores.

    Checked from the header alone, before numpy allocates what a forged shape asks for.
    """
    name = info.filename.removesuffix(".npy")
    with archive.open(info) as member:
        if member.read(len(np.lib.format.MAGIC_PREFIX)) != np.lib.format.MAGIC_PREFIX:
            raise DataError(
                f"{path}: member {name!r} is not a .npy array (save arrays with np.savez)"
            )
        member.seek(0)
        version = np.lib.format.read_magic(member)
        reader = (
            np.lib.format.read_array_header_1_0
            if version == (1, 0)
            else np.lib.format.read_array_header_2_0
        )
        shape, _, dtype = reader(member, max_header_size=10_000)
        header_bytes = member.tell()
    if dtype.hasobject:
        return  # np.load refuses pickled object arrays itself
    needed = math.prod(shape) * dtype.itemsize
    if needed > info.file_size - header_bytes:
        raise DataError(f"{path}: array {name!r} declares shape {tuple(shape)} ({needed:,} bytes) "
                        f"but stores {max(info.file_size - header_bytes, 0):,} bytes")


def load_npz(path: str | os.PathLike[str], model: ir.Model) -> dict[str, np.ndarray]:
    """Load and validate an .npz of named arrays."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    return validate_data(model, read_npz(path))
