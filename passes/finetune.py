"""`finetune`: retrain a compressed model's weights in PyTorch and write them back in place.

Han et al. 2015 (retraining after pruning, connections held at zero, L1/L2, dropout
rescaled by eq. 2) and Han, Mao & Dally 2016 (fine-tuning shared centroids). The graph runs
in `onnxcompress.finetune.executor.OnnxModule`; the structure is kept by parametrizations
(`onnxcompress.finetune.parametrize`): zeros stay exactly zero, codebook indices are never
touched, low-rank factors are trained as the two initializers they are.

Write-back is an ordinary, gated pass: the same tensor names, shapes and dtypes; no node,
input or output is added, removed or rewired. Lossy by design (it retrains toward labels
or the original model's outputs); the pipeline's fidelity gate judges the result.
torch is imported only when the pass runs.
"""

from __future__ import annotations

__all__ = ["FinetuneConfig", "FinetunePass"]

import logging
from typing import Literal

import onnx_ir as ir
import pydantic

from onnxcompress.errors import DataError
from onnxcompress.pass_base import CompressionPass, PassConfig, PassReport, register

logger = logging.getLogger(__name__)

#: Where training runs, not how: not a training option.
_PLACEMENT = {"executor", "workers", "ray_address", "checkpoint_dir"}


class FinetuneConfig(PassConfig):
    epochs: int = pydantic.Field(1, ge=1, le=100_000, description="Passes over the training data.")
    lr: float = pydantic.Field(
        1e-3, gt=0.0, le=10.0, description="Learning rate (Han: about 1/10 of the original one)."
    )
    batch_size: int = pydantic.Field(64, ge=1, le=1_000_000, description="Samples per optimizer step.")
    optimizer: Literal["sgd", "adam"] = pydantic.Field("sgd", description="sgd (with momentum) or adam.")
    lr_schedule: Literal["constant", "cosine"] = pydantic.Field(
        "constant", description="constant, or cosine decay from lr to 0 over all steps."
    )
    momentum: float = pydantic.Field(0.9, ge=0.0, lt=1.0, description="SGD momentum.")
    weight_decay: float = pydantic.Field(0.0, ge=0.0, le=1.0, description="L2 regularisation (optimizer weight decay).")
    l1: float = pydantic.Field(0.0, ge=0.0, le=1.0, description="L1 regularisation: adds l1 * sum|W| over weights.")
    loss: Literal["auto", "cross_entropy", "kl", "mse", "cosine"] = pydantic.Field(
        "auto",
        description="auto: cross-entropy with labels, else KL on 2-D logits, else MSE against the original model.",
    )
    distill: bool = pydantic.Field(
        False, description="Distil from the original model's outputs even when the data has labels."
    )
    temperature: float = pydantic.Field(1.0, gt=0.0, le=100.0, description="Softening temperature of the KL loss.")
    teacher: str | None = pydantic.Field(
        None, description="Path of the teacher model for distillation (default: the model before the first step)."
    )
    data: str | None = pydantic.Field(
        None, description=".npz path or 'module:function' returning dict batches (default: the pipeline's data)."
    )
    target_cosine: float | None = pydantic.Field(
        None, ge=-1.0, le=1.0, description="Stop early once the output cosine against the original reaches this."
    )
    target_accuracy: float | None = pydantic.Field(
        None, ge=0.0, le=1.0, description="Stop early once the accuracy on the training data reaches this."
    )
    dropout_rescale: bool = pydantic.Field(
        True, description="Han's D_new = D_old * sqrt(C_new / C_old) for Dropout nodes after pruned layers."
    )
    trainable: tuple[str, ...] = pydantic.Field(
        (), description="Tensor-name globs to train (default: every float tensor of more than one value)."
    )
    freeze: tuple[str, ...] = pydantic.Field((), description="Tensor-name globs never trained.")
    keep_zeros: bool = pydantic.Field(True, description="Hold every zero of a weight or codebook at exactly zero.")
    max_samples: int | None = pydantic.Field(None, ge=1, description="Use at most this many training samples.")
    seed: int | None = pydantic.Field(None, ge=0, description="Seed of batch order and dropout (default: the pipeline's).")
    executor: Literal["local", "ray"] = pydantic.Field(
        "local", description="local: this process; ray: Ray Train's TorchTrainer, `workers` DDP workers "
        "(pip install 'onnxcompress[ray]').")
    workers: int = pydantic.Field(1, ge=1, le=4096, description="Data-parallel workers (more than 1 needs ray).")
    ray_address: str | None = pydantic.Field(
        None, description="Ray cluster to join (auto, ray://host:port); None starts a local one.")
    checkpoint_dir: str | None = pydantic.Field(
        None, description="Folder every Ray worker reaches for the training checkpoints (default: a temporary one).")

    @pydantic.model_validator(mode="after")
    def _workers_need_ray(self) -> FinetuneConfig:
        if self.workers > 1 and self.executor != "ray":
            raise ValueError("more than 1 worker trains on Ray: set executor to ray (--executor ray)")
        return self


