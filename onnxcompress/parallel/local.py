"""The default executor: this process, or a pool of processes on this machine. No service.

A pool's initializer hands the payload to each process once; tasks then carry only their
(layer, method, setting). A process that dies mid-task (killed, out of memory, a crash in
native code) breaks the pool: a fresh pool is started and the tasks without a result are
sent again, up to `retries` times.
"""

from __future__ import annotations

__all__ = ["LocalExecutor", "free_cores"]

import concurrent.futures
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from onnxcompress.errors import WorkerError
from onnxcompress.parallel.sweep import (
    Executor,
    Result,
    Sweep,
    Task,
    evaluate_remembered,
    forget,
    remember,
)

logger = logging.getLogger(__name__)


def free_cores() -> int:
    """Cores not busy by the 1-minute load average (at least 1)."""
    count = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = 0.0
    return max(1, int(count - load))


class LocalExecutor(Executor):
    """`workers` processes (1: in this process; None: one per free core but one, if >1 is free)."""

    def __init__(self, workers: int | None = None, *, retries: int = 2) -> None:
        self.workers = workers
        self.retries = retries

    def _processes(self, tasks: int) -> int:
        if self.workers is not None:
            return min(self.workers, tasks)
        return min(tasks, free_cores() - 1) if free_cores() > 1 else 1

    def imap(self, sweep: Sweep, tasks: Sequence[Task]) -> Iterator[tuple[int, Result]]:
        """Results as the worker processes finish them (in this process when one would do)."""
        processes = self._processes(len(tasks))
        if processes <= 1:
            state = remember(sweep.key, sweep.setup, lambda: sweep.payload)  # kept for the next run
            for index, task in enumerate(tasks):
                yield index, sweep.evaluate(state, task)
            return
        logger.info("%d evaluations in %d processes", len(tasks), processes)
        pending = dict(enumerate(tasks))
        for attempt in range(self.retries + 1):
            try:
                yield from self._pool(sweep, pending, processes)
                return
            except BrokenProcessPool:
                logger.warning(
                    "a worker process died; retrying %d unfinished evaluations in a new pool "
                    "(retry %d of %d)",
                    len(pending),
                    attempt + 1,
                    self.retries,
                )
        raise WorkerError(
            f"worker processes died {self.retries + 1} times; {len(pending)} evaluations "
            "never finished (out of memory? try fewer --workers)"
        )

    @staticmethod
    def _pool(
        sweep: Sweep, pending: dict[int, Task], processes: int
    ) -> Iterator[tuple[int, Result]]:
        """Runs `pending` in one pool, removing each task as its result is yielded."""
        with concurrent.futures.ProcessPoolExecutor(
            processes,
            initializer=_set_up_worker,
            initargs=(sweep.key, sweep.setup, _Payload(sweep.payload)),
        ) as pool:
            futures = {
                pool.submit(evaluate_remembered, sweep.key, sweep.evaluate, task): index
                for index, task in pending.items()
            }
            for future in concurrent.futures.as_completed(futures):
                value = future.result()  # BrokenProcessPool: the caller starts a new pool
                index = futures[future]
                del pending[index]
                yield index, value


def _set_up_worker(key: str, setup: Callable[[bytes], Any], payload: Callable[[], bytes]) -> None:
    """A pool process builds its own state: one inherited by fork may hold the parent's sessions."""
    forget()
    remember(key, setup, payload)


class _Payload:
    """A picklable thunk returning the payload (what `remember` expects)."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload

    def __call__(self) -> bytes:
        return self.payload
