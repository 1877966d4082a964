"""Kernel tests need the built library: skip without it, FAIL when CI requires it.

CI exports ONNXCOMPRESS_REQUIRE_KERNELS=1 so that a broken build cannot pass as skipped tests.
"""

from __future__ import annotations

import os

import pytest

from onnxcompress import runtime


@pytest.fixture(autouse=True)
def kernel_library() -> None:
    if runtime.available_ops():
        return
    message = (
        "onnxcompress kernel library not built (run `bash kernels/fetch_headers.sh && pip install "
        "-e .`)"
    )
    if os.environ.get("ONNXCOMPRESS_REQUIRE_KERNELS") == "1":
        pytest.fail(f"ONNXCOMPRESS_REQUIRE_KERNELS=1 but {message}")
    pytest.skip(message)
