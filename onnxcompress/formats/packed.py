"""Codebook indices packed at their bit width, and float weights stored as float16.

Both are decoded back by standard ONNX ops whose inputs are all initializers.

Why: `codebook.kmeans` needs only b bits per weight, but ONNX has no 3-, 5- or 6-bit type
(and uint4 only from opset 21), so the uint8 form costs a byte per weight whatever b is.
Here the indices go into a uint8 stream at b bits each and the graph unpacks them with
Cast / MatMul / Div / Mod / Reshape [/ Slice] (opset 11; from opset 9 with Mod spelled out).
Every input of that decoder is an initializer, so onnxruntime's constant folding replaces the
whole chain, codebook Gather included, by the dense weight when the session is created: the
model runs at the dense model's speed, in stock onnxruntime, without any library of ours. The
same holds for float16 storage (`store_fp16`): initializer in float16 + Cast(to=FLOAT).

Layout ("groups of 8"): the flat index stream i_0 .. i_{n-1} (row-major order of the
weight, each 0 <= i < 2^b) is padded with zeros to n' = 8G, G = ceil(n / 8). Group g holds
i_{8g} .. i_{8g+7} in b bytes P[g, 0..b-1], read as one little-endian 8b-bit integer, with
index j of the group at bits jb .. jb+b-1:

    sum_t P[g, t] 256^t  =  sum_j i_{8g+j} 2^(jb)          P: uint8[G, b], the initializer

Index j starts in byte q_j = floor(jb / 8) at bit s_j = jb mod 8 and, as b <= 8, ends in
byte q_j or q_j + 1. With the two-byte window w_j = P[g, q_j] + 256 P[g, q_j + 1]:

    i_{8g+j} = floor(w_j / 2^(s_j)) mod 2^b

When index j does not cross a byte (s_j + b <= 8; always for b = 1, 2, 4) the high byte
is left out of w_j (it would only add a multiple of 2^b). All eight windows of a group are
one integer matrix product, w = P M with M[q_j, j] = 1 and M[q_j + 1, j] = 256 (int32
[b, 8], shared by every layer of width b; w < 2^16, exact). In the graph (S: the weight's
shape):

    w = MatMul(Cast(P, to=INT32), M)                 [G, 8]
    i = Mod(Div(w, 2^s), 2^b)                        [G, 8] (w >= 0: integer Div is floor)
    Reshape(i, S)  or, when 8 does not divide n,  Reshape(Slice(Reshape(i, [-1]), 0, n), S)

then Gather(codebook, i, axis=0) as in the uint8 form (`formats.codebook`). File cost:
ceil(n / 8) b bytes plus ~0.5 KB of decoder per layer (node protos, value names, its shape;
the width constants are shared), so layers where that does not pay stay uint8. Exact: the
decoded indices are the packed ones bit for bit.

Where it plugs in: `codebook_layers` recognises this decoder as a codebook layer (index
dtype "packed", same fields; `indices()` unpacks), so inspect, `pack` archives, the
fine-tune bridge (its executor runs these ops) and later passes see one kind of layer.
We did not choose "unpack after load": a model loaded, fine-tuned and saved again would
silently go back to a byte per weight, and in-memory pipelines would see both forms anyway.
"""

from __future__ import annotations

__all__ = [
    "MIN_PACK_OPSET",
    "FP16_MAX",
    "PACKED_DTYPE",
    "PackedSource",
    "decode_initializer",
    "decode_packed",
    "is_decoder_matmul",
    "pack_codebook_indices",
    "packs_indices",
    "pack_indices",
    "decoder_nbytes",
    "packed_nbytes",
    "packing_pays",
    "packed_source",
    "store_fp16",
    "float_constants",
    "unpack_indices",
]

import dataclasses
import math
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from onnxcompress.formats.hoist import hoist_constant
from onnxcompress.formats.naming import unique_name

if TYPE_CHECKING:
    from onnxcompress.formats.codebook import CodebookLayer

#: `CodebookLayer.index_dtype` of a layer whose indices are bit-packed here.
PACKED_DTYPE = "packed"
#: The largest finite float16; weights beyond it are left in float32.
FP16_MAX = 65504.0
MIN_PACK_OPSET = 9  # integer MatMul; below 11 the decoder avoids Mod (`_decoder_nodes`)
_MOD_OPSET = 11
_BLOCK = 1 << 18  # groups of 8 per numpy block: temporaries of at most 16 MiB


