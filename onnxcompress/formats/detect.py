"""The one answer to "is this weight coded?": decoded from a codebook, or held by a kernel op.

A coded weight is not a tensor a pass can rewrite in place: a codebook layer's weight is the
output of Gather(codebook, indices) (`formats.codebook`, bit-packed indices through the
`formats.packed` decoder too), a sparse layer's weight lives in the stored arrays of one of
the `ai.onnxcompress` ops (`formats.kernel_ops`). `sites` skips both with a reason, `summary`
reads them back, and the fine-tune bridge trains the codebooks found here.

Looser than `codebook_layers` on purpose: any Gather of a constant float table by constant
integer indices (through Cast / Reshape, in any graph) counts, since nothing may treat its
output as a dense weight; `codebook_layers` recognises only the exact form our passes write,
whose indices it can read back.
"""

from __future__ import annotations

__all__ = ["codebook_of", "is_codebook_decoded", "codebook_tensors", "kernel_op"]

import onnx_ir as ir

from onnxcompress.formats.codebook import SCALES_KEY, codebook_layers
from onnxcompress.formats.dtypes import FLOAT_DTYPES, INTEGER_DTYPES
from onnxcompress.formats.kernel_ops import kernel_op  # the same question for the sparse kernels
from onnxcompress.formats.packed import packed_source


def _constant_dtype(value: ir.Value | None) -> ir.DataType | None:
    """The dtype of a constant value (initializer or Constant node output), else None."""
    if value is None:
        return None
    producer = value.producer()
    if (
        producer is not None
        and producer.op_type == "Constant"
        and producer.domain in ("", "ai.onnx")
    ):
        attribute = producer.attributes.get("value")
        if attribute is not None and attribute.type == ir.AttributeType.TENSOR:
            return attribute.as_tensor().dtype
        return None
    if producer is None and value.const_value is not None and not value.is_graph_input():
        return value.const_value.dtype
    return None


def _through_casts(value: ir.Value | None) -> ir.Value | None:
    """Follow Cast / Reshape producers back to their source.

    Indices stored as uint8 are cast to int32/int64 before Gather, which takes only those.
    """
    for _ in range(4):
        producer = value.producer() if value is not None else None
        if producer is None or producer.op_type not in ("Cast", "Reshape"):
            return value
        value = producer.inputs[0]
    return value


def codebook_of(gather: ir.Node) -> ir.Value | None:
    """The codebook a Gather node decodes (its constant float data), or None.

    None when the node is not a codebook lookup: its indices are neither constant integers nor
    bit-packed.
    """
    if gather.op_type != "Gather" or gather.domain not in ("", "ai.onnx") or len(gather.inputs) < 2:
        return None
    data, indices = gather.inputs[0], gather.inputs[1]
    if data is None or indices is None or _constant_dtype(data) not in FLOAT_DTYPES:
        return None
    if _constant_dtype(_through_casts(indices)) in INTEGER_DTYPES:
        return data
    if gather.graph is not None and packed_source(gather.graph, indices) is not None:
        return data
    return None


def is_codebook_decoded(value: ir.Value) -> bool:
    """Whether `value` is the output of a codebook lookup: a weight-shared (codebook) layer.

    A channel-scaled codebook's weight is the output of the marked Mul after the lookup.
    """
    producer = value.producer()
    if producer is not None and producer.op_type == "Mul" and SCALES_KEY in producer.metadata_props:
        shared = producer.inputs[0]
        producer = shared.producer() if shared is not None else None
    return producer is not None and codebook_of(producer) is not None


def codebook_tensors(model: ir.Model) -> list[str]:
    """The names of the main graph's codebooks (trainable centroids), sorted."""
    found = {data.name or "" for node in model.graph if (data := codebook_of(node)) is not None}
    return sorted(found | {layer.codebook_name for layer in codebook_layers(model)})
