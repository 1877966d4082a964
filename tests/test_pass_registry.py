"""The explicit pass list (`pass_base.PASS_MODULES`) names every pass, and only real ones."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys

import pytest

from onnxcompress import pass_base
from onnxcompress.errors import RecipeError
from onnxcompress.pass_base import PASS_MODULES, CompressionPass, get_pass, pass_names


def _registered_in_passes() -> dict[str, str]:
    """name -> module of every pass class defined under onnxcompress.passes (imports them all)."""
    package = importlib.import_module("onnxcompress.passes")
    for module in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        importlib.import_module(module.name)
    return {
        name: cls.__module__
        for name, cls in pass_base._REGISTRY.items()
        if cls.__module__.startswith("onnxcompress.passes.")
    }


def test_every_pass_defined_under_passes_is_listed_with_its_module():
    assert _registered_in_passes() == PASS_MODULES


@pytest.mark.parametrize("name", sorted(PASS_MODULES))
def test_each_listed_pass_resolves_to_a_pass_of_that_name(name: str):
    cls = get_pass(name)
    assert (
        issubclass(cls, CompressionPass)
        and cls.name == name
        and cls.__module__ == PASS_MODULES[name]
    )


def test_unknown_names_are_refused_with_the_list():
    with pytest.raises(
        RecipeError, match="unknown pass 'prune.nope'; available: .*prune.magnitude"
    ):
        get_pass("prune.nope")


def test_listing_the_passes_imports_none_of_them():
    code = (
        "import sys; from onnxcompress.pass_base import pass_names; names = pass_names(); "
        "assert 'sparse.csr' in names, names; "
        "print(sorted(m for m in sys.modules if m.startswith('onnxcompress.passes')))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout.strip() == "[]"


def test_looking_one_up_imports_only_its_module():
    code = (
        "import sys; from onnxcompress.pass_base import get_pass; get_pass('cast.fp16'); "
        "print(sorted(m for m in sys.modules if m.startswith('onnxcompress.passes.prune')))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout.strip() == "[]"
    assert "cast.fp16" in pass_names()
