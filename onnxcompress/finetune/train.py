"""Retrain the weights of an ONNX model in torch while keeping its compressed structure.

Han et al. 2015 ("Learning both Weights and Connections") retrain after pruning with the
pruned connections held at zero, L1 or L2 regularisation, a learning rate about 1/10 of
the original one, and the dropout ratio of a layer rescaled with its connection count,
``D_new = D_old * sqrt(C_new / C_old)`` (their eq. 2). Deep Compression (Han, Mao & Dally
2016) fine-tunes the shared centroids of weight-shared layers. Both are done here:

* the graph runs in `OnnxModule` (weights are parameters keyed by ONNX name);
* `attach_structure` masks every zero of a weight or codebook (exact zeros after every
  step, momentum and weight decay included); codebook indices are integers, never trained;
* loss: cross-entropy against ``labels`` or distillation against the original model
  (`losses`); L2 as the optimizer's weight decay, L1 as ``l1 * sum |W|`` over weight sites;
* seeded: the batch order, dropout and everything torch draws come from ``seed``;
* early stop when a fidelity target (output cosine against the original model) or an
  accuracy target (with labels) is met, checked after every epoch.

The result is a dict of new arrays by ONNX name; `write_back` swaps them into the model
(same names, shapes and dtypes; no graph edits). Training is lossy by design: it changes
the outputs, and the pipeline's gate judges the result.
"""

from __future__ import annotations

__all__ = [
    "TrainOptions",
    "TrainResult",
    "finetune",
    "write_back",
    "evaluate",
    "dropout_ratio",
    "show_progress",
]

import contextlib
import contextvars
import dataclasses
import fnmatch
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir
import torch

from onnxcompress.data import check_label_shape
from onnxcompress.errors import DataError, UserError
from onnxcompress.finetune.data import (
    LABELS,
    Arrays,
    Batches,
    batches_of,
    check_data,
    iterate_batches,
)
from onnxcompress.finetune.executor import OnnxModule, to_ir
from onnxcompress.finetune.losses import compute_loss, resolve_loss
from onnxcompress.finetune.parametrize import attach_structure
from onnxcompress.sites import constant_array, constant_node_array, find_weight_sites, set_constant

if TYPE_CHECKING:
    from onnxcompress.finetune.distributed import Replica

logger = logging.getLogger(__name__)

#: Set by the CLI: draw a rich progress bar with the loss (logging otherwise).
_PROGRESS: contextvars.ContextVar[bool] = contextvars.ContextVar("finetune_progress", default=False)


@contextlib.contextmanager
def show_progress(enabled: bool = True) -> Iterator[None]:
    """Within this block, `finetune` draws a progress bar (the CLI's choice, not a library's)."""
    token = _PROGRESS.set(enabled)
    try:
        yield
    finally:
        _PROGRESS.reset(token)


@dataclasses.dataclass(frozen=True)
class TrainOptions:
    """How to retrain; see `passes/finetune.py` for the documented, validated knobs."""

    epochs: int = 1
    lr: float = 1e-3
    batch_size: int = 64
    optimizer: str = "sgd"
    lr_schedule: str = "constant"
    momentum: float = 0.9
    weight_decay: float = 0.0
    l1: float = 0.0
    loss: str = "auto"
    distill: bool = False
    temperature: float = 1.0
    target_cosine: float | None = None
    target_accuracy: float | None = None
    dropout_rescale: bool = True
    trainable: tuple[str, ...] = ()
    freeze: tuple[str, ...] = ()
    keep_zeros: bool = True
    max_samples: int | None = None
    probe_samples: int = 256
    seed: int = 0


@dataclasses.dataclass
class TrainResult:
    """New arrays by ONNX name, and an account of the run."""

    arrays: dict[str, np.ndarray]
    history: list[dict[str, float]]
    structure: dict[str, str]
    stopped_early: bool
    loss_kind: str

    def summary(self) -> dict[str, Any]:
        return {
            "epochs_run": len(self.history),
            "stopped_early": self.stopped_early,
            "loss": self.loss_kind,
            "history": self.history,
            "structure": self.structure,
        }


def _trainable_names(model: ir.Model, module: OnnxModule, options: TrainOptions) -> list[str]:
    names = module.trainable_names()
    if options.trainable:
        every = [n for n in module.onnx_names if module.tensor(n).is_floating_point()]
        names = [n for n in every if any(fnmatch.fnmatchcase(n, p) for p in options.trainable)]
    names = [n for n in names if not any(fnmatch.fnmatchcase(n, p) for p in options.freeze)]
    return sorted(names)


