"""Safe model I/O on onnx_ir: refuse what is broken or unsafe, write atomically.

Loading never reads weights: external data stays memory-mapped until a pass touches it
(DESIGN.md: ~2 ms for 100 M parameters against ~0.3 s for `onnx.load`). Every external
location is checked first; one that escapes the model's folder (absolute, `..`, a symlink
pointing out) is refused, because a crafted model could otherwise read any file.

Saving goes through `writer`, the one guarded atomic writer: staged beside the destination,
then renamed into place, refusing the input and every external-data file the loaded model
still maps.
"""

from __future__ import annotations

__all__ = [
    "load",
    "save",
    "serialized",
    "write_text_atomic",
    "protected",
    "stage_model",
    "SaveOptions",
    "data_path",
    "in_memory",
    "iter_graphs",
    "drop_initializer_value_info",
    "iter_tensors",
    "ir_version_for",
    "minimum_ir_version",
    "model_bytes",
    "EXTERNAL_DATA_THRESHOLD",
]

import contextlib
import dataclasses
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from onnxcompress import writer
from onnxcompress.errors import ModelLoadError, UnsafeExternalDataError

logger = logging.getLogger(__name__)

#: Above this many bytes of tensors, weights go to an external-data file (protobuf's limit: 2 GiB).
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
SOURCE_KEY = "onnxcompress.source"
READS_KEY = "onnxcompress.reads"  # the external-data files the input model was loaded from


def iter_graphs(graph: ir.Graph | ir.Function) -> Iterator[ir.Graph | ir.Function]:
    """The graph and every subgraph (If/Loop/Scan bodies) nested in it."""
    yield graph
    for node in graph:
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                yield from iter_graphs(attr.as_graph())
            elif attr.type == ir.AttributeType.GRAPHS:
                for subgraph in attr.as_graphs():
                    yield from iter_graphs(subgraph)


def iter_tensors(model: ir.Model) -> Iterator[ir.TensorProtocol]:
    """Every constant tensor: initializers and Constant/attribute tensors, in all graphs."""
    roots: list[ir.Graph | ir.Function] = [model.graph, *model.functions.values()]
    for root in roots:
        for graph in iter_graphs(root):
            if isinstance(graph, ir.Graph):
                for value in graph.initializers.values():
                    if value.const_value is not None:
                        yield value.const_value
            for node in graph:
                for attr in node.attributes.values():
                    if attr.type == ir.AttributeType.TENSOR:
                        yield attr.as_tensor()
                    elif attr.type == ir.AttributeType.TENSORS:
                        yield from attr.as_tensors()


def _check_external_data(model: ir.Model, folder: Path) -> None:
    """Refuse external locations outside `folder`, missing files and out-of-range extents."""
    root = folder.resolve()
    for tensor in iter_tensors(model):
        if not isinstance(tensor, ir.ExternalTensor):
            continue
        location = str(tensor.location)
        where = f"tensor {tensor.name!r}: external data location {location!r}"
        if os.path.isabs(location) or Path(location).is_absolute():
            raise UnsafeExternalDataError(
                f"{where} is absolute; it must be relative to the model's folder"
            )
        if ".." in Path(location).parts:
            raise UnsafeExternalDataError(f"{where} climbs out of the model's folder ('..')")
        resolved = (root / location).resolve()
        if not resolved.is_relative_to(root):
            raise UnsafeExternalDataError(
                f"{where} resolves outside the model's folder (to {resolved})"
            )
        if not resolved.is_file():
            raise ModelLoadError(f"{where} does not exist next to the model")
        end = (tensor.offset or 0) + (tensor.length or tensor.nbytes)
        if end > resolved.stat().st_size:
            raise ModelLoadError(
                f"{where} is truncated (needs {end} bytes, file has {resolved.stat().st_size})"
            )


def _check_defined(model: ir.Model) -> None:
    """Refuse a node input that nothing defines: such a model cannot run or be copied."""
    for graph in iter_graphs(model.graph):
        for node in graph:
            for value in node.inputs:
                if value is not None and value.producer() is None and value.graph is None:
                    raise ModelLoadError(
                        f"node {node.name or node.op_type!r} reads {value.name!r}, which no input, "
                        "initializer or node defines: the model is invalid"
                    )


def _embed_attribute_tensors(model: ir.Model) -> None:
    """Read external data held by Constant/attribute tensors into memory.

    onnx_ir externalizes and re-homes initializers only: an attribute tensor left pointing at
    the input's data file would break in a temporary folder (the gates) or beside the output.
    """
    roots: list[ir.Graph | ir.Function] = [model.graph, *model.functions.values()]
    for graph in [g for root in roots for g in iter_graphs(root)]:
        for node in graph:
            for key, attr in list(node.attributes.items()):
                if attr.type == ir.AttributeType.TENSOR and isinstance(
                    attr.as_tensor(), ir.ExternalTensor
                ):
                    tensor = attr.as_tensor()
                    node.attributes[key] = ir.AttrTensor(
                        key, ir.tensor(tensor.numpy(), name=tensor.name)
                    )
                elif attr.type == ir.AttributeType.TENSORS and any(
                    isinstance(t, ir.ExternalTensor) for t in attr.as_tensors()
                ):
                    node.attributes[key] = ir.AttrTensors(
                        key, [ir.tensor(t.numpy(), name=t.name) for t in attr.as_tensors()]
                    )


