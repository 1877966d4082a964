"""Package layout: `passes/` is installed as `onnxcompress.passes`, never as top-level `passes`.

The symlink onnxcompress/passes -> ../passes serves a bare checkout (pytest, mypy, IDEs);
find_packages does not follow it, so the mapping below is the only way passes get in.
"""

from setuptools import find_packages, setup

packages = [
    name
    for name in find_packages(include=["onnxcompress", "onnxcompress.*"])
    if not name.startswith("onnxcompress.passes")
]
packages += ["onnxcompress.passes"] + [
    f"onnxcompress.passes.{name}" for name in find_packages("passes")
]

setup(
    packages=packages,
    package_dir={"onnxcompress": "onnxcompress", "onnxcompress.passes": "passes"},
)
