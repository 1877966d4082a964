"""What the reconstruction passes share: calibration inputs, a weight's matrix form, H per layer.

The matrix form of a weight is W [output channels, input features] in the order the layer's
Hessian uses (`onnxcompress.calibration`): MatMul W[in, out] -> W^T; Gemm by its transB;
Conv W[out, in/groups, kh, kw] -> W.reshape(out, -1), with output channel o in group
o // (out / groups) and that group's H; LSTM/GRU/RNN W or R [directions, gates * hidden, d] ->
W.reshape(-1, d), a group per direction. Layers calibration cannot capture (Gather tables,
batch-major recurrent ops, ConvTranspose, weights inside subgraphs, Conv with auto_pad, a weight
read by several nodes) get a reason instead, and each pass falls back to its data-free method.
"""

from __future__ import annotations

__all__ = [
    "ReconstructConfig",
    "calibration_inputs",
    "calibration_reason",
    "matrix_form",
    "from_matrix_form",
    "group_slices",
    "per_group",
    "layer_error",
    "hessians_for",
]

from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np
import onnx_ir as ir
import pydantic

from onnxcompress.calibration import RECURRENT, LayerHessian, layer_hessians, supported
from onnxcompress.pass_base import PassConfig, PassContext, PassReport
from onnxcompress.sites import WeightSite

_FLOATS = (np.float16, np.float32, np.float64)


class ReconstructConfig(PassConfig):
    """The calibration knobs both passes share."""

    probes: int = pydantic.Field(
        128,
        ge=1,
        description="Calibration samples for H = X^T X: "
        "the data's first N (random probes without data).",
    )
    blocksize: int = pydantic.Field(
        128, ge=1, description="Columns per lazy batch update (result-neutral; speed)."
    )
    percdamp: float = pydantic.Field(
        0.01,
        gt=0.0,
        lt=1.0,
        description="Damping added to H's diagonal, as a share of its mean diagonal.",
    )
    sequential: bool = pydantic.Field(
        False,
        description="Re-capture each layer's input after the earlier layers are compressed (GPTQ's "
        "sequential setting; one calibration run per layer). "
        "False: one capture on the model as the pass "
        "receives it.",
    )


def calibration_inputs(
    model: ir.Model, context: PassContext, count: int, report: PassReport
) -> dict[str, np.ndarray]:
    """The first `count` samples of the context's data, or the pipeline's seeded random probes."""
    from onnxcompress.pipeline import reference_probes

    source = context.original if context.original is not None else model
    if context.data is not None:
        report.notes["calibration"] = f"data: first {count} samples"
        return reference_probes(source, count=count, seed=context.seed, data=context.data)
    report.notes["calibration"] = (
        f"no data: {count} random probes "
        "(H from noise; give --data for a meaningful reconstruction)"
    )
    return reference_probes(source, count=count, seed=context.seed)


def calibration_reason(site: WeightSite, model: ir.Model) -> str | None:
    """Why calibration cannot reconstruct this weight's layer, or None when it can."""
    if len(site.value.uses()) > 1 or site.value.is_graph_output():
        return "read by several nodes (or a graph output): one layer input cannot stand for all"
    if site.op_type == "Gather":
        return "an embedding table (Gather): no layer input to reconstruct"
    if site.op_type in RECURRENT and not supported(site, model):
        return f"a recurrent weight ({site.op_type}) in a subgraph or batch-major layout"
    if not supported(site, model):
        return f"{site.op_type} not capturable (subgraph, constant input, auto_pad or >2-D weight)"
    if site.array().dtype.type not in _FLOATS:
        return f"dtype {site.array().dtype} is not float"
    return None


def matrix_form(site: WeightSite, array: np.ndarray) -> np.ndarray:
    """W as [output channels, input features] (float64) in the Hessian's feature order."""
    array = np.asarray(array, np.float64)
    if site.op_type == "Conv":
        return array.reshape(array.shape[0], -1)
    if site.op_type in RECURRENT:  # [directions, gates * hidden, d]: a group per direction
        return array.reshape(-1, array.shape[-1])
    axis = site.out_axis if site.out_axis is not None else 0
    moved = np.moveaxis(array, axis, 0)
    return np.ascontiguousarray(moved.reshape(moved.shape[0], -1))


def from_matrix_form(site: WeightSite, matrix: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """The inverse of `matrix_form`, cast back to the weight's dtype."""
    shape = site.shape
    if site.op_type == "Conv" or site.op_type in RECURRENT:
        return matrix.reshape(shape).astype(dtype)
    axis = site.out_axis if site.out_axis is not None else 0
    axis %= len(shape)
    moved_shape = (shape[axis], *(d for i, d in enumerate(shape) if i != axis))
    return np.moveaxis(matrix.reshape(moved_shape), 0, axis).astype(dtype)


def group_slices(rows: int, groups: int) -> Iterator[tuple[int, slice]]:
    """(group, rows of that group): output channel o uses group o // (rows / groups)."""
    per_group = rows // groups
    for group in range(groups):
        yield group, slice(group * per_group, (group + 1) * per_group)


def per_group(
    matrix: np.ndarray, stats: LayerHessian, method: Callable[[np.ndarray, np.ndarray], np.ndarray]
) -> np.ndarray:
    """Apply `method(W_group, H_group)` to each group's rows."""
    out = np.empty_like(matrix)
    for group, rows in group_slices(matrix.shape[0], stats.groups):
        out[rows] = method(matrix[rows], stats.hessian[group])
    return out


def layer_error(before: np.ndarray, after: np.ndarray, stats: LayerHessian) -> float:
    """tr(D H D^T) summed over groups: the squared output change on the calibration inputs."""
    total = 0.0
    for group, rows in group_slices(before.shape[0], stats.groups):
        delta = after[rows] - before[rows]
        total += float(np.sum((delta @ stats.hessian[group]) * delta))  # BLAS, not einsum's loop
    return total


def hessians_for(
    model: ir.Model, probes: Mapping[str, np.ndarray], sites: Sequence[WeightSite], seed: int
) -> dict[str, LayerHessian]:
    """H per layer for `sites`, the one call both reconstruction passes make."""
    return layer_hessians(model, probes, sites, seed=seed)
