"""onnxruntime sessions with the onnxcompress kernel library registered when it is built.

Every session the tool opens (gates, fidelity, benchmarks) comes from here, so custom ops
written by the sparse passes always find their kernels.

The library (`kernels/`, built by the package install into `onnxcompress/_kernels/`) adds the
domain `ai.onnxcompress` (`SparseMatMul`, and whatever `available_ops()` lists). Models written
with `--portable` also carry each op as a model-local ONNX function, so they run in a stock
onnxruntime without the library; models written with `--no-portable` need it, and opening
one without the library raises `MissingDependencyError` naming what is missing.

Set `ONNXCOMPRESS_KERNEL_LIBRARY` to use a library built elsewhere.
"""

from __future__ import annotations

__all__ = [
    "DOMAIN",
    "session",
    "kernel_library_path",
    "session_options",
    "available_ops",
    "missing_kernel_ops",
]

import ctypes
import functools
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import onnx
import onnx_ir as ir
import onnxruntime as ort

from onnxcompress.errors import MissingDependencyError, UnsupportedModelError
from onnxcompress.formats.kernel_ops import DOMAIN

logger = logging.getLogger(__name__)

_LIBRARY_NAMES = (
    "libonnxcompress_kernels.so",
    "onnxcompress_kernels.dll",
    "libonnxcompress_kernels.dylib",
)
_CUDA_LIBRARY_NAMES = ("libonnxcompress_kernels_cuda.so",)
CUDA_PROVIDER = "CUDAExecutionProvider"
_BUILD_HINT = (
    "build it with `bash kernels/fetch_headers.sh && pip install -e .` (needs cmake and a C++17 "
    "compiler), or point ONNXCOMPRESS_KERNEL_LIBRARY at a built libonnxcompress_kernels.so"
)

ModelLike = str | os.PathLike[str] | ir.Model | onnx.ModelProto | bytes


def kernel_library_path(*, cuda: bool = False) -> Path | None:
    """The compiled custom-op library shipped in the package, or None when not built.

    `cuda=True` asks for the CUDA build (CPU and CUDAExecutionProvider kernels in one library,
    `ONNXCOMPRESS_CUDA_KERNEL_LIBRARY` overrides it); None when it was not built.
    """
    override = os.environ.get(
        "ONNXCOMPRESS_CUDA_KERNEL_LIBRARY" if cuda else "ONNXCOMPRESS_KERNEL_LIBRARY"
    )
    if override:
        return Path(override)
    folder = Path(__file__).parent / "_kernels"
    for name in _CUDA_LIBRARY_NAMES if cuda else _LIBRARY_NAMES:
        if (folder / name).is_file():
            return folder / name if _cpu_runs_kernels() else None
    return None


@functools.cache
def _cpu_runs_kernels() -> bool:
    """Whether this CPU runs the shipped library, built for x86-64-v3.

    On a CPU without AVX2 and FMA it would die of an illegal instruction, so it is left
    unregistered (portable models still run, at dense speed).
    """
    try:
        flags = next(
            (
                line.split(":", 1)[1].split()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("flags")
            ),
            None,
        )
    except OSError:
        return True  # not Linux: trust the build
    if flags is None or ("avx2" in flags and "fma" in flags):
        return True
    logger.warning("this CPU lacks AVX2/FMA: the onnxcompress kernel library is not used")
    return False


@functools.cache
def _ops_of(library: str) -> tuple[str, ...]:
    handle = ctypes.CDLL(library)
    names = handle.OnnxCompressKernelOps
    names.restype = ctypes.c_char_p
    return tuple(op for op in names().decode().split(",") if op)


def available_ops(*, cuda: bool = False) -> list[str]:
    """The custom ops (domain `ai.onnxcompress`) the built library provides; [] when not built.

    With `cuda=True`, those of the CUDA build, whose CUDAExecutionProvider kernels are listed
    as `cuda:<op>`.
    """
    library = kernel_library_path(cuda=cuda)
    if library is None or not library.is_file():
        return []
    try:
        return list(_ops_of(str(library)))
    except (OSError, AttributeError) as error:
        logger.warning("cannot read the op list of %s: %s", library, error)
        return []


