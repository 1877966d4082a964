r"""The `.onnxc` archive: one file holding a weight-shared model in Deep Compression storage.

Han, Mao & Dally (ICLR 2016) store a pruned, quantised network as relative sparse indices,
codebook indices and codebooks, then Huffman-code the indices. `pack` does that for every
`codebook.kmeans` layer of a model and keeps the rest of the model (graph, other tensors) as
a zlib-compressed ModelProto; `unpack` rebuilds the ModelProto with every tensor bit-identical
(the torch exporter's debug annotations left out unless `keep_annotations`: `annotations`).

Byte layout (little-endian), version 1:

    offset  size  field
    0       8     magic  b"\x89ONNXC\r\n"   (non-ASCII first byte, CRLF: catches text mangling)
    8       2     format version (1)
    10      2     flags (0; anything else is rejected)
    12      4     manifest length M
    16      8     body length B
    24      32    SHA-256 of bytes [0, 24) + manifest + body
    56      M     manifest: zlib-compressed UTF-8 JSON (schema below)
    56+M    B     body: blobs referenced from the manifest by [offset, length] into the body

The file must be exactly 56 + M + B bytes. The manifest:

    {"format": "onnxcompress.archive", "version": 1, "coder": "huffman" | "ans",
     "graph": [offset, length],                # zlib(ModelProto without the layers' tensors)
     "layers": [{"weight": name, "bits": b, "zero_entry": bool,
                 "indices": {"name", "position", "dtype": "uint8"|"uint4", "shape"},
                 "codebook": {"name", "position", "dtype": "float32"|"float16"|"float64",
                              "size": k, "blob": [offset, length]},   # raw little-endian values
                 "mode": "sparse" | "dense", "index_bits": r,
                 "values": [offset, length],            # entropy-coded stream, see entropy.py
                 "diffs": [offset, length] | null}]}    # sparse mode only, see relative.py

`position` is the tensor's place in `graph.initializer`, so unpack restores the order too.
Dense mode codes every index; sparse mode codes (relative index, value) entries of the
non-zero indices, padding included. Each layer takes the mode whose ideal entropy is lower.

Safety: a wrong magic says "not an onnxcompress archive"; a wrong length, digest, version or
flag, an unparsable manifest, a blob outside the body, a stream that does not decode or that
contradicts its counts, or a decoded tensor of the wrong size is a `ModelLoadError`. A
corrupt, truncated or foreign file never yields a model. A crafted one is refused before it
costs memory or reads a file: the graph may name no external data, the manifest inflates to
at most 8 MiB, the declared layer shapes and the inflated graph together stay under
`--max-ratio` × the archive (see `limits`), a stream declares at most as many symbols as its
layer has indices, and restored tensors take free, non-negative positions under names the
graph reads.
"""

from __future__ import annotations

__all__ = [
    "MAGIC",
    "VERSION",
    "PackedLayer",
    "PackResult",
    "pack",
    "unpack",
    "pack_file",
    "unpack_file",
    "read_archive",
    "read_archive_file",
]

import dataclasses
import hashlib
import itertools
import json
import os
import struct
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from onnxcompress.archive.annotations import strip_exporter_annotations
from onnxcompress.archive.entropy import (
    CODERS,
    decode_stream,
    empirical_bits,
    encode_stream,
    estimated_bytes,
)
from onnxcompress.archive.limits import (
    DEFAULT_MAX_RATIO,
    MAX_MANIFEST_BYTES,
    output_budget,
    too_large,
)
from onnxcompress.archive.relative import decode_relative, encode_relative, entry_count
from onnxcompress.errors import ModelLoadError, UnsafeExternalDataError, UserError
from onnxcompress.formats.codebook import CodebookLayer, codebook_layers
from onnxcompress.formats.packed import pack_indices

MAGIC = b"\x89ONNXC\r\n"
VERSION = 1
_HEADER = struct.Struct("<8sHHIQ32s")
_PREFIX = 24  # bytes of the header covered by the digest
_FLOATS = {
    "float32": TensorProto.FLOAT,
    "float16": TensorProto.FLOAT16,
    "float64": TensorProto.DOUBLE,
}
_MAX_DECOMPRESSED = 1 << 31  # protobuf's own limit for one ModelProto
#: How a relative-index width is chosen: a number of bits, or one of these rules.
IndexBits = int | Literal["auto", "paper"]
INDEX_WIDTH_RULES = ("auto", "paper")
#: The widths "auto" tries.
AUTO_WIDTHS = range(2, 11)


