"""A seeded, deterministic corpus of broken inputs: models, recipes, .npz data and .onnxc archives.

Case `i` depends only on `(SEED, i)`, never on how many cases are drawn: the CI slice is the
first cases of the long corpus, and any case can be replayed alone by its index. Each case is
one seed file, mutated once (byte flips, truncations, or a field changed to an odd value at
the format's own level), and the command that reads it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import yaml
from onnx import helper, numpy_helper

SEED = 14
KINDS = ("model", "npz", "recipe", "archive")
#: Values that break assumptions: signs, zero, the int32/int64 edges, absurd sizes.
ODD_INTS = (-1, 0, 1, 3, 2**31 - 1, 2**31, 10**9, 10**12, -(2**63), 2**63 - 1)
ODD_VALUES: tuple[Any, ...] = (
    *ODD_INTS,
    1e309,
    -1e309,
    float("nan"),
    0.5,
    "",
    "x" * 300,
    None,
    True,
    [],
    {},
    [[[[[]]]]],
    {"a": {"b": {"c": None}}},
)

Rng = np.random.Generator


@dataclasses.dataclass(frozen=True)
class Case:
    index: int
    kind: str
    mutation: str
    file: str  # the mutated file's name in the work folder
    data: bytes
    args: tuple[str, ...]

    @property
    def id(self) -> str:
        return f"{self.index:05d}-{self.kind}-{self.mutation}-{self.args[0]}"


# ---- byte-level mutations: any format ----

def flip_bytes(rng: Rng, data: bytes) -> bytes:
    out = bytearray(data)
    for position in rng.integers(0, len(out), size=int(rng.integers(1, 9))):
        out[position] ^= int(rng.integers(1, 256))
    return bytes(out)


def truncate(rng: Rng, data: bytes) -> bytes:
    return data[: int(rng.integers(0, len(data)))]


def splice_junk(rng: Rng, data: bytes) -> bytes:
    at = int(rng.integers(0, len(data) + 1))
    return data[:at] + rng.bytes(int(rng.integers(1, 64))) + data[at:]


def zero_window(rng: Rng, data: bytes) -> bytes:
    start = int(rng.integers(0, len(data)))
    end = min(len(data), start + int(rng.integers(1, 256)))
    return data[:start] + bytes(end - start) + data[end:]


BYTE_MUTATIONS: dict[str, Callable[[Rng, bytes], bytes]] = {
    "flip": flip_bytes, "truncate": truncate, "junk": splice_junk, "zeros": zero_window,
}


# ---- ONNX model field mutations ----

def _model(data: bytes) -> onnx.ModelProto:
    model = onnx.ModelProto()
    model.ParseFromString(data)
    return model


def _pick(rng: Rng, items: Any) -> Any:
    items = list(items)
    return items[int(rng.integers(0, len(items)))]


def _odd_int(rng: Rng) -> int:
    return int(_pick(rng, ODD_INTS))


def m_value_dim(rng: Rng, model: onnx.ModelProto) -> None:
    value = _pick(rng, [*model.graph.input, *model.graph.output])
    dims = value.type.tensor_type.shape.dim
    _pick(rng, dims).dim_value = _odd_int(rng)


def m_weight_dims(rng: Rng, model: onnx.ModelProto) -> None:
    tensor = _pick(rng, model.graph.initializer)
    choice = int(rng.integers(0, 3))
    if choice == 0:
        tensor.dims[int(rng.integers(0, len(tensor.dims)))] = _odd_int(rng)
    elif choice == 1:
        tensor.dims.append(int(rng.integers(0, 3)))
    else:
        del tensor.dims[-1]


def m_dtype(rng: Rng, model: onnx.ModelProto) -> None:
    dtype = int(_pick(rng, (0, 1, 2, 3, 6, 7, 8, 9, 10, 11, 14, 16, 17, 21, 22, 23, 25, 40)))
    if rng.random() < 0.5:
        _pick(rng, model.graph.initializer).data_type = dtype
    else:
        _pick(rng, [*model.graph.input, *model.graph.output]).type.tensor_type.elem_type = dtype


def m_raw_data(rng: Rng, model: onnx.ModelProto) -> None:
    tensor = _pick(rng, model.graph.initializer)
    raw = tensor.raw_data
    tensor.raw_data = _pick(rng, (raw[: len(raw) // 2], raw + raw[:7], b"", raw[:-1]))


def m_weight_value(rng: Rng, model: onnx.ModelProto) -> None:
    tensor = _pick(rng, model.graph.initializer)
    values = numpy_helper.to_array(tensor).copy()
    values.flat[int(rng.integers(0, values.size))] = _pick(rng, (np.nan, np.inf, -np.inf, 3e38))
    tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))


def m_attribute(rng: Rng, model: onnx.ModelProto) -> None:
    node = _pick(rng, model.graph.node)
    name = _pick(rng, [a.name for a in node.attribute] or ["transB", "axis", "alpha", "perm"])
    kept = [a for a in node.attribute if a.name != name]
    value = _pick(rng, ("yes", 1.5, -7, [1, 2], [0.5], "", 2**40))
    del node.attribute[:]
    node.attribute.extend([*kept, helper.make_attribute(name, value)])


def m_rewire(rng: Rng, model: onnx.ModelProto) -> None:
    """A node reads another value: a later node's output makes a cycle, an unknown name dangles."""
    names = [o for n in model.graph.node for o in n.output] + ["nowhere", ""]
    node = _pick(rng, model.graph.node)
    node.input[int(rng.integers(0, len(node.input)))] = _pick(rng, names)


