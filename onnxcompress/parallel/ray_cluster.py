"""The Ray executor: one Ray task per evaluation, on a local or a remote cluster.

`pip install 'onnxcompress[ray]'`. The payload is put in Ray's object store once per
sweep (`ray.put`); each task carries a reference to it, and a worker process fetches it
only the first time it serves the sweep (`remember`), so the bytes cross the network once
per node, not once per task. A worker that dies mid-task (killed, out of memory) is
replaced by Ray and the task run again (`max_retries`). Address: None starts a local
cluster of `workers` CPUs for this run (stopped on `close`); "auto" joins the cluster
started with `ray start --head` on this machine; "ray://host:port" a remote one.
"""

from __future__ import annotations

__all__ = ["RayExecutor", "connect", "require_ray"]

import logging
from collections.abc import Iterator, Sequence
from typing import Any

from onnxcompress.errors import MissingDependencyError, UserError, WorkerError
from onnxcompress.parallel.sweep import Executor, Result, Sweep, Task, remember

logger = logging.getLogger(__name__)


def require_ray() -> Any:
    """The `ray` module, or one clear error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise MissingDependencyError(
            "the Ray executor needs Ray: pip install 'onnxcompress[ray]'"
        ) from None
    return ray


def connect(ray: Any, address: str | None, workers: int | None) -> bool:
    """Join the cluster at `address`, or start a local one of `workers` CPUs.

    True when this call started it (the caller then stops it). An unreachable address is one error
    line.
    """
    if ray.is_initialized():
        return False
    try:
        if address is None:
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address=address, log_to_driver=False)
    except (ConnectionError, ValueError, RuntimeError) as error:
        raise UserError(
            f"cannot reach the Ray cluster at {address}: {str(error).splitlines()[0]}"
        ) from None
    return True


def _evaluate_in_worker(
    key: str, setup: Any, evaluate: Any, payload: list[Any], task: Task
) -> Result:
    """A Ray task: the worker's state for this sweep (fetched and built once), then one evaluation.

    The payload's reference travels inside a list so that Ray does not fetch it for every task.
    """
    import ray

    state = remember(key, setup, lambda: ray.get(payload[0]))
    return evaluate(state, task)


class RayExecutor(Executor):
    """Tasks on Ray: joins `address`, or starts (and stops) a local cluster of `workers` CPUs."""

    def __init__(
        self, address: str | None = None, *, workers: int | None = None, retries: int = 2
    ) -> None:
        ray = require_ray()
        self.retries = retries
        self._started = False
        self._started = connect(ray, address, workers)
        self._remote = ray.remote(_evaluate_in_worker)
        self.payload_bytes = 0  # what the last sweep put in the object store

    def imap(self, sweep: Sweep, tasks: Sequence[Task]) -> Iterator[tuple[int, Result]]:
        """Results as Ray finishes them; the payload is put in the object store once per sweep."""
        import ray

        payload = ray.put(sweep.payload)
        self.payload_bytes = len(sweep.payload)
        remote = self._remote.options(num_cpus=1, max_retries=self.retries, retry_exceptions=False)
        futures = {
            remote.remote(sweep.key, sweep.setup, sweep.evaluate, [payload], task): index
            for index, task in enumerate(tasks)
        }
        pending = list(futures)
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                for future in done:
                    yield futures[future], self._result(future)
        finally:
            for future in pending:  # interrupted: stop what is still queued
                ray.cancel(future, force=True)

    def _result(self, future: Any) -> Result:
        import ray

        try:
            return ray.get(future)
        except (
            ray.exceptions.WorkerCrashedError,
            ray.exceptions.NodeDiedError,
            ray.exceptions.OutOfMemoryError,
        ) as error:
            raise WorkerError(
                f"a Ray worker died {self.retries + 1} times on one evaluation: "
                f"{str(error).splitlines()[0]}"
            ) from None

    def close(self) -> None:
        """Close the Ray session this executor opened (one that was open already stays open)."""
        if self._started:
            import ray

            ray.shutdown()
            self._started = False
