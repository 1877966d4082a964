"""Bias correction: the mean of a layer's output error moves into its bias, for free.

A changed weight W + D shifts a layer's output by x D. Over calibration inputs with mean mu,
that shift has a systematic part mu D (per output channel) that every later layer sees as a
wrong offset, amplified through ReLUs (Nagel et al. 2019, "Data-Free Quantization", bias
correction; Finkelstein et al. 2019). Subtracting mu D from the layer's bias removes it exactly
on the calibration mean, at no storage cost: the bias is stored as floats anyway. What stays
is the error's centred part, so candidates are scored under the centred Gram matrix

    H_c = X^T X - n mu mu^T,

the input covariance (times n), instead of H = X^T X (`centred_hessian`).

Measured on open-nsfw (ResNet-50 with BatchNorm folded into biased Convs), 6-bit k-means on
every layer: relative output error 0.103 -> 0.065 with the biases corrected.

Only biases the layer owns are changed: a Conv's or Gemm's third input, or the constant of the
one Add that follows a MatMul, each read by that layer alone.
"""

from __future__ import annotations

__all__ = ["layer_bias", "centred_hessian", "corrected_bias"]

import numpy as np
import onnx_ir as ir

from onnxcompress.calibration import LayerHessian
from onnxcompress.formats.dtypes import FLOAT_DTYPES
from onnxcompress.sites import WeightSite, constant_array


def layer_bias(site: WeightSite) -> ir.Value | None:
    """The constant bias only this layer reads, of shape [out] (None: it has none)."""
    node = site.node
    if site.op_type in ("Conv", "Gemm") and site.input_index == 1:
        bias = node.inputs[2] if len(node.inputs) > 2 else None
    elif site.op_type == "MatMul" and site.input_index == 1:
        bias = _added_constant(node)
    else:
        return None
    if bias is None or len(bias.uses()) != 1 or bias.is_graph_output():
        return None
    array = constant_array(bias)
    if array is None or bias.dtype not in FLOAT_DTYPES or array.shape != (_outputs(site),):
        return None
    return bias


def _added_constant(node: ir.Node) -> ir.Value | None:
    """The constant operand of the one Add reading a MatMul's output, if that is all it feeds."""
    output = node.outputs[0]
    uses = list(output.uses())
    if len(uses) != 1 or output.is_graph_output():
        return None
    add = uses[0].node
    if add.op_type != "Add" or add.domain not in ("", "ai.onnx") or len(add.inputs) != 2:
        return None
    other = add.inputs[1 - uses[0].idx]
    return other if constant_array(other) is not None else None


def _outputs(site: WeightSite) -> int:
    axis = site.out_axis
    return site.shape[axis] if axis is not None else -1


def centred_hessian(stats: LayerHessian) -> np.ndarray:
    """X^T X - n mu mu^T per group: the output error left once the bias absorbs its mean."""
    mean = stats.mean
    return stats.hessian - stats.rows * mean[:, :, None] * mean[:, None, :]


def corrected_bias(
    bias: np.ndarray, delta_out_by_in: np.ndarray, stats: LayerHessian, beta: float = 1.0
) -> np.ndarray:
    """`bias` minus the change's output shift on the mean input, mu D, per output channel.

    `delta_out_by_in` is the weight change as [out, in features] in the calibration's feature
    order; output channel o belongs to group o // (out / groups). Gemm scales its bias by
    `beta`, so the shift is divided by it.
    """
    groups = stats.groups
    per_group = delta_out_by_in.shape[0] // groups
    shift = np.concatenate([
        np.asarray(delta_out_by_in[g * per_group:(g + 1) * per_group], np.float64) @ stats.mean[g]
        for g in range(groups)
    ])
    return (np.asarray(bias, np.float64) - shift / beta).astype(bias.dtype)
