"""The in-graph form of a shared-weight layer, and how to find it again.

A clustered weight W (shape S) becomes two main-graph initializers and two standard ops (a weight
held in a Constant node or read inside a subgraph is first moved to the main graph:
`formats.hoist`):

    W.codebook_indices : uint8[S]  (uint4[S] when bits <= 4 and the model's opset >= 21)
    W.codebook         : float[k]  (the weight's own dtype; entry 0 is exactly 0 for pruned layers)
    Cast(W.codebook_indices, to=INT32) -> Gather(W.codebook, ., axis=0) -> W

The Gather output keeps the weight's name, so every consumer reads the same value as before.
Stock onnxruntime runs it (it constant-folds the pair into the dense weight at load, so
inference speed and memory are those of the dense model); the file holds 1 byte (or half a
byte) per weight instead of 4. The Gather node carries the requested bit width and whether
entry 0 is the reserved exact zero in its `metadata_props`, for `inspect`, the fine-tune
bridge (centroid fine-tuning keeps the indices fixed) and `pack`.

Packed form (`onnxcompress.formats.packed`, what `codebook.kmeans` writes for bits < 8 unless
uint4 applies): the indices are a uint8 stream at b bits each, unpacked in the graph by a
constant-foldable chain Cast -> MatMul -> Div -> Mod -> Reshape [-> Slice -> Reshape] that
ends in the same codebook Gather (bits/8 byte per weight; layers where the ~0.4 KB decoder
would not pay stay uint8). `codebook_layers` finds both forms: for a
packed layer `index_dtype` is "packed", `index_name` the packed byte tensor, `cast` the
chain's first Cast, and `indices()` unpacks; `stored_index_bytes` is what the file holds.

Channel-scaled form (`codebook.search`'s per-channel candidates): one codebook shared by the
weight's output channels after each is divided by its own scale (BatchNorm folded into a Conv
leaves channels at scales several times apart, which a single codebook fits poorly):

    Gather(...) -> W.codebook_shared;  Mul(W.codebook_shared, W.codebook_scales) -> W

with `W.codebook_scales` float[1.., C, 1..] (C on the output axis) and the Mul marked with
`SCALES_KEY`. `CodebookLayer.name` stays the Gather output (what `pack` codes) and
`weight_name` is the Mul's; onnxruntime folds the Mul with the Gather at load.

Exact: `codebook[indices]` (times the scales) is bit for bit the weight the model computes with.
"""

from __future__ import annotations

__all__ = [
    "BITS_KEY",
    "ZERO_KEY",
    "SCALES_KEY",
    "CodebookLayer",
    "codebook_layers",
    "dense_weight",
    "expand_codebook",
    "insert_codebook",
    "remove_codebook_layer",
]

import dataclasses
import math

import numpy as np
import onnx_ir as ir

from onnxcompress.formats.hoist import hoist_constant
from onnxcompress.formats.naming import unique_name
from onnxcompress.formats.packed import PACKED_DTYPE, packed_nbytes, packed_source, unpack_indices

BITS_KEY = "onnxcompress.codebook.bits"
ZERO_KEY = "onnxcompress.codebook.zero_entry"
SCALES_KEY = "onnxcompress.codebook.scales"
_INDEX_DTYPES = (ir.DataType.UINT8, ir.DataType.UINT4)