@dataclasses.dataclass(frozen=True)
class PackedLayer:
    """What packing one shared-weight layer cost, for the Table-1 report."""

    weight: str
    op: str
    params: int
    nonzero: int
    bits: int
    k: int
    codebook_bytes: int
    mode: str
    index_bits: int
    entries: int
    value_bytes: int
    diff_bytes: int
    fixed_entries: int
    codebook_bits: int

    @property
    def coded_bytes(self) -> int:
        """The layer's share of the archive: its streams and codebook (Table 1's coded column)."""
        return self.value_bytes + self.diff_bytes + self.codebook_bytes


@dataclasses.dataclass(frozen=True)
class PackResult:
    """The archive's bytes and the sizes `compression_table` reports (no second pack needed)."""

    data: bytes
    layers: list[PackedLayer]
    graph_bytes: int
    other_tensor_bytes: int
    other_params: int
    annotations_dropped: int = 0


def default_index_bits(op_type: str) -> int:
    """The paper's relative-index widths: 8 bits for conv layers, 5 for the rest."""
    return 8 if op_type in ("Conv", "ConvTranspose") else 5


def _consumer_op(model: ir.Model, weight: str) -> str:
    for node in model.graph:
        if any(v is not None and v.name == weight for v in node.inputs):
            return node.op_type
    return ""


def _to_proto(model: ir.Model) -> onnx.ModelProto:
    """The model as a self-contained ModelProto (external data read into memory)."""
    from onnxcompress.io import in_memory

    proto = ir.to_proto(in_memory(model))
    for tensor in proto.graph.initializer:
        if tensor.data_location == TensorProto.EXTERNAL:  # only a model not loaded by io.load
            raise UserError(
                f"{tensor.name}: weights held as external data; load the model with "
                "onnxcompress.io.load first"
            )
    return proto


def pack(
    model: ir.Model,
    *,
    coder: str = "ans",
    index_bits: IndexBits = "auto",
    keep_annotations: bool = False,
) -> PackResult:
    """Archive bytes for `model`; every `codebook.kmeans` layer goes into coded streams.

    `index_bits` sets the relative-index width: "auto" (default) takes for each sparse layer
    the width of 2 to 10 bits whose streams are estimated smallest, "paper" Han et al.'s widths
    (8 conv, 5 others), a number takes that width for every layer. The default coder is rANS,
    within a fraction of a percent of the entropy where Huffman spends up to a bit a symbol:
    together they store the LeNet-300-100 soft weight-sharing model 11% smaller (57.6x -> 65.1x).
    The torch exporter's debug annotations are left out unless `keep_annotations`
    (`annotations`): the restored model has every tensor and node, without them.
    """
    if coder not in CODERS:
        raise UserError(f"unknown coder {coder!r}; choose one of {', '.join(CODERS)}")
    if index_bits not in INDEX_WIDTH_RULES and not (
        isinstance(index_bits, int) and not isinstance(index_bits, bool)
        and 1 <= index_bits <= 16
    ):
        raise UserError(f"index_bits must be in 1..16, 'auto' or 'paper', got {index_bits!r}")
    layers = codebook_layers(model)
    proto = _to_proto(model)
    dropped = 0 if keep_annotations else strip_exporter_annotations(proto)
    initializers = list(proto.graph.initializer)
    position = {tensor.name: i for i, tensor in enumerate(initializers)}
    body = bytearray()

    def blob(data: bytes) -> list[int]:
        start = len(body)
        body.extend(data)
        return [start, len(data)]

    entries, packed, removed = [], [], set()
    for layer in layers:
        entry, sizes = _pack_layer(model, layer, coder, index_bits, position, blob)
        entries.append(entry)
        removed |= {layer.index_name, layer.codebook_name}
        packed.append(sizes)
    kept = [t for t in initializers if t.name not in removed]
    other_bytes = sum(numpy_helper.to_array(t).nbytes for t in kept)
    other_params = sum(int(np.prod(t.dims, dtype=np.int64)) for t in kept)
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)
    graph = zlib.compress(proto.SerializeToString(), 9)
    manifest = {
        "format": "onnxcompress.archive",
        "version": VERSION,
        "coder": coder,
        "graph": blob(graph),
        "layers": entries,
    }
    data = _seal(
        zlib.compress(json.dumps(manifest, separators=(",", ":")).encode(), 9), bytes(body)
    )
    return PackResult(data, packed, len(graph), other_bytes, other_params, dropped)


