"""Gradient services for pruning: first-order Taylor scores and OBD saliencies.

References:
* Molchanov et al., "Pruning Convolutional Neural Networks for Resource Efficient Inference",
  ICLR 2017 (first-order Taylor expansion of the loss).
* LeCun, Denker & Solla, "Optimal Brain Damage", NIPS 1990 (saliency from the diagonal Hessian).
* Hutchinson, "A stochastic estimator of the trace of the influence matrix", 1990
  (diag(H) ~= E_v[v * (H v)] for Rademacher v).

Public signatures (stable; the pruning scorers in ``passes/prune/saliency.py`` call them)::

    taylor_scores(model, data, *, names=None, per_channel=False, loss="auto",
                  original=None, batch_size=64, max_samples=None, seed=0)
        -> dict[str, np.ndarray]

    obd_scores(model, data, *, names=None, per_channel=False, hessian="fisher",
               hutchinson_samples=4, loss="auto", original=None, batch_size=64,
               max_samples=None, seed=0)
        -> dict[str, np.ndarray]

Arguments shared by both:
* ``model``: an ``onnx_ir.Model`` (or ``onnx.ModelProto``); it is never modified.
* ``data``: a mapping from graph-input names to arrays whose first axis is the sample axis,
  plus an optional ``labels`` array of class indices (int) -- the same shape as
  ``PassContext.data``.
* ``names``: the weight names (initializer / Constant output names) to score; ``None`` means
  every weight that ``find_weight_sites(model)`` finds.
* ``per_channel``: ``False`` gives an array of the weight's shape (one score per weight);
  ``True`` gives a 1-D array with one score per output channel (along the site's
  ``out_axis``; see ``onnxcompress.sites``).
* ``loss``: ``"auto"`` is cross-entropy on the first output against ``labels`` when the
  data carries them; without labels, cross-entropy against the argmax of ``original``'s
  (default: the model's own) first output when that output is 2-D logits, else MSE against
  ``original``'s outputs. ``"cross_entropy"`` / ``"mse"`` force one.
* ``batch_size`` / ``max_samples``: how the data is walked (in order, no shuffling);
  ``seed`` seeds the Hutchinson probes. Results are deterministic.

Definitions (g = gradient of the mean loss over the samples used, accumulated over batches
and weighted by batch size):
* Taylor, per weight: ``|w * g|``; per channel: ``|sum_{i in channel} w_i * g_i|`` -- the
  first-order change of the loss when the whole channel is zeroed (Molchanov et al., eq. 8).
* OBD, per weight: ``0.5 * h_ii * w_i**2``; per channel: the sum over the channel's weights
  (the diagonal approximation makes saliencies additive).
  ``hessian="fisher"``: ``h_ii ~= B * mean_b(g_b,i ** 2)`` over mini-batches b of size B
  (the empirical Fisher / squared-gradient approximation; the factor B turns the variance
  of a batch-mean gradient back into a per-sample one).
  ``hessian="hutchinson"``: ``h_ii ~= mean_v(v_i * (H v)_i)`` with Rademacher ``v``, by
  double back-propagation, ``hutchinson_samples`` probes per batch. Unbiased; may be
  negative for a single probe away from a minimum (OBD assumes a minimum; we clip the
  estimated h_ii at 0 so saliencies stay non-negative).

What is exact: the gradients are exact back-propagation through the ONNX graph (run by
``onnxcompress.finetune.executor``); the Hessian diagonal is an estimate (Fisher is biased,
Hutchinson is unbiased with variance decreasing as 1/samples).

torch is imported lazily; without it these raise ``MissingDependencyError``.
"""

from __future__ import annotations

__all__ = ["taylor_scores", "obd_scores"]

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from onnxcompress.errors import DataError
from onnxcompress.finetune import require_torch
from onnxcompress.finetune.data import LABELS, check_data, iterate_batches

logger = logging.getLogger(__name__)

HESSIANS = ("fisher", "hutchinson")


def _prepare(
    model: ir.Model | onnx.ModelProto,
    data: Mapping[str, np.ndarray],
    names: Sequence[str] | None,
    loss: str,
    original: ir.Model | onnx.ModelProto | None,
) -> tuple[Any, Any, list[str], dict[str, int], str]:
    """(module, reference module, names, out axis per name, concrete loss)."""
    require_torch()
    from onnxcompress.finetune.executor import OnnxModule, to_ir
    from onnxcompress.sites import find_weight_sites

    model = to_ir(model)
    sites = find_weight_sites(model, min_params=0).by_name()
    if names is None:
        names = sorted(sites)
    axes = {name: (sites[name].out_axis or 0) if name in sites else 0 for name in names}
    module = OnnxModule(model, trainable=set(names))
    unknown = [n for n in names if n not in module.onnx_names]
    if unknown:
        raise DataError(f"no weights named {', '.join(map(repr, unknown))} in the model")
    module.eval()
    check_data(data, module.input_names)
    reference = OnnxModule(to_ir(original), trainable=()) if original is not None else None
    if loss == "auto":
        probe = next(iterate_batches(data, 2))
        first = module.run(probe)[0]
        if LABELS in data:
            loss = "cross_entropy"
        else:
            loss = "cross_entropy" if first.ndim == 2 else "mse"
        reference = reference or OnnxModule(model, trainable=())
    elif loss not in ("cross_entropy", "mse"):
        raise DataError(f"saliency loss must be auto, cross_entropy or mse, not {loss!r}")
    if reference is None and (loss == "mse" or LABELS not in data):
        reference = OnnxModule(model, trainable=())
    if reference is not None:
        reference.eval()
    return module, reference, list(names), axes, loss