@dataclasses.dataclass(frozen=True)
class CodebookLayer:
    """One shared-weight layer as found in a graph.

    `name` is the weight's name (the Gather output); `bits` the width the indices use
    (ceil(log2 k) when the node does not record one); `k` the number of codebook entries,
    the reserved zero included; `zero_entry` whether entry 0 is the exact zero of a pruned
    layer (zeros then cost no learned centroid).
    """

    name: str
    bits: int
    k: int
    index_name: str
    codebook_name: str
    zero_entry: bool
    shape: tuple[int, ...]
    index_dtype: str
    gather: ir.Node
    cast: ir.Node
    scaling: ir.Node | None = None

    @property
    def weight_name(self) -> str:
        """The value the layer's consumers read: the Gather's, or the channel-scaling Mul's."""
        return self.scaling.outputs[0].name or "" if self.scaling is not None else self.name

    def scales(self) -> np.ndarray | None:
        """The per-output-channel scales (broadcastable to the weight), None when unscaled."""
        if self.scaling is None:
            return None
        tensor = self.scaling.inputs[1].const_value  # type: ignore[union-attr]
        assert tensor is not None
        return np.asarray(tensor.numpy())

    @property
    def scale_bytes(self) -> int:
        """Bytes the scales take in the file (0 when unscaled)."""
        scales = self.scales()
        return 0 if scales is None else int(scales.nbytes)

    def indices(self) -> np.ndarray:
        """The index tensor as uint8 of the weight's shape (uint4 and packed storage unpacked)."""
        tensor = self.cast.inputs[0].const_value  # type: ignore[union-attr]
        assert tensor is not None
        stored = np.asarray(tensor.numpy())
        if self.index_dtype == PACKED_DTYPE:
            return unpack_indices(stored, int(stored.shape[1]), math.prod(self.shape)).reshape(
                self.shape
            )
        return stored.astype(np.uint8)

    @property
    def stored_index_bytes(self) -> int:
        """Bytes the indices take in the file: 1 a weight (uint8), 1/2 (uint4), bits/8 (packed)."""
        count = math.prod(self.shape)
        if self.index_dtype == PACKED_DTYPE:
            tensor = self.cast.inputs[0].const_value  # type: ignore[union-attr]
            return packed_nbytes(count, tensor.shape.numpy()[1]) if tensor is not None else 0
        return count if self.index_dtype == "uint8" else (count + 1) // 2

    def codebook(self) -> np.ndarray:
        """The shared values, read from the Gather's constant data input."""
        tensor = self.gather.inputs[0].const_value  # type: ignore[union-attr]
        assert tensor is not None
        return np.asarray(tensor.numpy())


def _initializer(graph: ir.Graph, value: ir.Value | None) -> ir.TensorProtocol | None:
    if value is None or value.name is None or value.const_value is None:
        return None
    if graph.initializers.get(value.name) is not value:
        return None
    return value.const_value


def _match(graph: ir.Graph, node: ir.Node) -> CodebookLayer | None:
    """The layer a Gather node decodes, or None when it is not the codebook pattern."""
    if node.op_type != "Gather" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
        return None
    if node.attributes.get_int("axis", 0) != 0:
        return None
    codebook = _initializer(graph, node.inputs[0])
    if codebook is None or len(codebook.shape) != 1:
        return None
    found = _index_source(graph, node.inputs[1])
    if found is None:
        return None
    cast, index_dtype, shape, stored_bits = found
    if codebook.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE):
        return None
    k = codebook.shape.numpy()[0]
    recorded = node.metadata_props.get(BITS_KEY)
    bits = (
        int(recorded)
        if recorded and recorded.isdigit()
        else stored_bits or max(1, math.ceil(math.log2(max(k, 2))))
    )
    output = node.outputs[0]
    return CodebookLayer(
        scaling=_scaling(graph, output),
        name=output.name or "",
        bits=bits,
        k=k,
        index_name=cast.inputs[0].name or "",  # type: ignore[union-attr]
        codebook_name=node.inputs[0].name or "",  # type: ignore[union-attr]
        zero_entry=node.metadata_props.get(ZERO_KEY) == "1",
        shape=shape,
        index_dtype=index_dtype,
        gather=node,
        cast=cast,
    )


