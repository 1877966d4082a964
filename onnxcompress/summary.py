"""What `inspect` shows: one row per weight (op, shape, params, sparsity, distinct values, bytes).

A shared-weight layer (indices + codebook + Cast/Gather, see `formats.codebook`) is one
row for the logical weight: its shape, params and sparsity are those of codebook[indices], its
bytes what the file stores (indices and codebook), and it adds `bits` and `codebook_size`.
Layers the `sparse.csr` pass moved into `ai.onnxcompress` kernels (SparseMatMul,
CodebookMatMul, SparseCodebookMatMul) are read back the same way: the K × N weight they hold,
and the bytes of their CSR / index arrays.

Made to stay fast on large models: a weight is read once (memory-mapped), sparsity is a
count, and distinct values are exact up to 2^18 elements; above that a strided sample of
2^18 decides: few distinct values (a shared-weight layer stored dense) are counted exactly,
otherwise the sample's count is reported as a lower bound.
"""

from __future__ import annotations

__all__ = ["LayerInfo", "layer_table", "totals"]

import dataclasses
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxcompress.formats.codebook import CodebookLayer, codebook_layers, dense_weight
from onnxcompress.formats.kernel_ops import kernel_layer_name, kernel_weight
from onnxcompress.sites import find_weight_sites

_SAMPLE = 1 << 18


@dataclasses.dataclass(frozen=True)
class LayerInfo:
    """One row of `inspect`: a weight as stored and as the model computes with it."""

    name: str
    op: str
    shape: tuple[int, ...]
    dtype: str
    params: int
    nonzero: int
    distinct: int
    distinct_exact: bool
    bytes: int
    holder: str
    bits: int | None = None
    codebook_size: int | None = None

    @property
    def sparsity(self) -> float:
        """Share of zero weights (0 for an empty tensor)."""
        return 1.0 - self.nonzero / self.params if self.params else 0.0

    def to_dict(self) -> dict[str, Any]:
        """The row as JSON-ready values, sparsity included."""
        row = dataclasses.asdict(self)
        row["shape"] = list(self.shape)
        row["sparsity"] = round(self.sparsity, 6)
        return row


def _distinct(array: np.ndarray) -> tuple[int, bool]:
    flat = array.reshape(-1)
    if flat.size <= _SAMPLE:
        return int(np.unique(flat).size), True
    sample = flat[:: flat.size // _SAMPLE]
    count = int(np.unique(sample).size)
    if count <= 256:
        return int(np.unique(flat).size), True
    return count, False


def _consumer_op(layer: CodebookLayer) -> str:
    weight = layer.scaling.outputs[0] if layer.scaling is not None else layer.gather.outputs[0]
    ops = sorted({node.op_type for node in weight.consumers()})
    return "/".join(ops) or "Gather"


def _codebook_row(layer: CodebookLayer) -> LayerInfo:
    weight = dense_weight(layer)
    codebook = layer.codebook()
    index_bytes = layer.stored_index_bytes
    return LayerInfo(
        name=layer.weight_name,
        op=_consumer_op(layer),
        shape=layer.shape,
        dtype=codebook.dtype.name,
        params=int(weight.size),
        nonzero=int(np.count_nonzero(weight)),
        distinct=int(np.unique(weight).size),
        distinct_exact=True,
        bytes=int(index_bytes + codebook.nbytes + layer.scale_bytes),
        holder="codebook",
        bits=layer.bits,
        codebook_size=layer.k,
    )


def _kernel_rows(model: ir.Model, count_distinct: bool) -> list[LayerInfo]:
    """One row per kernel node (formats.kernel_ops): the K × N weight it holds, its stored bytes."""
    rows = []
    for node in model.graph:
        held = kernel_weight(node)
        if held is None:
            continue
        weight, bits, codebook_size, stored_bytes = held
        rows.append(
            LayerInfo(
                name=kernel_layer_name(node),
                op=node.op_type,
                shape=tuple(weight.shape),
                dtype="float32",
                params=int(weight.size),
                nonzero=int(np.count_nonzero(weight)),
                distinct=int(np.unique(weight).size) if count_distinct else 0,
                distinct_exact=count_distinct,
                bytes=stored_bytes,
                holder="kernel",
                bits=bits,
                codebook_size=codebook_size,
            )
        )
    return rows


def layer_table(model: ir.Model, count_distinct: bool = True) -> list[LayerInfo]:
    """One row per weight. `count_distinct=False` skips the distinct-value count (the slow part)."""
    rows = [_codebook_row(layer) for layer in codebook_layers(model)] + _kernel_rows(
        model, count_distinct
    )
    for site in find_weight_sites(model, min_params=0).sites:
        array = site.array()
        distinct, exact = _distinct(array) if count_distinct else (0, False)
        rows.append(
            LayerInfo(
                name=site.name,
                op=site.op_type,
                shape=site.shape,
                dtype=site.dtype.name.lower(),
                params=int(array.size),
                nonzero=int(np.count_nonzero(array)),
                distinct=distinct,
                distinct_exact=exact,
                bytes=int(array.nbytes),
                holder=site.holder,
            )
        )
    return sorted(rows, key=lambda row: row.name)


def totals(rows: list[LayerInfo]) -> dict[str, Any]:
    """Sums over the rows, for the last line of `inspect`."""
    params = sum(r.params for r in rows)
    nonzero = sum(r.nonzero for r in rows)
    return {
        "total_params": params,
        "total_nonzero": nonzero,
        "total_bytes": sum(r.bytes for r in rows),
        "sparsity": round(1.0 - nonzero / params, 6) if params else 0.0,
    }
