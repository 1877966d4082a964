"""Probe inputs: what the gates feed both models when they compare them.

The user's data comes first (`--data`). Without it, probes are drawn (seeded) from the input
signature, and every symbolic dimension needs a size the ORIGINAL model runs on: a detector
may need a multiple of its stride, a streaming model a chunk longer than its padding. Sizes
come, in order, from `--input-shape name=1x3x320x320` (the convention onnxsim users know),
from the model's metadata (Ultralytics exports store `imgsz`), else from the first of a few
candidate sizes the original model accepts, tried on one sample.

Integer inputs take values from their valid ranges: indices stay below the smallest table they
gather from, attention masks are ones, token-type ids zeros.
"""

from __future__ import annotations

__all__ = ["probe_inputs", "fixed_batch", "parse_input_shapes", "runnable_dims", "metadata_dims",
           "shapes_as_sizes", "DEFAULT_PROBES", "MAX_PROBE_ELEMENTS"]

import ast
import itertools
import logging
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from onnxcompress.data import (
    LABELS,
    batch_axes,
    batch_symbols,
    model_inputs,
    sample_axis,
    take_samples,
)
from onnxcompress.errors import DataError, UnsupportedModelError

logger = logging.getLogger(__name__)

#: Probe samples per gate: enough for rank correlations to resolve one swapped pair
#: (1 - 6*2/(n^3-n)).
DEFAULT_PROBES = 64
#: Refuse probes larger than this many elements per input (a huge fixed dimension).
MAX_PROBE_ELEMENTS = 1 << 26  # 256 MiB of float32: a model may declare any fixed size
#: Sizes tried for a symbolic image height/width, most typical first.
IMAGE_SIZES = (224, 320, 256, 384, 416, 512, 640, 128, 64, 32)
#: Sizes tried for any other symbolic dimension (sequence lengths, audio chunks, features).
OTHER_SIZES = (8, 16, 32, 64, 128, 256, 512, 1024, 1536, 2048, 4096)

_NUMPY_DTYPES = {
    ir.DataType.FLOAT: np.float32,
    ir.DataType.DOUBLE: np.float64,
    ir.DataType.FLOAT16: np.float16,
    ir.DataType.INT64: np.int64,
    ir.DataType.INT32: np.int32,
    ir.DataType.BOOL: np.bool_,
    ir.DataType.UINT8: np.uint8,
    ir.DataType.INT8: np.int8,
}

#: Runs the original model on some inputs; raises when onnxruntime refuses them.
Runner = Callable[[Mapping[str, np.ndarray]], object]


def fixed_batch(model: ir.Model) -> int | None:
    """The batch size every input fixes on its first axis, or None.

    A model exported for batch 1 fixes 1: probes must then come in whole batches of it.
    """
    firsts = {
        v.shape[0] if v.shape and isinstance(v.shape[0], int) else None for v in model_inputs(model)
    }
    return firsts.pop() if len(firsts) == 1 and None not in firsts else None


def parse_input_shapes(text: Sequence[str], model: ir.Model) -> dict[str, tuple[int, ...]]:
    """`["x=1x3x320x320", "mask=1x128"]` (or one comma-separated string) -> shapes, checked.

    Every problem is reported at once, naming the input and what the model declares.
    """
    inputs = {value.name or "": value for value in model_inputs(model)}
    shapes: dict[str, tuple[int, ...]] = {}
    problems = []
    for item in itertools.chain.from_iterable(t.split(",") for t in text):
        name, sep, dims = item.strip().rpartition("=")
        try:
            shape = tuple(int(d) for d in dims.lower().split("x")) if sep and name else None
        except ValueError:
            shape = None
        if shape is None or any(d <= 0 for d in shape):
            problems.append(
                f"{item.strip()!r} is not NAME=DxDx... with positive sizes (e.g. x=1x3x320x320)"
            )
        elif name not in inputs:
            problems.append(f"{name!r} is not an input of the model (inputs: {sorted(inputs)})")
        else:
            problems += _shape_problems(name, shape, inputs[name])
            shapes[name] = shape
    if problems:
        raise DataError("--input-shape: " + "; ".join(problems))
    return shapes