def m_output(rng: Rng, model: onnx.ModelProto) -> None:
    names = [o for n in model.graph.node for o in n.output] + ["ghost", "x", "fc0.weight"]
    model.graph.output[0].name = _pick(rng, names)


def m_nodes(rng: Rng, model: onnx.ModelProto) -> None:
    nodes = list(model.graph.node)
    index = int(rng.integers(0, len(nodes)))
    choice = int(rng.integers(0, 4))
    if choice == 0:
        del nodes[index]
    elif choice == 1:
        nodes.insert(int(rng.integers(0, len(nodes))), nodes[index])
    elif choice == 2:
        nodes[index].op_type = _pick(rng, ("Relu", "Conv", "Softmax", "Reshape", "NoSuchOp", ""))
    else:
        nodes.reverse()
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def m_opset(rng: Rng, model: onnx.ModelProto) -> None:
    if rng.random() < 0.7:
        model.opset_import[0].version = int(_pick(rng, (0, 1, 7, 9, 13, 18, 22, 99, -1)))
    else:
        model.ir_version = int(_pick(rng, (0, 1, 3, 4, 7, 11, 99, -1)))


def m_initializers(rng: Rng, model: onnx.ModelProto) -> None:
    tensors = list(model.graph.initializer)
    index = int(rng.integers(0, len(tensors)))
    if rng.random() < 0.5:
        del tensors[index]
    else:
        tensors.append(tensors[index])  # a duplicate name
    del model.graph.initializer[:]
    model.graph.initializer.extend(tensors)


def m_external(rng: Rng, model: onnx.ModelProto) -> None:
    tensor = _pick(rng, model.graph.initializer)
    tensor.data_location = onnx.TensorProto.EXTERNAL
    location = _pick(rng, ("missing.bin", "../outside.bin", "/etc/hostname", "data.npz", ""))
    tensor.ClearField("raw_data")
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(_odd_int(rng))), ("length", "64")):
        if rng.random() < 0.8:
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value