def dropout_ratio(old_ratio: float, old_connections: int, new_connections: int) -> float:
    """Han et al. 2015, eq. 2: ``D_new = D_old * sqrt(C_new / C_old)``."""
    if old_connections <= 0:
        return old_ratio
    return old_ratio * math.sqrt(max(new_connections, 0) / old_connections)


def _upstream_weight(model: ir.Model, node: ir.Node) -> str | None:
    """The weight of the nearest MatMul / Gemm / Conv feeding a Dropout, through 1-input ops."""
    weights = {id(site.node): site.name for site in find_weight_sites(model, min_params=0).sites}
    value = node.inputs[0]
    for _ in range(8):
        producer = value.producer() if value is not None else None
        if producer is None:
            return None
        if id(producer) in weights:
            return weights[id(producer)]
        if producer.op_type in ("MatMul", "Gemm", "Conv", "ConvTranspose"):
            return None  # a layer whose weight is not a constant (e.g. Transpose(W)): never walk past it
        # follow the activation, not a constant operand (torch writes Add(bias, MatMul) too)
        value = next((v for v in producer.inputs if v is not None and _constant_of(v) is None), None)
    return None


def _constant_of(value: ir.Value) -> np.ndarray | None:
    """The array behind an initializer or a Constant node's output (literals too), else None."""
    array = constant_array(value)
    producer = value.producer()
    if array is None and producer is not None and producer.op_type == "Constant":
        return constant_node_array(producer)
    return array


def _rescale_dropout(module: OnnxModule, model: ir.Model, original: ir.Model | None) -> dict[str, float]:
    """Set each Dropout node's training ratio from its layer's connection counts."""
    if original is None:
        return {}
    original_values = {
        name: value.const_value for name, value in original.graph.initializers.items() if value.const_value is not None
    }
    ratios = {}
    for node in model.graph:
        if node.op_type != "Dropout":
            continue
        name = node.name or node.outputs[0].name or ""
        weight = _upstream_weight(model, node)
        if weight is None or weight not in original_values or name not in module.dropout_nodes:
            continue
        old_ratio = 0.5
        ratio_input = node.inputs[1] if len(node.inputs) > 1 and node.inputs[1] is not None else None
        held = _constant_of(ratio_input) if ratio_input is not None else None
        if held is not None:
            old_ratio = float(held)
        elif "ratio" in node.attributes:
            old_ratio = float(node.attributes["ratio"].value)
        c_old = int(np.count_nonzero(original_values[weight].numpy()))
        c_new = int(np.count_nonzero(module.tensor(weight).detach().numpy()))
        ratios[name] = dropout_ratio(old_ratio, c_old, c_new)
        module.set_dropout_ratio(name, ratios[name])
        logger.info("dropout %s: ratio %.3f -> %.3f (%d -> %d connections)", name, old_ratio, ratios[name], c_old, c_new)
    return ratios


def _feeds(module: OnnxModule, batch: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    missing = [n for n in module.input_names if n not in batch]
    if missing:
        unknown = sorted(k for k in batch if k not in module.input_names and k != LABELS)
        raise DataError(f"a batch lacks model inputs {missing}" + (f"; it has {unknown} instead" if unknown else ""))
    return {k: torch.as_tensor(np.asarray(v)) for k, v in batch.items() if k in module.input_names}


def evaluate(module: OnnxModule, data: Arrays, batch_size: int = 256, max_samples: int | None = None) -> float:
    """Top-1 accuracy of the first output against ``labels``."""
    if LABELS not in data:
        raise DataError("accuracy needs labels in the data")
    correct = total = 0
    was_training = module.training
    module.eval()
    with torch.no_grad():
        for batch in iterate_batches(data, batch_size, max_samples=max_samples):
            out = module(**_feeds(module, batch))
            logits = out[0] if isinstance(out, tuple) else out
            check_label_shape(np.shape(batch[LABELS]), tuple(logits.shape))
            labels = torch.as_tensor(np.asarray(batch[LABELS])).reshape(-1)
            correct += int((logits.reshape(labels.shape[0], -1).argmax(-1) == labels).sum())
            total += int(labels.shape[0])
    module.train(was_training)
    return correct / max(total, 1)


def _cosine(module: OnnxModule, teacher: OnnxModule, probes: Mapping[str, np.ndarray]) -> float:
    got = module.run(probes)
    ref = teacher.run(probes)
    a = np.concatenate([g.reshape(-1) for g in got if g.dtype.kind == "f"]).astype(np.float64)
    b = np.concatenate([r.reshape(-1) for r in ref if r.dtype.kind == "f"]).astype(np.float64)
    denominator = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / denominator) if denominator > 0 else float(np.array_equal(a, b))