def _shape_problems(name: str, shape: tuple[int, ...], value: ir.Value) -> list[str]:
    declared = list(value.shape or ())
    if value.shape is not None and len(shape) != len(declared):
        return [f"{name!r} has rank {len(declared)} ({value.shape}), not {len(shape)}"]
    if any(
        isinstance(want, int) and want != got for want, got in zip(declared, shape, strict=False)
    ):
        return [f"{name!r} fixes {value.shape}; {'x'.join(map(str, shape))} does not fit it"]
    if int(np.prod(shape, dtype=object)) > MAX_PROBE_ELEMENTS:
        return [
            f"{name!r} at {'x'.join(map(str, shape))} "
            f"is over the cap of {MAX_PROBE_ELEMENTS:,} values"
        ]
    return []


def _symbolic(model: ir.Model) -> list[tuple[ir.Value, int, str | None]]:
    """(input, axis, symbol) for every non-batch dimension without a fixed size."""
    found = []
    batch = batch_axes(model)
    for value in model_inputs(model):
        for axis, dim in enumerate(value.shape or ()):
            if axis > 0 and not isinstance(dim, int) and (value.name, axis) not in batch:
                found.append((value, axis, None if dim is None else dim.value))
    return found


def _is_image_axis(value: ir.Value, axis: int) -> bool:
    """Height or width of an NCHW float input with 1, 3 or 4 channels."""
    shape = value.shape
    return (shape is not None and len(shape) == 4 and axis in (2, 3) and shape[1] in (1, 3, 4)
            and value.dtype in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE))


def metadata_dims(model: ir.Model) -> dict[tuple[str, int], int]:
    """Image sizes a model states in its metadata: Ultralytics' `imgsz: [h, w]`."""
    text = model.metadata_props.get("imgsz")
    try:
        size = ast.literal_eval(text) if text else None
    except (ValueError, SyntaxError):
        return {}
    if isinstance(size, int):
        size = [size, size]
    if not (
        isinstance(size, list | tuple)
        and len(size) == 2
        and all(isinstance(s, int) and s > 0 for s in size)
    ):
        return {}
    return {(value.name or "", axis): int(size[axis - 2])
            for value, axis, _ in _symbolic(model) if _is_image_axis(value, axis)}


def runnable_dims(
    model: ir.Model,
    run: Runner,
    *,
    fixed: Mapping[tuple[str, int], int] | None = None,
    seed: int = 0,
) -> dict[tuple[str, int], int]:
    """Sizes for the symbolic dimensions that the original model runs on, tried on one sample.

    Dimensions sharing a symbol take one size. Image height/width try typical image sizes,
    others the sequence/chunk ladder; the first size at which `run` succeeds wins.
    """
    fixed = dict(fixed or {})
    open_dims = [(v, axis, sym) for v, axis, sym in _symbolic(model) if (v.name, axis) not in fixed]
    if not open_dims:
        return fixed
    image = all(_is_image_axis(v, axis) for v, axis, _ in open_dims)
    last_error = ""
    for size in IMAGE_SIZES if image else OTHER_SIZES:
        dims = {**fixed, **{(v.name or "", axis): size for v, axis, _ in open_dims}}
        try:
            run(probe_inputs(model, count=1, seed=seed, sizes=dims))
        except (UnsupportedModelError, DataError) as error:
            last_error = str(error)
            continue
        logger.info("symbolic dimensions probed at %d", size)
        return dims
    tried = ", ".join(map(str, IMAGE_SIZES if image else OTHER_SIZES))
    raise UnsupportedModelError(
        f"the input model runs at none of the sizes tried for its dynamic dimensions ({tried}): "
        f"{last_error}; give them with --input-shape NAME=DxDx... or give --data")