def _pack_layer(
    model: ir.Model,
    layer: CodebookLayer,
    coder: str,
    index_bits: IndexBits,
    position: dict[str, int],
    blob: Callable[[bytes], list[int]],
) -> tuple[dict[str, Any], PackedLayer]:
    """One layer's manifest entry and sizes; `blob` appends its streams to the body in order."""
    op = _consumer_op(model, layer.name)
    indices = layer.indices().reshape(-1)
    codebook = layer.codebook()
    value_stream, diff_stream, sparse, entry_total, bits = _layer_streams(
        indices, op, coder, index_bits
    )
    codebook_raw = codebook.astype(codebook.dtype.newbyteorder("<")).tobytes()
    entry = {
        "weight": layer.name,
        "bits": layer.bits,
        "zero_entry": layer.zero_entry,
        "indices": {"name": layer.index_name, "position": position[layer.index_name],
                    "dtype": layer.index_dtype, "shape": list(layer.shape)},
        "codebook": {"name": layer.codebook_name, "position": position[layer.codebook_name],
                     "dtype": codebook.dtype.name, "size": int(codebook.size),
                     "blob": blob(codebook_raw)},
        "mode": "sparse" if sparse else "dense",
        "index_bits": bits,
        "values": blob(value_stream),
        "diffs": blob(diff_stream) if sparse else None,
    }
    sizes = PackedLayer(
        weight=layer.name, op=op, params=int(indices.size),
        nonzero=int(np.count_nonzero(codebook[indices])), bits=layer.bits, k=int(codebook.size),
        codebook_bytes=len(codebook_raw), mode="sparse" if sparse else "dense", index_bits=bits,
        entries=entry_total,
        value_bytes=len(value_stream), diff_bytes=len(diff_stream),
        fixed_entries=entry_count(indices, bits) if layer.zero_entry else int(indices.size),
        codebook_bits=8 * codebook.dtype.itemsize,
    )
    return entry, sizes


def _layer_streams(
    indices: np.ndarray, op: str, coder: str, index_bits: IndexBits
) -> tuple[bytes, bytes, bool, int, int]:
    """`_encode_layer`'s result and the width used.

    "auto" takes the one of 2..10 bits whose two streams `estimated_bytes` finds smallest
    (coding them all costs ~10x the pack time). A layer too dense for relative indices is
    coded once (under "auto" at the paper's width, which its dense stream does not use).
    """
    if index_bits == "auto" and not _too_dense_for_gaps(indices):
        bits = min(AUTO_WIDTHS, key=lambda width: _sparse_estimate(indices, width, coder))
    elif index_bits in INDEX_WIDTH_RULES:
        bits = default_index_bits(op)
    else:
        bits = int(index_bits)
    return (*_encode_layer(indices, bits, coder), bits)


def _sparse_estimate(indices: np.ndarray, bits: int, coder: str) -> float:
    diffs, values = encode_relative(indices, bits)
    return estimated_bytes(diffs, coder) + estimated_bytes(values, coder)


