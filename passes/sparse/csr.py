"""`sparse.csr`: run pruned MatMul/Gemm/Conv layers with our sparse kernels, where they are faster.

Deep Compression (Han et al., ICLR 2016) stores pruned layers as sparse matrices and measured
3× faster fully connected layers at batch 1 on CPU; onnxruntime has no usable sparse kernel
(it densifies `sparse_initializer` at load), so a pruned model is as slow as the dense one.
This pass swaps a pruned layer's weight for CSR arrays read by `ai.onnxcompress.SparseMatMul`
(`onnxcompress.formats.kernel_arrays`), but only where the kernel is measurably faster at the
batch size the user gives: each candidate is timed against onnxruntime's dense MatMul on this
machine, in one process, alternating, caches flushed between calls by default; the fixed cost
of a call (timed on a graph that does nothing) is subtracted from both, since a layer inside a
model does not pay it. Every layer left dense gets its reason (too dense, not faster, shared
weight, unsupported Gemm form, ...).

Pruned Conv layers (1-D and 2-D, any strides, pads, dilations, groups) become `SparseConv`
(conv.py: Liu et al.'s sparse × dense product over the lowered input, run as direct sparse
convolution), timed against onnxruntime's Conv at the user's batch and the layer's own input
size from shape inference.

Weight-shared layers (the `codebook.*` passes' Cast(indices) -> Gather(codebook) pattern) are
recognised too: a pruned one becomes SparseCodebookMatMul (CSR whose values are codebook
indices, the EIE layout), a dense one CodebookMatMul (4-bit packed or 8-bit indices), again
only where measured faster.

The rewrite is exact: MatMul(X, W) becomes SparseMatMul(X, csr(W), bias=0), and
Gemm(A, B, C; alpha, beta, transB) becomes SparseMatMul(A, csr(alpha·op(B)), bias=beta·C)
for a constant C that broadcasts to [N]; outputs differ from dense only by fp32 summation
order. With `portable` (default) the model also carries each op as a model-local function
(`onnxcompress.formats.kernel_ops`), so a stock onnxruntime still runs it, at dense speed.
"""

from __future__ import annotations

__all__ = ["SparseCsrConfig", "SparseCsrPass", "measure_layer", "csr_arrays", "codebook_arrays"]

import dataclasses
import fnmatch
import functools
import logging
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import onnx
import onnx_ir as ir
import pydantic
from onnx import TensorProto, helper, numpy_helper

from onnxcompress import runtime
from onnxcompress.errors import MissingDependencyError, UnsupportedModelError
from onnxcompress.formats.codebook import CodebookLayer, codebook_layers, remove_codebook_layer
from onnxcompress.formats.conv_layout import conv_csr
from onnxcompress.formats.kernel_arrays import pack_codebook_indices, to_csr
from onnxcompress.formats.kernel_ops import (
    DOMAIN,
    KERNEL_OPS,
    MIN_ONNX_OPSET,
    OPSET_VERSION,
    function_for,
)
from onnxcompress.io import ir_version_for
from onnxcompress.pass_base import CompressionPass, PassConfig, PassReport, register
from onnxcompress.passes.sparse.conv import ConvLayer, conv_layer, measure_conv, value_shapes
from onnxcompress.sites import CODEBOOK_LAYER, WeightSite, find_weight_sites
from onnxcompress.timing import call_overhead_model, interleaved_medians

logger = logging.getLogger(__name__)

OP = "SparseMatMul"
Shapes = dict[str, tuple[int | None, ...]]  # value name -> static shape (None: unknown dim)


