"""One executor interface for embarrassingly parallel work: sensitivity sweeps, search candidates.

A `Sweep` is a payload every worker needs (model bytes, probe data), shipped once per
worker process, and independent `Task`s, one per (layer, method, setting). `run_sweep`
asks the `SweepCache` first, hands only the missing tasks to an executor, stores each
result as it arrives, and returns the results in task order, so the executor and the
cache never change a table:

* `LocalExecutor` (default): this process, or a process pool on this machine. No service.
* `RayExecutor` (`pip install 'onnxcompress[ray]'`): one Ray task per evaluation on a
  local or remote cluster; the payload sits in Ray's object store once.

Dead workers are retried by both. Nothing here imports Ray until a `RayExecutor` is made.
"""

from __future__ import annotations

__all__ = ["Task", "Sweep", "Executor", "LocalExecutor", "SweepCache", "make_executor", "run_sweep"]

import logging
from collections.abc import Callable, Sequence
from typing import Literal

from onnxcompress.errors import UserError
from onnxcompress.parallel.cache import SweepCache
from onnxcompress.parallel.local import LocalExecutor
from onnxcompress.parallel.sweep import Executor, Result, Sweep, Task

logger = logging.getLogger(__name__)

ExecutorKind = Literal["local", "ray"]


def make_executor(
    kind: str = "local", *, workers: int | None = None, address: str | None = None
) -> Executor:
    """The executor the CLI options name: `--executor local|ray --ray-address A --workers N`.

    A Ray address alone implies the Ray executor.
    """
    if kind == "local" and address is None:
        return LocalExecutor(workers)
    if kind not in ("local", "ray"):
        raise UserError(f"--executor must be local or ray, not {kind!r}")
    from onnxcompress.parallel.ray_cluster import RayExecutor

    return RayExecutor(address, workers=workers)


def run_sweep(
    sweep: Sweep,
    tasks: Sequence[Task],
    *,
    executor: Executor | None = None,
    cache: SweepCache | None = None,
    on_result: Callable[[int], None] | None = None,
) -> list[Result]:
    """Every task's result, in task order: from the cache where stored, else from the executor.

    `on_result(index)` is called once per task as its result is known (cached ones first).
    """
    results: dict[int, Result] = {}
    if cache is not None:
        for index, task in enumerate(tasks):
            hit, value = cache.get(sweep, task)
            if hit:
                results[index] = value
                if on_result is not None:
                    on_result(index)
    missing = [index for index in range(len(tasks)) if index not in results]
    if results:
        logger.info("sweep: %d of %d results from the cache", len(results), len(tasks))
    if missing:
        for position, value in (executor or LocalExecutor()).imap(
            sweep, [tasks[i] for i in missing]
        ):
            index = missing[position]
            results[index] = value
            if cache is not None:
                cache.put(sweep, tasks[index], value)
            if on_result is not None:
                on_result(index)
    return [results[index] for index in range(len(tasks))]