def _too_dense_for_gaps(indices: np.ndarray) -> bool:
    """Fewer than 1 index in 8 is zero: relative indices would cost more than they skip."""
    return bool(np.count_nonzero(indices) > 7 * indices.size // 8)


def _encode_layer(indices: np.ndarray, bits: int, coder: str) -> tuple[bytes, bytes, bool, int]:
    """(value stream, diff stream, sparse?, entries) in whichever mode codes smaller.

    The ideal entropies of the two modes are close for random sparsity, and a Huffman code
    cannot go below 1 bit per symbol, so real sizes decide: the sparse mode is coded first
    (when at least 1 index in 8 is zero) and the dense one only if it could still be smaller
    than the sparse one (its size is at least the empirical entropy, and 1 bit per index for
    Huffman).
    """
    if _too_dense_for_gaps(indices):
        return encode_stream(indices, coder), b"", False, int(indices.size)
    diffs, values = encode_relative(indices, bits)
    value_stream, diff_stream = encode_stream(values, coder), encode_stream(diffs, coder)
    sparse_size = len(value_stream) + len(diff_stream)
    dense_floor = empirical_bits(indices) / 8
    if coder == "huffman":
        dense_floor = max(dense_floor, indices.size / 8)
    if sparse_size <= dense_floor:
        return value_stream, diff_stream, True, int(values.size)
    dense = encode_stream(indices, coder)
    if sparse_size < len(dense):
        return value_stream, diff_stream, True, int(values.size)
    return dense, b"", False, int(indices.size)


def _seal(manifest: bytes, body: bytes) -> bytes:
    prefix = _HEADER.pack(MAGIC, VERSION, 0, len(manifest), len(body), b"\0" * 32)[:_PREFIX]
    digest = hashlib.sha256(prefix + manifest + body).digest()
    return prefix + digest + manifest + body


def read_archive(data: bytes) -> tuple[dict[str, Any], memoryview]:
    """(manifest, body) of verified archive bytes; ModelLoadError for anything else."""
    if len(data) < len(MAGIC) or data[: len(MAGIC)] != MAGIC:
        raise ModelLoadError("not an onnxcompress archive (wrong magic bytes)")
    if len(data) < _HEADER.size:
        raise ModelLoadError("archive is truncated (incomplete header)")
    _, version, flags, manifest_len, body_len, digest = _HEADER.unpack_from(data)
    if version != VERSION:
        raise ModelLoadError(
            f"archive format version {version} is not supported (this build reads {VERSION})"
        )
    if flags != 0:
        raise ModelLoadError(f"archive header has unknown flags {flags:#x}")
    expected = _HEADER.size + manifest_len + body_len
    if len(data) != expected:
        state = "truncated" if len(data) < expected else "followed by extra bytes"
        raise ModelLoadError(f"archive is {state} ({len(data)} bytes, header says {expected})")
    view = memoryview(data)
    manifest_raw = view[_HEADER.size : _HEADER.size + manifest_len]
    body = view[_HEADER.size + manifest_len :]
    if (
        hashlib.sha256(view[:_PREFIX].tobytes() + manifest_raw.tobytes() + body.tobytes()).digest()
        != digest
    ):
        raise ModelLoadError("archive is corrupt (SHA-256 mismatch)")
    try:
        manifest = json.loads(_inflate(manifest_raw, MAX_MANIFEST_BYTES, "manifest"))
    except (zlib.error, ValueError, RecursionError) as error:  # RecursionError: JSON too deep
        raise ModelLoadError(f"archive manifest is unreadable: {error}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "onnxcompress.archive":
        raise ModelLoadError("archive manifest is not an onnxcompress manifest")
    return manifest, body


def _inflate(raw: memoryview, limit: int, what: str) -> bytes:
    """zlib-inflate at most `limit` bytes: a bomb stops at the limit, never in memory."""
    decompressor = zlib.decompressobj()
    inflated = decompressor.decompress(raw, limit)
    if decompressor.unconsumed_tail:
        raise ModelLoadError(f"archive {what} inflates past {limit} bytes (a decompression bomb?)")
    if not decompressor.eof:
        raise ModelLoadError(f"archive {what} is truncated (incomplete zlib stream)")
    return inflated


def _check_reference(ref: Any, body_size: int, what: str = "a stream") -> None:
    """A blob reference must be an [offset, length] pair of non-negative ints inside the body."""
    if (
        not isinstance(ref, list) or len(ref) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in ref)
        or ref[0] + ref[1] > body_size
    ):
        raise ModelLoadError(f"archive manifest has a bad reference for {what}: {ref!r}")


def _slice(body: memoryview, ref: Any, what: str) -> memoryview:
    _check_reference(ref, len(body), what)
    return body[ref[0] : ref[0] + ref[1]]


def _field(entry: Any, key: str, kind: type | tuple[type, ...], what: str) -> Any:
    value = entry.get(key) if isinstance(entry, dict) else None
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise ModelLoadError(f"archive manifest: {what}.{key} is missing or of the wrong type")
    return value


@dataclasses.dataclass(frozen=True)
class _LayerHeader:
    """What a manifest entry declares, checked before any stream is decoded."""

    weight: str
    shape: list[int]
    size: int
    k: int
    codebook_dtype: np.dtype
    index_dtype: str

    @property
    def restored_bytes(self) -> int:
        # packed: at most this
        return (self.size + 1) // 2 if self.index_dtype == "uint4" else self.size


def _packed_width(entry: Any, weight: str) -> int:
    width = _field(entry, "bits", int, weight)
    if not 1 <= width <= 8:
        raise ModelLoadError(f"archive: {weight} has packed width {width} (1..8)")
    return width


def _layer_header(entry: Any) -> _LayerHeader:
    weight = _field(entry, "weight", str, "layer")
    indices_meta = _field(entry, "indices", dict, weight)
    codebook_meta = _field(entry, "codebook", dict, weight)
    shape = _field(indices_meta, "shape", list, f"{weight}.indices")
    if not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 62 for d in shape):
        raise ModelLoadError(f"archive manifest: {weight} has a bad shape {shape!r}")
    size = 1
    for dim in shape:  # Python ints: a product past int64 cannot wrap around
        size *= dim
    dtype_name = _field(codebook_meta, "dtype", str, f"{weight}.codebook")
    if dtype_name not in _FLOATS:
        raise ModelLoadError(
            f"archive manifest: {weight} codebook dtype {dtype_name!r} is not supported"
        )
    k = _field(codebook_meta, "size", int, f"{weight}.codebook")
    if not 1 <= k <= 256:
        raise ModelLoadError(f"archive: {weight} codebook declares {k} entries (1..256)")
    index_dtype = _field(indices_meta, "dtype", str, f"{weight}.indices")
    if index_dtype not in ("uint8", "uint4", "packed"):
        raise ModelLoadError(f"archive: {weight} has unknown index dtype {index_dtype!r}")
    if index_dtype == "packed":
        _packed_width(entry, weight)
    if index_dtype == "uint4" and k > 16:
        raise ModelLoadError(f"archive: {weight} stores {k} entries in uint4")
    return _LayerHeader(weight, shape, size, k, np.dtype(dtype_name).newbyteorder("<"), index_dtype)


