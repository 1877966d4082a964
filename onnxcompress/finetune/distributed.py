"""Data-parallel fine-tuning on Ray Train: `TorchTrainer`, PyTorch DDP, CPU workers.

Every worker runs the same training step (`train.finetune`) on its own copy of the model,
with the module wrapped in `DistributedDataParallel`:

* each global batch (the batch a local run takes: same size, same order, same seed) is split
  row-wise, rows ``rank::workers`` to each worker; a last batch with fewer rows than
  workers is skipped by all of them;
* DDP all-reduces the gradients in the backward pass, so every worker steps the same
  weights by the same averaged gradient; the mean of the per-worker mean losses is the
  batch mean when the rows split evenly (else workers' rows weigh slightly unevenly);
* masks, codebooks and low-rank factors are parametrizations of each worker's module, so
  they hold on every worker exactly as in one process.

Rank 0 saves the trained arrays as a Ray Train checkpoint (`arrays.npz` + `summary.json`)
under `storage` (a folder every worker can reach: on a cluster, a shared filesystem or a
bucket); the caller writes them back into the model as a local run does, so the written
model has the same format. A worker group that fails is restarted from the start
(`retries`). Exact vs. a local run: the same batches and optimizer; the gradients agree up
to float summation order, so the weights agree closely, not bit for bit.
"""

from __future__ import annotations

__all__ = ["Replica", "finetune_on_ray"]

import dataclasses
import json
import logging
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import torch

from onnxcompress.errors import WorkerError
from onnxcompress.finetune.data import Arrays, Batches
from onnxcompress.finetune.train import TrainOptions, TrainResult
from onnxcompress.io import model_bytes
from onnxcompress.parallel.ray_cluster import connect, require_ray

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Replica:
    """One of `workers` data-parallel processes, whose process group is set up (by Ray Train)."""

    rank: int
    workers: int

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """The module behind DDP: its backward averages gradients over the workers."""
        return torch.nn.parallel.DistributedDataParallel(
            module, find_unused_parameters=True, broadcast_buffers=False
        )

    def shard(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray] | None:
        """This worker's rows of a global batch.

        None (on every worker) when there are fewer rows than workers.
        """
        rows = len(next(iter(batch.values())))
        if rows < self.workers:
            return None
        return {name: np.asarray(array)[self.rank :: self.workers] for name, array in batch.items()}


def _train_worker(config: dict[str, Any]) -> None:
    """Ray Train's loop on each worker: the shared training step, then rank 0's checkpoint."""
    import ray
    import ray.train

    from onnxcompress.finetune.executor import OnnxModule
    from onnxcompress.finetune.train import finetune

    context = ray.train.get_context()
    replica = Replica(context.get_world_rank(), context.get_world_size())
    model = ir.from_proto(onnx.load_from_string(ray.get(config["model"])))
    teacher = (
        None
        if config["teacher"] is None
        else ir.from_proto(onnx.load_from_string(ray.get(config["teacher"])))
    )
    result = finetune(
        model,
        ray.get(config["data"]),
        original=teacher,
        options=config["options"],
        module=OnnxModule(model),
        replica=replica,
    )
    checkpoint = None
    if replica.rank == 0:
        folder = Path(tempfile.mkdtemp(prefix="onnxcompress-finetune-"))
        np.savez(folder / "arrays.npz", **result.arrays)  # type: ignore[arg-type]  # numpy's stub
        summary = {
            "history": result.history,
            "structure": result.structure,
            "stopped_early": result.stopped_early,
            "loss": result.loss_kind,
        }
        (folder / "summary.json").write_text(json.dumps(summary))
        checkpoint = ray.train.Checkpoint.from_directory(str(folder))
    last = result.history[-1] if result.history else {}
    ray.train.report(
        {
            "rank": replica.rank,
            "epochs": len(result.history),
            "loss": last.get("loss", float("nan")),
        },
        checkpoint=checkpoint,
    )


def finetune_on_ray(
    model: ir.Model,
    data: Arrays | Batches,
    *,
    original: ir.Model | None = None,
    options: TrainOptions | None = None,
    workers: int = 2,
    address: str | None = None,
    storage: str | Path | None = None,
    retries: int = 1,
) -> TrainResult:
    """`train.finetune` on `workers` Ray Train workers (DDP over gloo): the same `TrainResult`.

    `address`: a Ray cluster to join (auto, ray://host:port); None starts a local one of
    `workers` CPUs for this run. `storage`: the shared folder for checkpoints (default: a
    temporary folder, fine on one machine only).
    """
    ray = require_ray()
    started = connect(ray, address, workers)
    try:
        return _fit(
            ray, model, data, original, options or TrainOptions(), workers, storage, retries
        )
    finally:
        if started:
            ray.shutdown()


def _fit(
    ray: Any,
    model: ir.Model,
    data: Arrays | Batches,
    original: ir.Model | None,
    options: TrainOptions,
    workers: int,
    storage: str | Path | None,
    retries: int,
) -> TrainResult:
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    config = {
        "model": ray.put(model_bytes(model)),
        "data": ray.put(data),
        "options": options,
        "teacher": None if original is None else ray.put(model_bytes(original)),
    }
    with tempfile.TemporaryDirectory(prefix="onnxcompress-ray-train-") as scratch:
        trainer = TorchTrainer(
            _train_worker,
            train_loop_config=config,
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=False),
            run_config=RunConfig(
                storage_path=str(storage or scratch),
                name="onnxcompress-finetune",
                failure_config=FailureConfig(max_failures=retries),
            ),
        )
        try:
            outcome = trainer.fit()
        except Exception as error:  # Ray Train wraps a worker's failure in its own error types
            raise WorkerError(f"fine-tuning on Ray failed: {str(error).splitlines()[0]}") from error
        if outcome.checkpoint is None:
            raise WorkerError("fine-tuning on Ray finished without a checkpoint")
        with outcome.checkpoint.as_directory() as folder:
            with np.load(Path(folder) / "arrays.npz") as archive:
                arrays = {name: archive[name] for name in archive.files}
            summary = json.loads((Path(folder) / "summary.json").read_text())
    logger.info("fine-tuned on %d Ray workers; checkpoint %s", workers, outcome.checkpoint.path)
    return TrainResult(
        arrays, summary["history"], summary["structure"], summary["stopped_early"], summary["loss"]
    )