MODEL_MUTATIONS: dict[str, Callable[[Rng, onnx.ModelProto], None]] = {
    "value-dim": m_value_dim,
    "weight-dims": m_weight_dims,
    "dtype": m_dtype,
    "raw-data": m_raw_data,
    "weight-value": m_weight_value,
    "attribute": m_attribute,
    "rewire": m_rewire,
    "output": m_output,
    "nodes": m_nodes,
    "opset": m_opset,
    "initializers": m_initializers,
    "external": m_external,
}
MODEL_COMMANDS = (
    ("inspect", "{file}", "--json"),
    ("prune", "{file}", "--sparsity", "0.5", "-o", "out.onnx"),
    ("cluster", "{file}", "--bits", "4", "-o", "out.onnx"),
    ("pack", "{file}", "-o", "out.onnxc"),
    ("lowrank", "{file}", "--ratio", "0.5", "-o", "out.onnx"),
    ("optimize", "{file}", "--recipe", "recipe.yaml", "-o", "out.onnx"),
)


# ---- .npz data mutations ----

def _arrays(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        return {name: archive[name] for name in archive.files}


def _savez(arrays: dict[str, Any], compressed: bool = False) -> bytes:
    buffer = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buffer, **arrays)
    return buffer.getvalue()


def n_non_finite(rng: Rng, arrays: dict[str, Any]) -> None:
    x = arrays["x"].copy()
    x.flat[rng.integers(0, x.size, size=int(rng.integers(1, 5)))] = _pick(
        rng, (np.nan, np.inf, -np.inf)
    )
    arrays["x"] = x


def n_dtype(rng: Rng, arrays: dict[str, Any]) -> None:
    key = _pick(rng, list(arrays))
    dtype = _pick(
        rng, (np.int64, np.float64, np.float16, np.bool_, np.complex64, np.uint8, "U3", "V4")
    )
    arrays[key] = arrays[key].astype(dtype)


def n_shape(rng: Rng, arrays: dict[str, Any]) -> None:
    key = _pick(rng, list(arrays))
    array = arrays[key]
    arrays[key] = _pick(
        rng,
        (
            array[:0],
            array[..., None],
            array.reshape(-1),
            np.asarray(array.flat[0]),
            array[:3],
            np.concatenate([array, array], axis=-1),
        ),
    )


def n_labels(rng: Rng, arrays: dict[str, Any]) -> None:
    count = len(arrays["x"])
    arrays["labels"] = _pick(
        rng,
        (
            rng.integers(0, 10, (count, 3)),
            rng.random(count),
            np.full(count, -1),
            np.full(count, 10**6),
            rng.integers(0, 10, count + 1),
            np.asarray(3),
            np.array(["cat"] * count),
        ),
    )


def n_keys(rng: Rng, arrays: dict[str, Any]) -> None:
    choice = int(rng.integers(0, 3))
    if choice == 0:
        arrays.pop("x")
    elif choice == 1:
        arrays["X"] = arrays.pop("x")
    else:
        arrays["extra"] = np.zeros(3)


NPZ_MUTATIONS: dict[str, Callable[[Rng, dict[str, Any]], None]] = {
    "non-finite": n_non_finite,
    "dtype": n_dtype,
    "shape": n_shape,
    "labels": n_labels,
    "keys": n_keys,
}


def npz_header(rng: Rng, data: bytes) -> bytes:
    """x.npy's header declares another shape, the data left as is (huge, negative, empty)."""
    arrays = _arrays(data)
    shape = _pick(rng, ((10**12, 16), (2**62, 2**62), (-1, 16), (0, 16), (20,), (20, 16, 16), ()))
    member = io.BytesIO()
    header = {"descr": "<f4", "fortran_order": False, "shape": shape}
    try:
        np.lib.format.write_array_header_1_0(member, header)
    except ValueError:
        member = io.BytesIO(
            np.lib.format.MAGIC_PREFIX + b"\x01\x00" + repr(header).encode().ljust(118) + b"\n"
        )
        member.seek(0, 2)
    member.write(arrays["x"].tobytes())
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        archive.writestr("x.npy", member.getvalue())
    return out.getvalue()


