"""Weight sites: which tensor is the learned weight of which op, and its channel axes.

One table (`LAYOUTS`) knows, per op, which input is the weight and which axes hold the
output channels (neurons) and the input channels. Weights may be initializers, outputs of
`Constant` nodes, or live in (or be referenced from) If/Loop/Scan subgraphs; all are found.
A tensor read by several nodes is one site (deduplicated by value). Anything left alone is
recorded with its reason: a graph input (fed at run time), too small, excluded by name.

Some exporters hand a layer its weight through data-movement ops: silero-vad's LSTM reads
Unsqueeze(Concat(Slice(W), Slice(W), Slice(W))), its gates reordered. The constant W is then
a weight whose axes no longer match the layer's layout, so only element-wise passes (codebooks)
can rewrite it; they ask for such sites with `find_weight_sites(..., derived=True)`, and each
records the ops in between (`WeightSite.through`).
"""

from __future__ import annotations

__all__ = [
    "Layout",
    "LAYOUTS",
    "WeightSite",
    "SiteScan",
    "find_weight_sites",
    "weight_params",
    "constant_array",
    "constant_node_array",
    "set_constant",
]

import dataclasses
import fnmatch
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Literal

import numpy as np
import onnx_ir as ir

from onnxcompress.formats.detect import is_codebook_decoded
from onnxcompress.formats.dtypes import FLOAT_DTYPES
from onnxcompress.formats.kernel_ops import DOMAIN as KERNEL_DOMAIN
from onnxcompress.formats.kernel_ops import kernel_layer_name
from onnxcompress.formats.packed import is_decoder_matmul
from onnxcompress.pass_base import Skip

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where the weight is among an op's inputs and which of its axes mean what.

    Axes are negative-or-positive indices into the stored tensor; `None` where the notion
    does not apply.
    """

    input_index: int
    out_axis: int | None
    in_axis: int | None


def _gemm_layout(node: ir.Node) -> Layout:
    trans_b = node.attributes.get_int("transB", 0)
    return Layout(1, out_axis=0 if trans_b else 1, in_axis=1 if trans_b else 0)


def _layouts(node: ir.Node) -> list[Layout]:
    """The weight layouts of one node (empty when the op carries no learned weight)."""
    op = node.op_type
    if node.domain not in ("", "ai.onnx"):
        return []
    if op == "MatMul":
        return [Layout(1, out_axis=-1, in_axis=-2)]
    if op == "Gemm":
        return [_gemm_layout(node)]
    if op == "Conv":
        return [Layout(1, out_axis=0, in_axis=1)]
    if op == "ConvTranspose":
        return [Layout(1, out_axis=1, in_axis=0)]
    if op == "Gather":
        # An embedding table: rows are looked up, so no input-channel axis.
        return (
            [Layout(0, out_axis=1, in_axis=None)] if node.attributes.get_int("axis", 0) == 0 else []
        )
    if op in ("LSTM", "GRU", "RNN"):
        # W: [directions, gates*hidden, input]; R: [directions, gates*hidden, hidden].
        return [Layout(1, out_axis=1, in_axis=2), Layout(2, out_axis=1, in_axis=2)]
    return []


LAYOUTS = ("MatMul", "Gemm", "Conv", "ConvTranspose", "Gather", "LSTM", "GRU", "RNN")

Holder = Literal["initializer", "constant"]


@dataclasses.dataclass
class WeightSite:
    """One learned weight tensor, where it is held and who reads it."""

    name: str
    op_type: str
    node: ir.Node
    input_index: int
    value: ir.Value
    layout: Layout
    holder: Holder
    consumers: list[tuple[ir.Node, int]]
    through: tuple[str, ...] = ()

    @property
    def direct(self) -> bool:
        """Whether the layer reads the tensor itself, so its layout holds.

        False when it reads it through data-movement ops (`through`): only element-wise
        rewrites are valid there.
        """
        return not self.through

    @property
    def readers(self) -> int:
        """Every node input that reads the tensor, plus one if it is a graph output.

        Whatever the op (a tied embedding's Gather too, which `consumers` leaves out): a pass
        that rewrites one reader cannot drop the tensor unless this is 1.
        """
        return len(self.value.uses()) + int(self.value.is_graph_output())

    @property
    def out_axis(self) -> int | None:
        """The weight's output-channel axis, for per-channel passes (None: the op has none)."""
        return self.layout.out_axis

    @property
    def in_axis(self) -> int | None:
        """The weight's input-feature axis, for N:M patterns and low-rank (None: none)."""
        return self.layout.in_axis

    @property
    def tensor(self) -> ir.TensorProtocol:
        """The constant tensor itself; every site has one."""
        tensor = self.value.const_value
        if tensor is None:  # pragma: no cover - find_weight_sites guarantees it
            raise RuntimeError(f"{self.name} has no constant value")
        return tensor

    @property
    def shape(self) -> tuple[int, ...]:
        """The weight's shape as ints (a constant's dimensions are never symbolic)."""
        return tuple(self.tensor.shape.numpy())

    @property
    def size(self) -> int:
        """Element count, in int64 so huge embeddings do not overflow."""
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def dtype(self) -> ir.DataType:
        """The stored element type (passes refuse those they cannot handle)."""
        return self.tensor.dtype

    def array(self) -> np.ndarray:
        """The weight as numpy; may be a read-only memory map, never edit it in place."""
        return self.tensor.numpy()

    def replace(self, array: np.ndarray) -> None:
        """Swap in a new tensor of the same shape and dtype (never mutates the old one)."""
        if tuple(array.shape) != self.shape:
            raise ValueError(f"{self.name}: new shape {array.shape} != {self.shape}")
        new = ir.tensor(np.ascontiguousarray(array), name=self.name)
        if new.dtype != self.dtype:
            raise ValueError(f"{self.name}: new dtype {new.dtype} != {self.dtype}")
        _swap(self.value, new, array.shape)


# ---- constants: every weight is read from and swapped into a graph here ---------------------


def constant_node_array(node: ir.Node) -> np.ndarray | None:
    """The value of a Constant node.

    Whichever attribute holds it (a tensor, value_float(s), value_int(s)); None for the forms no
    weight takes (sparse_value, strings).
    """
    for key, attribute in node.attributes.items():
        if key == "value" and attribute.type == ir.AttributeType.TENSOR:
            return np.array(attribute.as_tensor().numpy())
        if key in ("value_float", "value_floats"):
            return np.array(
                attribute.value if key == "value_float" else list(attribute.value), dtype=np.float32
            )
        if key in ("value_int", "value_ints"):
            return np.array(
                attribute.value if key == "value_int" else list(attribute.value), dtype=np.int64
            )
    return None


def constant_array(value: ir.Value | None) -> np.ndarray | None:
    """The tensor behind an initializer (not one fed as a graph input) or a Constant node's `value`.

    Else None (an activation). May be a read-only memory map: never edit it in place.
    """
    if value is None:
        return None
    producer = value.producer()
    if producer is not None:
        if producer.op_type != "Constant" or producer.domain not in ("", "ai.onnx"):
            return None
        attribute = producer.attributes.get("value")
        if attribute is None or attribute.type != ir.AttributeType.TENSOR:
            return None
        return attribute.as_tensor().numpy()
    if value.const_value is not None and not value.is_graph_input():
        return value.const_value.numpy()
    return None


def set_constant(value: ir.Value, array: np.ndarray) -> None:
    """Swap a new tensor (any shape) into an initializer or a Constant node's output.

    The old tensor is never mutated, so snapshots and memory-mapped inputs stay intact.
    """
    _swap(value, ir.tensor(np.ascontiguousarray(array), name=value.name), array.shape)


def _swap(value: ir.Value, tensor: ir.TensorProtocol, shape: tuple[int, ...]) -> None:
    producer = value.producer()
    if producer is not None:
        producer.attributes["value"] = ir.AttrTensor("value", tensor)
    value.const_value = tensor
    value.shape = ir.Shape(shape)
    if value.type is None:  # a Constant's output often has none; with a shape it must have one
        value.type = ir.TensorType(tensor.dtype)


def _constant_tensor(value: ir.Value) -> tuple[ir.TensorProtocol | None, Holder | None]:
    """The tensor behind a value if it is an initializer or a Constant node's output."""
    producer = value.producer()
    if (
        producer is not None
        and producer.op_type == "Constant"
        and producer.domain in ("", "ai.onnx")
    ):
        attr = producer.attributes.get("value")
        if attr is not None and attr.type == ir.AttributeType.TENSOR:
            tensor = attr.as_tensor()
            if value.const_value is None:
                value.const_value = tensor
            return tensor, "constant"
        return None, None
    if producer is None and value.const_value is not None:
        return value.const_value, "initializer"
    return None, None


@dataclasses.dataclass
class SiteScan:
    """The weights found, and those left alone with their reasons."""

    sites: list[WeightSite]
    skipped: list[Skip]

    def by_name(self) -> dict[str, WeightSite]:
        """The found sites by weight name, for passes that look layers up by name."""
        return {site.name: site for site in self.sites}


def find_weight_sites(
    model: ir.Model,
    *,
    min_params: int = 16,
    exclude: Sequence[str] = (),
    include: Sequence[str] = (),
    ops: Iterable[str] | None = None,
    derived: bool = False,
) -> SiteScan:
    """Every learned float weight in the model (all graphs), deduplicated.

    `exclude` / `include` are name globs; `ops` limits the op types considered. `derived`
    adds the constants a layer reads through data-movement ops (`MOVEMENT_OPS`; not `direct`).
    Skips are recorded, not silently dropped: a weight fed as a graph input, a weight
    smaller than `min_params`, a non-float tensor, or a name excluded by a glob.
    """
    wanted = set(ops) if ops is not None else None
    sites: dict[int, WeightSite] = {}
    skipped: dict[str, Skip] = {}

    def skip(name: str, reason: str) -> None:
        if name not in skipped:
            logger.debug("skipping weight %s: %s", name, reason)
            skipped[name] = Skip(name, reason)

    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.domain == KERNEL_DOMAIN:
            skip(
                kernel_layer_name(node),
                f"held by the {node.op_type} kernel: run this pass before sparsify",
            )
            continue
        if wanted is not None and node.op_type not in wanted:
            continue
        if is_decoder_matmul(node):  # unpacks bit-packed codebook indices (formats.packed)
            continue
        _scan_node(node, sites, skip, min_params, exclude, include, derived)
    return SiteScan(sorted(sites.values(), key=lambda s: s.name), list(skipped.values()))


def _scan_node(
    node: ir.Node,
    sites: dict[int, WeightSite],
    skip: Callable[[str, str], None],
    min_params: int,
    exclude: Sequence[str],
    include: Sequence[str],
    derived: bool = False,
) -> None:
    """Add the weights `node` reads to `sites` (a shared one gains a consumer), or skip them."""
    for layout in _layouts(node):
        if layout.input_index >= len(node.inputs):
            continue
        value = node.inputs[layout.input_index]
        if value is None:
            continue
        key = id(value)
        if key in sites:
            sites[key].consumers.append((node, layout.input_index))
            continue
        name = value.name or f"<{node.name}:{layout.input_index}>"
        if value.is_graph_input():
            skip(name, "graph input: the weight is fed at run time")
            continue
        tensor, holder = _constant_tensor(value)
        if tensor is None or holder is None:
            if is_codebook_decoded(value):
                skip(name, CODEBOOK_LAYER)
            elif derived and node.op_type != "Gather":
                for source, through in _moved_constants(value):
                    if id(source) not in sites:
                        _add_site(node, layout, source, through, sites, skip,
                                  (min_params, exclude, include))
            continue  # an activation, not a weight
        if node.op_type == "Gather" and not _reads_embedding(node):
            continue
        _add_site(node, layout, value, (), sites, skip, (min_params, exclude, include))


def _add_site(
    node: ir.Node,
    layout: Layout,
    value: ir.Value,
    through: tuple[str, ...],
    sites: dict[int, WeightSite],
    skip: Callable[[str, str], None],
    rules: tuple[int, Sequence[str], Sequence[str]],
) -> None:
    """Record constant `value` as the weight `node` reads at `layout` (or skip it, with why)."""
    tensor, holder = _constant_tensor(value)
    assert tensor is not None and holder is not None
    name = value.name or f"<{node.name}:{layout.input_index}>"
    reason = _rejection(name, tensor, *rules)
    if reason is not None:
        skip(name, reason)
        return
    sites[id(value)] = WeightSite(
        name=name,
        op_type=node.op_type,
        node=node,
        input_index=layout.input_index,
        value=value,
        layout=layout if not through else Layout(layout.input_index, None, None),
        holder=holder,
        consumers=[(node, layout.input_index)],
        through=through,
    )


#: Ops that move or reshape a tensor's elements without computing new values (input 0 is
#: the data; Concat's every input is).
MOVEMENT_OPS = frozenset(
    {"Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Slice", "Concat",
     "Split"}
)
_MOVEMENT_DEPTH = 16


def _moved_constants(value: ir.Value) -> list[tuple[ir.Value, tuple[str, ...]]]:
    """The constants `value` is made of through `MOVEMENT_OPS` alone, with the ops in between.

    Empty when any element comes from an activation.
    """
    found: dict[int, tuple[ir.Value, tuple[str, ...]]] = {}

    def walk(current: ir.Value, path: tuple[str, ...]) -> bool:
        tensor, _ = _constant_tensor(current)
        if tensor is not None:
            if path and not current.is_graph_input():
                found.setdefault(id(current), (current, path))
                return True
            return False
        producer = current.producer()
        if (
            producer is None
            or producer.op_type not in MOVEMENT_OPS
            or producer.domain not in ("", "ai.onnx")
            or len(path) >= _MOVEMENT_DEPTH
        ):
            return False
        data = producer.inputs if producer.op_type == "Concat" else producer.inputs[:1]
        step = (producer.op_type, *path)
        return all(v is not None and walk(v, step) for v in data)

    return list(found.values()) if walk(value, ()) else []


def _rejection(
    name: str,
    tensor: ir.TensorProtocol,
    min_params: int,
    exclude: Sequence[str],
    include: Sequence[str],
) -> str | None:
    """Why a constant read as a weight is not a weight site (dtype, size, a glob), or None."""
    if tensor.dtype not in FLOAT_DTYPES:
        return f"not a float weight ({tensor.dtype.name})"
    size = int(np.prod(tensor.shape.numpy(), dtype=np.int64))
    if size == 0:
        return "empty (a zero-size dimension)"
    if size < min_params:
        return f"too small ({size} < min_params={min_params})"
    if exclude and any(fnmatch.fnmatchcase(name, pattern) for pattern in exclude):
        return "excluded by name"
    if include and not any(fnmatch.fnmatchcase(name, pattern) for pattern in include):
        return "not matched by include"
    return None


#: The skip reason of a `codebook.*` layer (passes that handle them, e.g. sparse.csr, drop it).
CODEBOOK_LAYER = (
    "weight-shared (codebook) layer: compress the dense model, or fine-tune the codebook"
)


def _reads_embedding(node: ir.Node) -> bool:
    """A Gather is an embedding lookup when its data is 2-D and its indices are integers."""
    data, indices = node.inputs[0], node.inputs[1]
    if data is None or indices is None or data.const_value is None:
        return False
    if len(data.const_value.shape) != 2:
        return False
    return indices.dtype in (ir.DataType.INT64, ir.DataType.INT32, None)


def weight_params(model: ir.Model) -> int:
    """Total parameters held in weight sites (no size floor)."""
    return sum(site.size for site in find_weight_sites(model, min_params=0).sites)