# --- numpy: the layout ---------------------------------------------------------------------


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes of `count` indices packed at `bits` each: whole groups of 8 indices = `bits` bytes."""
    return math.ceil(count / 8) * bits


def decoder_nbytes(weight: str) -> int:
    """About what one layer's decoder adds to the file (nodes, value names, shape constant).

    Measured ~400 bytes for a 10-character weight name; the names repeat on every edge.
    """
    return 300 + 16 * len(weight)


def packing_pays(weight: str, count: int, bits: int) -> bool:
    """Whether packing `count` indices at `bits` saves more than its decoder costs."""
    return bits < 8 and count - packed_nbytes(count, bits) > decoder_nbytes(weight)


def pack_indices(indices: np.ndarray, bits: int) -> np.ndarray:
    """uint8[G, bits]: the flat indices (each < 2^bits) in groups of 8, little-endian bits."""
    _check_bits(bits)
    flat = np.asarray(indices).reshape(-1)
    if flat.size and (int(flat.min()) < 0 or int(flat.max()) >= 1 << bits):
        raise ValueError(f"indices must lie in 0..{(1 << bits) - 1} to pack at {bits} bits")
    groups = math.ceil(flat.size / 8)
    padded: np.ndarray = np.zeros(groups * 8, dtype=np.uint8)  # flat, then [groups, 8]
    padded[: flat.size] = flat
    padded = padded.reshape(groups, 8)
    packed = np.empty((groups, bits), dtype=np.uint8)
    for start in range(0, groups, _BLOCK):  # blocks bound the bit-per-byte temporaries
        # bit t of a group's 8b-bit stream is bit (t mod b) of its index t // b
        stream = (padded[start : start + _BLOCK, :, None] >> np.arange(bits, dtype=np.uint8)) & 1
        block = np.packbits(stream.reshape(-1, bits, 8), axis=-1, bitorder="little")
        packed[start : start + _BLOCK] = block.reshape(-1, bits)
    return packed


def unpack_indices(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """uint8[count]: the first `count` indices of `pack_indices` output (the inverse)."""
    _check_bits(bits)
    packed = np.asarray(packed, dtype=np.uint8).reshape(-1, bits)
    if not 8 * (packed.shape[0] - 1) < count <= 8 * packed.shape[0] and not (
        count == 0 == packed.shape[0]
    ):
        raise ValueError(f"{packed.shape[0]} groups of 8 cannot hold exactly {count} indices")
    values = np.empty(packed.shape[0] * 8, dtype=np.uint8)
    weights = np.arange(bits, dtype=np.uint8)
    for start in range(0, packed.shape[0], _BLOCK):
        stream = np.unpackbits(packed[start : start + _BLOCK], axis=-1, bitorder="little").reshape(
            -1, bits
        )
        values[start * 8 : (start + _BLOCK) * 8] = (stream << weights).sum(axis=-1, dtype=np.uint8)
    return values[:count]


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")


def _layout(bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(M, 2^s): the matrix that gathers each slot's two-byte window, and the 8 shifts.

    M is int32 [bits, 8] with M[q_j, j] = 1 and M[q_j + 1, j] = 256 (when index j crosses
    into the next byte), so (P @ M)[g, j] is slot j's two-byte window; the shifts are 2^(s_j).
    """
    offsets = np.arange(8) * bits
    low, shift = offsets // 8, offsets % 8
    matrix = np.zeros((bits, 8), dtype=np.int32)
    matrix[low, np.arange(8)] = 1
    crossing = shift + bits > 8
    matrix[low[crossing] + 1, np.arange(8)[crossing]] = 256
    return matrix, (1 << shift).astype(np.int32)