def _batch_losses(
    module: Any, reference: Any, data: Mapping[str, np.ndarray], loss: str, batch_size: int,
    max_samples: int | None,
) -> Iterator[tuple[Any, int]]:
    """(mean loss of the batch, batch length) for each batch, graph kept for backward."""
    import torch

    from onnxcompress.finetune.losses import compute_loss

    for batch in iterate_batches(data, batch_size, max_samples=max_samples):
        feeds = {k: torch.as_tensor(v) for k, v in batch.items() if k in module.input_names}
        ref = None
        if reference is not None:
            with torch.no_grad():
                ref = reference(**feeds)
        yield compute_loss(loss, module(**feeds), batch, ref), len(next(iter(batch.values())))


def _reduce_channel(scores: np.ndarray, axis: int, signed_sum: bool) -> np.ndarray:
    """Sum over every axis but the output-channel one (absolute value after, if asked)."""
    moved = np.moveaxis(scores, axis, 0).reshape(scores.shape[axis], -1)
    total = moved.sum(axis=1)
    return np.abs(total) if signed_sum else total


def _total(data: Mapping[str, np.ndarray], max_samples: int | None) -> int:
    count = len(next(iter(data.values())))
    return min(count, max_samples) if max_samples is not None else count


def taylor_scores(
    model: ir.Model | onnx.ModelProto,
    data: Mapping[str, np.ndarray],
    *,
    names: Sequence[str] | None = None,
    per_channel: bool = False,
    loss: str = "auto",
    original: ir.Model | onnx.ModelProto | None = None,
    batch_size: int = 64,
    max_samples: int | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """First-order Taylor scores ``|w * dL/dw|`` per weight, or ``|sum w*g|`` per channel."""
    import torch

    module, reference, names, axes, loss = _prepare(model, data, names, loss, original)
    total = _total(data, max_samples)
    params = [module.parameter(n) for n in names]
    grads = [torch.zeros_like(p) for p in params]
    for value, count in _batch_losses(module, reference, data, loss, batch_size, max_samples):
        batch_grads = torch.autograd.grad(value, params, allow_unused=True)
        for acc, g in zip(grads, batch_grads, strict=True):
            if g is not None:
                acc += g * (count / total)
    out: dict[str, np.ndarray] = {}
    for name, p, g in zip(names, params, grads, strict=True):
        product = (p.detach() * g).numpy().astype(np.float64)
        out[name] = _reduce_channel(product, axes[name], True) if per_channel else np.abs(product)
    return out


def obd_scores(
    model: ir.Model | onnx.ModelProto,
    data: Mapping[str, np.ndarray],
    *,
    names: Sequence[str] | None = None,
    per_channel: bool = False,
    hessian: str = "fisher",
    hutchinson_samples: int = 4,
    loss: str = "auto",
    original: ir.Model | onnx.ModelProto | None = None,
    batch_size: int = 64,
    max_samples: int | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """OBD saliencies ``0.5 * h_ii * w**2`` per weight, or summed per output channel."""
    import torch

    if hessian not in HESSIANS:
        raise DataError(f"hessian must be one of {', '.join(HESSIANS)}, not {hessian!r}")
    if hutchinson_samples < 1:
        raise DataError("hutchinson_samples must be >= 1")
    module, reference, names, axes, loss = _prepare(model, data, names, loss, original)
    total = _total(data, max_samples)
    params = [module.parameter(n) for n in names]
    diag = [torch.zeros_like(p) for p in params]
    generator = torch.Generator().manual_seed(seed)
    estimate: Callable[..., None] = _fisher if hessian == "fisher" else _hutchinson
    for value, count in _batch_losses(module, reference, data, loss, batch_size, max_samples):
        estimate(value, params, diag, count / total, count, hutchinson_samples, generator)
    out: dict[str, np.ndarray] = {}
    for name, p, h in zip(names, params, diag, strict=True):
        w = p.detach().numpy().astype(np.float64)
        saliency = 0.5 * np.maximum(h.numpy().astype(np.float64), 0.0) * w * w
        out[name] = _reduce_channel(saliency, axes[name], False) if per_channel else saliency
    return out


def _fisher(value: Any, params: list[Any], diag: list[Any], weight: float, count: int,
            samples: int, generator: Any) -> None:
    """Accumulate ``B * g_b**2`` with weight B/N: the empirical Fisher diagonal."""
    import torch

    grads = torch.autograd.grad(value, params, allow_unused=True)
    for acc, g in zip(diag, grads, strict=True):
        if g is not None:
            acc += (g * g) * (count * weight)


def _hutchinson(value: Any, params: list[Any], diag: list[Any], weight: float, count: int,
                samples: int, generator: Any) -> None:
    """Accumulate ``mean_v v * (H v)`` with Rademacher v (double back-propagation)."""
    import torch

    grads = torch.autograd.grad(value, params, create_graph=True, allow_unused=True)
    live = [(i, g) for i, g in enumerate(grads) if g is not None and g.requires_grad]
    if not live:
        return
    for s in range(samples):
        probes = [
            torch.randint(0, 2, params[i].shape, generator=generator).to(params[i].dtype) * 2 - 1
            for i, _ in live
        ]
        hv = torch.autograd.grad(
            [g for _, g in live], [params[i] for i, _ in live], probes,
            retain_graph=s < samples - 1, allow_unused=True,
        )
        for (i, _), v, h in zip(live, probes, hv, strict=True):
            if h is not None:
                diag[i] += (v * h).detach() * (weight / samples)
