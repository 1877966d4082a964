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