def _check_structure(model: ir.Model, path: Path) -> None:
    """One error naming every structural offender (cycles, bad types, sizes) before a pass runs."""
    from onnxcompress import integrity  # it walks the model with this module's iterators

    problems = integrity.model_problems(model)
    if problems:
        raise ModelLoadError(f"{path}: the model is invalid: {integrity.summarize(problems)}")


def load(path: str | os.PathLike[str]) -> ir.Model:
    """Load an ONNX model lazily; raise one clear `ModelLoadError` for anything unusable."""
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file")
    if not path.is_file():
        raise ModelLoadError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise ModelLoadError(f"{path}: the file is empty")
    serde_log = logging.getLogger("onnx_ir.serde")
    level = serde_log.level
    serde_log.setLevel(logging.ERROR)  # its "invalid model" warning becomes our one error line
    try:
        model = ir.load(path, format="protobuf")
    except Exception as error:  # protobuf raises several unrelated types on garbage
        detail = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ModelLoadError(f"{path}: not an ONNX model ({detail})") from None
    finally:
        serde_log.setLevel(level)
    if len(model.graph.outputs) == 0:
        raise ModelLoadError(f"{path}: not an ONNX model with a graph (no graph outputs)")
    _check_structure(model, path)
    _check_external_data(model, path.parent)
    _embed_attribute_tensors(model)
    try:
        _check_defined(model)
    except ModelLoadError as error:
        raise ModelLoadError(f"{path}: {error}") from None
    model.meta[SOURCE_KEY] = str(path.resolve())
    model.meta[READS_KEY] = tuple(sorted(str(p) for p in _mapped_files(model)))
    return model


def ir_version_for(
    opset: int, *, functions: bool = False, dtypes: Iterable[ir.DataType] = ()
) -> int:
    """The one IR-version rule.

    The lowest IR version that default-domain `opset`, model-local `functions` and tensors of
    `dtypes` allow (every model and layer model we write uses it).

    onnx 1.23 stamps IR 14, which onnxruntime 1.31 rejects; IR 10 covers opset 21.
    """
    versions = [ir_v for _, ir_v, ops, *_ in onnx.helper.VERSION_TABLE if ops >= opset]
    version = min(versions) if versions else onnx.IR_VERSION
    version = max(version, 4)  # IR 3 (opset <= 8) demands every initializer be a graph input
    if functions:
        version = max(version, 8)  # model-local functions
    for dtype in set(dtypes):
        if dtype in (ir.DataType.INT4, ir.DataType.UINT4):
            version = max(version, 10)
        elif "FLOAT8" in dtype.name:
            version = max(version, 9)
    return version


def minimum_ir_version(model: ir.Model) -> int:
    """The lowest IR version the model's opsets and features allow (`ir_version_for`)."""
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))
    dtypes = {tensor.dtype for tensor in iter_tensors(model)}
    return ir_version_for(opset, functions=bool(model.functions), dtypes=dtypes)


def model_bytes(model: ir.Model) -> bytes:
    """The model as one self-contained protobuf at its minimum IR version.

    What a worker process or a cache key needs (the model itself is left as it is).
    """
    proto = ir.to_proto(in_memory(model))
    proto.ir_version = minimum_ir_version(model)
    return proto.SerializeToString()


def _mapped_files(model: ir.Model) -> set[Path]:
    return {
        Path(tensor.path).resolve()
        for tensor in iter_tensors(model)
        if isinstance(tensor, ir.ExternalTensor)
    }


def _tensor_bytes(model: ir.Model) -> int:
    return sum(tensor.nbytes for tensor in iter_tensors(model))


def in_memory(model: ir.Model) -> ir.Model:
    """A copy whose external tensors are read into memory (the model itself keeps its mapping).

    Serializing a model that still points at external files only works from their folder;
    this copy serializes anywhere. Copies, never closes the mapping: views may still be alive.
    """
    if not _mapped_files(model):
        return model
    copy = model.clone()
    copy.meta.update(model.meta)
    roots: list[ir.Graph | ir.Function] = [copy.graph, *copy.functions.values()]
    for graph in [g for root in roots for g in iter_graphs(root)]:
        if isinstance(graph, ir.Graph):
            for value in graph.initializers.values():
                tensor = value.const_value
                if isinstance(tensor, ir.ExternalTensor):
                    value.const_value = ir.tensor(np.array(tensor.numpy()), name=tensor.name)
    return copy