def _decode_layer(
    entry: dict[str, Any], header: _LayerHeader, body: memoryview
) -> tuple[TensorProto, TensorProto]:
    weight, size, k = header.weight, header.size, header.k
    codebook_meta, indices_meta = entry["codebook"], entry["indices"]
    raw = _slice(body, codebook_meta.get("blob"), f"{weight}.codebook")
    if len(raw) != k * header.codebook_dtype.itemsize:
        raise ModelLoadError(f"archive: {weight} codebook has {len(raw)} bytes for {k} entries")
    codebook = np.frombuffer(raw, dtype=header.codebook_dtype).astype(
        header.codebook_dtype.newbyteorder("=")
    )
    mode = _field(entry, "mode", str, weight)
    bits = _field(entry, "index_bits", int, weight)
    if mode not in ("dense", "sparse"):
        raise ModelLoadError(f"archive: {weight} has unknown mode {mode!r}")
    if mode == "sparse" and not 1 <= bits <= 16:
        raise ModelLoadError(f"archive: {weight} has index_bits {bits}")
    # Each entry, padding included, advances at least one position: never more entries than indices.
    values, _, _ = decode_stream(
        _slice(body, entry.get("values"), f"{weight}.values"), max_symbols=size
    )
    if values.size and int(values.max()) >= k:
        raise ModelLoadError(
            f"archive: {weight} refers to codebook entry {int(values.max())} of {k}"
        )
    if mode == "dense":
        if values.size != size:
            raise ModelLoadError(
                f"archive: {weight} decodes to {values.size} indices, shape needs {size}"
            )
        flat = values.astype(np.uint8)
    else:
        diffs, _, _ = decode_stream(
            _slice(body, entry.get("diffs"), f"{weight}.diffs"), max_symbols=size
        )
        flat = decode_relative(diffs, values, size, bits)
    index_name = _field(indices_meta, "name", str, f"{weight}.indices")
    if header.index_dtype == "uint4":
        padded = np.concatenate([flat, np.zeros(flat.size % 2, np.uint8)])
        nibbles = (padded[0::2] | (padded[1::2] << 4)).astype(np.uint8)  # ONNX: low nibble first
        index_tensor = helper.make_tensor(
            index_name, TensorProto.UINT4, header.shape, nibbles.tobytes(), raw=True
        )
    elif header.index_dtype == "packed":
        # onnxcompress.formats.packed: groups of 8 indices in `bits` bytes
        width = _packed_width(entry, weight)
        if flat.size and int(flat.max()) >= 1 << width:
            raise ModelLoadError(f"archive: {weight} indices do not fit the packed width {width}")
        index_tensor = numpy_helper.from_array(pack_indices(flat, width), index_name)
    else:
        index_tensor = numpy_helper.from_array(flat.reshape(header.shape), index_name)
    codebook_tensor = numpy_helper.from_array(
        codebook, _field(codebook_meta, "name", str, f"{weight}.codebook")
    )
    return index_tensor, codebook_tensor


