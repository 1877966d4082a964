"""A sweep: one payload every worker needs, and many independent tasks over it.

The payload (model bytes, probe data) is shipped once per worker process, never per task:
a worker builds its state from it on first use (`remember`) and keeps it for the sweep's
next tasks. A task is one (layer, method, setting) evaluation, so a sweep over hundreds of
layers spreads over as many cores as a cluster has, and a cache can store each result alone.
"""

from __future__ import annotations

__all__ = ["Task", "Sweep", "Executor", "remember", "adopt", "forget", "evaluate_remembered"]

import abc
import dataclasses
import functools
import hashlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import onnxcompress

#: What a task returns: a number, or a JSON-able list/dict of numbers (the cache stores JSON).
Result = Any


@dataclasses.dataclass(frozen=True, order=True)
class Task:
    """One evaluation: `layer` treated by `method` at `setting` (a pruning rate, a bit width)."""

    layer: str
    method: str
    setting: float


@dataclasses.dataclass(frozen=True)
class Sweep:
    """The payload shipped once to every worker, and two module-level (picklable) functions.

    `setup(payload)` builds a worker's state once, `evaluate(state, task)` scores one task.
    """

    payload: bytes
    setup: Callable[[bytes], Any]
    evaluate: Callable[[Any, Task], Result]

    @functools.cached_property
    def key(self) -> str:
        """Names the sweep's results.

        The payload's hash, the functions and the code that computes them (a result cached by other
        code, a release or an edit, is never reused).
        """
        digest = hashlib.sha256(self.payload)
        for part in (_qualified(self.setup), _qualified(self.evaluate), code_fingerprint()):
            digest.update(b"\0" + part.encode())
        return digest.hexdigest()


@functools.cache
def code_fingerprint() -> str:
    """The hash of every Python source of the package and its passes.

    An edited metric or pass changes every key, so a developer's cache never serves results of the
    code before the edit.
    """
    root = Path(onnxcompress.__file__).resolve().parent
    digest = hashlib.sha256(onnxcompress.__version__.encode())
    for folder in (root, (root / "passes").resolve()):
        for source in sorted(folder.rglob("*.py")):
            digest.update(source.relative_to(folder).as_posix().encode() + b"\0")
            digest.update(source.read_bytes())
    return digest.hexdigest()


def _qualified(function: Callable[..., Any]) -> str:
    return f"{function.__module__}.{function.__qualname__}"


class Executor(abc.ABC):
    """Runs a sweep's tasks somewhere; yields (task index, result) as each one finishes."""

    @abc.abstractmethod
    def imap(self, sweep: Sweep, tasks: Sequence[Task]) -> Iterator[tuple[int, Result]]:
        """Every task's result exactly once, in completion order (retrying dead workers)."""

    def close(self) -> None:
        """Release what the executor started (a pool, a local cluster)."""
        return None

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


#: One worker process's state for the sweep it last served: (sweep key, state).
_REMEMBERED: dict[str, Any] = {}


def remember(key: str, setup: Callable[[bytes], Any], payload: Callable[[], bytes]) -> Any:
    """This process's state for sweep `key`, built from the payload on first use only.

    `payload` is a thunk so that a worker that already holds the state never fetches the
    bytes again. Only the latest sweep is kept: a long-lived worker does not pile up models.
    """
    if key not in _REMEMBERED:
        _REMEMBERED.clear()
        _REMEMBERED[key] = setup(payload())
    return _REMEMBERED[key]


def adopt(key: str, state: Any) -> None:
    """Make `state` this process's state for sweep `key`.

    The caller built it from live objects (a serial sweep then runs on them, with no copy of the
    payload).
    """
    _REMEMBERED.clear()
    _REMEMBERED[key] = state


def forget() -> None:
    """Drop this process's state (a forked pool worker builds its own, not the parent's)."""
    _REMEMBERED.clear()


def evaluate_remembered(key: str, evaluate: Callable[[Any, Task], Result], task: Task) -> Result:
    """A task in a worker whose state was set up (by a pool initializer) for sweep `key`."""
    return evaluate(_REMEMBERED[key], task)
