"""setup.py's kernel build hook: the install switches and the atomic library install.

These check the build machinery itself, so they run whether or not the library is built.
"""

from __future__ import annotations

import importlib.util
import mmap
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def kernel_library() -> None:
    """Overrides the package conftest's skip: nothing here needs the built library."""


def _setup_module():
    spec = importlib.util.spec_from_file_location("onnxcompress_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # not __main__: defines the hook without calling setup()
    return module


def test_install_replaces_the_file_and_leaves_mapped_copies_intact(tmp_path):
    """A process that mapped the old library keeps reading it; later loads see the new one."""
    install_atomically = _setup_module().install_atomically
    target = tmp_path / "_kernels" / "libonnxcompress_kernels.so"
    target.parent.mkdir()
    target.write_bytes(b"old library " * 1000)
    new = tmp_path / "built.so"
    new.write_bytes(b"new build " * 500)
    with target.open("rb") as handle, mmap.mmap(handle.fileno(), 0, prot=mmap.PROT_READ) as mapped:
        old_inode = os.stat(target).st_ino
        install_atomically(new, target)
        # not truncated under the mapping
        assert mapped[:12] == b"old library " and len(mapped) == 12000
    assert target.read_bytes() == new.read_bytes()
    assert os.stat(target).st_ino != old_inode
    # no temporary left behind
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]


def _build_py(tmp_path, **env: str) -> subprocess.CompletedProcess[str]:
    """`setup.py build_py` with no cmake on PATH (the kernel build must fail), into tmp_path."""
    empty = tmp_path / "no-tools"
    empty.mkdir(exist_ok=True)
    return subprocess.run(
        [sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path / "lib")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={
            **os.environ,
            "PATH": str(empty),
            "ONNXCOMPRESS_SKIP_KERNELS": "",
            "ONNXCOMPRESS_REQUIRE_KERNELS": "",
            **env,
        },
    )


def test_failed_build_warns_and_installs_the_python_package(tmp_path):
    done = _build_py(tmp_path)
    assert done.returncode == 0, done.stderr
    assert "onnxcompress kernels not built" in done.stderr
    assert (tmp_path / "lib" / "onnxcompress" / "runtime.py").is_file()


def test_require_kernels_makes_a_failed_build_fatal(tmp_path):
    done = _build_py(tmp_path, ONNXCOMPRESS_REQUIRE_KERNELS="1")
    assert done.returncode != 0
    assert "kernel library build failed" in done.stderr


def test_skip_kernels_does_not_try_to_build(tmp_path):
    done = _build_py(tmp_path, ONNXCOMPRESS_SKIP_KERNELS="1", ONNXCOMPRESS_REQUIRE_KERNELS="1")
    assert done.returncode == 0, done.stderr
    assert "kernels" not in done.stderr
    assert not (tmp_path / "lib" / "onnxcompress" / "_kernels").exists()