def decode_packed(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """The in-graph decoder's algebra in numpy (int32 [count]); tests hold it to unpack_indices."""
    matrix, powers = _layout(bits)
    window = np.asarray(packed).reshape(-1, bits).astype(np.int32) @ matrix
    return ((window // powers) % (1 << bits)).reshape(-1)[:count]


# --- the graph: decoder nodes and how to recognise them -------------------------------------


def _initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    tensor = ir.tensor(array, name=unique_name(graph, name))
    value = ir.Value(
        name=tensor.name,
        const_value=tensor,
        shape=ir.Shape(array.shape),
        type=ir.TensorType(tensor.dtype),
    )
    graph.register_initializer(value)
    return value


def _shared(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """The initializer `name` when it already holds `array`, else a new one.

    Layers of one width share their decoder constants this way.
    """
    existing = graph.initializers.get(name)
    if existing is not None and existing.const_value is not None:
        held = np.asarray(existing.const_value.numpy())
        if held.dtype == array.dtype and np.array_equal(held, array):
            return existing
    return _initializer(graph, name, array)


def _decoder_nodes(
    graph: ir.Graph, weight: str, packed: ir.Value, bits: int, shape: tuple[int, ...],
    opset: int = _MOD_OPSET,
) -> list[ir.Node]:
    """The nodes that turn packed bytes `packed` into int32 indices of `shape` (last output).

    Kept small in the file: width constants are shared by every layer of that width, nodes
    carry no names and intermediate values no type annotations (shape inference has them).
    Below opset 11 (models exported long ago, such as open_nsfw at opset 9), x mod 2^b is
    written floor(w / 2^s) - floor(w / 2^(s+b)) 2^b and opset 9's Slice takes attributes.
    """
    matrix, powers = _layout(bits)
    count = math.prod(shape)
    groups = math.ceil(count / 8)

    def width_const(suffix: str, array: np.ndarray) -> ir.Value:
        return _shared(graph, f"onnxcompress.unpack{bits}.{suffix}", array)

    nodes: list[ir.Node] = []

    def add(op: str, inputs: list[ir.Value], **attributes: int | list[int]) -> ir.Value:
        node = ir.node(op, inputs, attributes=attributes)
        node.outputs[0].name = unique_name(graph, f"{weight}.unpack{len(nodes)}")
        nodes.append(node)
        return node.outputs[0]

    wide = add("Cast", [packed], to=ir.DataType.INT32)
    window = add("MatMul", [wide, width_const("bytes", matrix)])
    shifted = add("Div", [window, width_const("shift", powers)])
    modulus = width_const("modulus", np.array(1 << bits, np.int32))
    if opset >= _MOD_OPSET:
        indices = add("Mod", [shifted, modulus])
    else:
        above = add("Div", [window, width_const("shift_out", powers << bits)])
        indices = add("Sub", [shifted, add("Mul", [above, modulus])])
    if count != 8 * groups:
        flat = add(
            "Reshape",
            [indices, _shared(graph, "onnxcompress.unpack.flat", np.array([-1], np.int64))],
        )
        indices = (
            add("Slice", [flat], starts=[0], ends=[count], axes=[0])  # type: ignore[arg-type]
            if opset < 10
            else add(
                "Slice",
                [
                    flat,
                    _shared(graph, "onnxcompress.unpack.start", np.array([0], np.int64)),
                    _initializer(graph, f"{weight}.unpack_end", np.array([count], np.int64)),
                ],
            )
        )
    add(
        "Reshape",
        [indices, _initializer(graph, f"{weight}.unpack_shape", np.array(shape, np.int64))],
    )
    return nodes


@dataclasses.dataclass(frozen=True)
class PackedSource:
    """A packed decoder behind a codebook Gather: its first Cast, the packed bytes, the width."""

    cast: ir.Node
    packed: ir.Value
    bits: int
    shape: tuple[int, ...]


def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None:
        return None
    return np.asarray(value.const_value.numpy())


def _producer(value: ir.Value | None, op_type: str) -> ir.Node | None:
    node = value.producer() if value is not None else None
    if node is None or node.op_type != op_type or node.domain not in ("", "ai.onnx"):
        return None
    return node


def packed_source(graph: ir.Graph, index_value: ir.Value | None) -> PackedSource | None:
    """The packed decoder that computes `index_value`, exactly as `_decoder_nodes` writes it.

    None for anything else: a look-alike graph is not decoded as packed indices.
    """
    reshape = _producer(index_value, "Reshape")
    shape_array = _const(reshape.inputs[1]) if reshape is not None else None
    if reshape is None or shape_array is None or shape_array.ndim != 1 or np.any(shape_array < 0):
        return None
    shape = tuple(int(d) for d in shape_array)
    source = reshape.inputs[0]
    slice_node = _producer(source, "Slice")
    if slice_node is not None:
        if not _takes_first(slice_node, math.prod(shape)):
            return None
        source = slice_node.inputs[0].producer().inputs[0]  # type: ignore[union-attr]
    found = _modulo(source)
    if found is None:
        return None
    div, bits = found
    matrix, powers = _layout(bits)
    if not np.array_equal(_const(div.inputs[1]), powers):  # type: ignore[arg-type]
        return None
    matmul = _producer(div.inputs[0], "MatMul")
    if matmul is None or not np.array_equal(_const(matmul.inputs[1]), matrix):  # type: ignore[arg-type]
        return None
    cast = _producer(matmul.inputs[0], "Cast")
    packed = cast.inputs[0] if cast is not None else None
    if (
        cast is None
        or packed is None
        or packed.name is None
        or graph.initializers.get(packed.name) is not packed
    ):
        return None
    tensor = packed.const_value
    if (
        tensor is None
        or tensor.dtype != ir.DataType.UINT8
        or tuple(tensor.shape) != (math.ceil(math.prod(shape) / 8), bits)
    ):
        return None
    return PackedSource(cast=cast, packed=packed, bits=bits, shape=shape)


def _takes_first(slice_node: ir.Node, count: int) -> bool:
    """Whether a Slice keeps elements [0, count) of a flattening Reshape (inputs or attributes)."""
    if _producer(slice_node.inputs[0], "Reshape") is None:
        return False
    if len(slice_node.inputs) == 3:
        return bool(np.array_equal(_const(slice_node.inputs[1]), [0])  # type: ignore[arg-type]
                    and np.array_equal(_const(slice_node.inputs[2]), [count]))  # type: ignore[arg-type]
    attributes = slice_node.attributes
    return (
        len(slice_node.inputs) == 1
        and list(attributes.get_ints("starts", [])) == [0]
        and list(attributes.get_ints("ends", [])) == [count]
        and list(attributes.get_ints("axes", [0])) == [0]
    )


def _modulo(value: ir.Value | None) -> tuple[ir.Node, int] | None:
    """(the Div by 2^s, b) of `Div(w, 2^s) mod 2^b` as `_decoder_nodes` writes it, else None."""
    mod = _producer(value, "Mod")
    if mod is not None:
        div, modulus = _producer(mod.inputs[0], "Div"), _const(mod.inputs[1])
    else:  # below opset 11: Sub(Div(w, 2^s), Mul(Div(w, 2^(s+b)), 2^b))
        sub = _producer(value, "Sub")
        mul = _producer(sub.inputs[1], "Mul") if sub is not None else None
        above = _producer(mul.inputs[0], "Div") if mul is not None else None
        div = _producer(sub.inputs[0], "Div") if sub is not None else None
        modulus = _const(mul.inputs[1]) if mul is not None else None
        if above is None or div is None or above.inputs[0] is not div.inputs[0]:
            return None
        shift, shift_out = _const(div.inputs[1]), _const(above.inputs[1])
        if modulus is None or shift is None or shift_out is None or modulus.size != 1:
            return None
        if not np.array_equal(shift_out, shift * int(modulus.reshape(-1)[0])):
            return None
    if div is None or modulus is None or modulus.size != 1:
        return None
    if int(modulus.reshape(-1)[0]) not in {1 << b for b in range(1, 9)}:
        return None
    return div, int(modulus.reshape(-1)[0]).bit_length() - 1


def is_decoder_matmul(node: ir.Node) -> bool:
    """Whether `node` is a packed decoder's MatMul (its int32 constant is no weight to compress)."""
    if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
        return False
    matrix = _const(node.inputs[1])
    if (
        matrix is None
        or matrix.dtype != np.int32
        or matrix.ndim != 2
        or not 1 <= matrix.shape[0] <= 8
    ):
        return False
    return _producer(node.inputs[0], "Cast") is not None and np.array_equal(
        matrix, _layout(matrix.shape[0])[0]
    )


def _users(graph: ir.Graph, value: ir.Value) -> int:
    return sum(1 for _ in value.uses()) + int(value.is_graph_output())


def packs_indices(model: ir.Model) -> bool:
    """Whether the packed decoder can be written into `model` (its opset has integer MatMul)."""
    return model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0)) >= MIN_PACK_OPSET


def pack_codebook_indices(model: ir.Model, names: set[str] | None = None) -> bool:
    """Rewrite every uint8 codebook layer with bits < 8 (or those in `names`) into the packed form.

    Returns whether anything changed. Models below opset 9 are left alone, and so are layers
    too small for packing to pay for its decoder (`packing_pays`). A layer whose index tensor
    is shared with another reader keeps it (only its own Cast is replaced).
    """
    from onnxcompress.formats.codebook import codebook_layers  # it reads this module's layout

    if not packs_indices(model):
        return False
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
    graph = model.graph
    changed = False
    for layer in codebook_layers(model):
        if layer.index_dtype != "uint8" or (names is not None and layer.name not in names):
            continue
        if not packing_pays(layer.name, math.prod(layer.shape), layer.bits):
            continue
        indices = layer.indices()
        if indices.size and int(indices.max()) >= 1 << layer.bits:
            continue
        _replace_indices(graph, layer, pack_indices(indices, layer.bits), opset)
        changed = True
    return changed


def _replace_indices(
    graph: ir.Graph, layer: CodebookLayer, packed: np.ndarray, opset: int
) -> None:
    """Put the decoder of `packed` where `layer.cast` was.

    The packed bytes take the old index initializer's name when nothing else reads it.
    """
    old, old_out = layer.cast.inputs[0], layer.cast.outputs[0]
    assert old is not None and old.name is not None
    sole = _users(graph, old_out) == 1 and _users(graph, old) == 1
    name = old.name if sole else f"{layer.name}.codebook_indices_packed"
    if sole:
        graph.initializers.pop(old.name)
        old.const_value = None  # detach first: onnx_ir renames a value's tensor with it
        old.name = None
    nodes = _decoder_nodes(
        graph, layer.name, _initializer(graph, name, packed), layer.bits, layer.shape, opset
    )
    graph.insert_before(layer.gather, nodes)
    layer.gather.replace_input_with(1, nodes[-1].outputs[0])
    if sole:
        graph.remove(layer.cast, safe=True)


# --- float16 storage -------------------------------------------------------------------------


def decode_initializer(
    graph: ir.Graph, weight: ir.Value, nodes: list[ir.Node], decoded: ir.Value
) -> None:
    """Replace initializer `weight` by `nodes` computing `decoded` from constants.

    The nodes go at the graph's start; `decoded` takes the weight's name, so every consumer
    reads the same value as before.
    """
    name = weight.name
    graph.initializers.pop(name)  # type: ignore[arg-type]
    ir.convenience.replace_all_uses_with(weight, decoded)
    weight.const_value = None
    weight.name = None
    decoded.name = name
    first = next(iter(graph), None)
    graph.extend(nodes) if first is None else graph.insert_before(first, nodes)


def store_fp16(
    model: ir.Model, *, min_params: int = 64, exclude: set[str] | None = None
) -> list[str]:
    """Store each float32 constant (>= `min_params` values) as a float16 initializer + Cast.

    Initializers of the main graph, and tensors held in Constant nodes or subgraphs, which are
    first moved to the main graph (`formats.hoist`). Lossy by float16 rounding (relative error
    <= 2^-11 for |w| >= 6.1e-5; smaller values lose precision, below 6e-8 they become 0). Left
    alone: codebooks (tiny), graph inputs or outputs, tensors with NaN/inf or beyond +-65504,
    and names in `exclude`. Returns the names converted (as found); the Cast output keeps each
    weight's name (the hoisted one's: `hoist_constant`), so consumers are unchanged.
    """
    from onnxcompress.formats.codebook import codebook_layers  # it reads this module's layout

    graph = model.graph
    skip = set(exclude or ()) | {layer.codebook_name for layer in codebook_layers(model)}
    done = []
    for value in float_constants(model):
        name, tensor = value.name or "", value.const_value
        if name in skip or tensor is None or value.is_graph_output() or value.is_graph_input():
            continue
        if math.prod(tensor.shape.numpy()) < max(min_params, 1):
            continue
        array = np.asarray(tensor.numpy())
        if not np.all(np.isfinite(array)) or float(np.abs(array).max()) > FP16_MAX:
            continue
        value = hoist_constant(graph, value)
        half = _initializer(graph, f"{value.name}.fp16", array.astype(np.float16))
        cast = ir.node(
            "Cast",
            [half],
            attributes={"to": ir.DataType.FLOAT},
            name=unique_name(graph, f"{value.name}.fp16_cast"),
        )
        decoded = cast.outputs[0]
        decoded.type, decoded.shape = ir.TensorType(ir.DataType.FLOAT), ir.Shape(array.shape)
        decode_initializer(graph, value, [cast], decoded)
        done.append(name)
    return done


def float_constants(model: ir.Model) -> list[ir.Value]:
    """Every float32 initializer (main graph first) and float32 Constant node output, any graph."""
    found = [v for v in model.graph.initializers.values()]
    found += [v for g in model.graph.subgraphs() for v in g.initializers.values()]
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            attribute = node.attributes.get("value")
            if attribute is not None and attribute.type == ir.AttributeType.TENSOR:
                if node.outputs[0].const_value is None:
                    node.outputs[0].const_value = attribute.as_tensor()
                found.append(node.outputs[0])
    return [v for v in found if v.const_value is not None
            and v.const_value.dtype == ir.DataType.FLOAT]
