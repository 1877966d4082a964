"""Layer inputs captured through onnxruntime, and the layer-wise Hessians they give.

For a layer y = x W (W: in x out), the squared output error of a changed weight W + D over
calibration inputs X is

    ||X D||_F^2 = sum over output columns j of  d_j^T H d_j,     H = X^T X  (in x in),

so H is all that Optimal Brain Surgeon (Hassibi & Stork 1993), SparseGPT and GPTQ (Frantar &
Alistarh 2022-23) need to prune or quantise a layer while compensating with the weights that
remain, and it scores any candidate representation of the layer without running the model.

A Conv becomes a matrix product through im2col: every output position reads one patch of
C/groups x kh x kw inputs, so X holds patches (rows sampled, seeded) and H is per group.

A recurrent op (LSTM/GRU/RNN) is a matrix product per step and direction: its gates' pre-
activations are W x_t + R h_(t-1) + b. W's input is the op's input X, the same for every
direction, so H of W is X^T X once per direction (group). R's input is the hidden state of the
step before, which the op emits as Y: H of R for direction d is Y_d^T Y_d, every emitted state
counted once (the exact set differs by one row per sequence: the initial state is read but not
emitted, the last emitted state is not read). This is the error of the gates' pre-activations
at each step; what an error does through the recurrence is left to the gate on the whole model.

Inputs are captured by exposing each layer's activation as an extra graph output and running
the probes a few samples at a time, so memory is bounded by one chunk's activations.
"""

from __future__ import annotations

__all__ = ["LayerHessian", "layer_hessians", "supported"]

import dataclasses
import logging
from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir

from onnxcompress.data import model_inputs, sample_axis
from onnxcompress.fidelity import exposed, run_model
from onnxcompress.io import serialized
from onnxcompress.sites import WeightSite

logger = logging.getLogger(__name__)

CHUNK_SAMPLES = 8  # probe samples per onnxruntime run
MAX_ROWS_PER_CHUNK = 2048  # im2col patches kept per chunk (sampled)
RECURRENT = ("LSTM", "GRU", "RNN")


@dataclasses.dataclass
class LayerHessian:
    """H = X^T X of one weight's layer input, per group: shape [groups, d, d] (float64).

    `d` is the weight's input features in its own flattening order: `in` for MatMul/Gemm,
    C/groups * kh * kw for Conv. `rows` counts the input rows (patches) summed.
    """

    name: str
    hessian: np.ndarray
    rows: int

    @property
    def groups(self) -> int:
        """Conv groups: each reads its own input channels, so each has its own H."""
        return int(self.hessian.shape[0])


def supported(site: WeightSite, model: ir.Model) -> bool:
    """Layers whose input is a main-graph activation and whose product we can rebuild.

    Not a layer inside an If/Loop/Scan subgraph: its input is no value of the main graph, so
    it cannot be exposed as a model output (the codebook search scores those with H = I, the
    relative weight error); nor a weight the layer reads through data-movement ops.
    """
    node = site.node
    if site.op_type in RECURRENT:
        return _recurrent_supported(site, model)
    if site.input_index != 1 or node.graph is not model.graph or not site.direct:
        return False
    if not node.inputs or node.inputs[0] is None or node.inputs[0].const_value is not None:
        return False
    if site.op_type == "MatMul":
        return len(site.shape) == 2
    if site.op_type == "Gemm":
        return True
    if site.op_type == "Conv":
        return len(site.shape) == 4 and node.attributes.get_string("auto_pad", "NOTSET") == "NOTSET"
    return False


def _recurrent_supported(site: WeightSite, model: ir.Model) -> bool:
    """W (input 1) and R (input 2) of a main-graph LSTM/GRU/RNN in the time-major layout."""
    node = site.node
    if site.op_type not in RECURRENT or node.graph is not model.graph or len(site.shape) != 3:
        return False
    if node.attributes.get_int("layout", 0) != 0 or site.input_index not in (1, 2):
        return False
    if not site.direct:
        return False
    source = _source(site)
    return source is not None and bool(source.name) and source.const_value is None


def _gemm_rows(node: ir.Node, x: np.ndarray) -> np.ndarray:
    return x.T if node.attributes.get_int("transA", 0) else x


