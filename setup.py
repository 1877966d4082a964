"""Package layout: `passes/` is installed as `onnxcompress.passes`, never as top-level `passes`.

The symlink onnxcompress/passes -> ../passes serves a bare checkout (pytest, mypy, IDEs);
find_packages does not follow it, so the mapping below is the only way passes get in.

`build_py` also builds the custom-op library (`kernels/`, CMake) and puts
`libonnxcompress_kernels.so` into `onnxcompress/_kernels/`: in the wheel, and in the source
tree for editable installs. Headers come from ORT_INCLUDE_DIR or `bash kernels/fetch_headers.sh`
(run it first; this hook never downloads). Without headers, CMake or a compiler the pure Python
package still installs, with a warning; ONNXCOMPRESS_REQUIRE_KERNELS=1 makes that an error.
Set ONNXCOMPRESS_SKIP_KERNELS=1 to skip the native build (it wins over REQUIRE). The library is
installed by renaming a finished copy over the old one, never by rewriting it in place. The
CUDA build (`libonnxcompress_kernels_cuda.so`: CPU + CUDAExecutionProvider kernels) is added
when nvcc is found and onnxruntime-gpu is installed or ONNXCOMPRESS_CUDA=1; it never blocks the
install.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.bdist_wheel import bdist_wheel
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
LIBRARY = "libonnxcompress_kernels.so"
CUDA_LIBRARY = "libonnxcompress_kernels_cuda.so"

packages = [
    name
    for name in find_packages(include=["onnxcompress", "onnxcompress.*"])
    if not name.startswith("onnxcompress.passes")
]
packages += ["onnxcompress.passes"] + [
    f"onnxcompress.passes.{name}" for name in find_packages("passes")
]


def _ort_include_dir() -> Path | None:
    candidates = [
        os.environ.get("ORT_INCLUDE_DIR", ""),
        str(ROOT / "build/apt/root/usr/include/onnxruntime"),
    ]
    for candidate in candidates:
        if candidate and (Path(candidate) / "onnxruntime_c_api.h").is_file():
            return Path(candidate)
    return None


def _build_kernels(cuda: bool = False) -> Path:
    """Configure and build kernels/ with CMake; return the built library."""
    include = _ort_include_dir()
    if include is None:
        raise RuntimeError(
            "onnxruntime headers not found: run `bash kernels/fetch_headers.sh` or set "
            "ORT_INCLUDE_DIR"
        )
    if shutil.which("cmake") is None:
        raise RuntimeError("cmake not found")
    build = ROOT / "build" / ("kernels-cuda" if cuda else "kernels")
    configure = [
        "cmake",
        "-S",
        str(ROOT / "kernels"),
        "-B",
        str(build),
        f"-DORT_INCLUDE_DIR={include}",
        "-DCMAKE_BUILD_TYPE=Release",
    ]
    if cuda:
        configure += ["-DONNXCOMPRESS_CUDA=ON", f"-DCMAKE_CUDA_COMPILER={shutil.which('nvcc')}"]
    subprocess.run(configure, check=True, stdout=subprocess.DEVNULL)
    target = ["--target", "onnxcompress_kernels_cuda"] if cuda else []
    subprocess.run(
        ["cmake", "--build", str(build), "-j", str(min(os.cpu_count() or 1, 4)), *target],
        check=True,
    )
    library = build / "cuda" / CUDA_LIBRARY if cuda else build / LIBRARY
    if not library.is_file():
        raise RuntimeError(f"{library} was not produced")
    return library


def _want_cuda() -> bool:
    if shutil.which("nvcc") is None or os.environ.get("ONNXCOMPRESS_CUDA") == "0":
        return False
    if os.environ.get("ONNXCOMPRESS_CUDA") == "1":
        return True
    try:
        from importlib.metadata import PackageNotFoundError, version

        version("onnxruntime-gpu")
        return True
    except PackageNotFoundError:
        return False


class BuildPyWithKernels(build_py):
    """build_py that also builds the kernel library into onnxcompress/_kernels/."""

    def run(self) -> None:
        """Build the Python package, then the kernel library (see the module docstring)."""
        super().run()
        if os.environ.get("ONNXCOMPRESS_SKIP_KERNELS") == "1":
            return
        try:
            if not (ROOT / "kernels" / "CMakeLists.txt").is_file():
                raise RuntimeError("kernels/CMakeLists.txt is missing from this source tree")
            library = _build_kernels()
        except (RuntimeError, OSError, subprocess.CalledProcessError) as error:
            if os.environ.get("ONNXCOMPRESS_REQUIRE_KERNELS") == "1":
                raise RuntimeError(f"kernel library build failed: {error}") from error
            print(
                f"warning: onnxcompress kernels not built ({error}); installing the pure Python "
                "package",
                file=sys.stderr,
            )
            return
        built = [library]
        if _want_cuda():
            try:
                built.append(_build_kernels(cuda=True))
            except (RuntimeError, OSError, subprocess.CalledProcessError) as error:
                print(f"warning: onnxcompress CUDA kernels not built ({error})", file=sys.stderr)
        # editable / compat installs read the source tree
        targets = [ROOT / "onnxcompress" / "_kernels"]
        if not getattr(self, "editable_mode", False):
            targets.append(Path(self.build_lib) / "onnxcompress" / "_kernels")
        for folder in targets:
            for path in built:
                install_atomically(path, folder / path.name)


class PlatformWheel(bdist_wheel):
    """The wheel carries a native library (no Python extension): tag it py3-none-<platform>."""

    def finalize_options(self) -> None:
        """A wheel with the native library is not pure, whatever setuptools infers."""
        super().finalize_options()
        self.root_is_pure = os.environ.get("ONNXCOMPRESS_SKIP_KERNELS") == "1"

    def get_tag(self) -> tuple[str, str, str]:
        """py3-none-<platform>: onnxruntime loads the library; no Python ABI is involved."""
        python, abi, platform = super().get_tag()
        return ("py3", "none", platform) if not self.root_is_pure else (python, abi, platform)


def install_atomically(source: Path, target: Path) -> None:
    """Copy to a temporary file beside `target`, then rename it over `target`.

    A running process (a test session, a notebook) may have the old library mapped: writing
    into that file in place would change its code under it and crash it. A rename leaves the
    old inode alive for whoever holds it and gives later loads the new one.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        shutil.copy2(source, temporary)
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)


if __name__ == "__main__":  # the build backend runs this file as __main__; tests import it
    setup(
        packages=packages,
        package_dir={"onnxcompress": "onnxcompress", "onnxcompress.passes": "passes"},
        cmdclass={"build_py": BuildPyWithKernels, "bdist_wheel": PlatformWheel},
    )
