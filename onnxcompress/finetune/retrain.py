"""Retraining after every lossy step of a recipe (`optimize --finetune`), gated on labelled accuracy.

Han et al. 2015 (§3.2, Fig. 5) prune far past the point where a network without retraining
holds up, because retraining after each round recovers the accuracy; Deep Compression (2016)
fine-tunes the shared centroids after k-means. `with_retraining` turns a recipe of gated
steps into that pipeline:

* after every `prune.magnitude` / `prune.taylor` / `prune.obd` step and after `codebook.kmeans`,
  a `finetune` step with its defaults (learning rate from a range test, early stopping on
  held-out samples) forms one round with it (`with_previous`): the round's gate is judged
  after retraining, and a failed round is undone whole when the step says `rollback`;
* a magnitude-pruning ladder goes on past its last rung, each further rung halving the
  share of weights kept (0.9 -> 0.95 -> 0.975), since retraining moves the knee;
* the gate is the change of top-1 accuracy against the labels on the gate's samples,
  ``accuracy(candidate) - accuracy(original) >= -max_drop`` (`accuracy_change`): output
  cosine against the original is no measure once retraining has moved the outputs. The
  `finetune` pass never trains on the gate's samples (it leaves the pipeline's probes out).

No torch here: this is recipe arithmetic; the training is the `finetune` pass's.
"""

from __future__ import annotations

__all__ = ["RETRAINED_PASSES", "with_retraining", "accuracy_change", "retraining_gate"]

from collections.abc import Sequence

import numpy as np

from onnxcompress.fidelity import Gate, TaskMetric
from onnxcompress.pipeline import Step

#: Steps a `finetune` step follows under `--finetune`.
RETRAINED_PASSES = ("prune.magnitude", "prune.taylor", "prune.obd", "codebook.kmeans")
#: Kept shares past a ladder's last rung are halved this many times.
EXTRA_RUNGS = 2


def retraining_gate(max_drop: float) -> Gate:
    """Only the task metric (accuracy change): outputs are meant to move."""
    return Gate.off().model_copy(update={"min_task": -max_drop})


def accuracy_change(labels: np.ndarray) -> TaskMetric:
    """Top-1 accuracy of the candidate minus the original's, on the gate's samples (first output)."""
    truth = np.asarray(labels).reshape(-1)

    def metric(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> float:
        def hits(outputs: Sequence[np.ndarray]) -> int:
            logits = np.asarray(outputs[0]).reshape(len(truth), -1)
            return int(np.sum(logits.argmax(axis=1) == truth))

        # counts first: 6 of 2,000 is exactly -0.003, not a hair below it
        return (hits(candidate) - hits(reference)) / max(len(truth), 1)

    return metric


def _extended_ladder(steps: Sequence[Step]) -> list[Step]:
    """Rungs past the last uniform magnitude rung: the kept share halved `EXTRA_RUNGS` times."""
    rungs = [i for i, s in enumerate(steps) if s.pass_name == "prune.magnitude" and "overrides" not in s.options
             and "sparsity" in s.options]
    if not rungs:
        return list(steps)
    last = rungs[-1]
    top = steps[last]
    kept = 1.0 - float(top.options["sparsity"])
    extra = []
    for _ in range(EXTRA_RUNGS):
        kept /= 2
        extra.append(top.model_copy(update={"options": {**top.options, "sparsity": round(1.0 - kept, 6)}}))
    return [*steps[: last + 1], *extra, *steps[last + 1:]]


def with_retraining(steps: Sequence[Step], *, max_drop: float = 0.003) -> list[Step]:
    """The recipe with a `finetune` round after every pruning and k-means step (see module doc)."""
    gate = retraining_gate(max_drop)
    out: list[Step] = []
    for step in _extended_ladder(steps):
        if step.pass_name not in RETRAINED_PASSES:
            out.append(step)
            continue
        out.append(step.model_copy(update={"gate": Gate.off()}))
        out.append(Step(pass_name="finetune", gate=gate, on_fail=step.on_fail, with_previous=True))
    return out
