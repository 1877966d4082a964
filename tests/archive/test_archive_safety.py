"""Crafted archives (issue 14): nothing read outside the archive, nothing allocated unchecked.

Each archive here is resealed with a correct digest, so only the checks inside `unpack`
stand between it and the disk.
"""

from __future__ import annotations

import hashlib
import io as stdio
import json
import struct
import tracemalloc
import zlib

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, numpy_helper
from typer.testing import CliRunner

from onnxcompress.archive import MAGIC, pack, unpack, unpack_file
from onnxcompress.archive.entropy import decode_stream, write_varint
from onnxcompress.cli import app
from onnxcompress.errors import ModelLoadError, UnsafeExternalDataError
from onnxcompress.pass_base import get_pass
from tests.builders import mlp_proto

runner = CliRunner()


def _clustered(rng: np.random.Generator) -> ir.Model:
    model = ir.from_proto(mlp_proto(rng, (96, 64, 40, 10)))
    get_pass("prune.magnitude")(sparsity=0.8)(model)
    get_pass("codebook.kmeans")()(model)
    return model


def _open(data: bytes) -> tuple[dict, bytes]:
    manifest_len = struct.unpack_from("<I", data, 12)[0]
    return json.loads(zlib.decompress(data[56 : 56 + manifest_len])), data[56 + manifest_len :]


def _seal(manifest: dict | bytes, body: bytes) -> bytes:
    raw = (
        manifest if isinstance(manifest, bytes) else zlib.compress(json.dumps(manifest).encode(), 9)
    )
    prefix = struct.pack("<8sHHIQ", MAGIC, 1, 0, len(raw), len(body))
    return prefix + hashlib.sha256(prefix + raw + body).digest() + raw + body


def _with_graph(data: bytes, edit) -> bytes:  # type: ignore[no-untyped-def]
    """The archive with its graph blob edited (and the layout references moved to match)."""
    manifest, body = _open(data)
    start, length = manifest["graph"]
    proto = onnx.ModelProto.FromString(zlib.decompress(body[start : start + length]))
    edit(proto)
    return _relayout(manifest, body, zlib.compress(proto.SerializeToString(), 9))


def _relayout(manifest: dict, body: bytes, graph: bytes) -> bytes:
    """Rebuild the body as graph + every layer blob, so the body stays fully covered."""
    out = bytearray(graph)
    manifest["graph"] = [0, len(graph)]
    for entry in manifest["layers"]:
        for holder, key in ((entry["codebook"], "blob"), (entry, "values"), (entry, "diffs")):
            ref = holder.get(key)
            if ref:
                blob = body[ref[0] : ref[0] + ref[1]]
                holder[key] = [len(out), len(blob)]
                out += blob
    return _seal(manifest, bytes(out))


def _layer_stream(n: int, counts: list[int], words: list[int] = (), coder: int = 2) -> bytes:  # type: ignore[assignment]
    out = stdio.BytesIO()
    out.write(bytes([coder]))  # 1 huffman, 2 ans
    write_varint(out, n)
    write_varint(out, len(counts))
    for count in counts:
        write_varint(out, count)
    write_varint(out, len(words))
    out.write(np.asarray(words, dtype="<u4").tobytes())
    return out.getvalue()


def _one_layer(
    shape: list[int], stream: bytes, mode: str = "dense", diffs: bytes | None = None
) -> bytes:
    """An archive of one weight-shared layer (a 2-entry codebook) declaring `shape`."""
    graph = onnx.helper.make_graph(
        [], "g", [], [onnx.helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])]
    )
    graph_blob = zlib.compress(onnx.helper.make_model(graph).SerializeToString())
    codebook = np.array([0.0, 1.0], dtype=np.float32).tobytes()
    body = graph_blob + codebook + stream + (diffs or b"")
    manifest = {
        "format": "onnxcompress.archive",
        "version": 1,
        "coder": "ans",
        "graph": [0, len(graph_blob)],
        "layers": [
            {
                "weight": "w",
                "bits": 1,
                "zero_entry": True,
                "indices": {"name": "w.idx", "position": 0, "dtype": "uint8", "shape": shape},
                "codebook": {
                    "name": "w.cb",
                    "position": 1,
                    "dtype": "float32",
                    "size": 2,
                    "blob": [len(graph_blob), len(codebook)],
                },
                "mode": mode,
                "index_bits": 5,
                "values": [len(graph_blob) + len(codebook), len(stream)],
                "diffs": [len(graph_blob) + len(codebook) + len(stream), len(diffs)]
                if diffs
                else None,
            }
        ],
    }
    return _seal(manifest, body)


@pytest.fixture
def archive(rng) -> bytes:
    return pack(_clustered(rng)).data


# --- external data: an archive is self-contained -------------------------------------------