class SparseCsrConfig(PassConfig):
    """Options of `sparse.csr`: which layers, how the decision is made, portable or not."""

    min_sparsity: float = pydantic.Field(
        0.7, ge=0.0, le=1.0, description="Layers with a smaller share of zero weights stay dense."
    )
    batch: int = pydantic.Field(
        1,
        ge=1,
        le=65536,
        description="Rows per inference the decision is measured at (X is batch × K).",
    )
    portable: bool = pydantic.Field(
        True,
        description="Also write each op as a model-local ONNX function so stock onnxruntime runs "
        "the model.",
    )
    decide: Literal["measure", "always"] = pydantic.Field(
        "measure",
        description="measure: convert only where the kernel is timed faster than dense MatMul "
        "here; always: convert every layer at or above min_sparsity (needs no kernel library with "
        "portable).",
    )
    min_speedup: float = pydantic.Field(
        1.1,
        gt=0.0,
        description="Measured dense time / sparse time a layer must reach to be converted.",
    )
    index_dtype: Literal["auto", "uint16", "int32"] = pydantic.Field(
        "auto", description="CSR column index type; auto picks uint16 when K <= 65536."
    )
    threads: int | None = pydantic.Field(
        None,
        ge=1,
        description="onnxruntime intra-op threads for the measurement (default: onnxruntime's).",
    )
    repeats: int = pydantic.Field(
        15, ge=3, le=1000, description="Timed runs per variant; the median counts."
    )
    cold_cache: bool = pydantic.Field(
        True,
        description="Flush the CPU caches before each timed run (weights of a real model rarely "
        "stay cached).",
    )
    min_params: int = pydantic.Field(
        1024, ge=0, description="Weights smaller than this stay dense."
    )
    exclude: tuple[str, ...] = pydantic.Field((), description="Weight-name globs never converted.")


@dataclasses.dataclass
class _Candidate:
    """One layer that may be converted: its consumer node and what would replace its weight."""

    name: str
    node: ir.Node  # the MatMul / Gemm reading the weight
    weight: np.ndarray  # K x N float32, effective (alpha, transB applied); Conv: its own weight
    bias: np.ndarray  # [N] float32
    sparsity: float
    op: str = OP
    # op inputs after X, before bias
    arrays: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    attributes: dict[str, Any] = dataclasses.field(default_factory=dict)
    site: WeightSite | None = None  # a plain weight
    conv: ConvLayer | None = None  # a Conv layer (op SparseConv)
    layer: CodebookLayer | None = None  # a weight-shared layer
    timing: dict[str, float] | None = None

    def stored_bytes(self) -> int:
        return int(sum(a.nbytes for a in self.arrays.values()))


def _layer_model(
    nodes: list[onnx.NodeProto], initializers: list[onnx.TensorProto], k: int
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "layer",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
        initializer=initializers,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, OPSET_VERSION)],
    )
    model.ir_version = ir_version_for(17)
    return model


def measure_layer(
    weight: np.ndarray,
    op: str,
    arrays: dict[str, np.ndarray],
    attributes: dict[str, int],
    batch: int,
    *,
    threads: int | None = None,
    repeats: int = 15,
    cold_cache: bool = True,
    seed: int = 0,
) -> dict[str, float]:
    """Median seconds of dense MatMul and of our `op` for one [batch, K] × [K, N] product.

    `arrays` are the op's inputs after X (no bias). Both run in this process through
    onnxruntime with the kernel library, alternating, so that load from other processes hits
    both alike. Also returns `overhead`, the median time of a call that computes nothing.
    """
    k = weight.shape[0]
    dense = _layer_model(
        [helper.make_node("MatMul", ["X", "W"], ["Y"])], [numpy_helper.from_array(weight, "W")], k
    )
    sparse = _layer_model(
        # make_node takes attributes as **kwargs; mypy matches them to its str keywords too
        [helper.make_node(op, ["X", *arrays], ["Y"], domain=DOMAIN, **attributes)],  # type: ignore[arg-type]
        [
            numpy_helper.from_array(np.ascontiguousarray(array), name)
            for name, array in arrays.items()
        ],
        k,
    )
    # `overhead`: the same call on a graph that does nothing; a layer inside a model does not
    # pay it, so it is subtracted from both before comparing.
    models = {"dense": dense, "sparse": sparse, "overhead": call_overhead_model(dense)}
    sessions = [runtime.session(model, threads=threads) for model in models.values()]
    feeds = {"X": np.random.default_rng(seed).standard_normal((batch, k)).astype(np.float32)}
    medians = interleaved_medians(sessions, feeds, repeats=repeats, cold_cache=cold_cache)
    return dict(zip(models, medians, strict=True))