def protected(model: ir.Model) -> dict[Path, str]:
    """The files no write may replace: the input model and every data file it maps."""
    files = {
        Path(p): "a data file the loaded model still reads" for p in model.meta.get(READS_KEY, ())
    }
    files.update((p, "a data file the loaded model still reads") for p in _mapped_files(model))
    source = model.meta.get(SOURCE_KEY)
    if source is not None:
        files[Path(source)] = "the input model"
    return files


def uses_external_data(model: ir.Model, external_data: bool | None) -> bool:
    """`external_data=None` chooses external data only above `EXTERNAL_DATA_THRESHOLD` bytes."""
    return (
        external_data
        if external_data is not None
        else _tensor_bytes(model) > EXTERNAL_DATA_THRESHOLD
    )


def data_path(path: Path) -> Path:
    """Where a model written to `path` keeps its external data."""
    return path.with_name(path.name + ".data")


@dataclasses.dataclass(frozen=True)
class SaveOptions:
    """How a model is written.

    `external_data` True, False, or None (only above `EXTERNAL_DATA_THRESHOLD` bytes). Passed down
    to every writer, never held in a global.
    """

    external_data: bool | None = None


def save(
    model: ir.Model,
    path: str | os.PathLike[str],
    *,
    external_data: bool | None = None,
    protect: Mapping[Path, str] | None = None,
) -> Path:
    """Write `model` atomically through the guarded writer; return the path written.

    `external_data=None` chooses external data only above `EXTERNAL_DATA_THRESHOLD` bytes;
    the data file is `<name>.data` beside the model. `protect` adds files never to replace
    (the model's own input and mapped files always are).
    """
    with writer.batch({**protected(model), **(protect or {})}) as staged:
        written = stage_model(staged, model, Path(path), SaveOptions(external_data))
    return written


def stage_model(staged: writer.Batch, model: ir.Model, path: Path, options: SaveOptions) -> Path:
    """Serialize `model` into a writer batch: the data file (if any) first, then the model."""
    path = path.resolve()
    use_external = uses_external_data(model, options.external_data)
    data = data_path(path)
    model.ir_version = minimum_ir_version(model)
    staged_data = staged.stage(data, "output", unpairs=path) if use_external else None
    staged_model = staged.stage(path, "output")
    if staged_data is None:  # embedded: the file must stand alone
        proto = ir.to_proto(in_memory(model))
        drop_initializer_value_info(proto.graph)
        onnx.save(proto, staged_model)
    else:
        ir.save(model, staged_model, external_data=data.name, size_threshold_bytes=1024)
        # every tensor under the threshold
        if not staged_data.is_file() or not staged_data.stat().st_size:
            staged.drop(data)
    return path


def drop_initializer_value_info(graph: onnx.GraphProto) -> None:
    """Remove the value_info entries that only repeat an initializer's dtype and dims.

    onnx_ir writes one for every typed value, initializers included (~100 bytes each, the
    name twice over); loading gives an initializer its type and shape from the tensor anyway.
    On silero-vad's 2.3 MB (58 initializers once its weights are codebooks) that is 1% of
    the written file. Entries with a doc string or metadata are kept. Subgraphs too.
    """
    held = {tensor.name for tensor in graph.initializer}
    kept = [
        info
        for info in graph.value_info
        if info.name not in held or info.doc_string or len(info.metadata_props)
    ]
    if len(kept) != len(graph.value_info):
        del graph.value_info[:]
        graph.value_info.extend(kept)
    for node in graph.node:
        for attribute in node.attribute:
            for subgraph in [attribute.g] if attribute.HasField("g") else attribute.graphs:
                drop_initializer_value_info(subgraph)


#: Models with more tensor bytes than this are handed to checkers and runtimes as files.
IN_MEMORY_LIMIT = 256 * 1024 * 1024


@contextlib.contextmanager
def serialized(model: ir.Model) -> Iterator[str | bytes]:
    """The model as bytes (small, self-contained) or as a temporary file with external data.

    onnx's checker and onnxruntime accept both. Large or externally held weights go through
    a file, so nothing is copied into one giant protobuf and external data resolves.
    """
    model.ir_version = minimum_ir_version(model)
    if not _mapped_files(model) and _tensor_bytes(model) < IN_MEMORY_LIMIT:
        yield ir.to_proto(model).SerializeToString()
        return
    with tempfile.TemporaryDirectory(prefix="onnxcompress-") as tmp:
        path = os.path.join(tmp, "model.onnx")
        ir.save(model, path, external_data="model.onnx.data", size_threshold_bytes=1024)
        yield path


def write_text_atomic(path: Path, text: str, protect: Mapping[Path, str] | None = None) -> None:
    """Write a text file through the guarded writer: never half a file, never a protected one."""
    writer.write_text(Path(path), text, "output", protect or {})
