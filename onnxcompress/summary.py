"""What `inspect` shows: one row per weight (op, shape, params, sparsity, distinct values, bytes).

Made to stay fast on large models: a weight is read once (memory-mapped), sparsity is a
count, and distinct values are exact up to 2^20 elements; above that a strided sample of
2^20 decides: few distinct values (a shared-weight layer stored dense) are counted exactly,
otherwise the sample's count is reported as a lower bound.
"""

from __future__ import annotations

__all__ = ["LayerInfo", "layer_table", "totals"]

import dataclasses
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxcompress.sites import find_weight_sites

_SAMPLE = 1 << 20


@dataclasses.dataclass(frozen=True)
class LayerInfo:
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

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nonzero / self.params if self.params else 0.0

    def to_dict(self) -> dict[str, Any]:
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


def layer_table(model: ir.Model) -> list[LayerInfo]:
    rows = []
    for site in find_weight_sites(model, min_params=0).sites:
        array = site.array()
        distinct, exact = _distinct(array)
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
    return rows


def totals(rows: list[LayerInfo]) -> dict[str, Any]:
    params = sum(r.params for r in rows)
    nonzero = sum(r.nonzero for r in rows)
    return {
        "total_params": params,
        "total_nonzero": nonzero,
        "total_bytes": sum(r.bytes for r in rows),
        "sparsity": round(1.0 - nonzero / params, 6) if params else 0.0,
    }