def _optimizer(params: Sequence[torch.Tensor], options: TrainOptions) -> torch.optim.Optimizer:
    if options.optimizer == "sgd":
        return torch.optim.SGD(params, lr=options.lr, momentum=options.momentum, weight_decay=options.weight_decay)
    if options.optimizer == "adam":
        return torch.optim.Adam(params, lr=options.lr, weight_decay=options.weight_decay)
    raise UserError(f"optimizer must be sgd or adam, not {options.optimizer!r}")


def _scheduler(
    optimizer: torch.optim.Optimizer, options: TrainOptions, data: Arrays | Batches
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """``cosine``: lr * (1 + cos(pi * step / steps)) / 2 over all steps (Loshchilov & Hutter 2017)."""
    if options.lr_schedule == "constant":
        return None
    if options.lr_schedule != "cosine":
        raise UserError(f"lr_schedule must be constant or cosine, not {options.lr_schedule!r}")
    if isinstance(data, Mapping):
        count = len(next(iter(data.values())))
        count = min(count, options.max_samples) if options.max_samples is not None else count
        per_epoch = math.ceil(count / options.batch_size)
    else:
        per_epoch = sum(1 for _ in data())
    steps = max(per_epoch * options.epochs, 1)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps)))


def finetune(
    model: ir.Model,
    data: Arrays | Batches,
    *,
    original: ir.Model | None = None,
    options: TrainOptions | None = None,
    module: OnnxModule | None = None,
    replica: Replica | None = None,
) -> TrainResult:
    """Retrain `model`'s weights on `data`; the model itself is not modified.

    `original` is the teacher for distillation and the baseline for dropout rescaling and
    fidelity targets (default: `model` as given). Pass a prepared `module` (an `OnnxModule`
    of `model`) to add parametrizations of your own first; `keep_zeros` masks only the
    tensors left unparametrized. `replica`: this process is one of several data-parallel
    workers (`finetune.distributed`): it trains on its share of each batch through DDP.
    """
    options = options or TrainOptions()
    model = to_ir(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(options.seed)
        return _finetune(model, data, original, options, module, replica)


def _finetune(
    model: ir.Model,
    data: Arrays | Batches,
    original: ir.Model | None,
    options: TrainOptions,
    module: OnnxModule | None,
    replica: Replica | None = None,
) -> TrainResult:
    if module is None:
        module = OnnxModule(model)
    names = _trainable_names(model, module, options)
    if not names:
        raise UserError("nothing to train: no float weight matches the trainable/freeze globs")
    for name in module.onnx_names:
        for param in module.originals(name) if module.tensor(name).is_floating_point() else []:
            param.requires_grad_(name in names)
    structure = attach_structure(module, model, names) if options.keep_zeros else {}
    forward = replica.wrap(module) if replica is not None else module  # DDP syncs gradients in backward
    teacher = OnnxModule(original if original is not None else model, trainable=())
    teacher.eval()

    if isinstance(data, Mapping):
        check_data(data, module.input_names)
        first = next(iterate_batches(data, 2))
    else:
        first = next(iter(data()))
        _feeds(module, first)  # a callable's batches are checked here, by name
    has_labels = LABELS in first and not options.distill
    rank = np.ndim(teacher.run({k: v for k, v in first.items() if k != LABELS})[0])
    loss_kind = resolve_loss(options.loss, has_labels, rank)
    if loss_kind == "cross_entropy" and not has_labels and options.loss == "cross_entropy":
        raise DataError("cross-entropy needs labels in the data; use a distillation loss instead")
    probes = _probe_set(data, options.probe_samples)

    ratios = _rescale_dropout(module, model, original) if options.dropout_rescale else {}
    l1_names = [n for n in names if n in structure or n in _weight_names(model)] if options.l1 > 0 else []
    params = [p for n in names for p in module.originals(n)]
    optimizer = _optimizer(params, options)
    scheduler = _scheduler(optimizer, options, data)
    rng = np.random.default_rng(options.seed)
    history: list[dict[str, float]] = []
    first_loss: float | None = None
    stopped = False
    progress = _progress_bar(options.epochs) if _PROGRESS.get() else contextlib.nullcontext(None)
    with progress as bar:
        task = bar.add_task("fine-tuning", total=options.epochs, loss=float("nan")) if bar else None
        for epoch in range(options.epochs):
            module.train()
            total, count = 0.0, 0
            for batch in batches_of(data, options.batch_size, shuffle=True, rng=rng, max_samples=options.max_samples) if isinstance(data, Mapping) else data():
                if replica is not None:
                    share = replica.shard(batch)
                    if share is None:
                        continue  # a last batch with fewer rows than workers
                    batch = share
                feeds = _feeds(module, batch)
                with torch.no_grad():
                    reference = teacher(**feeds) if loss_kind != "cross_entropy" else None
                loss = compute_loss(loss_kind, forward(**feeds), batch, reference, temperature=options.temperature)
                if l1_names:
                    loss = loss + options.l1 * sum(module.tensor(n).abs().sum() for n in l1_names)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                n = len(next(iter(batch.values())))
                total, count = total + float(loss.detach()) * n, count + n
                first_loss = float(loss.detach()) if first_loss is None else first_loss
            record = {"epoch": float(epoch + 1), "loss": total / max(count, 1)}
            if epoch == 0 and record["loss"] == 0.0 and loss_kind != "cross_entropy":
                logger.warning(
                    "the %s loss against the teacher is exactly 0: the teacher computes what the model "
                    "does, so there is nothing to learn (give the uncompressed model as teacher)", loss_kind
                )
            record.update(_targets(module, teacher, data, probes, options))
            history.append(record)
            if bar is not None:
                bar.update(task, advance=1, loss=record["loss"])
            logger.info("fine-tune epoch %d/%d: %s", epoch + 1, options.epochs, record)
            if _met(record, options):
                stopped = epoch + 1 < options.epochs
                break
    module.eval()
    _warn_if_diverged(first_loss, history)
    if ratios:
        structure.update({f"dropout:{k}": f"ratio {v:.4f}" for k, v in ratios.items()})
    return TrainResult(module.arrays(names), history, structure, stopped, loss_kind)


def _weight_names(model: ir.Model) -> set[str]:
    return {site.name for site in find_weight_sites(model, min_params=0).sites}


def _probe_set(data: Arrays | Batches, count: int) -> dict[str, np.ndarray]:
    if isinstance(data, Mapping):
        return {k: np.asarray(v)[:count] for k, v in data.items() if k != LABELS}
    first = next(iter(data()))
    return {k: np.asarray(v)[:count] for k, v in first.items() if k != LABELS}


def _targets(
    module: OnnxModule, teacher: OnnxModule, data: Arrays | Batches, probes: Mapping[str, np.ndarray], options: TrainOptions
) -> dict[str, float]:
    out: dict[str, float] = {}
    if options.target_cosine is not None:
        out["cosine"] = _cosine(module, teacher, probes)
    if options.target_accuracy is not None and isinstance(data, Mapping) and LABELS in data:
        out["accuracy"] = evaluate(module, data, max_samples=options.max_samples)
    return out


def _met(record: Mapping[str, float], options: TrainOptions) -> bool:
    checks = []
    if options.target_cosine is not None and "cosine" in record:
        checks.append(record["cosine"] >= options.target_cosine)
    if options.target_accuracy is not None and "accuracy" in record:
        checks.append(record["accuracy"] >= options.target_accuracy)
    return bool(checks) and all(checks)


def _warn_if_diverged(first_loss: float | None, history: list[dict[str, float]]) -> None:
    """Say so when training made the loss worse: the learning rate is the usual suspect."""
    if first_loss is None or not history:
        return
    last = history[-1]["loss"]
    if not math.isfinite(last) or last > 2.0 * first_loss + 1e-6:
        logger.warning("fine-tuning diverged: loss %.4g at the first step, %.4g over the last epoch; "
                       "try a lower --lr", first_loss, last)


def _progress_bar(epochs: int) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"), TimeElapsedColumn(), transient=True,
    )


