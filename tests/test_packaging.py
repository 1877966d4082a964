"""The wheel installs passes/ as onnxcompress.passes and never as a top-level `passes` module."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_maps_passes_into_the_package(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        env={**__import__("os").environ, "ONNXCOMPRESS_SKIP_KERNELS": "1"},
    )
    (wheel,) = tmp_path.glob("onnxcompress-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {
        f"onnxcompress/passes/{path.relative_to(ROOT / 'passes').as_posix()}"
        for path in (ROOT / "passes").rglob("*.py")
    }
    assert expected <= names, sorted(expected - names)
    assert not any(name.startswith("passes/") for name in names)
    assert "onnxcompress/recipes/default.yaml" in names


def test_checkout_symlink_points_at_passes():
    link = ROOT / "onnxcompress" / "passes"
    assert link.is_symlink() and link.resolve() == (ROOT / "passes").resolve()