def _scaling(graph: ir.Graph, shared: ir.Value) -> ir.Node | None:
    """The channel-scaling Mul our passes put after a codebook Gather, or None."""
    uses = list(shared.uses())
    if len(uses) != 1 or shared.is_graph_output():
        return None
    mul = uses[0].node
    if mul.op_type != "Mul" or SCALES_KEY not in mul.metadata_props or uses[0].idx != 0:
        return None
    return mul if _initializer(graph, mul.inputs[1]) is not None else None


def _index_source(
    graph: ir.Graph, index_value: ir.Value | None
) -> tuple[ir.Node, str, tuple[int, ...], int | None] | None:
    """(Cast reading the stored indices, index dtype, weight shape, packed width) or None."""
    cast = index_value.producer() if index_value is not None else None
    if cast is not None and cast.op_type == "Cast":
        if cast.attributes.get_int("to", 0) not in (ir.DataType.INT32, ir.DataType.INT64):
            return None
        indices = _initializer(graph, cast.inputs[0])
        if indices is None or indices.dtype not in _INDEX_DTYPES:
            return None
        dtype = "uint4" if indices.dtype == ir.DataType.UINT4 else "uint8"
        return cast, dtype, tuple(indices.shape.numpy()), None
    packed = packed_source(graph, index_value)
    if packed is None:
        return None
    return packed.cast, PACKED_DTYPE, packed.shape, packed.bits


def codebook_layers(model: ir.Model) -> list[CodebookLayer]:
    """Every shared-weight layer of the main graph, in graph order."""
    layers = []
    for node in model.graph:
        layer = _match(model.graph, node)
        if layer is not None:
            layers.append(layer)
    return layers


def _decoder_nodes(layer: CodebookLayer) -> list[ir.Node]:
    """The nodes from the index decoder's first Cast to the codebook Gather, in graph order."""
    chain, value = [layer.gather], layer.gather.inputs[1]
    while value is not None and (node := value.producer()) is not None:
        chain.append(node)
        if node is layer.cast:
            return chain[::-1]
        value = node.inputs[0]
    raise AssertionError(f"{layer.name}: the index decoder does not lead back to its Cast")


def remove_codebook_layer(graph: ir.Graph, layer: CodebookLayer) -> bool:
    """Drop the layer's Gather and index decoder once nothing reads the weight.

    The decoder is a Cast, or the packed chain; then every initializer they read that nothing
    else reads goes too (codebook, indices, the packed decoder's constants). Returns whether
    the nodes were removed.
    """
    nodes = _decoder_nodes(layer)
    inside = set(nodes)
    for node in nodes:
        for output in node.outputs:
            if output.is_graph_output() or any(user not in inside for user, _ in output.uses()):
                return False
    _remove_with_their_initializers(graph, nodes)
    return True


def dense_weight(layer: CodebookLayer) -> np.ndarray:
    """The weight the model computes with: codebook[indices] (times the channel scales)."""
    shared = layer.codebook()[layer.indices()]
    scales = layer.scales()
    return shared if scales is None else (shared * scales).astype(shared.dtype)


def expand_codebook(graph: ir.Graph, layer: CodebookLayer) -> ir.Value:
    """The inverse of `insert_codebook`: the decoded weight as a plain initializer, same name.

    Its consumers read the initializer; the Gather, the index decoder, the scaling Mul and the
    initializers only they read are removed. A retraining that moves every weight (soft
    weight-sharing) starts from the weights the layer computes with; its zeros stay zeros.
    """
    decoded = layer.scaling.outputs[0] if layer.scaling is not None else layer.gather.outputs[0]
    name = decoded.name
    assert name is not None
    weight = dense_weight(layer)
    nodes = [*_decoder_nodes(layer), *([layer.scaling] if layer.scaling is not None else [])]
    decoded.name = None
    plain = _constant(graph, ir.tensor(weight, name=name))
    ir.convenience.replace_all_uses_with(decoded, plain)
    _remove_with_their_initializers(graph, nodes)
    return plain


