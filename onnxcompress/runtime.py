"""onnxruntime sessions with the onnxcompress kernel library registered when it is built.

Every session the tool opens (gates, fidelity, benchmarks) comes from here, so custom ops
written by the sparse passes always find their kernels.
"""

from __future__ import annotations

__all__ = ["session", "kernel_library_path", "session_options"]

import os
from collections.abc import Sequence
from pathlib import Path

import onnx
import onnx_ir as ir
import onnxruntime as ort

_LIBRARY_NAMES = ("libonnxcompress_kernels.so", "onnxcompress_kernels.dll", "libonnxcompress_kernels.dylib")


def kernel_library_path() -> Path | None:
    """The compiled custom-op library shipped in the package, or None when not built."""
    override = os.environ.get("ONNXCOMPRESS_KERNEL_LIBRARY")
    if override:
        return Path(override)
    folder = Path(__file__).parent / "_kernels"
    for name in _LIBRARY_NAMES:
        if (folder / name).is_file():
            return folder / name
    return None


def session_options(threads: int | None = None) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads is not None:
        options.intra_op_num_threads = threads
    library = kernel_library_path()
    if library is not None:
        options.register_custom_ops_library(str(library))
    return options


def session(
    model: str | os.PathLike[str] | ir.Model | onnx.ModelProto | bytes,
    providers: Sequence[str] | None = None,
    *,
    threads: int | None = None,
) -> ort.InferenceSession:
    """An InferenceSession on a path, an ir.Model, a ModelProto or serialized bytes."""
    if isinstance(model, ir.Model):
        model = ir.to_proto(model)
    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    if isinstance(model, os.PathLike):
        model = os.fspath(model)
    return ort.InferenceSession(
        model,
        sess_options=session_options(threads),
        providers=list(providers) if providers else ["CPUExecutionProvider"],
    )