def csr_arrays(
    weight: np.ndarray, index_dtype: str = "auto"
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """SparseMatMul inputs (after X, before bias) and attributes for a K × N weight."""
    csr = to_csr(weight, index_dtype)  # type: ignore[arg-type]
    arrays = {"values": csr.values, "col_indices": csr.col_indices, "row_ptr": csr.row_ptr}
    return arrays, {"K": csr.in_features, "N": csr.out_features}


def codebook_arrays(
    indices: np.ndarray,
    codebook: np.ndarray,
    weight: np.ndarray,
    sparse: bool,
    index_dtype: str = "auto",
) -> tuple[str, dict[str, np.ndarray], dict[str, int]]:
    """(op, inputs after X before bias, attributes) for a K × N weight-shared layer.

    `weight` is codebook[indices] (its zeros decide the CSR structure when `sparse`).
    """
    k, n = weight.shape
    if sparse:
        csr = to_csr(weight, index_dtype)  # type: ignore[arg-type]
        counts: np.ndarray = np.diff(csr.row_ptr.astype(np.int64))  # numpy's stub: timedelta64
        rows = np.repeat(np.arange(n), counts)
        stored = np.ascontiguousarray(indices.T)[rows, csr.col_indices.astype(np.int64)].astype(
            np.uint8
        )
        arrays = {"indices": stored, "col_indices": csr.col_indices, "row_ptr": csr.row_ptr,
                  "codebook": codebook.astype(np.float32)}
        return "SparseCodebookMatMul", arrays, {"K": k, "N": n}
    bits = 4 if codebook.size <= 16 else 8
    arrays = {
        "indices": pack_codebook_indices(indices, bits),
        "codebook": codebook.astype(np.float32),
    }
    return "CodebookMatMul", arrays, {"K": k, "N": n, "bits": bits}


def _net(timing: dict[str, float], name: str) -> float:
    """A variant's time minus the call overhead, floored at 1 µs (noise can exceed tiny layers)."""
    return max(timing[name] - timing.get("overhead", 0.0), 1e-6)


def _opset(model: ir.Model) -> int:
    return int(model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0)))