@pytest.mark.parametrize("location", ["absolute", "../secret.bin", "secret.bin"])
def test_unpack_never_reads_external_data_named_in_the_graph(
    archive, tmp_path, monkeypatch, location
):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"S" * 40)
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work" if location.startswith("..") else tmp_path)
    location = str(secret) if location == "absolute" else location

    def point_outside(proto: onnx.ModelProto) -> None:
        bias = next(t for t in proto.graph.initializer if t.name == "head.bias")
        bias.ClearField("raw_data")
        del bias.float_data[:]
        for key, value in (("location", location), ("offset", "0"), ("length", "40")):
            bias.external_data.add(key=key, value=value)
        bias.data_location = TensorProto.EXTERNAL

    crafted = tmp_path / "crafted.onnxc"
    crafted.write_bytes(_with_graph(archive, point_outside))
    with pytest.raises(UnsafeExternalDataError, match="external data"):
        unpack_file(crafted, tmp_path / "out.onnx")
    result = runner.invoke(app, ["unpack", str(crafted), "-o", str(tmp_path / "out.onnx")])
    assert result.exit_code == 2 and result.output.startswith("error: ")
    assert not (tmp_path / "out.onnx").exists()


# --- decompression bombs -----------------------------------------------------------------


def test_a_manifest_bomb_is_refused_before_it_is_inflated(archive):
    manifest, body = _open(archive)
    manifest["padding"] = " " * (64 << 20)  # 64 MB of JSON in ~64 KB of zlib
    crafted = _seal(manifest, body)
    assert len(crafted) < 200_000
    tracemalloc.start()
    try:
        with pytest.raises(ModelLoadError, match="manifest"):
            unpack(crafted)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 32 << 20


def test_a_graph_bomb_is_refused_unless_the_ratio_is_raised(archive):
    def zeros(proto: onnx.ModelProto) -> None:
        proto.graph.initializer.append(
            numpy_helper.from_array(np.zeros(2 << 20, np.float32), "pad")
        )

    crafted = _with_graph(archive, zeros)  # 8 MB of zeros in ~8 KB
    assert len(crafted) < 30_000
    with pytest.raises(ModelLoadError, match="--max-ratio"):
        unpack(crafted)
    assert len(unpack(crafted, max_ratio=10_000).graph.initializer) > 0


def test_a_declared_shape_larger_than_the_ratio_allows_is_refused_before_allocating():
    # all-zero indices: no payload
    crafted = _one_layer([1 << 28], _layer_stream(1 << 28, [1 << 28]))
    assert len(crafted) < 3_000
    tracemalloc.start()
    try:
        with pytest.raises(ModelLoadError, match="--max-ratio"):
            unpack(crafted)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 << 20


def test_unpack_cli_takes_max_ratio(archive, tmp_path):
    crafted = tmp_path / "bomb.onnxc"
    crafted.write_bytes(_with_graph(archive, lambda proto: proto.graph.initializer.append(
        numpy_helper.from_array(np.zeros(2 << 20, np.float32), "pad"))))
    result = runner.invoke(app, ["unpack", str(crafted), "-o", str(tmp_path / "a.onnx")])
    assert result.exit_code == 2 and "--max-ratio" in result.output, result.output
    assert not (tmp_path / "a.onnx").exists()
    result = runner.invoke(
        app, ["unpack", str(crafted), "-o", str(tmp_path / "a.onnx"), "--max-ratio", "inf"]
    )
    assert result.exit_code == 0, result.output


# --- crafted stream headers --------------------------------------------------------------


@pytest.mark.parametrize(
    "stream",
    [
        _layer_stream(1 << 40, [1 << 39, 1 << 39], [1, 2, 3]),  # constriction aborted here
        _layer_stream(1 << 33, [1 << 33]),  # 8 GB of equal symbols, no payload
        _layer_stream(3, [(1 << 64) - 1, 4]),  # a count that overflows int64
        bytes([3]) + b"\xff\xff\xff\xff\xff\x3f" + bytes([8]),  # fixed width, 2^41 symbols
        _layer_stream(1000, [500, 500], [0], coder=1),  # 1000 Huffman codewords in 32 bits
    ],
    ids=["ans-2^40", "equal-2^33", "count-overflow", "fixed-2^41", "huffman-too-few-bits"],
)
def test_huge_or_overflowing_stream_headers_are_refused(stream):
    with pytest.raises(ModelLoadError):
        decode_stream(memoryview(stream), max_symbols=1000)
    with pytest.raises(ModelLoadError):
        unpack(_one_layer([10, 100], stream))


def test_sparse_entries_are_bounded_by_the_tensor_size():
    values = _layer_stream(1 << 32, [1 << 32])
    with pytest.raises(ModelLoadError):
        unpack(_one_layer([4, 4], values, mode="sparse", diffs=_layer_stream(1 << 32, [1 << 32])))


def test_a_renamed_or_misplaced_tensor_is_refused(archive):
    manifest, body = _open(archive)
    edits = {
        "renamed": lambda layer: layer["indices"].update(name="renamed"),
        "taken": lambda layer: layer["indices"].update(name="head.bias"),
        "negative": lambda layer: layer["indices"].update(position=-1),
        "codebook renamed": lambda layer: layer["codebook"].update(name="elsewhere"),
    }
    for what, edit in edits.items():
        crafted = json.loads(json.dumps(manifest))
        edit(crafted["layers"][0])
        with pytest.raises(ModelLoadError):
            unpack(_seal(crafted, body))
            pytest.fail(what)


def test_a_manifest_nested_too_deep_is_refused(archive):
    _, body = _open(archive)
    with pytest.raises(ModelLoadError, match="manifest"):
        unpack(_seal(zlib.compress(b"[" * 200_000), body))
