"""Does the factor pair run faster than the original node? Measured, not assumed.

Fewer FLOPs do not guarantee lower latency: two small GEMMs can be slower than one
memory-bound GEMM at batch 1, and a thin kh×1 conv runs at a poor arithmetic intensity. For a
planned layer we build two one-layer models (the original node, and the same node rewritten
by `rewrite.apply_factors`), run them in onnxruntime side by side with the same input, the same
thread count and interleaved repeats, and compare medians. Only wall-clock time of
onnxruntime's `run` is timed; nothing is asserted about it in tests.
"""

from __future__ import annotations

__all__ = ["PairLatency", "measure_pair", "static_input_shapes"]

import dataclasses
import logging

import numpy as np
import onnx
import onnx_ir as ir

from onnxcompress.io import ir_version_for
from onnxcompress.passes.lowrank.decompose import ConvAttributes
from onnxcompress.passes.lowrank.rewrite import apply_factors
from onnxcompress.runtime import session
from onnxcompress.sites import WeightSite, find_weight_sites
from onnxcompress.timing import interleaved_medians

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PairLatency:
    """Median milliseconds of the original node and of the factor pair."""

    original_ms: float
    pair_ms: float

    @property
    def speedup(self) -> float:
        """Original over factor-pair time: above 1 the pair is faster."""
        return self.original_ms / self.pair_ms if self.pair_ms > 0 else float("inf")


def static_input_shapes(model: ir.Model) -> dict[str, tuple[int | None, ...]]:
    """Shapes of every value onnx shape inference can tell (symbolic dims as None)."""
    proto = ir.to_proto(model)
    inferred = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    shapes: dict[str, tuple[int | None, ...]] = {}
    infos = [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]
    for info in infos:
        tensor_type = info.type.tensor_type
        if not tensor_type.HasField("shape"):
            continue
        shapes[info.name] = tuple(
            d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim
        )
    return shapes


_OPSET = 21  # the layer models timed here


def _one_layer_model(site: WeightSite, input_shape: tuple[int, ...]) -> ir.Model:
    node = site.node
    dtype = site.dtype
    x = ir.Value(name="x", shape=ir.Shape(input_shape), type=ir.TensorType(dtype))
    weight = ir.Value(name="weight", const_value=ir.tensor(np.array(site.array()), name="weight"))
    inputs: list[ir.Value | None] = [x, weight]
    initializers = [weight]
    if (
        len(node.inputs) > 2
        and node.inputs[2] is not None
        and node.inputs[2].const_value is not None
    ):
        bias = ir.Value(
            name="bias", const_value=ir.tensor(node.inputs[2].const_value.numpy(), name="bias")
        )
        inputs.append(bias)
        initializers.append(bias)
    attributes = {name: attr.value for name, attr in node.attributes.items()}
    y = ir.Value(name="y")
    copy = ir.node(node.op_type, inputs, attributes=attributes, outputs=[y], name="layer")
    graph = ir.Graph(
        [x],
        [y],
        nodes=[copy],
        initializers=initializers,
        opset_imports={"": _OPSET},
        name="one_layer",
    )
    return ir.Model(graph, ir_version=ir_version_for(_OPSET))


def measure_pair(
    site: WeightSite,
    kind: str,
    first: np.ndarray,
    second: np.ndarray,
    input_shape: tuple[int, ...],
    *,
    conv: ConvAttributes | None = None,
    threads: int = 1,
    repeats: int = 20,
    seed: int = 0,
) -> PairLatency:
    """Median latency (ms) of the node alone and of its factor pair on one random input."""
    original = _one_layer_model(site, input_shape)
    factored = _one_layer_model(site, input_shape)
    local = next(s for s in find_weight_sites(factored, min_params=0).sites if s.name == "weight")
    apply_factors(factored, local, kind, first, second, conv)
    rng = np.random.default_rng(seed)
    feed = {"x": rng.standard_normal(input_shape).astype(site.array().dtype)}
    sessions = [session(original, threads=threads), session(factored, threads=threads)]
    original_ms, pair_ms = (
        seconds * 1e3 for seconds in interleaved_medians(sessions, feed, repeats=repeats)
    )
    logger.info(
        "%s: original %.3f ms, pair %.3f ms at input %s",
        site.name,
        original_ms,
        pair_ms,
        input_shape,
    )
    return PairLatency(original_ms, pair_ms)