def _conv_patches(
    node: ir.Node, x: np.ndarray, weight_shape: tuple[int, ...], rng: np.random.Generator
) -> np.ndarray:
    """im2col of an NCHW input: [groups, rows, C/groups * kh * kw] (rows sampled)."""
    out_channels, per_group, kh, kw = weight_shape
    groups = node.attributes.get_int("group", 1)
    strides = list(node.attributes.get_ints("strides", [1, 1]))
    dilations = list(node.attributes.get_ints("dilations", [1, 1]))
    pads = list(node.attributes.get_ints("pads", [0, 0, 0, 0]))
    x = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    span_h, span_w = dilations[0] * (kh - 1) + 1, dilations[1] * (kw - 1) + 1
    windows = np.lib.stride_tricks.sliding_window_view(x, (span_h, span_w), axis=(2, 3))
    windows = windows[:, :, :: strides[0], :: strides[1], :: dilations[0], :: dilations[1]]
    n, channels, out_h, out_w = windows.shape[:4]
    positions = n * out_h * out_w
    keep = np.sort(rng.choice(positions, size=min(positions, MAX_ROWS_PER_CHUNK), replace=False))
    sample, row, col = np.unravel_index(keep, (n, out_h, out_w))
    patches = windows[sample, :, row, col]  # [rows, C, kh, kw]
    patches = patches.reshape(len(keep), groups, per_group * kh * kw)
    return np.ascontiguousarray(patches.transpose(1, 0, 2))


def _source(site: WeightSite) -> ir.Value | None:
    """The value whose rows the weight multiplies: the op's input, or for R the emitted Y."""
    node = site.node
    if site.op_type in RECURRENT and site.input_index == 2:
        return node.outputs[0] if node.outputs else None
    return node.inputs[0] if node.inputs else None


def _recurrent_rows(site: WeightSite, x: np.ndarray) -> np.ndarray:
    """[directions, rows, d]: X [T, batch, in] for every direction, or Y [T, dirs, batch, h]."""
    directions = site.shape[0]
    if site.input_index == 2:
        return np.ascontiguousarray(x.transpose(1, 0, 2, 3).reshape(directions, -1, x.shape[-1]))
    rows = x.reshape(1, -1, x.shape[-1])
    return np.broadcast_to(rows, (directions, *rows.shape[1:]))


def _rows(site: WeightSite, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The layer input as [groups, rows, d]."""
    x = np.asarray(x, np.float64)
    if site.op_type in RECURRENT:
        return _recurrent_rows(site, x)
    if site.op_type == "Conv":
        return _conv_patches(site.node, x, site.shape, rng)
    if site.op_type == "Gemm":
        x = _gemm_rows(site.node, x)
    return x.reshape(1, -1, x.shape[-1])


def _chunk(model: ir.Model, name: str, array: np.ndarray, start: int) -> np.ndarray:
    """Samples [start, start + CHUNK_SAMPLES) of one input, along its own sample axis."""
    value = next((v for v in model_inputs(model) if v.name == name), None)
    axis = sample_axis(model, value) if value is not None else 0
    array = np.asarray(array)
    if axis is None:
        return array
    stop = min(start + CHUNK_SAMPLES, array.shape[axis])
    return np.take(array, np.arange(start, stop), axis=axis)


def layer_hessians(
    model: ir.Model,
    probes: Mapping[str, np.ndarray],
    sites: Sequence[WeightSite],
    *,
    seed: int = 0,
) -> dict[str, LayerHessian]:
    """H = X^T X for each supported site's layer input over `probes` (unsupported ones left out)."""
    wanted = [site for site in sites if supported(site, model)]
    if not wanted:
        return {}
    rng = np.random.default_rng(seed)
    sources = {site.name: source.name or "" for site in wanted if (source := _source(site))}
    result: dict[str, LayerHessian] = {}
    count = len(next(iter(probes.values()))) if probes else 0
    with exposed(model, list(dict.fromkeys(sources.values()))):
        with serialized(model) as model_file:
            every = [v.name or "" for v in model.graph.outputs]  # a source may be an output
            for start in range(0, max(count, 1), CHUNK_SAMPLES):
                chunk = {name: _chunk(model, name, array, start) for name, array in probes.items()}
                outputs = run_model(model_file, chunk)
                # a graph input is its own source
                arrays = {**chunk, **dict(zip(every, outputs, strict=True))}
                for site in wanted:
                    if sources[site.name] not in arrays:
                        continue
                    rows = _rows(site, arrays[sources[site.name]], rng)
                    gram = np.matmul(rows.transpose(0, 2, 1), rows)
                    entry = result.get(site.name)
                    if entry is None:
                        result[site.name] = LayerHessian(site.name, gram, rows.shape[1])
                    else:
                        entry.hessian += gram
                        entry.rows += rows.shape[1]
    logger.info("captured %d layer inputs over %d samples", len(result), count)
    return result