NPZ_COMMANDS = (
    ("prune", "mlp.onnx", "--sparsity", "0.5", "--data", "{file}", "-o", "out.onnx"),
    ("bench", "mlp.onnx", "mlp.onnx", "--data", "{file}", "--runs", "1"),
    ("cluster", "mlp.onnx", "--bits", "5", "--data", "{file}", "-o", "out.onnx"),
    ("finetune", "mlp.onnx", "--data", "{file}", "--epochs", "1", "-o", "out.onnx"),
)


# ---- recipe mutations (YAML) ----

def _paths(tree: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    paths = [prefix]
    if isinstance(tree, dict):
        paths += [p for key, value in tree.items() for p in _paths(value, (*prefix, key))]
    elif isinstance(tree, list):
        paths += [p for index, value in enumerate(tree) for p in _paths(value, (*prefix, index))]
    return paths


def _replace(tree: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    tree[path[0]] = _replace(tree[path[0]], path[1:], value)
    return tree


def r_value(rng: Rng, text: str) -> str:
    tree = yaml.safe_load(text)
    path = _pick(rng, _paths(tree))
    value = _pick(rng, (*ODD_VALUES, "prune.nosuch", "rollback", "stop", {"sparsity": 1.5}))
    return yaml.safe_dump(_replace(tree, path, value))


def r_keys(rng: Rng, text: str) -> str:
    tree = yaml.safe_load(text)
    path = _pick(rng, [p for p in _paths(tree) if p])
    parent = _replace(tree, (), tree)
    for key in path[:-1]:
        parent = parent[key]
    if rng.random() < 0.5:
        del parent[path[-1]]
    elif isinstance(parent, dict):
        parent["unknown_key"] = 1
    return yaml.safe_dump(tree)


def r_deep(rng: Rng, text: str) -> str:
    depth = int(_pick(rng, (50, 999, 3000)))
    return text.replace("sparsity: 0.5", "sparsity: " + "[" * depth + "]" * depth)


def laughs_yaml(levels: int) -> str:
    """A structured-prune plan of 10**levels strings in few lines: each anchor repeats the last."""
    anchors = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    anchors += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, levels)]
    return "steps:\n  - pass: prune.structured\n    options:\n      plan:\n" + "".join(
        f"        {a}\n" for a in anchors
    )


def r_aliases(rng: Rng, text: str) -> str:
    """Anchors that expand geometrically (a 'billion laughs' recipe), in a field typed Any."""
    return laughs_yaml(levels=int(rng.integers(2, 10)))


RECIPE_MUTATIONS: dict[str, Callable[[Rng, str], str]] = {
    "value": r_value, "keys": r_keys, "deep": r_deep, "aliases": r_aliases,
}
RECIPE_COMMANDS = (
    ("optimize", "mlp.onnx", "--recipe", "{file}", "-o", "out.onnx"),
    ("recipe", "show", "{file}"),
)


# ---- .onnxc archive mutations: fields changed, then sealed with a valid digest ----

def _reseal(manifest: dict[str, Any] | bytes, body: bytes) -> bytes:
    from onnxcompress.archive.format import _seal

    raw = manifest if isinstance(manifest, bytes) else zlib.compress(json.dumps(manifest).encode())
    return _seal(raw, body)


def a_manifest(rng: Rng, data: bytes) -> bytes:
    from onnxcompress.archive.format import read_archive

    manifest, body = read_archive(data)
    path = _pick(rng, [p for p in _paths(manifest) if p])
    value = _pick(
        rng, (*ODD_VALUES, [0, 10**12], [2**63, 1], [-1, 4], "uint4", "float64", "ans", "dense")
    )
    if isinstance(value, float) and value != value:
        value = None  # JSON has no NaN
    return _reseal(_replace(manifest, path, value), bytes(body))


def a_body(rng: Rng, data: bytes) -> bytes:
    from onnxcompress.archive.format import read_archive

    manifest, body = read_archive(data)
    return _reseal(manifest, flip_bytes(rng, bytes(body)) if body else b"\0")


@functools.cache
def _zeros_deflated(size: int) -> bytes:
    return zlib.compress(bytes(size), 9)


