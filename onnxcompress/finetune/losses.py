"""Losses for fine-tuning and saliency: cross-entropy with labels, or distillation.

Distillation compares the model being trained with the original (uncompressed) model's
outputs on the same batch (Hinton et al., 2015): ``kl`` on logits (softened by a
temperature T, scaled by T**2), ``mse`` or ``cosine`` (1 - cosine along the last axis) on
embeddings. ``auto`` picks cross-entropy when the batch carries labels, else KL when the
first output is 2-D logits, else MSE. Every loss is a mean over the batch.
"""

from __future__ import annotations

__all__ = ["LOSSES", "resolve_loss", "compute_loss"]

import functools
import operator
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from onnxcompress.data import check_label_shape
from onnxcompress.errors import DataError
from onnxcompress.finetune.data import LABELS

LOSSES = ("auto", "cross_entropy", "kl", "mse", "cosine")


def resolve_loss(kind: str, has_labels: bool, first_output_rank: int | None) -> str:
    """The concrete loss `auto` stands for, or `kind` itself after a validity check."""
    if kind not in LOSSES:
        raise DataError(f"unknown loss {kind!r}; choose one of {', '.join(LOSSES)}")
    if kind == "auto":
        if has_labels:
            return "cross_entropy"
        return "kl" if first_output_rank == 2 else "mse"
    return kind


def _as_tuple(outputs: torch.Tensor | Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return (outputs,) if isinstance(outputs, torch.Tensor) else tuple(outputs)


def compute_loss(
    kind: str,
    outputs: torch.Tensor | Sequence[torch.Tensor],
    batch: Mapping[str, np.ndarray],
    reference: torch.Tensor | Sequence[torch.Tensor] | None = None,
    *,
    temperature: float = 1.0,
) -> torch.Tensor:
    """The mean loss of one batch. `kind` must already be resolved (not ``auto``).

    ``cross_entropy`` without labels uses the reference's argmax as pseudo-labels.
    """
    outs = _as_tuple(outputs)
    if kind == "cross_entropy":
        if LABELS in batch:
            labels = np.asarray(batch[LABELS])
            check_label_shape(labels.shape, tuple(outs[0].shape))
            target = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        elif reference is not None:
            target = _as_tuple(reference)[0].argmax(dim=-1).reshape(-1)
        else:
            raise DataError("cross-entropy needs labels in the data (or a reference model)")
        logits = outs[0].reshape(target.shape[0], -1)
        if target.numel() and (int(target.min()) < 0 or int(target.max()) >= logits.shape[1]):
            raise DataError(
                f"labels must be class indices in 0..{logits.shape[1] - 1} (the model has "
                f"{logits.shape[1]} outputs), got {int(target.min())}..{int(target.max())}"
            )
        return F.cross_entropy(logits, target)
    if reference is None:
        raise DataError(f"the {kind} loss distils from the original model's outputs; none given")
    refs = _as_tuple(reference)
    if kind == "kl":
        t = temperature
        student = F.log_softmax(outs[0] / t, dim=-1)
        teacher = F.log_softmax(refs[0] / t, dim=-1)
        return F.kl_div(student, teacher, reduction="batchmean", log_target=True) * (t * t)
    floats = [(o, r) for o, r in zip(outs, refs, strict=True) if o.is_floating_point()]
    if kind == "mse":
        return _total(F.mse_loss(o, r) for o, r in floats) / len(floats)
    if kind == "cosine":
        cosines = ((1 - F.cosine_similarity(o, r, dim=-1)).mean() for o, r in floats)
        return _total(cosines) / len(floats)
    raise DataError(f"unknown loss {kind!r}; choose one of {', '.join(LOSSES)}")


def _total(losses: Iterable[torch.Tensor]) -> torch.Tensor:
    """The sum of per-output losses as a tensor (builtin `sum` starts from the int 0)."""
    return functools.reduce(operator.add, losses)
