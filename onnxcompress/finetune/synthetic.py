"""Synthetic probes matched to a model's BatchNorm statistics (ZeroQ, Cai et al. CVPR 2020).

Random noise is a poor stand-in for real inputs: it drives the layers far from the
activations they were trained on. A BatchNormalization layer remembers the mean and variance
of its input over the training data; ZeroQ's "distilled data" are inputs optimised until the
batch statistics at every BN layer match them:

    min_x  sum over BN layers l of  ||mean_c(a_l(x)) - mu_l||^2 + ||std_c(a_l(x)) - sigma_l||^2

(per channel c, over the batch and spatial axes). Gradients come from the ONNX->torch
executor; the model's weights stay fixed. Exporters usually fold BN into the convolutions,
so this only applies to graphs that keep BatchNormalization nodes with constant statistics.
"""

from __future__ import annotations

__all__ = ["batchnorm_statistics", "match_batchnorm"]

import functools
import logging
import operator
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir
import torch

from onnxcompress.finetune.executor import OnnxModule

logger = logging.getLogger(__name__)


def batchnorm_statistics(model: ir.Model) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(input value name, running mean, running variance) of each main-graph BN node."""
    found = []
    for node in model.graph:
        if node.op_type != "BatchNormalization" or len(node.inputs) < 5:
            continue
        source, mean, var = node.inputs[0], node.inputs[3], node.inputs[4]
        if (
            source is None
            or mean is None
            or var is None
            or mean.const_value is None
            or var.const_value is None
        ):
            continue
        found.append((source.name or "", mean.const_value.numpy().astype(np.float32),
                      var.const_value.numpy().astype(np.float32)))
    return found


def match_batchnorm(model: ir.Model, probes: Mapping[str, np.ndarray], *, steps: int = 60,
                    learning_rate: float = 0.1, seed: int = 0) -> dict[str, np.ndarray] | None:
    """`probes` with their float inputs optimised to match the BN statistics; None if no BN."""
    from onnxcompress.fidelity import exposed

    statistics = batchnorm_statistics(model)
    if not statistics:
        return None
    torch.manual_seed(seed)
    copy = model.clone()
    with exposed(copy, [name for name, _, _ in statistics]) as names:
        module = OnnxModule(copy, trainable=())
    wanted = {
        name: (torch.from_numpy(m), torch.from_numpy(np.sqrt(v))) for name, m, v in statistics
    }
    first_extra = len(module.output_names) - len(names)
    feeds = {
        name: torch.tensor(np.asarray(array), requires_grad=np.asarray(array).dtype.kind == "f")
        for name, array in probes.items()
    }
    trained = [t for t in feeds.values() if t.requires_grad]
    optimizer = torch.optim.Adam(trained, lr=learning_rate)
    for _ in range(steps):
        optimizer.zero_grad()
        outputs = module(**feeds)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        mismatches = (
            _mismatch(value, *wanted[name])
            for name, value in zip(names, outputs[first_extra:], strict=True)
        )
        loss = functools.reduce(operator.add, mismatches)  # a tensor: `sum` would start at int 0
        loss.backward()
        optimizer.step()
    logger.info(
        "probes matched to %d BatchNorm layers (ZeroQ), final loss %.4g",
        len(names),
        float(loss.detach()),
    )
    return {
        name: tensor.detach().numpy().astype(np.asarray(probes[name]).dtype)
        for name, tensor in feeds.items()
    }


def _mismatch(activation: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    axes = [axis for axis in range(activation.dim()) if axis != 1]
    batch_mean = activation.mean(dim=axes)
    batch_std = (activation.var(dim=axes, unbiased=False) + 1e-5).sqrt()
    return ((batch_mean - mean) ** 2).mean() + ((batch_std - std) ** 2).mean()
