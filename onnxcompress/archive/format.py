"""The `.onnxc` archive: one file holding a weight-shared model in Deep Compression storage.

Han, Mao & Dally (ICLR 2016) store a pruned, quantised network as relative sparse indices,
codebook indices and codebooks, then Huffman-code the indices. `pack` does that for every
`codebook.kmeans` layer of a model and keeps the rest of the model (graph, other tensors) as
a zlib-compressed ModelProto; `unpack` rebuilds the ModelProto with every tensor bit-identical.

Byte layout (little-endian), version 1:

    offset  size  field
    0       8     magic  b"\\x89ONNXC\\r\\n"   (non-ASCII first byte, CRLF: catches text mangling)
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
corrupt, truncated or foreign file never yields a model.
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
]

import dataclasses
import hashlib
import json
import logging
import os
import struct
import zlib
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from onnxcompress.archive.entropy import CODERS, decode_stream, empirical_bits, encode_stream
from onnxcompress.archive.relative import decode_relative, encode_relative, entry_count
from onnxcompress.errors import ModelLoadError, UserError

logger = logging.getLogger(__name__)

MAGIC = b"\x89ONNXC\r\n"
VERSION = 1
_HEADER = struct.Struct("<8sHHIQ32s")
_PREFIX = 24  # bytes of the header covered by the digest
_FLOATS = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "float64": TensorProto.DOUBLE}
_MAX_DECOMPRESSED = 1 << 31  # protobuf's own limit for one ModelProto


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
        return self.value_bytes + self.diff_bytes + self.codebook_bytes


@dataclasses.dataclass(frozen=True)
class PackResult:
    data: bytes
    layers: list[PackedLayer]
    graph_bytes: int
    other_tensor_bytes: int
    other_params: int


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
    coder: str = "huffman",
    index_bits: int | Literal["auto"] | None = None,
) -> PackResult:
    """Archive bytes for `model`; every `codebook.kmeans` layer goes into coded streams.

    `index_bits` sets the relative-index width of every layer (default: 8 conv, 5 others);
    "auto" codes each layer with every width from 2 to 10 bits and keeps the smallest.
    """
    from onnxcompress.passes.codebook.graph import codebook_layers

    if coder not in CODERS:
        raise UserError(f"unknown coder {coder!r}; choose one of {', '.join(CODERS)}")
    if index_bits not in (None, "auto") and not (isinstance(index_bits, int) and 1 <= index_bits <= 16):
        raise UserError(f"index_bits must be in 1..16 or 'auto', got {index_bits!r}")
    layers = codebook_layers(model)
    proto = _to_proto(model)
    initializers = list(proto.graph.initializer)
    position = {tensor.name: i for i, tensor in enumerate(initializers)}
    body = bytearray()

    def blob(data: bytes) -> list[int]:
        start = len(body)
        body.extend(data)
        return [start, len(data)]

    entries, packed, removed = [], [], set()
    for layer in layers:
        op = _consumer_op(model, layer.name)
        indices = layer.indices().reshape(-1)
        codebook = layer.codebook()
        if index_bits == "auto":
            options = [(*_encode_layer(indices, width, coder), width) for width in range(2, 11)]
            value_stream, diff_stream, sparse, entry_total, bits = min(
                options, key=lambda option: len(option[0]) + len(option[1])
            )
        else:
            bits = index_bits if index_bits is not None else default_index_bits(op)
            value_stream, diff_stream, sparse, entry_total = _encode_layer(indices, bits, coder)
        codebook_raw = codebook.astype(codebook.dtype.newbyteorder("<")).tobytes()
        entries.append({
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
        })
        removed |= {layer.index_name, layer.codebook_name}
        packed.append(PackedLayer(
            weight=layer.name, op=op, params=int(indices.size),
            nonzero=int(np.count_nonzero(codebook[indices])), bits=layer.bits, k=int(codebook.size),
            codebook_bytes=len(codebook_raw), mode="sparse" if sparse else "dense", index_bits=bits,
            entries=entry_total,
            value_bytes=len(value_stream), diff_bytes=len(diff_stream),
            fixed_entries=entry_count(indices, bits) if layer.zero_entry else int(indices.size),
            codebook_bits=8 * codebook.dtype.itemsize,
        ))
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
    data = _seal(zlib.compress(json.dumps(manifest, separators=(",", ":")).encode(), 9), bytes(body))
    return PackResult(data, packed, len(graph), other_bytes, other_params)


def _encode_layer(indices: np.ndarray, bits: int, coder: str) -> tuple[bytes, bytes, bool, int]:
    """(value stream, diff stream, sparse?, entries) in whichever mode codes smaller.

    The ideal entropies of the two modes are close for random sparsity, and a Huffman code
    cannot go below 1 bit per symbol, so real sizes decide: the sparse mode is coded first
    (when at least 1 index in 8 is zero) and the dense one only if it could still be smaller
    than the sparse one (its size is at least the empirical entropy, and 1 bit per index for
    Huffman).
    """
    if np.count_nonzero(indices) > 7 * indices.size // 8:
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
        raise ModelLoadError(f"archive format version {version} is not supported (this build reads {VERSION})")
    if flags != 0:
        raise ModelLoadError(f"archive header has unknown flags {flags:#x}")
    expected = _HEADER.size + manifest_len + body_len
    if len(data) != expected:
        state = "truncated" if len(data) < expected else "followed by extra bytes"
        raise ModelLoadError(f"archive is {state} ({len(data)} bytes, header says {expected})")
    view = memoryview(data)
    manifest_raw = view[_HEADER.size : _HEADER.size + manifest_len]
    body = view[_HEADER.size + manifest_len :]
    if hashlib.sha256(view[:_PREFIX].tobytes() + manifest_raw.tobytes() + body.tobytes()).digest() != digest:
        raise ModelLoadError("archive is corrupt (SHA-256 mismatch)")
    try:
        manifest = json.loads(zlib.decompress(manifest_raw))
    except (zlib.error, ValueError) as error:
        raise ModelLoadError(f"archive manifest is unreadable: {error}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "onnxcompress.archive":
        raise ModelLoadError("archive manifest is not an onnxcompress manifest")
    return manifest, body


def _slice(body: memoryview, ref: Any, what: str) -> memoryview:
    if (
        not isinstance(ref, list) or len(ref) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in ref)
        or ref[0] + ref[1] > len(body)
    ):
        raise ModelLoadError(f"archive manifest has a bad reference for {what}: {ref!r}")
    return body[ref[0] : ref[0] + ref[1]]


def _field(entry: Any, key: str, kind: type | tuple[type, ...], what: str) -> Any:
    value = entry.get(key) if isinstance(entry, dict) else None
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise ModelLoadError(f"archive manifest: {what}.{key} is missing or of the wrong type")
    return value


def _decode_layer(entry: dict[str, Any], body: memoryview) -> tuple[TensorProto, int, TensorProto, int]:
    weight = _field(entry, "weight", str, "layer")
    indices_meta = _field(entry, "indices", dict, weight)
    codebook_meta = _field(entry, "codebook", dict, weight)
    shape = _field(indices_meta, "shape", list, f"{weight}.indices")
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise ModelLoadError(f"archive manifest: {weight} has a bad shape {shape!r}")
    size = int(np.prod(shape, dtype=np.int64))
    dtype_name = _field(codebook_meta, "dtype", str, f"{weight}.codebook")
    if dtype_name not in _FLOATS:
        raise ModelLoadError(f"archive manifest: {weight} codebook dtype {dtype_name!r} is not supported")
    k = _field(codebook_meta, "size", int, f"{weight}.codebook")
    raw = _slice(body, codebook_meta.get("blob"), f"{weight}.codebook")
    dtype = np.dtype(dtype_name).newbyteorder("<")
    if not 1 <= k <= 256 or len(raw) != k * dtype.itemsize:
        raise ModelLoadError(f"archive: {weight} codebook has {len(raw)} bytes for {k} entries")
    codebook = np.frombuffer(raw, dtype=dtype).astype(dtype.newbyteorder("="))
    mode = _field(entry, "mode", str, weight)
    bits = _field(entry, "index_bits", int, weight)
    values, _, _ = decode_stream(_slice(body, entry.get("values"), f"{weight}.values"))
    if values.size and int(values.max()) >= k:
        raise ModelLoadError(f"archive: {weight} refers to codebook entry {int(values.max())} of {k}")
    if mode == "dense":
        if values.size != size:
            raise ModelLoadError(f"archive: {weight} decodes to {values.size} indices, shape needs {size}")
        flat = values.astype(np.uint8)
    elif mode == "sparse":
        if not 1 <= bits <= 16:
            raise ModelLoadError(f"archive: {weight} has index_bits {bits}")
        diffs, _, _ = decode_stream(_slice(body, entry.get("diffs"), f"{weight}.diffs"))
        flat = decode_relative(diffs, values, size, bits)
    else:
        raise ModelLoadError(f"archive: {weight} has unknown mode {mode!r}")
    index_dtype = _field(indices_meta, "dtype", str, f"{weight}.indices")
    index_name = _field(indices_meta, "name", str, f"{weight}.indices")
    if index_dtype == "uint4":
        if k > 16:
            raise ModelLoadError(f"archive: {weight} stores {k} entries in uint4")
        padded = np.concatenate([flat, np.zeros(flat.size % 2, np.uint8)])
        nibbles = (padded[0::2] | (padded[1::2] << 4)).astype(np.uint8)  # ONNX: low nibble first
        index_tensor = helper.make_tensor(index_name, TensorProto.UINT4, shape, nibbles.tobytes(), raw=True)
    elif index_dtype == "uint8":
        index_tensor = numpy_helper.from_array(flat.reshape(shape), index_name)
    elif index_dtype == "packed":  # onnxcompress.formats.packed: groups of 8 indices in `bits` bytes
        from onnxcompress.formats.packed import pack_indices

        width = _field(entry, "bits", int, weight)
        if not 1 <= width <= 8 or (flat.size and int(flat.max()) >= 1 << width):
            raise ModelLoadError(f"archive: {weight} indices do not fit the packed width {width}")
        index_tensor = numpy_helper.from_array(pack_indices(flat, width), index_name)
    else:
        raise ModelLoadError(f"archive: {weight} has unknown index dtype {index_dtype!r}")
    codebook_tensor = numpy_helper.from_array(codebook, _field(codebook_meta, "name", str, f"{weight}.codebook"))
    return (
        index_tensor, _field(indices_meta, "position", int, f"{weight}.indices"),
        codebook_tensor, _field(codebook_meta, "position", int, f"{weight}.codebook"),
    )


def _check_body_covered(manifest: dict[str, Any], layers: list[Any], body_size: int) -> None:
    """The streams the manifest names must tile the body: no byte unaccounted for."""
    refs = [manifest["graph"]]
    for entry in layers:
        refs += [entry["codebook"]["blob"], entry["values"]] + ([entry["diffs"]] if entry.get("diffs") else [])
    if sum(length for _, length in refs) != body_size or max(start + length for start, length in refs) != body_size:
        raise ModelLoadError(f"archive body has {body_size} bytes but its manifest accounts for another layout")


def unpack(data: bytes) -> onnx.ModelProto:
    """The ModelProto an archive holds, every tensor bit-identical to the packed model's."""
    manifest, body = read_archive(data)
    if manifest.get("version") != VERSION:
        raise ModelLoadError(f"archive manifest version {manifest.get('version')!r} is not supported")
    graph_raw = _slice(body, manifest.get("graph"), "graph")
    try:
        decompressor = zlib.decompressobj()
        serialized = decompressor.decompress(graph_raw, _MAX_DECOMPRESSED)
        if decompressor.unconsumed_tail:
            raise ModelLoadError("archive graph is larger than a ModelProto may be")
        proto = onnx.ModelProto.FromString(serialized)
    except (zlib.error, Exception) as error:
        if isinstance(error, ModelLoadError):
            raise
        raise ModelLoadError(f"archive graph is unreadable: {error}") from None
    layers = manifest.get("layers")
    if not isinstance(layers, list):
        raise ModelLoadError("archive manifest has no layer list")
    placed: list[tuple[int, TensorProto]] = []
    for entry in layers:
        index_tensor, index_pos, codebook_tensor, codebook_pos = _decode_layer(entry, body)
        placed += [(index_pos, index_tensor), (codebook_pos, codebook_tensor)]
    _check_body_covered(manifest, layers, len(body))
    tensors = list(proto.graph.initializer)
    total = len(tensors) + len(placed)
    positions = sorted(p for p, _ in placed)
    if len(set(positions)) != len(positions) or (positions and positions[-1] >= total):
        raise ModelLoadError("archive manifest places tensors at impossible positions")
    for position, tensor in sorted(placed, key=lambda item: item[0]):
        tensors.insert(position, tensor)
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(tensors)
    return proto