@register
class SparseCsrPass(CompressionPass):
    """Swap pruned MatMul/Gemm/Conv weights for our sparse kernels where they are faster."""

    name = "sparse.csr"
    summary = (
        "Pruned MatMul/Gemm -> ai.onnxcompress.SparseMatMul, Conv -> SparseConv (CSR) where "
        "measured faster; exact."
    )
    Config = SparseCsrConfig
    config: SparseCsrConfig
    lossy = False

    def requires(self, model: ir.Model) -> None:
        """Refuse before any edit when the kernel library the options need is not built."""
        super().requires(model)
        has_kernel = OP in runtime.available_ops()
        if self.config.decide == "measure" and not has_kernel:
            raise MissingDependencyError(
                "sparse.csr measures the SparseMatMul kernel but the kernel library is not built "
                "(see `bash kernels/fetch_headers.sh && pip install -e .`); use decide='always' to "
                "convert without measuring"
            )
        if not self.config.portable and not has_kernel:
            raise MissingDependencyError(
                "sparse.csr with portable=False writes a model that needs the kernel library, "
                "which is not built"
            )
        if self.config.portable and _opset(model) < MIN_ONNX_OPSET:
            raise UnsupportedModelError(
                f"the portable SparseMatMul function needs ONNX opset >= {MIN_ONNX_OPSET}; the "
                f"model uses {_opset(model)} (convert the opset first, or use portable=False)"
            )

    def rewrite(self, model: ir.Model, report: PassReport) -> bool:
        """Convert every layer where it pays to a kernel op (shared layers to the codebook ops)."""
        scan = find_weight_sites(
            model,
            min_params=self.config.min_params,
            exclude=self.config.exclude,
            ops=("MatMul", "Gemm", "Conv"),
        )
        shapes = functools.cache(functools.partial(self._input_shapes, model))  # once, if asked
        for skip in scan.skipped:
            if skip.reason != CODEBOOK_LAYER:  # those are handled below
                report.skip(skip.name, skip.reason)
        candidates = []
        for site in scan.sites:
            candidate = self._candidate(model, site, report, shapes)
            if candidate is not None:
                candidates.append(candidate)
        for layer in codebook_layers(model):
            candidate = self._codebook_candidate(model, layer, report)
            if candidate is not None:
                candidates.append(candidate)
        chosen = [c for c in candidates if self._faster(c, report)]
        if not chosen:
            return False
        for candidate in chosen:
            self._convert(model, candidate, report)
        model.opset_imports[DOMAIN] = OPSET_VERSION
        if self.config.portable:
            for op in sorted({c.op for c in chosen}):
                function = ir.serde.deserialize_function(function_for(op, _opset(model)))
                model.functions[function.identifier()] = function
        return True

    # ---- eligibility -------------------------------------------------------------------

    def _candidate(self, model: ir.Model, site: WeightSite, report: PassReport,
                   shapes: Callable[[], Shapes]) -> _Candidate | None:
        node = site.node
        reason = self._ineligible(model, site)
        if reason is not None:
            report.skip(site.name, reason)
            return None
        if node.op_type == "Conv":
            return self._conv_candidate(site, report, shapes())
        array = np.asarray(site.array(), dtype=np.float32)
        bias = np.zeros(array.shape[1] if node.op_type == "MatMul" else 0, dtype=np.float32)
        if node.op_type == "Gemm":
            effective = self._gemm_weight_and_bias(site, array)
            if isinstance(effective, str):
                report.skip(site.name, effective)
                return None
            array, bias = effective
        sparsity = 1.0 - np.count_nonzero(array) / array.size
        if sparsity < self.config.min_sparsity:
            report.skip(
                site.name, f"sparsity {sparsity:.3f} < min_sparsity {self.config.min_sparsity}"
            )
            return None
        arrays, attributes = csr_arrays(array, self.config.index_dtype)
        return _Candidate(
            site.name, node, array, bias, float(sparsity), OP, arrays, attributes, site=site
        )

    def _conv_candidate(
        self, site: WeightSite, report: PassReport, shapes: Shapes
    ) -> _Candidate | None:
        needs_kernel = self.config.decide == "measure" or not self.config.portable
        if needs_kernel and "SparseConv" not in runtime.available_ops():
            report.skip(
                site.name, "the kernel library predates SparseConv: rebuild it (pip install -e .)"
            )
            return None
        x = site.node.inputs[0]
        shape = shapes.get(x.name or "") if x is not None else None
        layer = conv_layer(site, shape)
        if isinstance(layer, str):
            report.skip(site.name, layer)
            return None
        sparsity = 1.0 - np.count_nonzero(layer.weight) / layer.weight.size
        if sparsity < self.config.min_sparsity:
            reason = f"sparsity {sparsity:.3f} < min_sparsity {self.config.min_sparsity}"
            report.skip(site.name, reason)
            return None
        csr = conv_csr(layer.weight, self.config.index_dtype)
        arrays = {"values": csr.values, "col_indices": csr.col_indices, "row_ptr": csr.row_ptr}
        return _Candidate(
            site.name, site.node, layer.weight, layer.bias, float(sparsity), "SparseConv", arrays,
            layer.geometry.attributes(), site=site, conv=layer,
        )

    def _input_shapes(self, model: ir.Model) -> Shapes:
        """Static shapes from onnx shape inference (asked once per run, for Conv layers only)."""
        try:
            return value_shapes(model, self.context.probes or self.context.data)
        except (onnx.shape_inference.InferenceError, ValueError) as error:  # sizes unknown
            logger.debug("shape inference failed: %s", error)
            return {}

    def _codebook_candidate(
        self, model: ir.Model, layer: CodebookLayer, report: PassReport
    ) -> _Candidate | None:
        """A Cast -> Gather decoded weight read by one MatMul / Gemm."""
        name = layer.name
        if self.config.exclude and any(fnmatch.fnmatchcase(name, p) for p in self.config.exclude):
            report.skip(name, "excluded by name")
            return None
        decoded = layer.gather.outputs[0]
        uses = list(decoded.uses())
        if decoded.is_graph_output() or len(uses) != 1:
            report.skip(name, f"shared weight read by {len(uses)} nodes" if len(uses) != 1 else
                             "weight is also a graph output")
            return None
        node, index = uses[0]
        if (
            node.op_type not in ("MatMul", "Gemm")
            or node.domain not in ("", "ai.onnx")
            or index != 1
        ):
            report.skip(name, f"read by {node.op_type} input {index}, not as a MatMul/Gemm weight")
            return None
        if node.op_type == "Gemm" and node.attributes.get_int("transA", 0) != 0:
            report.skip(name, "Gemm with transA=1")
            return None
        codebook = layer.codebook()
        if codebook.dtype != np.float32 or len(layer.shape) != 2 or codebook.size > 256:
            report.skip(
                name,
                f"codebook {codebook.dtype} of {codebook.size} entries for a "
                f"{len(layer.shape)}-D weight: the kernels take fp32, <= 256 entries, 2-D",
            )
            return None
        indices = layer.indices()
        if int(np.prod(indices.shape)) < self.config.min_params:
            report.skip(name, f"too small ({indices.size} < min_params={self.config.min_params})")
            return None
        bias = np.zeros(indices.shape[1], dtype=np.float32)
        if node.op_type == "Gemm":
            alpha = node.attributes.get_float("alpha", 1.0)
            if node.attributes.get_int("transB", 0):
                indices = np.ascontiguousarray(indices.T)
            codebook = (codebook * np.float32(alpha)).astype(np.float32)
            folded = self._gemm_bias(node, indices.shape[1])
            if isinstance(folded, str):
                report.skip(name, folded)
                return None
            bias = folded
        weight = codebook[indices.astype(np.int64)]
        sparsity = 1.0 - np.count_nonzero(weight) / weight.size
        sparse = bool(sparsity >= self.config.min_sparsity)
        op, arrays, attributes = codebook_arrays(
            indices, codebook, weight, sparse, self.config.index_dtype
        )
        return _Candidate(
            name, node, weight, bias, float(sparsity), op, arrays, attributes, layer=layer
        )

    def _ineligible(self, model: ir.Model, site: WeightSite) -> str | None:
        node = site.node
        if node.graph is not model.graph:
            return "inside a subgraph (If/Loop/Scan): only main-graph layers are converted"
        if site.value.is_graph_output():
            return "weight is also a graph output"
        if site.readers != 1:
            return f"weight read by {site.readers} nodes"
        if site.dtype != ir.DataType.FLOAT:
            return f"dtype {site.dtype.name}: the kernel is fp32 only"
        if len(site.shape) != 2 and node.op_type != "Conv":
            return f"weight is {len(site.shape)}-D; the kernel takes a 2-D K x N weight"
        if node.op_type == "MatMul" and site.input_index != 1:
            return "weight is MatMul's first input"
        if node.op_type == "Gemm" and node.attributes.get_int("transA", 0) != 0:
            return "Gemm with transA=1"
        return None

    def _gemm_weight_and_bias(
        self, site: WeightSite, array: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray] | str:
        node = site.node
        alpha = node.attributes.get_float("alpha", 1.0)
        weight = array.T if node.attributes.get_int("transB", 0) else array
        weight = np.ascontiguousarray(
            weight * np.float32(alpha) if alpha != 1.0 else weight, dtype=np.float32
        )
        bias = self._gemm_bias(node, weight.shape[1])
        return bias if isinstance(bias, str) else (weight, bias)

    @staticmethod
    def _gemm_bias(node: ir.Node, n: int) -> np.ndarray | str:
        """beta · C as a [N] vector, or why it cannot be one."""
        beta = node.attributes.get_float("beta", 1.0)
        c = node.inputs[2] if len(node.inputs) > 2 else None
        if c is None:
            return np.zeros(n, dtype=np.float32)
        if c.const_value is None:
            return "Gemm bias C is not a constant"
        bias = np.asarray(c.const_value.numpy(), dtype=np.float32)
        if bias.size not in (1, n) or (bias.ndim == 2 and bias.shape[0] != 1):
            return f"Gemm bias C of shape {list(bias.shape)} does not broadcast to [{n}]"
        return np.ascontiguousarray(np.broadcast_to(bias.reshape(-1), (n,)) * np.float32(beta))

    # ---- decision ----------------------------------------------------------------------

    def _faster(self, candidate: _Candidate, report: PassReport) -> bool:
        if self.config.decide == "always":
            return True
        timing = self._measure(candidate, report)
        if timing is None:
            return False
        candidate.timing = timing
        speedup = _net(timing, "dense") / _net(timing, "sparse")
        report.notes.setdefault("timings", {})[candidate.name] = {
            "op": candidate.op,
            "batch": self.config.batch,
            "dense_ms": round(timing["dense"] * 1e3, 4),
            "sparse_ms": round(timing["sparse"] * 1e3, 4),
            "call_overhead_ms": round(timing["overhead"] * 1e3, 4),
            "speedup": round(speedup, 3),
        }
        if speedup < self.config.min_speedup:
            report.skip(
                candidate.name,
                f"{candidate.op} not faster at batch {self.config.batch}: "
                f"{_net(timing, 'sparse') * 1e3:.3f} ms vs dense {_net(timing, 'dense') * 1e3:.3f} "
                f"ms ({speedup:.2f}x < min_speedup {self.config.min_speedup})",
            )
            return False
        return True

    def _measure(self, candidate: _Candidate, report: PassReport) -> dict[str, float] | None:
        """Median seconds of the dense layer and of our op (None, with the reason, if not timed)."""
        common = {"threads": self.config.threads, "repeats": self.config.repeats,
                  "cold_cache": self.config.cold_cache, "seed": self.context.seed}
        if candidate.conv is None:
            return measure_layer(
                candidate.weight, candidate.op, candidate.arrays, candidate.attributes,
                self.config.batch, **common,  # type: ignore[arg-type]
            )
        shape = candidate.conv.input_shape
        if shape is None or len(shape) < 3 or any(d is None for d in shape[1:]):
            report.skip(
                candidate.name,
                "Conv input size unknown (shape inference cannot tell it), so the speed cannot be "
                "measured; give --input-shape, or use --always",
            )
            return None
        x_shape = [self.config.batch, *(int(d) for d in shape[1:])]  # type: ignore[arg-type]
        conv, arrays = candidate.conv, candidate.arrays
        return measure_conv(conv, arrays, x_shape, **common)  # type: ignore[arg-type]

    # ---- rewrite -----------------------------------------------------------------------

    def _convert(self, model: ir.Model, candidate: _Candidate, report: PassReport) -> None:
        node = candidate.node
        graph = model.graph
        taken = set(graph.initializers)
        op = KERNEL_OPS[candidate.op]
        if list(candidate.arrays) != op.stored_inputs:  # the table fixes the inputs' order
            raise AssertionError(
                f"{op.name} takes {op.stored_inputs}, got {list(candidate.arrays)}"
            )
        inputs = [node.inputs[0]]
        for suffix, array in {**candidate.arrays, "bias": candidate.bias}.items():
            name = _unique(f"{candidate.name}.{op.prefix}_{suffix}", taken)
            value = ir.Value(
                name=name, const_value=ir.tensor(np.ascontiguousarray(array), name=name)
            )
            value.shape = ir.Shape(array.shape)
            value.type = ir.TensorType(value.const_value.dtype)  # type: ignore[union-attr]
            graph.register_initializer(value)
            inputs.append(value)
        old_output = node.outputs[0]
        old_inputs = list(node.inputs[1:])
        new = ir.node(
            candidate.op,
            inputs,
            attributes=dict(candidate.attributes),
            domain=DOMAIN,
            name=node.name or f"{candidate.name}.{op.prefix}",
            num_outputs=1,
        )
        new.outputs[0].name = old_output.name
        new.outputs[0].shape = old_output.shape
        new.outputs[0].type = old_output.type
        old_output.name = None
        ir.convenience.replace_nodes_and_values(
            graph, node, [node], [new], [old_output], [new.outputs[0]]
        )
        if candidate.site is not None:
            _drop_if_unused(graph, candidate.site)
        if candidate.layer is not None:
            _drop_codebook_if_unused(graph, candidate.layer)
        for old_input in old_inputs:  # a Gemm's C, folded into the bias
            _drop_initializer_if_unused(graph, old_input)
        before = candidate.site.array() if candidate.site is not None else candidate.weight
        detail = self._detail(candidate)
        stored = (
            candidate.arrays["values"]
            if "values" in candidate.arrays
            else candidate.arrays["indices"]
        )
        params_after = (
            int(stored.size) if candidate.op != "CodebookMatMul" else int(candidate.weight.size)
        )
        report.changed(candidate.name, node.op_type, before, params_after=params_after,
                       bytes_after=candidate.stored_bytes(), detail=detail)

    def _detail(self, candidate: _Candidate) -> str:
        """The report's account of one conversion: the op, the index form, the measured gain."""
        detail = f"{candidate.op}, sparsity {candidate.sparsity:.3f}"
        if candidate.op != "CodebookMatMul":
            detail += f", {candidate.arrays['col_indices'].dtype.name} columns"
        else:
            detail += f", {candidate.attributes['bits']}-bit indices"
        if candidate.timing is not None:
            timing = candidate.timing
            detail += (
                f", {_net(timing, 'dense') / _net(timing, 'sparse'):.2f}x faster at batch "
                f"{self.config.batch} ({_net(timing, 'sparse') * 1e3:.3f} vs "
                f"{_net(timing, 'dense') * 1e3:.3f} ms)"
            )
        return detail


def _drop_initializer_if_unused(graph: ir.Graph, value: ir.Value | None) -> None:
    name = value.name if value is not None else None
    if (
        value is None
        or name is None
        or value.uses()
        or value.is_graph_output()
        or name not in graph.initializers
    ):
        return
    if graph.initializers[name] is value:
        graph.initializers.pop(name)


def _drop_codebook_if_unused(graph: ir.Graph, layer: CodebookLayer) -> None:
    """Remove the Cast -> Gather pair or packed decoder (and its initializers) once unread."""
    if layer.gather.outputs[0].uses() or layer.gather.outputs[0].is_graph_output():
        return
    remove_codebook_layer(graph, layer)


def _unique(base: str, taken: set[str]) -> str:
    name, index = base, 1
    while name in taken:
        name = f"{base}_{index}"
        index += 1
    taken.add(name)
    return name


def _drop_if_unused(graph: ir.Graph, site: WeightSite) -> None:
    value = site.value
    if value.uses() or value.is_graph_output():
        return
    if site.holder == "constant":
        producer = value.producer()
        if producer is not None and producer.graph is not None:
            producer.graph.remove(producer, safe=True)
    elif value.name is not None and value.name in graph.initializers:
        graph.initializers.pop(value.name)
