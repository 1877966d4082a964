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
  (`losses`); L2 as the optimizer's weight decay; L1, Hanson & Pratt's biased decay and
  Wen's group lasso per layer (`regularise`); Ullrich's soft weight-sharing prior (`prior`);
* the settings are `FinetuneConfig` (`config`): with ``lr`` unset a short range test picks
  it, with ``epochs`` unset training stops when the held-out metric stops improving and
  the best epoch's weights are kept;
* seeded: the split, the batch order, dropout and everything torch draws come from ``seed``;
* early stop when a fidelity target (output cosine against the original model) or an
  accuracy target (with labels) is met, checked after every epoch;
* progress: an optional ``progress(line)`` callback gets one line per epoch.

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
    "find_lr",
]

import dataclasses
import fnmatch
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir
import torch

from onnxcompress.data import check_label_shape
from onnxcompress.errors import DataError, UserError
from onnxcompress.finetune.config import FinetuneConfig
from onnxcompress.finetune.data import (
    LABELS,
    Arrays,
    Batches,
    batches_of,
    check_data,
    iterate_batches,
    num_samples,
)
from onnxcompress.finetune.executor import OnnxModule, to_ir
from onnxcompress.finetune.losses import compute_loss, resolve_loss
from onnxcompress.finetune.parametrize import attach_structure
from onnxcompress.finetune.prior import MIN_WEIGHTS_LR, MixturePrior
from onnxcompress.finetune.regularise import (
    RegularisedLayer,
    penalty,
    proximal_group_step,
    regularised_layers,
)
from onnxcompress.sites import constant_array, constant_node_array, find_weight_sites, set_constant

if TYPE_CHECKING:
    from onnxcompress.finetune.distributed import Replica

logger = logging.getLogger(__name__)

#: The one settings class; the old name stays for callers of the library.
TrainOptions = FinetuneConfig
Progress = Callable[[str], None]

#: Range test (Smith 2017): rates from LR_TEST_START to LR_TEST_END over LR_TEST_STEPS steps.
LR_TEST_START, LR_TEST_END, LR_TEST_STEPS = 1e-6, 1.0, 60
#: Held-out split only when at least this many samples remain for training.
MIN_SPLIT_SAMPLES = 20
#: Losses on class logits: with labelled held-out data, early stopping reads its accuracy (under
#: a prior, of the weights quantised to the mixture's means), also when distilling (``kl``).
CLASSIFYING_LOSSES = ("cross_entropy", "kl")


@dataclasses.dataclass
class TrainResult:
    """New arrays by ONNX name, and an account of the run."""

    arrays: dict[str, np.ndarray]
    history: list[dict[str, float]]
    structure: dict[str, str]
    stopped_early: bool
    loss_kind: str
    lr: float = 0.0
    best_epoch: int = 0
    prior_means: list[float] = dataclasses.field(default_factory=list)
    held_out_samples: int = 0  # what early stopping read (0: none, or not arrays)
    train_samples: int = 0

    def summary(self) -> dict[str, Any]:
        """The JSON-ready part of the result, for the pass report (arrays are written back)."""
        out: dict[str, Any] = {
            "epochs_run": len(self.history),
            "stopped_early": self.stopped_early,
            "loss": self.loss_kind,
            "lr": self.lr,
            "best_epoch": self.best_epoch,
            "train_samples": self.train_samples,
            "held_out_samples": self.held_out_samples,
            "history": self.history,
            "structure": self.structure,
        }
        if self.prior_means:
            out["prior_means"] = self.prior_means
        return out