def write_back(model: ir.Model, arrays: Mapping[str, np.ndarray]) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Swap trained arrays into `model` by name: same shapes and dtypes, no graph edits.

    Returns (name, before, after) for every tensor whose values changed. Checks every name,
    shape and dtype before the first swap, so the model changes fully or not at all.
    """
    holders: dict[str, tuple[ir.Value, ir.Node | None]] = {}
    for name, value in model.graph.initializers.items():
        holders[name] = (value, None)
    for node in model.graph:
        if node.op_type == "Constant" and "value" in node.attributes:
            holders[node.outputs[0].name or ""] = (node.outputs[0], node)
    plan = []
    for name, array in arrays.items():
        if name not in holders:
            raise UserError(f"write-back: no initializer or Constant named {name!r}")
        value, node = holders[name]
        old = value.const_value if node is None else node.attributes["value"].as_tensor()
        if old is None:
            raise UserError(f"write-back: {name!r} holds no tensor")
        before = old.numpy()
        after = np.asarray(array).astype(before.dtype, copy=False)
        if after.shape != before.shape:
            raise UserError(f"write-back: {name!r} has shape {after.shape}, the model {before.shape}")
        if not np.array_equal(after, before):
            plan.append((name, value, node, before, after))
    for _, value, _, _, after in plan:
        set_constant(value, after)
    return [(name, before, after) for name, _, _, before, after in plan]
