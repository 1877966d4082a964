"""The Ray executor on a real local cluster.

The same results as the local executor, a dead worker retried, the cache answering a second run; and
the sensitivity table it gives.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from onnxcompress.errors import WorkerError
from onnxcompress.parallel import LocalExecutor, Sweep, SweepCache, Task, make_executor, run_sweep
from onnxcompress.passes.prune.sensitivity import sensitivity
from tests.builders import mlp
from tests.parallel import tasks as sweeps

TASKS = [Task(f"layer{n}", "square", float(s)) for n in range(2) for s in (1, 2, 3)]
EXPECTED = [t.setting**2 + 0.5 for t in TASKS]


@pytest.fixture(scope="module")
def executor(ray_cluster):
    with make_executor("ray") as ray_executor:  # joins the session's cluster, leaves it running
        yield ray_executor
    assert ray_cluster.is_initialized()


def test_ray_tasks_give_the_results_in_task_order(executor):
    assert (
        run_sweep(Sweep(sweeps.payload(0.5), sweeps.setup, sweeps.square), TASKS, executor=executor)
        == EXPECTED
    )
    assert executor.payload_bytes == len(sweeps.payload(0.5))


def test_a_ray_worker_builds_its_state_once_per_process(executor):
    pids = run_sweep(
        Sweep(sweeps.payload(0.0), sweeps.setup, sweeps.worker_pid), TASKS, executor=executor
    )
    assert all(built == running for built, running in pids)


def test_a_ray_task_that_kills_its_worker_is_retried(executor, tmp_path):
    sweep = Sweep(sweeps.payload(0.5, tmp_path), sweeps.setup, sweeps.square_dying_once)
    assert run_sweep(sweep, TASKS[:2], executor=executor) == EXPECTED[:2]
    assert len(list(tmp_path.iterdir())) == 2  # both tasks did kill a worker once


def test_a_ray_task_that_always_kills_its_worker_ends_in_one_clear_error(ray_cluster):
    from onnxcompress.parallel.ray_cluster import RayExecutor

    with pytest.raises(WorkerError, match="died 2 times"):
        run_sweep(
            Sweep(sweeps.payload(0.5), sweeps.setup, sweeps.always_dying),
            TASKS[:1],
            executor=RayExecutor(retries=1),
        )


def test_the_ray_sensitivity_table_is_the_local_one_and_a_rerun_hits_the_cache(
    executor, rng, tmp_path
):
    model = mlp(rng, (16, 48, 32, 10))
    x = rng.standard_normal((32, 16)).astype(np.float32)
    local = sensitivity(model, data={"x": x}, ratios=(0.3, 0.6, 0.9), executor=LocalExecutor(1))
    cache = SweepCache(tmp_path)
    on_ray = sensitivity(
        model, data={"x": x}, ratios=(0.3, 0.6, 0.9), executor=executor, cache=cache
    )
    assert on_ray.to_dict() == local.to_dict()
    assert (cache.hits, cache.stored) == (0, 9)
    rerun = SweepCache(tmp_path)
    again = sensitivity(
        model, data={"x": x}, ratios=(0.3, 0.6, 0.9), executor=executor, cache=rerun
    )
    assert again.to_dict() == local.to_dict()
    assert (rerun.hits, rerun.stored) == (9, 0)


def test_the_codebook_search_on_ray_writes_the_local_model_and_caches_each_error(
    executor, rng, tmp_path
):
    from onnxcompress import fidelity
    from onnxcompress.pipeline import Step, run_steps

    model = mlp(rng, (32, 64, 10))
    x = rng.standard_normal((48, 32)).astype(np.float32)
    gate = fidelity.Gate(min_cosine=0.999, min_rank_correlation=None, min_top1=None)

    def search(**options: object) -> bytes:
        step = Step(pass_name="codebook.search", options={"bits": (6, 4, 3), **options}, gate=gate)
        return ir.to_proto(run_steps(model, [step], data={"x": x}).model).SerializeToString()

    local = search()
    assert search(executor="ray", cache=str(tmp_path)) == local
    # one per (layer, width, codebook kind: shared or per channel)
    assert len(list(tmp_path.glob("sweeps/*/*.json"))) == 2 * 3 * 2
    assert search(executor="ray", cache=str(tmp_path)) == local  # answered by the cache