@dataclasses.dataclass
class _Run:
    """Everything one training run holds between its phases."""

    module: OnnxModule
    teacher: OnnxModule
    names: list[str]
    structure: dict[str, str]
    loss_kind: str
    options: FinetuneConfig
    train: Arrays | Batches
    held_out: Arrays | None
    layers: list[RegularisedLayer]
    prior: MixturePrior | None
    samples: int
    rng: np.random.Generator
    progress: Progress | None
    replica: Replica | None = None
    forward: Callable[..., Any] | None = None  # the module, or its DDP wrap on a replica

    def parameters(self) -> list[torch.Tensor]:
        return [p for n in self.names for p in self.module.originals(n)]

    def batches(self) -> Iterator[Arrays]:
        """This process's training batches: every one, or its share of each on a replica."""
        every = (batches_of(self.train, self.options.batch_size, shuffle=True, rng=self.rng,
                            max_samples=self.options.max_samples)
                 if isinstance(self.train, Mapping) else self.train())
        for batch in every:
            share = self.replica.shard(batch) if self.replica is not None else batch
            if share is not None:  # None: a last batch with fewer rows than workers
                yield share

    def say(self, line: str) -> None:
        logger.info("%s", line)
        if self.progress is not None:
            self.progress(line)


def _trainable_names(model: ir.Model, module: OnnxModule, options: FinetuneConfig) -> list[str]:
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
            # a layer whose weight is not a constant (e.g. Transpose(W)): never walk past it
            return None
        # follow the activation, not a constant operand (torch writes Add(bias, MatMul) too)
        value = next(
            (v for v in producer.inputs if v is not None and _constant_of(v) is None), None
        )
    return None


def _constant_of(value: ir.Value) -> np.ndarray | None:
    """The array behind an initializer or a Constant node's output (literals too), else None."""
    array = constant_array(value)
    producer = value.producer()
    if array is None and producer is not None and producer.op_type == "Constant":
        return constant_node_array(producer)
    return array


def _rescale_dropout(
    module: OnnxModule, model: ir.Model, original: ir.Model | None
) -> dict[str, float]:
    """Set each Dropout node's training ratio from its layer's connection counts."""
    if original is None:
        return {}
    original_values = {
        name: value.const_value
        for name, value in original.graph.initializers.items()
        if value.const_value is not None
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
        ratio_input = (
            node.inputs[1] if len(node.inputs) > 1 and node.inputs[1] is not None else None
        )
        held = _constant_of(ratio_input) if ratio_input is not None else None
        if held is not None:
            old_ratio = float(held)
        elif "ratio" in node.attributes:
            old_ratio = float(node.attributes["ratio"].value)
        c_old = int(np.count_nonzero(original_values[weight].numpy()))
        c_new = int(np.count_nonzero(module.tensor(weight).detach().numpy()))
        ratios[name] = dropout_ratio(old_ratio, c_old, c_new)
        module.set_dropout_ratio(name, ratios[name])
        logger.info(
            "dropout %s: ratio %.3f -> %.3f (%d -> %d connections)",
            name,
            old_ratio,
            ratios[name],
            c_old,
            c_new,
        )
    return ratios


def _feeds(module: OnnxModule, batch: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    missing = [n for n in module.input_names if n not in batch]
    if missing:
        unknown = sorted(k for k in batch if k not in module.input_names and k != LABELS)
        raise DataError(
            f"a batch lacks model inputs {missing}"
            + (f"; it has {unknown} instead" if unknown else "")
        )
    return {k: torch.as_tensor(np.asarray(v)) for k, v in batch.items() if k in module.input_names}


def evaluate(
    module: OnnxModule, data: Arrays, batch_size: int = 256, max_samples: int | None = None
) -> float:
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


def _optimizer(run: _Run, lr: float) -> torch.optim.Optimizer:
    options = run.options
    groups: list[dict[str, Any]] = [{"params": run.parameters()}]
    if run.prior is not None:
        groups += run.prior.parameter_groups()
    if options.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=options.momentum, weight_decay=options.l2)
    if options.optimizer == "adam":
        return torch.optim.Adam(groups, lr=lr, weight_decay=options.l2)
    raise UserError(f"optimizer must be sgd or adam, not {options.optimizer!r}")


def _scheduler(
    optimizer: torch.optim.Optimizer, options: FinetuneConfig, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """``cosine``: lr * (1 + cos(pi * step / steps)) / 2 over all steps (Loshchilov & Hutter)."""
    if options.lr_schedule == "constant":
        return None
    if options.lr_schedule != "cosine":
        raise UserError(f"lr_schedule must be constant or cosine, not {options.lr_schedule!r}")
    steps = max(total_steps, 1)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))
    )


