"""Training data for the bridge: `.npz` files, ``module:function`` callables, batching.

Data is a mapping from graph-input names to arrays whose first axis is the sample axis,
plus an optional ``labels`` array of class indices (the shape of `PassContext.data`). A
callable source returns an iterable of such dict batches (re-iterated every epoch).
Everything is checked against the graph's inputs before training starts, listing every
offender at once.
"""

from __future__ import annotations

__all__ = ["LABELS", "load_data", "check_data", "iterate_batches", "num_samples", "Batches"]

import importlib
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from onnxcompress.data import read_npz
from onnxcompress.errors import DataError

LABELS = "labels"
Arrays = Mapping[str, np.ndarray]
Batches = Callable[[], Iterable[Arrays]]
Source = str | Path | Arrays | Batches


def load_data(source: Source) -> Arrays | Batches:
    """Arrays from an ``.npz`` path, or a zero-argument batch factory from ``module:function``.

    A mapping is returned as is; a callable is returned as a factory of batch iterables.
    """
    if isinstance(source, Mapping):
        return dict(source)
    if callable(source):
        return source
    text = str(source)
    path = Path(text)
    if path.suffix == ".npz" or path.is_file():
        if not path.is_file():
            raise DataError(f"data file not found: {path}")
        return read_npz(path)
    if ":" in text:
        return _import_callable(text)
    raise DataError(f"data {text!r} is neither an .npz file nor a 'module:function' callable")


def _import_callable(spec: str) -> Batches:
    module_name, _, attr = spec.partition(":")
    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")  # the current folder, as `python -m` would allow
    try:
        module = importlib.import_module(module_name)
        function = getattr(module, attr)
    except (ImportError, AttributeError) as error:
        raise DataError(f"cannot import data callable {spec!r}: {error}") from None
    if not callable(function):
        raise DataError(f"{spec!r} is not callable")
    return function


def num_samples(data: Arrays) -> int:
    """Rows of the first array: the arrays of one data set agree on their sample count."""
    return int(len(next(iter(data.values())))) if data else 0


def check_data(data: Arrays, input_names: Sequence[str]) -> None:
    """Every graph input present, every array the same length, labels integral."""
    problems = [f"missing input {name!r}" for name in input_names if name not in data]
    known = set(input_names) | {LABELS}
    problems += [f"unknown array {key!r} (not a graph input)" for key in data if key not in known]
    lengths = {key: len(np.asarray(value)) for key, value in data.items()}
    if len(set(lengths.values())) > 1:
        problems.append(f"arrays differ in length: {lengths}")
    if LABELS in data and np.asarray(data[LABELS]).dtype.kind not in "iu":
        problems.append(
            f"labels must be integer class indices, got {np.asarray(data[LABELS]).dtype}"
        )
    if problems:
        raise DataError("training data does not fit the model: " + "; ".join(problems))


def iterate_batches(
    data: Arrays,
    batch_size: int,
    *,
    shuffle: bool = False,
    rng: np.random.Generator | None = None,
    max_samples: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Mini-batches in order (or a seeded permutation); the last one may be smaller."""
    count = num_samples(data)
    if max_samples is not None:
        count = min(count, max_samples)
    order = np.arange(count)
    if shuffle:
        order = (rng or np.random.default_rng(0)).permutation(count)
    for start in range(0, count, batch_size):
        picks = order[start : start + batch_size]
        yield {key: np.asarray(value)[picks] for key, value in data.items()}


def batches_of(source: Arrays | Batches, batch_size: int, **options: Any) -> Iterator[Arrays]:
    """One epoch of batches from either kind of source."""
    if isinstance(source, Mapping):
        yield from iterate_batches(source, batch_size, **options)
    else:
        yield from source()
