"""Shared fixtures.

One seeded generator, so every test model is the same on every run; one local Ray cluster per
session for the tests that need it; a sweep cache of the session's own.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture(scope="session", autouse=True)
def _sweep_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Commands cache sweep results by default: tests use a fresh folder, never the user's."""
    before = os.environ.get("ONNXCOMPRESS_CACHE")
    os.environ["ONNXCOMPRESS_CACHE"] = str(tmp_path_factory.mktemp("sweep-cache"))
    yield
    if before is None:
        os.environ.pop("ONNXCOMPRESS_CACHE", None)
    else:
        os.environ["ONNXCOMPRESS_CACHE"] = before


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[Any]:
    """A real local Ray cluster of 2 CPUs in a temporary folder, started once per session.

    Skipped when Ray is not installed (`pip install 'onnxcompress[ray]'`). Its workers import
    this checkout first (PYTHONPATH), as the test process does.
    """
    ray = pytest.importorskip("ray")
    folder = tempfile.mkdtemp(prefix="ray-")  # short: Ray's socket paths must stay < 108 bytes
    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), before) if p)
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=folder, log_to_driver=False,
             configure_logging=False)
    try:
        yield ray
    finally:
        ray.shutdown()
        if before is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = before
        shutil.rmtree(folder, ignore_errors=True)