def finetune(
    model: ir.Model,
    data: Arrays | Batches,
    *,
    original: ir.Model | None = None,
    options: FinetuneConfig | None = None,
    module: OnnxModule | None = None,
    progress: Progress | None = None,
    replica: Replica | None = None,
    held_out: Arrays | None = None,
) -> TrainResult:
    """Retrain `model`'s weights on `data`; the model itself is not modified.

    `original` is the teacher for distillation and the baseline for dropout rescaling and
    fidelity targets (default: `model` as given). Pass a prepared `module` (an `OnnxModule`
    of `model`) to add parametrizations of your own first; `keep_zeros` masks only the
    tensors left unparametrized. `progress` receives one line per epoch. `replica`: this
    process is one of several data-parallel workers (`finetune.distributed`): it trains on its
    share of each batch through DDP. `held_out`: samples never trained on, for early stopping
    instead of `validation_split` of `data` (with automatic epochs).
    """
    options = options or FinetuneConfig()
    model = to_ir(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(options.seed or 0)
        run = _prepare(model, data, original, options, module, progress, held_out)
        run.replica = replica
        # DDP syncs gradients
        run.forward = replica.wrap(run.module) if replica is not None else run.module
        ratios = _rescale_dropout(run.module, model, original) if options.dropout_rescale else {}
        lr = options.lr if options.lr is not None else find_lr(run)
        history, stopped, best = _train(run, lr)
        run.module.eval()
        means = _quantise_to_prior(run) if run.prior is not None else []
    if ratios:
        run.structure.update({f"dropout:{k}": f"ratio {v:.4f}" for k, v in ratios.items()})
    return TrainResult(run.module.arrays(run.names), history, run.structure, stopped, run.loss_kind,
                       lr=lr, best_epoch=best, prior_means=means,
                       held_out_samples=num_samples(run.held_out) if run.held_out else 0,
                       train_samples=run.samples)


def _prepare(
    model: ir.Model,
    data: Arrays | Batches,
    original: ir.Model | None,
    options: FinetuneConfig,
    module: OnnxModule | None,
    progress: Progress | None,
    given_held_out: Arrays | None = None,
) -> _Run:
    """The module with its structure held, the teacher, the loss and the data split."""
    module = module if module is not None else OnnxModule(model)
    names = _trainable_names(model, module, options)
    if not names:
        raise UserError("nothing to train: no float weight matches the trainable/freeze globs")
    for name in module.onnx_names:
        for param in module.originals(name) if module.tensor(name).is_floating_point() else []:
            param.requires_grad_(name in names)
    structure = attach_structure(module, model, names) if options.keep_zeros else {}
    teacher = OnnxModule(original if original is not None else model, trainable=())
    teacher.eval()
    loss_kind = _loss_kind(module, teacher, data, options)
    train, held_out = _split(data, options, given_held_out)
    wants_layers = options.regularised or options.prior == "gmm"
    layers = regularised_layers(model, names, options) if wants_layers else []
    if options.prior == "gmm" and not layers:
        raise UserError("the gmm prior found no weight layer to act on (check --regularise globs)")
    prior = MixturePrior(torch.cat([module.tensor(x.name).detach().reshape(-1) for x in layers]),
                         options.prior_components, options.prior_zero_mass
                         ) if options.prior == "gmm" else None
    samples = num_samples(train) if isinstance(train, Mapping) else sum(
        len(next(iter(b.values()))) for b in train())
    rng = np.random.default_rng(options.seed or 0)
    return _Run(
        module,
        teacher,
        names,
        structure,
        loss_kind,
        options,
        train,
        held_out,
        layers,
        prior,
        max(samples, 1),
        rng,
        progress,
    )


def _loss_kind(
    module: OnnxModule, teacher: OnnxModule, data: Arrays | Batches, options: FinetuneConfig
) -> str:
    first: Mapping[str, np.ndarray]
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
    return loss_kind


def _split(
    data: Arrays | Batches, options: FinetuneConfig, given: Arrays | None = None
) -> tuple[Arrays | Batches, Arrays | None]:
    """(training data, held-out data): a seeded share held out only when epochs are automatic.

    Held-out samples `given` apart (with the same arrays as the data) are used whole instead.
    """
    if not options.auto_epochs:
        return data, None
    if given is not None and isinstance(data, Mapping) and set(given) == set(data):
        return data, dict(given)
    if options.validation_split <= 0 or not isinstance(data, Mapping):
        return data, None
    count = num_samples(data)
    if options.max_samples is not None:
        count = min(count, options.max_samples)
    held = int(round(count * options.validation_split))
    if held < 1 or count - held < MIN_SPLIT_SAMPLES:
        return data, None
    order = np.random.default_rng((options.seed or 0) + 1).permutation(num_samples(data))[:count]
    return ({k: np.asarray(v)[order[held:]] for k, v in data.items()},
            {k: np.asarray(v)[order[:held]] for k, v in data.items()})


def _task_loss(run: _Run, batch: Arrays) -> torch.Tensor:
    """The batch loss against labels or the teacher, without any regulariser."""
    feeds = _feeds(run.module, batch)
    with torch.no_grad():
        reference = run.teacher(**feeds) if run.loss_kind != "cross_entropy" else None
    forward = run.forward if run.forward is not None and run.module.training else run.module
    return compute_loss(
        run.loss_kind, forward(**feeds), batch, reference, temperature=run.options.temperature
    )


def _step_loss(run: _Run, batch: Arrays) -> tuple[torch.Tensor, torch.Tensor]:
    """(what is minimised, the task loss): the minimised adds regularisers and the prior's term."""
    task = _task_loss(run, batch)
    loss = task
    extra = penalty(run.module, run.layers, run.options)
    if extra is not None:
        loss = loss + extra
    if run.prior is not None:
        weights = [run.module.tensor(layer.name) for layer in run.layers]
        complexity = run.prior.negative_log_prob(weights, sample=run.options.prior_sample)
        loss = loss + run.options.prior_strength * complexity / run.samples
    return loss, task


def _snapshot(run: _Run) -> list[torch.Tensor]:
    tensors = run.parameters() + (list(run.prior.parameters()) if run.prior is not None else [])
    return [t.detach().clone() for t in tensors]


@torch.no_grad()
def _restore(run: _Run, saved: Sequence[torch.Tensor]) -> None:
    tensors = run.parameters() + (list(run.prior.parameters()) if run.prior is not None else [])
    for tensor, value in zip(tensors, saved, strict=True):
        tensor.copy_(value)


def find_lr(run: _Run) -> float:
    """Smith's range test: 1/10 of the rate at the smoothed loss minimum; the weights are restored.

    The rate rises geometrically from `LR_TEST_START` to `LR_TEST_END` over `LR_TEST_STEPS`
    steps (batches cycled) and stops once the loss exceeds 4x its best. Under a prior, at least
    `MIN_WEIGHTS_LR` (the test reads the task loss alone).
    """
    prior, run.prior = run.prior, None  # the task loss alone sets the rate
    try:
        rate = _range_test(run)
    finally:
        run.prior = prior
    if prior is not None and rate < MIN_WEIGHTS_LR:
        run.say(f"fine-tune: learning rate {MIN_WEIGHTS_LR:.3g} under the prior (Ullrich et al.'s)")
        return MIN_WEIGHTS_LR
    return rate


def _range_test(run: _Run) -> float:
    saved, state = _snapshot(run), np.random.default_rng(run.options.seed or 0)
    run.say("fine-tune: finding the learning rate (range test)")
    optimizer = _optimizer(run, LR_TEST_START)
    factor = (LR_TEST_END / LR_TEST_START) ** (1 / (LR_TEST_STEPS - 1))
    fixed = _fixed_batch(run)
    rates, losses = [], []
    batches = _cycle(run, state)
    for step in range(LR_TEST_STEPS):
        lr = LR_TEST_START * factor**step
        optimizer.param_groups[0]["lr"] = lr  # the prior is left out of the test: one group
        run.module.train()
        loss, _ = _step_loss(run, next(batches))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        value = _fixed_loss(run, fixed)
        if not math.isfinite(value):
            break
        rates.append(lr)
        losses.append(value)
        if value > 4 * min(losses):
            break
    _restore(run, saved)
    chosen, why = _rate_from_curve(rates, losses)
    run.say(f"fine-tune: learning rate {chosen:.3g} ({why})")
    return chosen


def _fixed_batch(run: _Run) -> Arrays:
    """The samples every range-test step is scored on (no sampling noise between steps)."""
    if isinstance(run.train, Mapping):
        return next(iterate_batches(run.train, 512))
    return next(iter(run.train()))


@torch.no_grad()
def _fixed_loss(run: _Run, batch: Arrays) -> float:
    run.module.eval()
    return float(_step_loss(run, batch)[0])


def _rate_from_curve(rates: Sequence[float], losses: Sequence[float]) -> tuple[float, str]:
    """1/10 of the rate at the loss minimum.

    For a model already at its minimum (the loss never fell by 5%), 1/10 of the last rate before the
    loss rose 10% (the edge of stability).
    """
    if not losses:
        return 1e-3, "the range test diverged at once: 1e-3"
    lowest = int(np.argmin(losses))
    if losses[lowest] <= 0.95 * losses[0]:
        return rates[lowest] / 10, "loss minimum of the range test / 10"
    rise = next((i for i, loss in enumerate(losses) if loss > 1.1 * losses[lowest]), len(losses))
    edge = rates[max(rise - 1, 0)]
    return edge / 10, "the loss did not fall: 1/10 of the last rate before it rose by 10%"


def _cycle(run: _Run, rng: np.random.Generator) -> Iterator[Arrays]:
    """Training batches without end (range test), in a seeded order of their own."""
    while True:
        if isinstance(run.train, Mapping):
            yield from batches_of(run.train, run.options.batch_size, shuffle=True, rng=rng,
                                  max_samples=run.options.max_samples)
        else:
            yield from run.train()


def _planned_epochs(run: _Run) -> tuple[int, int]:
    """(epochs, steps per epoch): the given epochs, or enough for `max_steps` (at least 3)."""
    if isinstance(run.train, Mapping):
        count = num_samples(run.train)
        count = (
            min(count, run.options.max_samples) if run.options.max_samples is not None else count
        )
        per_epoch = max(math.ceil(count / run.options.batch_size), 1)
    else:
        per_epoch = max(sum(1 for _ in run.train()), 1)
    if run.options.epochs is not None:
        return run.options.epochs, per_epoch
    return max(3, math.ceil(run.options.max_steps / per_epoch)), per_epoch


@dataclasses.dataclass
class _Best:
    """The best held-out result so far, its epoch and weights, epochs since it improved.

    And the first step's task loss (to tell a diverged run).
    """

    score: float = -math.inf
    epoch: int = 0
    state: list[torch.Tensor] | None = None
    stale: int = 0
    first_loss: float | None = None


def _train(run: _Run, lr: float) -> tuple[list[dict[str, float]], bool, int]:
    """The epochs: returns (history, stopped early, best epoch); the best weights are restored.

    With early stopping, a cycle (cosine over the planned epochs) that still improved the
    held-out result is followed by another from the best weights at half the rate (warm
    restarts, Loshchilov & Hutter 2017), up to `max_cycles`: the held-out samples, not a step
    cap, decide how long a hard round (a deep pruning rung) retrains.
    """
    epochs, per_epoch = _planned_epochs(run)
    probes = _probe_set(
        run.train if run.held_out is None else run.held_out, run.options.probe_samples
    )
    history: list[dict[str, float]] = []
    best, stopped = _Best(), False
    cycles = run.options.max_cycles if run.options.auto_epochs else 1
    for cycle in range(cycles):
        before = best.score
        if cycle > 0:
            assert best.state is not None
            _restore(run, best.state)
            run.say(
                f"fine-tune: still improving: cycle {cycle + 1} from epoch {best.epoch} at rate "
                f"{lr * 0.5**cycle:.3g}"
            )
        stopped = _train_cycle(
            run, lr * 0.5**cycle, epochs * per_epoch, epochs, probes, history, best
        )
        if stopped or not best.score > before or best.state is None:
            break
    if best.state is not None and best.epoch != len(history):
        _restore(run, best.state)
        run.say(f"fine-tune: kept epoch {best.epoch} (best held-out result)")
    if run.prior is None:  # a prior raises the task loss on purpose
        _warn_if_diverged(best.first_loss, history)
    return history, stopped, best.epoch or len(history)


def _train_cycle(
    run: _Run, lr: float, steps: int, epochs: int, probes: Mapping[str, np.ndarray],
    history: list[dict[str, float]], best: _Best,
) -> bool:
    """One cosine cycle of `epochs` into `history`; True when a target or patience stopped it."""
    optimizer = _optimizer(run, lr)
    scheduler = _scheduler(optimizer, run.options, steps)
    for epoch in range(epochs):
        record, first = _train_epoch(run, optimizer, scheduler)
        record = {"epoch": float(len(history) + 1), **record, **_held_out_metrics(run)}
        best.first_loss = first if best.first_loss is None else best.first_loss
        if not history and record["loss"] == 0.0 and run.loss_kind != "cross_entropy":
            logger.warning(
                "the %s loss against the teacher is exactly 0: the teacher computes what the model "
                "does, so there is nothing to learn (give the uncompressed model as teacher)",
                run.loss_kind,
            )
        record.update(_targets(run, probes))
        history.append(record)
        run.say(f"fine-tune epoch {len(history)}/{epochs}: " + _describe(record))
        if _met(record, run.options):
            return epoch + 1 < epochs
        if run.options.auto_epochs:
            score = _score(record)
            if score > best.score:
                best.score, best.epoch, best.state, best.stale = (
                    score,
                    len(history),
                    _snapshot(run),
                    0,
                )
            else:
                best.stale += 1
            if best.stale >= run.options.patience and run.prior is None:  # under a prior the
                return epoch + 1 < epochs  # quantised score dips while weights change components
    return False


def _train_epoch(
    run: _Run,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
) -> tuple[dict[str, float], float | None]:
    """One pass over the training batches: ({loss, lr[, objective]}, the first step's task loss).

    ``loss`` is the task loss alone; ``objective`` adds the regularisers and the prior.
    """
    run.module.train()
    total, objective, count, first = 0.0, 0.0, 0, None
    lr = optimizer.param_groups[0]["lr"]
    for batch in run.batches():
        loss, task = _step_loss(run, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if run.options.group_lasso > 0:
            proximal_group_step(
                run.module, run.layers, run.options, optimizer.param_groups[0]["lr"]
            )
        if scheduler is not None:
            scheduler.step()
        n = len(next(iter(batch.values())))
        total, count = total + float(task.detach()) * n, count + n
        objective += float(loss.detach()) * n
        first = float(task.detach()) if first is None else first
    record = {"loss": total / max(count, 1), "lr": float(lr)}
    if objective != total:
        record["objective"] = objective / max(count, 1)
    return record, first


def _held_out_metrics(run: _Run) -> dict[str, float]:
    """Loss (and accuracy with labels) on the held-out samples, when there are any."""
    if run.held_out is None:
        return {}
    run.module.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in iterate_batches(run.held_out, 512):
            n = len(next(iter(batch.values())))
            total += float(_task_loss(run, batch)) * n
            count += n
    out = {"held_out_loss": total / max(count, 1)}
    if LABELS in run.held_out and run.loss_kind in CLASSIFYING_LOSSES:
        out["held_out_accuracy"] = evaluate(run.module, run.held_out)
        if run.prior is not None:  # what the run will keep: the weights at the mixture's means
            saved = _snapshot(run)
            _set_to_means(run)
            out["held_out_accuracy_quantised"] = evaluate(run.module, run.held_out)
            _restore(run, saved)
    return out


def _score(record: Mapping[str, float]) -> float:
    """Higher is better.

    Held-out accuracy (of the quantised weights under a prior), else minus the held-out loss, else
    minus the training loss.
    """
    if "held_out_accuracy_quantised" in record:
        return record["held_out_accuracy_quantised"]
    if "held_out_accuracy" in record:
        return record["held_out_accuracy"] - 1e-6 * record["held_out_loss"]  # loss breaks ties
    return -record.get("held_out_loss", record["loss"])


def _describe(record: Mapping[str, float]) -> str:
    parts = [f"loss {record['loss']:.4f}"]
    if "held_out_loss" in record:
        parts.append(f"held-out loss {record['held_out_loss']:.4f}")
    if "held_out_accuracy" in record:
        parts.append(f"held-out accuracy {100 * record['held_out_accuracy']:.2f}%")
    if "held_out_accuracy_quantised" in record:
        parts.append(f"quantised {100 * record['held_out_accuracy_quantised']:.2f}%")
    parts += [f"{key} {record[key]:.4f}" for key in ("cosine", "accuracy") if key in record]
    return ", ".join(parts)


def _quantise_to_prior(run: _Run) -> list[float]:
    """Every regularised weight set to its component's mean; returns the means in use."""
    used = _set_to_means(run)
    run.say(f"fine-tune: weights quantised to {len(used)} shared values (prior means)")
    return used


@torch.no_grad()
def _set_to_means(run: _Run) -> list[float]:
    assert run.prior is not None
    used: set[float] = set()
    for layer in run.layers:
        originals = run.module.originals(layer.name)
        value = run.prior.quantise(run.module.tensor(layer.name))
        if len(originals) != 1 or tuple(originals[0].shape) != tuple(value.shape):
            raise UserError(
                f"the gmm prior cannot quantise {layer.name!r}: it is not a plain weight"
            )
        originals[0].copy_(value)
        used.update(float(v) for v in torch.unique(run.module.tensor(layer.name)))
    return sorted(used)


def _probe_set(data: Arrays | Batches, count: int) -> dict[str, np.ndarray]:
    if isinstance(data, Mapping):
        return {k: np.asarray(v)[:count] for k, v in data.items() if k != LABELS}
    first = next(iter(data()))
    return {k: np.asarray(v)[:count] for k, v in first.items() if k != LABELS}


def _targets(run: _Run, probes: Mapping[str, np.ndarray]) -> dict[str, float]:
    out: dict[str, float] = {}
    options = run.options
    if options.target_cosine is not None:
        out["cosine"] = _cosine(run.module, run.teacher, probes)
    if (
        options.target_accuracy is not None
        and isinstance(run.train, Mapping)
        and LABELS in run.train
    ):
        out["accuracy"] = evaluate(run.module, run.train, max_samples=options.max_samples)
    return out


def _met(record: Mapping[str, float], options: FinetuneConfig) -> bool:
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
        logger.warning(
            "fine-tuning diverged: loss %.4g at the first step, %.4g over the last epoch; "
            "try a lower --lr",
            first_loss,
            last,
        )


def write_back(
    model: ir.Model, arrays: Mapping[str, np.ndarray]
) -> list[tuple[str, np.ndarray, np.ndarray]]:
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
        value, holder_node = holders[name]
        old = (
            value.const_value
            if holder_node is None
            else holder_node.attributes["value"].as_tensor()
        )
        if old is None:
            raise UserError(f"write-back: {name!r} holds no tensor")
        before = old.numpy()
        after = np.asarray(array).astype(before.dtype, copy=False)
        if after.shape != before.shape:
            raise UserError(
                f"write-back: {name!r} has shape {after.shape}, the model {before.shape}"
            )
        if not np.array_equal(after, before):
            plan.append((name, value, holder_node, before, after))
    for _, value, _, _, after in plan:
        set_constant(value, after)
    return [(name, before, after) for name, _, _, before, after in plan]
