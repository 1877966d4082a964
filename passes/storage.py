"""Storage-only passes: only how the file holds the weights changes.

The weights the model computes with stay as they are (`codebook.pack`) or round to float16
(`cast.fp16`).

Both write forms that stock onnxruntime decodes by constant folding at session load, so the
model runs at the dense model's speed (`onnxcompress.formats.packed`, which holds the layout
and the algebra). `codebook.kmeans` already packs its own layers; `codebook.pack` is for
codebook layers written in the uint8 form by other passes or older versions.
"""

from __future__ import annotations

__all__ = ["PackIndicesPass", "StoreFp16Pass"]

import math

import numpy as np
import onnx_ir as ir
import pydantic

from onnxcompress.formats.codebook import codebook_layers, dense_weight
from onnxcompress.formats.packed import (
    float_constants,
    pack_codebook_indices,
    packed_nbytes,
    store_fp16,
)
from onnxcompress.pass_base import CompressionPass, LayerChange, PassConfig, PassReport, register


class PackIndicesConfig(PassConfig):
    pass


@register
class PackIndicesPass(CompressionPass):
    """Bit-pack the uint8 indices of every codebook layer below 8 bits (exact)."""

    name = "codebook.pack"
    summary = (
        "Codebook indices below 8 bits bit-packed (bits/8 byte per weight), "
        "decoded at load by standard ops."
    )
    Config = PackIndicesConfig
    lossy = False

    def rewrite(self, model: ir.Model, report: PassReport) -> bool:
        """Pack the uint8 codebook layers where packing pays; report only those it packed."""
        before = {
            layer.name: layer for layer in codebook_layers(model) if layer.index_dtype == "uint8"
        }
        if not pack_codebook_indices(model, names=set(before)):
            return False
        for layer in codebook_layers(model):
            old = before.get(layer.name)
            if old is None or layer.index_dtype != "packed":
                continue
            codebook_bytes = layer.codebook().nbytes
            count, nonzero = math.prod(layer.shape), int(np.count_nonzero(dense_weight(layer)))
            report.changes.append(
                LayerChange(
                    layer.name,
                    "Gather",
                    nonzero,
                    nonzero,
                    count + codebook_bytes,
                    packed_nbytes(count, layer.bits) + codebook_bytes,
                    f"{layer.bits}-bit packed indices",
                )
            )
        return True


class StoreFp16Config(PassConfig):
    min_params: int = pydantic.Field(
        64, ge=0, description="Tensors with fewer values stay float32."
    )
    exclude: tuple[str, ...] = pydantic.Field((), description="Initializer names left in float32.")


@register
class StoreFp16Pass(CompressionPass):
    """float32 constants (initializers, Constant nodes, subgraphs) stored as float16 + Cast."""

    name = "cast.fp16"
    summary = "float32 weights stored as float16 + Cast (half the bytes; float16 rounding)."
    Config = StoreFp16Config
    config: StoreFp16Config

    def needs_calibration(self) -> bool:
        """float16 rounding moves each weight by at most 2^-11 of itself (normal range)."""
        return False

    def rewrite(self, model: ir.Model, report: PassReport) -> bool:
        """Store the float32 initializers as float16; the report holds each one's rounding."""
        arrays = {
            value.name: value.const_value.numpy()
            for value in float_constants(model)  # Constant nodes and subgraphs too
            if value.name is not None and value.const_value is not None
        }
        done = store_fp16(
            model, min_params=self.config.min_params, exclude=set(self.config.exclude)
        )
        for name in done:
            before = np.asarray(arrays[name])
            report.changed(
                name, "Cast", before, before.astype(np.float16), detail="float16 + Cast"
            )
        return bool(done)
