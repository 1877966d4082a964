"""One exception hierarchy, so the CLI can map every failure to one line and one exit code.

Exit codes: 2 for bad input or recipe (`UserError`), 3 for a failed fidelity gate
(`FidelityGateError`, nothing written). Anything else is our bug: exit 1 with the traceback.
"""

from __future__ import annotations

__all__ = [
    "OnnxCompressError",
    "UserError",
    "ModelLoadError",
    "UnsafeExternalDataError",
    "QuantizedModelError",
    "UnsupportedModelError",
    "RecipeError",
    "DataError",
    "FidelityGateError",
    "MissingDependencyError",
    "WorkerError",
]


class OnnxCompressError(Exception):
    """Base of every error onnxcompress raises on purpose."""

    exit_code = 1


class UserError(OnnxCompressError):
    """The input, the recipe or the options are wrong: the user can fix it."""

    exit_code = 2


class ModelLoadError(UserError):
    """The file is missing, empty, corrupt or not an ONNX model."""


class UnsafeExternalDataError(UserError):
    """An external-data location points outside the model's folder."""


class QuantizedModelError(UserError):
    """A lossy pass was asked to run on a model that is already quantized."""


class UnsupportedModelError(UserError):
    """The model uses something a pass cannot handle (an op, a shape, a dtype)."""


class RecipeError(UserError):
    """A recipe or pass configuration is invalid."""


class DataError(UserError):
    """Calibration or training data does not fit the model."""


class MissingDependencyError(UserError):
    """An optional part (torch, the kernel library) is needed but not installed."""


class FidelityGateError(OnnxCompressError):
    """A step's output drifted past its fidelity threshold; nothing was written."""

    exit_code = 3


class WorkerError(OnnxCompressError):
    """A worker process of a parallel sweep died on every try (out of memory, a native crash)."""
