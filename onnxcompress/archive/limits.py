"""How much an archive may inflate to: the guard against decompression bombs.

zlib inflates up to ~1030× and a run of equal symbols costs no payload at all, so a few KB
can declare gigabytes. `unpack` therefore adds up what the manifest declares (every layer's
index tensor and codebook, from its shape) and inflates the graph with a hard stop, and
refuses the archive before allocating once the total passes

    max(max_ratio × archive bytes, FLOOR_BYTES).

Why 200×: the restored model holds 1-byte (or 4-bit) codebook indices, not float32, so a
restored/archive ratio of 200 is a float32/archive ratio of ~800. Deep Compression reports
35–49× (AlexNet 35×, VGG-16 49×, LeNet 39–40×), and even 99% pruning with 2-bit sharing
stays near 100× over the indices; the bombs of issue 14 inflate 900–50,000×. The floor lets
tiny archives (tests, toy models) restore whatever their ratio.
"""

from __future__ import annotations

__all__ = ["DEFAULT_MAX_RATIO", "FLOOR_BYTES", "MAX_MANIFEST_BYTES", "output_budget", "too_large"]

import math

from onnxcompress.errors import ModelLoadError

DEFAULT_MAX_RATIO = 200.0
FLOOR_BYTES = 1 << 20
#: A manifest entry is ~400 bytes per layer: 8 MiB is ~20,000 layers.
MAX_MANIFEST_BYTES = 8 << 20


def output_budget(archive_bytes: int, max_ratio: float) -> int:
    """Bytes the restored model may hold (`max_ratio=inf`: no limit)."""
    if math.isinf(max_ratio):
        return 1 << 62
    return max(int(max_ratio * archive_bytes), FLOOR_BYTES)


def too_large(what: str, needed: int | str, archive_bytes: int, max_ratio: float) -> ModelLoadError:
    """The error for output past the budget; it names the option, since a large model is legal."""
    return ModelLoadError(
        f"archive {what} would inflate to {needed} bytes, "
        f"more than {max_ratio:g}× its {archive_bytes} bytes "
        "(a decompression bomb?); pass --max-ratio to allow more if you trust it"
    )