@register
class FinetunePass(CompressionPass):
    """Retrain weights in torch with the compressed structure held; write them back by name."""

    name = "finetune"
    summary = "Retrain weights in PyTorch keeping zeros, codebook indices and factors (Han et al. 2015/2016)."
    Config = FinetuneConfig
    config: FinetuneConfig

    def requires(self, model: ir.Model) -> None:
        super().requires(model)
        from onnxcompress.finetune import require_torch

        require_torch()

    def _data(self) -> object:
        from onnxcompress.finetune.data import load_data

        if self.config.data is not None:
            return load_data(self.config.data)
        if self.context.data is None:
            raise DataError("finetune needs training data: give --data (an .npz) or the 'data' option")
        return dict(self.context.data)

    def _teacher(self) -> ir.Model | None:
        if self.config.teacher is None:
            return self.context.original
        from onnxcompress import io

        return io.load(self.config.teacher)

    def rewrite(self, model: ir.Model, report: PassReport) -> bool:
        from onnxcompress.finetune.executor import OnnxModule
        from onnxcompress.finetune.train import TrainOptions, finetune, write_back

        data = self._data()
        module = OnnxModule(model)  # unsupported ops fail here, before any edit
        options = TrainOptions(
            **self.config.model_dump(exclude={"teacher", "data", "seed", *_PLACEMENT}),
            seed=self.config.seed if self.config.seed is not None else self.context.seed,
        )
        if self.config.executor == "ray":
            from onnxcompress.finetune.distributed import finetune_on_ray

            result = finetune_on_ray(model, data, original=self._teacher(), options=options,  # type: ignore[arg-type]
                                     workers=self.config.workers, address=self.config.ray_address,
                                     storage=self.config.checkpoint_dir)
        else:
            result = finetune(model, data, original=self._teacher(), options=options, module=module)  # type: ignore[arg-type]
        consumers = _consumer_ops(model)
        changed = write_back(model, result.arrays)
        for name, before, after in changed:
            kept = result.structure.get(name, "")
            detail = f"retrained ({kept})" if kept == "mask" else "retrained"
            report.changed(name, consumers.get(name, "?"), before, after, detail=detail)
        trained = set(result.arrays)
        for name in sorted(trained - {c[0] for c in changed}):
            report.skip(name, "values unchanged by training")
        report.notes.update(result.summary())
        logger.info("finetune: %d tensors retrained over %d epochs", len(changed), len(result.history))
        return bool(changed)


def _consumer_ops(model: ir.Model) -> dict[str, str]:
    """The op type of the first node that reads each tensor, for the report."""
    ops: dict[str, str] = {}
    for node in model.graph:
        for value in node.inputs:
            if value is not None and value.name and value.name not in ops:
                ops[value.name] = node.op_type
    return ops