def session_options(
    threads: int | None = None, *, cuda: bool = False, kernels: bool = True
) -> ort.SessionOptions:
    """Session options with the kernel library registered when it is built (and `kernels`).

    `cuda=True` registers the CUDA build instead when it exists (it holds the CPU kernels too).
    """
    options = ort.SessionOptions()
    options.log_severity_level = 4  # errors reach us as exceptions: one line, ours
    if threads is not None:
        options.intra_op_num_threads = threads
    if not kernels:
        return options
    library = (kernel_library_path(cuda=True) if cuda else None) or kernel_library_path()
    if library is not None:
        if not library.is_file():
            raise MissingDependencyError(
                f"ONNXCOMPRESS_KERNEL_LIBRARY points at {library}, which does not exist"
            )
        options.register_custom_ops_library(str(library))
    return options


def missing_kernel_ops(model: ir.Model | onnx.ModelProto) -> list[str]:
    """Custom ops of our domain the model calls without a model-local function to fall back on."""
    proto = ir.to_proto(model) if isinstance(model, ir.Model) else model
    local = {(f.domain, f.name) for f in proto.functions}
    used: set[str] = set()

    def visit(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            if node.domain == DOMAIN and (node.domain, node.op_type) not in local:
                used.add(node.op_type)
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.GRAPH:
                    visit(attribute.g)
                for sub in attribute.graphs:
                    visit(sub)

    visit(proto.graph)
    for function in proto.functions:
        for node in function.node:
            if node.domain == DOMAIN and (node.domain, node.op_type) not in local:
                used.add(node.op_type)
    return sorted(used)


def _check_kernels(model: ir.Model | onnx.ModelProto) -> None:
    needed = missing_kernel_ops(model)
    if not needed:
        return
    have = set(available_ops())
    absent = [op for op in needed if op not in have]
    if absent:
        raise MissingDependencyError(
            f"the model calls {', '.join(f'{DOMAIN}.{op}' for op in absent)} without a portable "
            f"fallback and the kernel library does not provide it; {_BUILD_HINT} "
            "(or rewrite the model with `onnxcompress sparsify --portable`)"
        )


#: Every error onnxruntime raises (they share no base class but Exception).
ORT_ERRORS: tuple[type[Exception], ...] = tuple(
    cls for cls in vars(ort.capi.onnxruntime_pybind11_state).values()
    if isinstance(cls, type) and issubclass(cls, Exception)
)


def _imports_domain(model: str | bytes | onnx.ModelProto) -> bool:
    if isinstance(model, str):
        model = onnx.load(model, load_external_data=False)
    elif isinstance(model, bytes):
        model = onnx.load_from_string(model)
    return any(opset.domain == DOMAIN for opset in model.opset_import)


def _provider_name(provider: object) -> str:
    # (name, options) pairs too
    return provider[0] if isinstance(provider, tuple) else str(provider)


def session(
    model: ModelLike,
    providers: Sequence[str | tuple[str, dict[str, object]]] | None = None,
    *,
    threads: int | None = None,
    kernels: Literal["built", "used"] = "built",
) -> ort.InferenceSession:
    """An InferenceSession on a path, an ir.Model, a ModelProto or serialized bytes.

    The kernel library is registered when built (its CUDA build when `providers` name
    CUDAExecutionProvider and it exists); with `kernels="used"`, only for a model that imports
    our domain (registering costs time: worth saving where hundreds of sessions are opened, as
    the sensitivity sweep does). A model that needs it (custom ops of `ai.onnxcompress` with
    no model-local fallback function) raises `MissingDependencyError` when the library is
    absent, instead of onnxruntime's opaque schema error.
    """
    if isinstance(model, ir.Model):
        from onnxcompress.io import in_memory  # external data resolves from the model's folder only

        model = ir.to_proto(in_memory(model))
    if isinstance(model, os.PathLike):
        model = os.fspath(model)
    cuda = bool(providers) and any(_provider_name(p) == CUDA_PROVIDER for p in providers or ())
    library_built = bool(available_ops()) or (cuda and bool(available_ops(cuda=True)))
    if not library_built:
        if isinstance(model, onnx.ModelProto):
            _check_kernels(model)
        elif isinstance(model, str):
            _check_kernels(onnx.load(model, load_external_data=False))
        else:
            _check_kernels(onnx.load_from_string(model))
    what = model if isinstance(model, str) else "the model"
    register = kernels == "built" or _imports_domain(model)
    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    try:
        return ort.InferenceSession(
            model,
            sess_options=session_options(threads, cuda=cuda, kernels=register),
            providers=list(providers) if providers else ["CPUExecutionProvider"],
        )
    except ORT_ERRORS as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UnsupportedModelError(f"onnxruntime cannot load {what}: {first}") from None