def a_bomb(rng: Rng, data: bytes) -> bytes:
    """The graph blob replaced by a small zlib stream that inflates to hundreds of megabytes."""
    from onnxcompress.archive.format import read_archive

    manifest, body = read_archive(data)
    bomb = _zeros_deflated(int(_pick(rng, (10**6, 10**7, 10**8))))
    manifest["graph"] = [len(body), len(bomb)]
    return _reseal(manifest, bytes(body) + bomb)


def a_header(rng: Rng, data: bytes) -> bytes:
    """One header field (version, flags, a length) changed, with the digest made to match."""
    from onnxcompress.archive.format import _HEADER, _PREFIX

    fields = list(_HEADER.unpack_from(data))
    field = int(rng.integers(1, 5))
    limit = 2**16 if field < 3 else 2**32 if field == 3 else 2**64
    fields[field] = (
        int(_pick(rng, (0, 1, 2, 7, fields[field] + 1, fields[field] - 1, limit - 1))) % limit
    )
    prefix = _HEADER.pack(*fields[:5], b"\0" * 32)[:_PREFIX]
    rest = data[_HEADER.size:]
    return prefix + hashlib.sha256(prefix + rest).digest() + rest


ARCHIVE_MUTATIONS: dict[str, Callable[[Rng, bytes], bytes]] = {
    "manifest": a_manifest, "body": a_body, "bomb": a_bomb, "header": a_header,
}
ARCHIVE_COMMANDS = (("unpack", "{file}", "-o", "out.onnx"),)


# ---- the corpus ----

SEED_FILES = {
    "model": "mlp.onnx",
    "npz": "data.npz",
    "recipe": "recipe.yaml",
    "archive": "mlp.onnxc",
}
FORMAT_MUTATIONS: dict[str, dict[str, Any]] = {
    "model": MODEL_MUTATIONS, "npz": {**NPZ_MUTATIONS, "header": npz_header},
    "recipe": RECIPE_MUTATIONS, "archive": ARCHIVE_MUTATIONS,
}
COMMANDS = {
    "model": MODEL_COMMANDS,
    "npz": NPZ_COMMANDS,
    "recipe": RECIPE_COMMANDS,
    "archive": ARCHIVE_COMMANDS,
}


def plan(index: int) -> tuple[str, str, tuple[str, ...]]:
    """(kind, mutation, command) of case `index`: cheap, so tests are named before seeds exist."""
    rng = np.random.default_rng([SEED, index, 0])
    kind = KINDS[index % len(KINDS)]
    names = [*BYTE_MUTATIONS, *FORMAT_MUTATIONS[kind]]
    weights = np.array([1.0] * len(BYTE_MUTATIONS) + [2.0] * len(FORMAT_MUTATIONS[kind]))
    mutation = names[int(rng.choice(len(names), p=weights / weights.sum()))]
    command = COMMANDS[kind][int(rng.integers(0, len(COMMANDS[kind])))]
    return kind, mutation, command


def make_case(index: int, seeds: dict[str, bytes]) -> Case:
    kind, mutation, command = plan(index)
    rng = np.random.default_rng([SEED, index, 1])
    original = seeds[SEED_FILES[kind]]
    if mutation in BYTE_MUTATIONS:
        data = BYTE_MUTATIONS[mutation](rng, original)
    else:
        data = _format_mutation(kind, mutation, rng, original)
    name = "case" + Path(SEED_FILES[kind]).suffix
    return Case(index, kind, mutation, name, data, tuple(arg.format(file=name) for arg in command))


def _format_mutation(kind: str, mutation: str, rng: Rng, original: bytes) -> bytes:
    function = FORMAT_MUTATIONS[kind][mutation]
    if kind == "model":
        model = _model(original)
        function(rng, model)
        return model.SerializeToString()
    if kind == "npz" and mutation != "header":
        arrays = _arrays(original)
        function(rng, arrays)
        return _savez(arrays, compressed=bool(rng.random() < 0.3))
    if kind == "recipe":
        return function(rng, original.decode()).encode()
    return function(rng, original)