def _index_bound(model: ir.Model, value: ir.Value) -> int:
    """Exclusive upper bound for an integer input: the smallest table it indexes, else 10."""
    bounds = [
        int(node.inputs[0].const_value.shape[node.attributes.get_int("axis", 0)])  # type: ignore[arg-type]
        for node in value.consumers()
        if node.op_type == "Gather"
        and node.inputs[0] is not None
        and node.inputs[0].const_value is not None
        and node.inputs[1] is value
    ]
    return min(bounds) if bounds else 10


def _integer_probe(model: ir.Model, value: ir.Value, shape: list[int], dtype: type,
                   rng: np.random.Generator) -> np.ndarray:
    name = (value.name or "").lower()
    if "mask" in name:
        return np.ones(shape, dtype)
    if "type_id" in name or "segment" in name:
        return np.zeros(shape, dtype)
    return rng.integers(0, _index_bound(model, value), size=shape).astype(dtype)


def probe_inputs(
    model: ir.Model,
    *,
    count: int = 8,
    seed: int = 0,
    data: Mapping[str, np.ndarray] | None = None,
    dims: Mapping[str, int] | None = None,
    sizes: Mapping[tuple[str, int], int] | None = None,
) -> dict[str, np.ndarray]:
    """Inputs to compare models on: the first `count` samples of `data`, or seeded random ones.

    A symbolic dimension takes, in order: `sizes[(input, axis)]`, `dims[symbol]`, `count` on
    the first axis, else 8. A model exported for a fixed batch gets whole batches.
    """
    batch = fixed_batch(model)
    if data is not None:
        taken = max(batch, count // batch * batch) if batch else count
        inputs = {value.name or "": value for value in model_inputs(model)}
        return {
            name: take_samples(
                array, sample_axis(model, inputs[name]) if name in inputs else 0, taken
            )
            for name, array in data.items()
            if name != LABELS
        }
    rng = np.random.default_rng(seed)
    dims, sizes = dict(dims or {}), dict(sizes or {})
    rows: int | None = max(batch, -(-count // batch) * batch) if batch else None
    dims.update({symbol: rows or count for symbol in batch_symbols(model) if symbol not in dims})
    sizes.update({key: rows or count for key in batch_axes(model) if key not in sizes})
    probes: dict[str, np.ndarray] = {}
    for value in model_inputs(model):
        name = value.name or ""
        shape = []
        for axis, dim in enumerate(value.shape or ()):
            if axis == 0 and rows is not None:
                shape.append(rows)
            elif (name, axis) in sizes:
                shape.append(sizes[(name, axis)])
            elif isinstance(dim, int):
                shape.append(dim)
            elif dim is not None and dim.value in dims:
                shape.append(dims[dim.value])
            else:
                shape.append(count if axis == 0 else 8)
        values = int(np.prod(shape, dtype=object)) if shape else 1
        if values > MAX_PROBE_ELEMENTS:
            raise DataError(
                f"input {name!r}: a probe of shape {shape} would hold {values:,} values, over the "
                f"cap of {MAX_PROBE_ELEMENTS:,}; give --data or --input-shape"
            )
        dtype = _NUMPY_DTYPES.get(value.dtype or ir.DataType.FLOAT, np.float32)
        if np.issubdtype(dtype, np.floating):
            probes[name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            probes[name] = np.asarray(rng.random(shape) < 0.5)  # a 0-d draw is a numpy scalar
        else:
            probes[name] = _integer_probe(model, value, shape, dtype, rng)
    return probes


def shapes_as_sizes(shapes: Mapping[str, tuple[int, ...]]) -> dict[tuple[str, int], int]:
    """`--input-shape` values as per-axis sizes; the batch axis stays the probe count."""
    return {
        (name, axis): size
        for name, shape in shapes.items()
        for axis, size in enumerate(shape)
        if axis > 0
    }
