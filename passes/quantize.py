"""`quant.int8`: weight-only int8 with one scale per output channel, decoded by standard ops.

Each weight W becomes q = round(W / s) in int8, with s = max|W| / 127 taken over each output
channel (the site's output axis), and the graph computes W' = Cast(q, float) * s. Every input
of the two nodes is an initializer, so onnxruntime folds them into the dense weight at session
load: the model runs at the original's speed, from a file with 1 byte per weight.

Lossy with a bound that holds whatever the input: |W' - W| <= s / 2 = max|W_channel| / 254 per
weight, so the output error of a layer is bounded by its inputs' norm times that, not by a
calibration set. This is why `optimize` without data uses it: random probes cannot vouch for
input-dependent error, but they need not here. (A shared 8-bit k-means codebook per tensor has
no per-channel bound: channels with small weights share the centroids of the large ones.)
"""

from __future__ import annotations

__all__ = ["Int8Config", "Int8WeightPass", "quantize_per_channel"]

import numpy as np
import onnx_ir as ir
import pydantic

from onnxcompress.formats.packed import decode_initializer
from onnxcompress.pass_base import CompressionPass, PassConfig, PassReport, register
from onnxcompress.sites import WeightSite, find_weight_sites

_FLOATS = (np.float32, np.float64)


class Int8Config(PassConfig):
    """Options of `quant.int8`: which weights; the bits are fixed by the int8 format."""

    exclude: tuple[str, ...] = pydantic.Field((), description="Weight-name globs left as they are.")
    min_params: int = pydantic.Field(
        256,
        ge=0,
        description="Weights with fewer parameters are left alone (their scales would not pay).",
    )


def quantize_per_channel(weights: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """(int8 q, float scale broadcastable to W's shape) with W ~ q * scale, |error| <= scale / 2."""
    axis = axis % weights.ndim
    others = tuple(a for a in range(weights.ndim) if a != axis)
    peak = np.max(np.abs(weights), axis=others, keepdims=True) if others else np.abs(weights)
    scale = np.where(peak > 0, peak / 127.0, 1.0).astype(weights.dtype)
    q = np.clip(np.rint(weights / scale), -127, 127).astype(np.int8)
    return q, scale


def _reason_to_skip(model: ir.Model, site: WeightSite) -> str | None:
    if site.holder != "initializer" or model.graph.initializers.get(site.name) is not site.value:
        return "not an initializer of the main graph (Constant node or subgraph): not supported"
    if site.value.is_graph_output():
        return "the weight is also a graph output"
    if site.array().dtype.type not in _FLOATS:
        return f"dtype {site.array().dtype} is not supported (float32, float64)"
    if site.out_axis is None:
        return "no output-channel axis"
    if not np.all(np.isfinite(site.array())):
        return "holds NaN or inf"
    return None


def _insert(graph: ir.Graph, site: WeightSite, q: np.ndarray, scale: np.ndarray) -> None:
    """Replace the initializer by q + scale + Cast + Mul; the Mul output keeps the weight's name."""
    name = site.name
    q_value = ir.Value(name=f"{name}.int8", const_value=ir.tensor(q, name=f"{name}.int8"),
                       shape=ir.Shape(q.shape), type=ir.TensorType(ir.DataType.INT8))
    scale_value = ir.Value(name=f"{name}.scale", const_value=ir.tensor(scale, name=f"{name}.scale"),
                           shape=ir.Shape(scale.shape), type=ir.TensorType(site.dtype))
    graph.register_initializer(q_value)
    graph.register_initializer(scale_value)
    cast = ir.node("Cast", [q_value], attributes={"to": site.value.dtype}, name=f"{name}.int8_cast")
    cast.outputs[0].name = f"{name}.int8_float"
    mul = ir.node("Mul", [cast.outputs[0], scale_value], name=f"{name}.int8_scale")
    decoded = mul.outputs[0]
    decoded.type, decoded.shape = site.value.type, site.value.shape
    decode_initializer(graph, site.value, [cast, mul], decoded)


@register
class Int8WeightPass(CompressionPass):
    """Weights stored as int8 with a scale per output channel; folded back to float at load."""

    name = "quant.int8"
    summary = (
        "Weight-only int8, one scale per output channel (error <= max|W_channel|/254), "
        "folded at load."
    )
    Config = Int8Config
    config: Int8Config

    def needs_calibration(self) -> bool:
        """False: the per-channel error bound holds whatever the input."""
        return False

    def rewrite(self, model: ir.Model, report: PassReport) -> bool:
        """Quantize every eligible weight, then rewrite them all; the rest get their reason."""
        scan = find_weight_sites(
            model, min_params=self.config.min_params, exclude=self.config.exclude
        )
        for skip in scan.skipped:
            report.skip(skip.name, skip.reason)
        planned = []
        for site in scan.sites:
            reason = _reason_to_skip(model, site)
            if reason is not None:
                report.skip(site.name, reason)
                continue
            weights = site.array()
            q, scale = quantize_per_channel(weights, site.out_axis)  # type: ignore[arg-type]
            planned.append((site, weights, q, scale))
        for site, weights, q, scale in planned:
            _insert(model.graph, site, q, scale)
            report.changed(
                site.name,
                site.op_type,
                weights,
                params_after=int(np.count_nonzero(q)),
                bytes_after=int(q.nbytes + scale.nbytes),
                detail=f"int8, {scale.size} channel scales "
                f"(max error {float(scale.max()) / 2:.3g})",
            )
        return bool(planned)