def _check_body_covered(manifest: dict[str, Any], layers: list[Any], body_size: int) -> None:
    """The streams the manifest names must tile the body: no byte unaccounted for."""
    refs = [manifest["graph"]]
    for entry in layers:
        refs += [entry["codebook"]["blob"], entry["values"]] + (
            [entry["diffs"]] if entry.get("diffs") else []
        )
    for ref in refs:  # each an [offset, length] pair inside the body, as _slice will also insist
        _check_reference(ref, body_size)
    if (
        sum(length for _, length in refs) != body_size
        or max(start + length for start, length in refs) != body_size
    ):
        raise ModelLoadError(
            f"archive body has {body_size} bytes but its manifest accounts for another layout"
        )


def _all_tensors(graph: onnx.GraphProto) -> Iterator[TensorProto]:
    """Every TensorProto a graph holds: initializers, sparse ones, attributes, subgraphs."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from (sparse.values, sparse.indices)
    for node in graph.node:
        yield from _attribute_tensors(node)


def _attribute_tensors(node: onnx.NodeProto) -> Iterator[TensorProto]:
    for attr in node.attribute:
        yield from [attr.t, *attr.tensors, attr.sparse_tensor.values, attr.sparse_tensor.indices]
        for sparse in attr.sparse_tensors:
            yield from (sparse.values, sparse.indices)
        for subgraph in [attr.g, *attr.graphs]:
            yield from _all_tensors(subgraph)


def _refuse_external_data(proto: onnx.ModelProto) -> None:
    """An archive holds every byte of its model: a tensor naming an outside file is forged.

    Restoring it would copy that file (`/etc/...`, `../..`) into the output model.
    """
    tensors = itertools.chain(
        _all_tensors(proto.graph),
        (
            t
            for function in proto.functions
            for node in function.node
            for t in _attribute_tensors(node)
        ),
    )
    for tensor in tensors:
        if tensor.data_location == TensorProto.EXTERNAL or len(tensor.external_data):
            location = next((e.value for e in tensor.external_data if e.key == "location"), "")
            raise UnsafeExternalDataError(
                f"archive graph: tensor {tensor.name!r} names external data {location!r}; "
                "an archive holds all its data and unpack reads no file outside it"
            )


def _inflate_graph(
    body: memoryview, manifest: dict[str, Any], budget: int, limit: Any
) -> onnx.ModelProto:
    graph_raw = _slice(body, manifest.get("graph"), "graph")
    cap = min(budget, _MAX_DECOMPRESSED)
    decompressor = zlib.decompressobj()
    try:
        serialized = decompressor.decompress(graph_raw, cap)
    except zlib.error as error:
        raise ModelLoadError(f"archive graph is unreadable: {error}") from None
    if decompressor.unconsumed_tail:
        if cap == _MAX_DECOMPRESSED:
            raise ModelLoadError("archive graph is larger than a ModelProto may be")
        raise limit("graph", f"more than {budget}")
    try:
        proto = onnx.ModelProto.FromString(serialized)
    except Exception as error:  # protobuf raises several unrelated types on garbage
        raise ModelLoadError(f"archive graph is unreadable: {error}") from None
    _refuse_external_data(proto)
    return proto


def _place(proto: onnx.ModelProto, placed: list[tuple[Any, TensorProto]]) -> None:
    """Insert the restored tensors where they were.

    Each must be a name the graph reads and lacks: anything else is a tampered archive.
    """
    tensors = list(proto.graph.initializer)
    total = len(tensors) + len(placed)
    positions = [p for p, _ in placed]
    if not all(
        isinstance(p, int) and not isinstance(p, bool) and 0 <= p < total for p in positions
    ) or len(set(positions)) != len(positions):
        raise ModelLoadError("archive manifest places tensors at impossible positions")
    taken = {t.name for t in tensors} | {out for node in proto.graph.node for out in node.output}
    read = {name for node in proto.graph.node for name in node.input}
    names = [t.name for _, t in placed]
    for name in names:
        if name in taken or names.count(name) > 1:
            raise ModelLoadError(
                f"archive manifest restores {name!r}, which the graph already defines"
            )
        if name not in read:
            raise ModelLoadError(
                f"archive manifest restores {name!r}, which no node of the graph reads"
            )
    for position, tensor in sorted(placed, key=lambda item: item[0]):
        tensors.insert(position, tensor)
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(tensors)


def unpack(data: bytes, *, max_ratio: float = DEFAULT_MAX_RATIO) -> onnx.ModelProto:
    """The ModelProto an archive holds, every tensor bit-identical to the packed model's.

    Refuses, before allocating, an archive that would inflate past `max_ratio` × its size
    (see `limits`).
    """
    manifest, body = read_archive(data)
    if manifest.get("version") != VERSION:
        raise ModelLoadError(
            f"archive manifest version {manifest.get('version')!r} is not supported"
        )
    layers = manifest.get("layers")
    if not isinstance(layers, list):
        raise ModelLoadError("archive manifest has no layer list")
    headers = [_layer_header(entry) for entry in layers]
    budget = output_budget(len(data), max_ratio)

    def limit(what: str, needed: int | str) -> ModelLoadError:
        return too_large(what, needed, len(data), max_ratio)

    declared = sum(header.restored_bytes for header in headers)
    if declared > budget:
        raise limit("layers", declared)
    proto = _inflate_graph(body, manifest, budget - declared, limit)
    placed: list[tuple[Any, TensorProto]] = []
    for entry, header in zip(layers, headers, strict=True):
        index_tensor, codebook_tensor = _decode_layer(entry, header, body)
        placed += [(entry["indices"].get("position"), index_tensor),
                   (entry["codebook"].get("position"), codebook_tensor)]
    _check_body_covered(manifest, layers, len(body))
    _place(proto, placed)
    return proto


def pack_file(
    model_path: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    coder: str = "ans",
    index_bits: IndexBits = "auto",
    keep_annotations: bool = False,
) -> PackResult:
    """Load (safely), pack and write atomically, never over the input or the data it maps."""
    from onnxcompress import io, writer

    model = io.load(model_path)
    writer.check(Path(output), "archive", io.protected(model))
    result = pack(model, coder=coder, index_bits=index_bits, keep_annotations=keep_annotations)
    writer.write_bytes(Path(output), result.data, "archive", io.protected(model))
    return result


def read_archive_file(
    archive: str | os.PathLike[str], *, max_ratio: float = DEFAULT_MAX_RATIO
) -> onnx.ModelProto:
    """Read, verify and unpack an archive file; errors name the file."""
    path = Path(archive)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ModelLoadError(f"{path}: cannot read archive: {error.strerror}") from None
    try:
        return unpack(data, max_ratio=max_ratio)
    except ModelLoadError as error:
        raise type(error)(f"{path}: {error}") from None


def unpack_file(
    archive: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    external_data: bool | None = None,
    max_ratio: float = DEFAULT_MAX_RATIO,
) -> Path:
    """Read, verify and unpack an archive into an ONNX model written atomically.

    The output is never the archive itself: a failed write must leave the only copy intact.
    """
    from onnxcompress import io, writer

    protect = {Path(archive).resolve(): "the input archive"}
    writer.check(Path(output), "output", protect)
    if external_data:
        writer.check(io.data_path(Path(output).resolve()), "output", protect)
    proto = read_archive_file(archive, max_ratio=max_ratio)
    return io.save(ir.from_proto(proto), output, external_data=external_data, protect=protect)
