"""The local executor: in process or in a pool, results in task order, dead workers retried."""

from __future__ import annotations

import pytest

from onnxcompress.errors import WorkerError
from onnxcompress.parallel import LocalExecutor, Sweep, SweepCache, Task, run_sweep
from onnxcompress.parallel import sweep as sweep_module
from tests.parallel import tasks as sweeps

TASKS = [Task(f"layer{n}", "square", float(s)) for n in range(3) for s in (1, 2, 3)]
EXPECTED = [t.setting**2 + 0.5 for t in TASKS]


@pytest.mark.parametrize("workers", [1, 2])
def test_results_come_back_in_task_order(workers):
    sweep = Sweep(sweeps.payload(0.5), sweeps.setup, sweeps.square)
    assert run_sweep(sweep, TASKS, executor=LocalExecutor(workers)) == EXPECTED


def test_a_pool_worker_builds_its_state_once_and_reuses_it():
    sweep = Sweep(sweeps.payload(0.0), sweeps.setup, sweeps.worker_pid)
    pids = run_sweep(sweep, TASKS, executor=LocalExecutor(2))
    assert all(built == running for built, running in pids)
    assert len({running for _, running in pids}) <= 2


def test_a_worker_that_kills_itself_is_retried(tmp_path):
    sweep = Sweep(sweeps.payload(0.5, tmp_path), sweeps.setup, sweeps.square_dying_once)
    some = TASKS[:4]
    assert run_sweep(sweep, some, executor=LocalExecutor(2, retries=len(some))) == EXPECTED[:4]
    assert len(list(tmp_path.iterdir())) == len(some)  # each task did kill a worker once


def test_a_worker_that_always_dies_ends_in_one_clear_error():
    sweep = Sweep(sweeps.payload(0.5), sweeps.setup, sweeps.always_dying)
    with pytest.raises(WorkerError, match="died 2 times"):
        run_sweep(sweep, TASKS[:2], executor=LocalExecutor(2, retries=1))


def test_a_second_run_is_answered_by_the_cache(tmp_path):
    sweep = Sweep(sweeps.payload(0.5), sweeps.setup, sweeps.square)
    first = SweepCache(tmp_path)
    assert run_sweep(sweep, TASKS, executor=LocalExecutor(1), cache=first) == EXPECTED
    assert (first.hits, first.stored) == (0, len(TASKS))
    again = SweepCache(tmp_path)
    dying = Sweep(sweep.payload, sweeps.setup, sweeps.always_dying)  # another sweep: another key
    assert dying.key != sweep.key
    assert run_sweep(sweep, TASKS, executor=LocalExecutor(2, retries=0), cache=again) == EXPECTED
    assert (again.hits, again.stored) == (len(TASKS), 0)


def test_an_interrupted_sweep_resumes_from_the_cache(tmp_path):
    sweep = Sweep(sweeps.payload(0.5), sweeps.setup, sweeps.square)

    def stop_after_four(index: int) -> None:
        if index == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_sweep(
            sweep,
            TASKS,
            executor=LocalExecutor(1),
            cache=SweepCache(tmp_path),
            on_result=stop_after_four,
        )
    resumed = SweepCache(tmp_path)
    assert run_sweep(sweep, TASKS, executor=LocalExecutor(1), cache=resumed) == EXPECTED
    assert (resumed.hits, resumed.stored) == (4, len(TASKS) - 4)


def test_a_changed_payload_misses_the_cache(tmp_path):
    run_sweep(
        Sweep(sweeps.payload(0.5), sweeps.setup, sweeps.square),
        TASKS,
        cache=SweepCache(tmp_path),
        executor=LocalExecutor(1),
    )
    other = SweepCache(tmp_path)
    values = run_sweep(
        Sweep(sweeps.payload(1.5), sweeps.setup, sweeps.square),
        TASKS,
        cache=other,
        executor=LocalExecutor(1),
    )
    assert values == [v + 1.0 for v in EXPECTED] and other.hits == 0


def test_an_unwritable_cache_costs_speed_not_the_sweep(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    cache = SweepCache(blocker)  # a file where the folder should be
    sweep = Sweep(sweeps.payload(0.5), sweeps.setup, sweeps.square)
    assert run_sweep(sweep, TASKS, executor=LocalExecutor(1), cache=cache) == EXPECTED
    assert cache.stored == 0


def test_an_edit_of_the_package_source_misses_the_cache(monkeypatch):
    sweep = Sweep(sweeps.payload(0.5), sweeps.setup, sweeps.square)
    before = sweep.key
    monkeypatch.setattr(sweep_module, "code_fingerprint", lambda: "edited source")
    assert Sweep(sweeps.payload(0.5), sweeps.setup, sweeps.square).key != before