def _remove_with_their_initializers(graph: ir.Graph, nodes: list[ir.Node]) -> None:
    """Remove `nodes`, then the initializers they alone read."""
    inputs = [v for node in nodes for v in node.inputs if v is not None and v.producer() is None]
    graph.remove(nodes, safe=True)
    for value in dict.fromkeys(inputs):
        if value.name is not None and graph.initializers.get(value.name) is value:
            if not list(value.uses()) and not value.is_graph_output():
                graph.initializers.pop(value.name)


def insert_codebook(
    graph: ir.Graph,
    weight: ir.Value,
    indices: np.ndarray,
    codebook: np.ndarray,
    *,
    bits: int,
    zero_entry: bool,
    packed: bool,
    scales: np.ndarray | None = None,
) -> tuple[ir.Value, ir.Value]:
    """Replace constant `weight` by indices + codebook + Cast + Gather (same name, same value).

    `graph` is the main graph; a weight held in a Constant node or a subgraph is first moved
    there (`hoist_constant`), and its readers, at any depth, read the decoded value from the
    outer scope. With `scales` (broadcastable to the weight, one per output channel), the
    Gather decodes the shared values and a marked Mul by the scales gives the weight. Returns
    the new (indices, codebook) initializer values. The caller checks that `weight` is not a
    graph output.
    """
    weight = hoist_constant(graph, weight)
    name = weight.name
    assert name is not None
    index_value = _constant(
        graph,
        ir.Tensor(indices, dtype=ir.DataType.UINT4, name=f"{name}.codebook_indices")
        if packed
        else ir.tensor(indices.astype(np.uint8), name=f"{name}.codebook_indices"),
    )
    codebook_value = _constant(graph, ir.tensor(codebook, name=f"{name}.codebook"))
    # unnamed nodes, as the packed decoder's: the output names say which weight they decode
    cast = ir.node("Cast", [index_value], attributes={"to": ir.DataType.INT32})
    gather = ir.node("Gather", [codebook_value, cast.outputs[0]], attributes={"axis": 0})
    cast.outputs[0].name = unique_name(graph, f"{name}.codebook_indices_int32")
    cast.outputs[0].type = ir.TensorType(ir.DataType.INT32)
    cast.outputs[0].shape = ir.Shape(indices.shape)
    gather.metadata_props[BITS_KEY] = str(bits)
    gather.metadata_props[ZERO_KEY] = "1" if zero_entry else "0"
    nodes = [cast, gather]
    if scales is not None:
        scale_value = _constant(graph, ir.tensor(scales.astype(codebook.dtype),
                                                 name=f"{name}.codebook_scales"))
        nodes.append(ir.node("Mul", [gather.outputs[0], scale_value]))
        nodes[-1].metadata_props[SCALES_KEY] = "1"
        gather.outputs[0].name = unique_name(graph, f"{name}.codebook_shared")
    decoded = nodes[-1].outputs[0]
    for value in {gather.outputs[0], decoded}:
        value.type, value.shape = weight.type, ir.Shape(indices.shape)

    graph.initializers.pop(name)
    ir.convenience.replace_all_uses_with(weight, decoded)
    # Detach the old tensor before renaming: onnx_ir renames a value's tensor with it, and
    # that tensor may wrap the caller's proto or a memory map.
    weight.const_value = None
    weight.name = None
    decoded.name = name
    first = next(iter(graph), None)
    if first is None:
        graph.extend(nodes)
    else:
        graph.insert_before(first, nodes)
    return index_value, codebook_value


def _constant(graph: ir.Graph, tensor: ir.TensorProtocol) -> ir.Value:
    """`tensor` registered as an initializer of `graph` under a name not yet taken."""
    tensor.name = unique_name(graph, tensor.name or "constant")
    value = ir.Value(
        name=tensor.name, const_value=tensor,
        shape=ir.Shape(tuple(tensor.shape.numpy())), type=ir.TensorType(tensor.dtype),
    )
    graph.register_initializer(value)
    return value