def pack_file(
    model_path: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    coder: str = "huffman",
    index_bits: int | Literal["auto"] | None = None,
) -> PackResult:
    """Load (safely), pack and write atomically."""
    from onnxcompress import io

    result = pack(io.load(model_path), coder=coder, index_bits=index_bits)
    _write_atomic(Path(output), result.data, Path(model_path))
    return result


def unpack_file(
    archive: str | os.PathLike[str], output: str | os.PathLike[str], *, external_data: bool | None = None
) -> Path:
    """Read, verify and unpack an archive into an ONNX model written atomically."""
    from onnxcompress import io

    path = Path(archive)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ModelLoadError(f"{path}: cannot read archive: {error.strerror}") from None
    try:
        proto = unpack(data)
    except ModelLoadError as error:
        raise ModelLoadError(f"{path}: {error}") from None
    return io.save(ir.from_proto(proto), output, external_data=external_data)


def _write_atomic(path: Path, data: bytes, source: Path) -> None:
    path = path.resolve()
    if path == source.resolve():
        raise UserError(f"{path}: refusing to overwrite the input model; choose another output")
    if not path.parent.is_dir():
        raise UserError(f"{path.parent}: output folder does not exist")
    if path.is_dir():
        raise UserError(f"{path}: is a folder; give a file name for the archive")
    staged = path.with_name(f".{path.name}.partial")
    try:
        staged.write_bytes(data)
        os.replace(staged, path)
    finally:
        staged.unlink(missing_ok=True)
    logger.info("wrote %s (%d bytes)", path, len(data))
