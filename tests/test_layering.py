"""The core sits below the algorithms: importing it never imports a pass, nor torch.

The core is everything under onnxcompress/ but cli/ (the top), finetune/ (the torch bridge)
and passes/ (the algorithms). Every core module is imported in a fresh interpreter, so that
nothing an earlier test imported can hide an import. One interpreter imports them all (what a
module imports alone is a subset of what all of them import together; one interpreter per
module costs ~1 s each on 2 cores); when something forbidden shows up, each module is then
imported alone to name the culprits.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_OUTSIDE_CORE = ("cli", "finetune", "passes", "_kernels", "recipes")
_FORBIDDEN = ("torch", "onnxcompress.passes")

_PROBE = """
import importlib, json, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
print(json.dumps(sorted(
    m for m in sys.modules if m.split('.')[0] == 'torch' or m.startswith('onnxcompress.passes')
)))
"""


def core_modules() -> list[str]:
    package = ROOT / "onnxcompress"
    names = []
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package).with_suffix("").parts
        if parts[0] in _OUTSIDE_CORE or parts[-1] == "__main__":
            continue
        names.append(".".join(("onnxcompress", *parts)).removesuffix(".__init__"))
    return names


def _forbidden_after_importing(*modules: str) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, *modules],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def test_the_core_is_found():
    modules = core_modules()
    for expected in (
        "onnxcompress.sites",
        "onnxcompress.summary",
        "onnxcompress.formats.codebook",
        "onnxcompress.formats.kernel_ops",
        "onnxcompress.archive.format",
        "onnxcompress.pipeline",
    ):
        assert expected in modules
    assert not any(
        m.startswith(("onnxcompress.cli", "onnxcompress.finetune", "onnxcompress.passes"))
        for m in modules
    )


def test_no_core_module_imports_a_pass_or_torch():
    modules = core_modules()
    if not _forbidden_after_importing(*modules):
        return
    culprits = {m: found[:3] for m in modules if (found := _forbidden_after_importing(m))}
    pytest.fail(f"core modules import passes or torch: {culprits}")


def test_the_probe_sees_a_pass_import():
    """The check can fail: importing a pass module is reported."""
    assert "onnxcompress.passes.storage" in _forbidden_after_importing(
        "onnxcompress.sites", "onnxcompress.passes.storage"
    )
