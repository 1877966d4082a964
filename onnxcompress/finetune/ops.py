"""ONNX operators written with torch functions, for the fine-tune executor.

Each entry of `OPS` turns one ONNX node into a callable ``(inputs) -> outputs`` over torch
tensors; attributes are parsed once, when the executor is built, so a training step pays
only the torch call. The semantics follow the ONNX operator specification (opsets 11-21,
default domain); every op is differentiable wherever torch's counterpart is.

What is exact: all ops here compute the same function as the specification in float32;
they differ from onnxruntime only by floating-point rounding order (tests hold them to
1e-5 relative). Not covered: training-mode BatchNormalization (running statistics are
frozen, as in inference), MaxPool's Indices output, ConvTranspose's ``output_shape``,
subgraph ops (If, Loop, Scan). Those raise `UnsupportedModelError` naming op and node.
"""

from __future__ import annotations

__all__ = ["OPS", "OpContext", "build_op", "TORCH_DTYPES"]

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir
import torch
import torch.nn.functional as F

from onnxcompress.errors import UnsupportedModelError

Tensor = torch.Tensor
OpFn = Callable[[list[Tensor | None]], Sequence[Tensor | None]]

TORCH_DTYPES: dict[int, torch.dtype] = {
    int(ir.DataType.FLOAT): torch.float32,
    int(ir.DataType.UINT8): torch.uint8,
    int(ir.DataType.INT8): torch.int8,
    int(ir.DataType.INT16): torch.int16,
    int(ir.DataType.INT32): torch.int32,
    int(ir.DataType.INT64): torch.int64,
    int(ir.DataType.BOOL): torch.bool,
    int(ir.DataType.FLOAT16): torch.float16,
    int(ir.DataType.DOUBLE): torch.float64,
    int(ir.DataType.BFLOAT16): torch.bfloat16,
}


@dataclasses.dataclass(frozen=True)
class OpContext:
    """One node as the op builders see it: its attributes as Python values, and its opset."""

    node_name: str
    op_type: str
    opset: int
    attributes: dict[str, Any]
    num_outputs: int

    def get(self, key: str, default: Any = None) -> Any:
        """The attribute `key`, or `default` where the node leaves it to the specification."""
        return self.attributes.get(key, default)

    def required(self, x: Sequence[Tensor | None], count: int) -> list[Tensor]:
        """The first `count` inputs, which the operator specification makes required.

        The executor passes None only where a node omits an optional input, so None here means
        a malformed node: naming op, node and input beats a torch error about NoneType.
        """
        tensors = []
        for index in range(count):
            tensor = x[index]
            if tensor is None:
                raise UnsupportedModelError(
                    f"op {self.op_type} (node {self.node_name!r}): "
                    f"required input {index} is missing"
                )
            tensors.append(tensor)
        return tensors

    def unsupported(self, what: str) -> UnsupportedModelError:
        """The error to raise, so every refusal names the op and node the same way."""
        return UnsupportedModelError(
            f"op {self.op_type} (node {self.node_name!r}): {what} is not supported by the "
            "fine-tune executor"
        )


def attribute_value(attr: ir.Attr) -> Any:
    """An attribute as a plain Python value (tensors as numpy arrays)."""
    kind = attr.type
    if kind == ir.AttributeType.TENSOR:
        return np.array(attr.as_tensor().numpy())
    if kind in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
        return attr  # rejected by the ops that would need it
    if kind == ir.AttributeType.INTS:
        return [int(v) for v in attr.value]
    if kind == ir.AttributeType.FLOATS:
        return [float(v) for v in attr.value]
    return attr.value


def _ints(tensor: Tensor | None) -> list[int] | None:
    return None if tensor is None else [int(v) for v in tensor.reshape(-1).tolist()]


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


# --- element-wise -----------------------------------------------------------------------


def _binary(fn: Callable[[Tensor, Tensor], Tensor]) -> Callable[[OpContext], OpFn]:
    def build(ctx: OpContext) -> OpFn:
        return lambda x: (fn(*ctx.required(x, 2)),)

    return build


def _unary(fn: Callable[[Tensor], Tensor]) -> Callable[[OpContext], OpFn]:
    def build(ctx: OpContext) -> OpFn:
        return lambda x: (fn(ctx.required(x, 1)[0]),)

    return build


def _div(a: Tensor, b: Tensor) -> Tensor:
    if a.is_floating_point():
        return a / b
    return torch.div(a, b, rounding_mode="trunc")


def _pow(a: Tensor, b: Tensor) -> Tensor:
    return torch.pow(a, b).to(a.dtype)


def _mod(ctx: OpContext) -> OpFn:
    """fmod=0: the result takes the divisor's sign (Python's %); fmod=1: the dividend's (C fmod)."""
    fn = torch.fmod if int(ctx.get("fmod", 0)) else torch.remainder
    return lambda x: (fn(*ctx.required(x, 2)),)


def _gelu(ctx: OpContext) -> OpFn:
    approximate = ctx.get("approximate", "none")
    return lambda x: (F.gelu(ctx.required(x, 1)[0], approximate=approximate),)


def _leaky_relu(ctx: OpContext) -> OpFn:
    alpha = float(ctx.get("alpha", 0.01))
    return lambda x: (F.leaky_relu(ctx.required(x, 1)[0], alpha),)


def _clamp(x: Tensor, low: Any, high: Any) -> Tensor:
    return x if low is None and high is None else torch.clamp(x, low, high)  # no bounds: identity


def _clip(ctx: OpContext) -> OpFn:
    if ctx.opset < 11:
        low, high = ctx.get("min"), ctx.get("max")
        return lambda x: (_clamp(ctx.required(x, 1)[0], low, high),)

    def run(x: list[Tensor | None]) -> tuple[Tensor]:
        low = x[1] if len(x) > 1 else None
        high = x[2] if len(x) > 2 else None
        return (_clamp(ctx.required(x, 1)[0], low, high),)

    return run


def _softmax_like(fn: Callable[..., Tensor]) -> Callable[[OpContext], OpFn]:
    def build(ctx: OpContext) -> OpFn:
        if ctx.opset >= 13:
            axis = int(ctx.get("axis", -1))
            return lambda x: (fn(ctx.required(x, 1)[0], dim=axis),)
        axis = int(ctx.get("axis", 1))

        def coerced(x: list[Tensor | None]) -> tuple[Tensor]:
            data = ctx.required(x, 1)[0]
            a = _axis(axis, data.dim())
            flat = data.reshape(math.prod(data.shape[:a]), -1)
            return (fn(flat, dim=1).reshape(data.shape),)

        return coerced

    return build


def _cast(ctx: OpContext) -> OpFn:
    to = int(ctx.get("to"))
    if to not in TORCH_DTYPES:
        raise ctx.unsupported(f"cast to data type {to}")
    dtype = TORCH_DTYPES[to]
    return lambda x: (ctx.required(x, 1)[0].to(dtype),)


def _where(ctx: OpContext) -> OpFn:
    def run(x: list[Tensor | None]) -> tuple[Tensor]:
        condition, chosen, other = ctx.required(x, 3)
        return (torch.where(condition, chosen, other),)

    return run


def _identity(ctx: OpContext) -> OpFn:
    return lambda x: tuple(x[: max(1, ctx.num_outputs)])


def _dropout(ctx: OpContext) -> OpFn:
    """Dropout: identity at inference; in training, the ratio from the node (or overridden).

    The executor sets ``ratio_override`` on the returned function to apply Han's rescaled
    ratio; the mask output, when requested, is all True at inference.
    """
    default_ratio = float(ctx.get("ratio", 0.5))

    def run(x: list[Tensor | None]) -> tuple[Tensor, ...]:
        data = ctx.required(x, 1)[0]
        training = getattr(run, "training", False)
        ratio = getattr(run, "ratio_override", None)
        if ratio is None:
            ratio = float(x[1].item()) if len(x) > 1 and x[1] is not None else default_ratio
        if len(x) > 2 and x[2] is not None:
            training = training and bool(x[2].item())
        out = F.dropout(data, ratio, training=training and ratio > 0)
        if ctx.num_outputs > 1:
            mask = out != 0 if training else torch.ones_like(data, dtype=torch.bool)
            return (out, mask)
        return (out,)

    return run


# --- linear algebra and normalisation ------------------------------------------------------


def _gemm(ctx: OpContext) -> OpFn:
    alpha = float(ctx.get("alpha", 1.0))
    beta = float(ctx.get("beta", 1.0))
    trans_a = bool(ctx.get("transA", 0))
    trans_b = bool(ctx.get("transB", 0))

    def run(x: list[Tensor | None]) -> tuple[Tensor]:
        a, b = ctx.required(x, 2)
        c = x[2] if len(x) > 2 else None
        if trans_a:
            a = a.t()
        if trans_b and c is not None and c.dim() == 1 and alpha == 1.0 and beta == 1.0:
            return (F.linear(a, b, c),)
        out = F.linear(a, b) if trans_b else a @ b
        if alpha != 1.0:
            out = out * alpha
        if c is not None:
            out = out + (c * beta if beta != 1.0 else c)
        return (out,)

    return run


def _layer_norm(ctx: OpContext) -> OpFn:
    axis = int(ctx.get("axis", -1))
    eps = float(ctx.get("epsilon", 1e-5))
    if ctx.num_outputs > 1:
        raise ctx.unsupported("the Mean / InvStdDev outputs")

    def run(x: list[Tensor | None]) -> tuple[Tensor]:
        data, scale = ctx.required(x, 2)
        bias = x[2] if len(x) > 2 else None
        a = _axis(axis, data.dim())
        shape = tuple(data.shape[a:])
        if tuple(scale.shape) == shape and (bias is None or tuple(bias.shape) == shape):
            return (F.layer_norm(data, shape, scale, bias, eps),)
        dims = tuple(range(a, data.dim()))
        mean = data.mean(dim=dims, keepdim=True)
        var = ((data - mean) ** 2).mean(dim=dims, keepdim=True)
        out = (data - mean) / torch.sqrt(var + eps) * scale
        return (out + bias if bias is not None else out,)

    return run


def _batch_norm(ctx: OpContext) -> OpFn:
    eps = float(ctx.get("epsilon", 1e-5))
    if int(ctx.get("training_mode", 0)) or ctx.num_outputs > 1:
        raise ctx.unsupported("training-mode BatchNormalization")

    def run(x: list[Tensor | None]) -> tuple[Tensor]:
        data, scale, bias, mean, var = ctx.required(x, 5)
        return (F.batch_norm(data, mean, var, scale, bias, training=False, eps=eps),)

    return run


def _reduce(fn: Callable[..., Tensor], axes_input_since: int) -> Callable[[OpContext], OpFn]:
    def build(ctx: OpContext) -> OpFn:
        keepdims = bool(ctx.get("keepdims", 1))
        noop = bool(ctx.get("noop_with_empty_axes", 0))
        attr_axes = ctx.get("axes")

        def run(x: list[Tensor | None]) -> tuple[Tensor]:
            data = ctx.required(x, 1)[0]
            if ctx.opset >= axes_input_since:
                axes = _ints(x[1]) if len(x) > 1 else None
            else:
                axes = attr_axes
            if not axes:
                if noop:
                    return (data,)
                axes = list(range(data.dim()))
            return (fn(data, dim=tuple(axes), keepdim=keepdims),)

        return run

    return build


def _reduce_max(data: Tensor, dim: tuple[int, ...], keepdim: bool) -> Tensor:
    return torch.amax(data, dim=dim, keepdim=keepdim)


# --- shapes and indexing --------------------------------------------------------------------


def _reshape(ctx: OpContext) -> OpFn:
    allowzero = bool(ctx.get("allowzero", 0))

    def run(x: list[Tensor | None]) -> tuple[Tensor]:
        data = ctx.required(x, 1)[0]
        shape = _ints(x[1]) or []
        if not allowzero:
            shape = [data.shape[i] if s == 0 else s for i, s in enumerate(shape)]
        return (data.reshape(shape),)

    return run


def _transpose(ctx: OpContext) -> OpFn:
    perm = ctx.get("perm")

    def run(x: list[Tensor | None]) -> tuple[Tensor]:
        data = ctx.required(x, 1)[0]
        order = perm if perm is not None else list(reversed(range(data.dim())))
        return (data.permute(order),)

    return run


def _gather(ctx: OpContext) -> OpFn:
    axis = int(ctx.get("axis", 0))

    def run(x: list[Tensor | None]) -> tuple[Tensor]:
        data, indices = ctx.required(x, 2)
        a = _axis(axis, data.dim())
        size = data.shape[a]
        idx = indices.long()
        if idx.numel() and bool((idx < 0).any()):
            idx = torch.where(idx < 0, idx + size, idx)
        picked = torch.index_select(data, a, idx.reshape(-1))
        shape = tuple(data.shape[:a]) + tuple(indices.shape) + tuple(data.shape[a + 1 :])
        return (picked.reshape(shape),)

    return run


def _slice_indices(start: int, end: int, step: int, size: int) -> list[int]:
    """The indices ONNX Slice selects on one axis (clamping as the specification says)."""
    if start < 0:
        start += size
    if end < 0:
        end += size
    if step > 0:
        start, end = min(max(start, 0), size), min(max(end, 0), size)
    else:
        start, end = min(max(start, 0), size - 1), min(max(end, -1), size - 1)
    return list(range(start, end, step))


def _slice(ctx: OpContext) -> OpFn:
    def run(x: list[Tensor | None]) -> tuple[Tensor]:
        data = ctx.required(x, 1)[0]
        if ctx.opset < 10:
            starts, ends, axes, steps = ctx.get("starts"), ctx.get("ends"), ctx.get("axes"), None
        else:
            starts, ends = _ints(x[1]), _ints(x[2])
            axes = _ints(x[3]) if len(x) > 3 else None
            steps = _ints(x[4]) if len(x) > 4 else None
        axes = axes if axes is not None else list(range(len(starts)))
        steps = steps if steps is not None else [1] * len(starts)
        out = data
        for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
            a = _axis(axis, data.dim())
            size = out.shape[a]
            if step == 1:
                lo = min(max(start + size if start < 0 else start, 0), size)
                hi = min(max(end + size if end < 0 else end, 0), size)
                out = out.narrow(a, lo, max(hi - lo, 0))
            else:
                picks = _slice_indices(start, end, step, size)
                out = torch.index_select(out, a, torch.tensor(picks, dtype=torch.long))
        return (out,)

    return run


def _concat(ctx: OpContext) -> OpFn:
    axis = int(ctx.get("axis"))
    return lambda x: (torch.cat([t for t in x if t is not None], dim=axis),)


def _split(ctx: OpContext) -> OpFn:
    axis = int(ctx.get("axis", 0))
    attr_split = ctx.get("split")
    count = ctx.num_outputs

    def run(x: list[Tensor | None]) -> tuple[Tensor, ...]:
        data = ctx.required(x, 1)[0]
        a = _axis(axis, data.dim())
        sizes = _ints(x[1]) if len(x) > 1 and x[1] is not None else attr_split
        if not sizes:
            size = data.shape[a]
            chunk = -(-size // count)  # ceil, as opset 18's num_outputs specifies
            sizes = [chunk] * (count - 1) + [size - chunk * (count - 1)]
        return tuple(torch.split(data, sizes, dim=a))

    return run


def _axes_from(ctx: OpContext, x: list[Tensor | None]) -> list[int] | None:
    if ctx.opset >= 13:
        return _ints(x[1]) if len(x) > 1 else None
    return ctx.get("axes")


def _squeeze(ctx: OpContext) -> OpFn:
    def run(x: list[Tensor | None]) -> tuple[Tensor]:
        data = ctx.required(x, 1)[0]
        axes = _axes_from(ctx, x)
        if axes is None:
            return (data.squeeze(),)
        return (data.squeeze(tuple(_axis(a, data.dim()) for a in axes)),)

    return run


def _unsqueeze(ctx: OpContext) -> OpFn:
    def run(x: list[Tensor | None]) -> tuple[Tensor]:
        data = ctx.required(x, 1)[0]
        axes = _axes_from(ctx, x) or []
        rank = data.dim() + len(axes)
        out = data
        for a in sorted(_axis(a, rank) for a in axes):
            out = out.unsqueeze(a)
        return (out,)

    return run


def _shape(ctx: OpContext) -> OpFn:
    start = ctx.get("start", 0)
    end = ctx.get("end")

    def run(x: list[Tensor | None]) -> tuple[Tensor]:
        dims = list(ctx.required(x, 1)[0].shape)[start:end]
        return (torch.tensor(dims, dtype=torch.int64),)

    return run


def _size(ctx: OpContext) -> OpFn:
    return lambda x: (torch.tensor(ctx.required(x, 1)[0].numel(), dtype=torch.int64),)


def _expand(ctx: OpContext) -> OpFn:
    def run(x: list[Tensor | None]) -> tuple[Tensor]:
        data = ctx.required(x, 1)[0]
        shape = torch.broadcast_shapes(tuple(data.shape), tuple(_ints(x[1]) or []))
        return (data.expand(shape),)

    return run


def _constant_of_shape(ctx: OpContext) -> OpFn:
    value = ctx.get("value")
    fill = torch.from_numpy(np.array(value).reshape(-1)) if value is not None else torch.zeros(1)

    def run(x: list[Tensor | None]) -> tuple[Tensor]:
        shape = _ints(x[0]) or []
        scalar = not shape  # [] -> a 0-d tensor
        return ((fill.reshape(()) if scalar else fill).expand(shape).clone(),)

    return run


def _range(ctx: OpContext) -> OpFn:
    def run(x: list[Tensor | None]) -> tuple[Tensor]:
        start, limit, delta = ctx.required(x, 3)
        return (torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype),)

    return run


def _tile(ctx: OpContext) -> OpFn:
    return lambda x: (ctx.required(x, 1)[0].repeat(_ints(x[1]) or []),)


def _flatten(ctx: OpContext) -> OpFn:
    axis = int(ctx.get("axis", 1))

    def run(x: list[Tensor | None]) -> tuple[Tensor]:
        data = ctx.required(x, 1)[0]
        a = _axis(axis, data.dim())
        return (data.reshape(math.prod(data.shape[:a]), math.prod(data.shape[a:])),)

    return run


def _variadic(fn: Callable[[Tensor, Tensor], Tensor]) -> Callable[[OpContext], OpFn]:
    def build(ctx: OpContext) -> OpFn:
        def run(x: list[Tensor | None]) -> tuple[Tensor]:
            first, *rest = ctx.required(x, len(x))
            out = first
            for t in rest:
                out = fn(out, t)
            return (out,)

        return run

    return build


# --- convolution and pooling ----------------------------------------------------------------


def _spatial(
    ctx: OpContext, data: Tensor, kernel: Sequence[int]
) -> tuple[list[int], list[int], list[int]]:
    """(strides, dilations, pads as [begin..., end...]) with auto_pad resolved."""
    n = len(kernel)
    strides = ctx.get("strides") or [1] * n
    dilations = ctx.get("dilations") or [1] * n
    pads = ctx.get("pads") or [0] * (2 * n)
    auto_pad = ctx.get("auto_pad", "NOTSET")
    if isinstance(auto_pad, bytes):
        auto_pad = auto_pad.decode()
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads = [0] * (2 * n)
        for i in range(n):
            size = data.shape[2 + i]
            out = -(-size // strides[i])
            total = max((out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - size, 0)
            small, large = total // 2, total - total // 2
            pads[i], pads[i + n] = (small, large) if auto_pad == "SAME_UPPER" else (large, small)
    elif auto_pad == "VALID":
        pads = [0] * (2 * n)
    return list(strides), list(dilations), list(pads)


def _torch_pad(pads: Sequence[int]) -> list[int]:
    """ONNX [b1, b2, ..., e1, e2, ...] to F.pad's [bN, eN, ..., b1, e1]."""
    n = len(pads) // 2
    out: list[int] = []
    for i in reversed(range(n)):
        out += [pads[i], pads[i + n]]
    return out


def _symmetric(pads: Sequence[int]) -> bool:
    n = len(pads) // 2
    return list(pads[:n]) == list(pads[n:])


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_MAXPOOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVGPOOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def _conv(ctx: OpContext) -> OpFn:
    group = int(ctx.get("group", 1))

    def run(x: list[Tensor | None]) -> tuple[Tensor]:
        data, weight = ctx.required(x, 2)
        bias = x[2] if len(x) > 2 else None
        kernel = ctx.get("kernel_shape") or list(weight.shape[2:])
        n = len(kernel)
        if n not in _CONV:
            raise ctx.unsupported(f"{n}-D convolution")
        strides, dilations, pads = _spatial(ctx, data, kernel)
        if _symmetric(pads):
            padding: list[int] | int = pads[:n]
        else:
            data = F.pad(data, _torch_pad(pads))
            padding = 0
        return (_CONV[n](data, weight, bias, strides, padding, dilations, group),)

    return run


def _conv_transpose(ctx: OpContext) -> OpFn:
    group = int(ctx.get("group", 1))
    if ctx.get("output_shape") is not None:
        raise ctx.unsupported("the output_shape attribute")
    auto_pad = ctx.get("auto_pad", "NOTSET")
    if auto_pad not in ("NOTSET", b"NOTSET", "VALID", b"VALID"):
        raise ctx.unsupported(f"auto_pad={auto_pad!r}")

    def run(x: list[Tensor | None]) -> tuple[Tensor]:
        data, weight = ctx.required(x, 2)
        bias = x[2] if len(x) > 2 else None
        kernel = ctx.get("kernel_shape") or list(weight.shape[2:])
        n = len(kernel)
        if n not in _CONV_T:
            raise ctx.unsupported(f"{n}-D transposed convolution")
        strides = ctx.get("strides") or [1] * n
        dilations = ctx.get("dilations") or [1] * n
        pads = ctx.get("pads") or [0] * (2 * n)
        if auto_pad in ("VALID", b"VALID"):
            pads = [0] * (2 * n)
        output_padding = ctx.get("output_padding") or [0] * n
        if _symmetric(pads):
            out = _CONV_T[n](
                data, weight, bias, strides, pads[:n], output_padding, group, dilations
            )
            return (out,)
        out = _CONV_T[n](data, weight, bias, strides, 0, output_padding, group, dilations)
        for i in range(n):
            out = out.narrow(2 + i, pads[i], out.shape[2 + i] - pads[i] - pads[i + n])
        return (out,)

    return run


def _max_pool(ctx: OpContext) -> OpFn:
    if ctx.num_outputs > 1:
        raise ctx.unsupported("the Indices output of MaxPool")
    kernel = ctx.get("kernel_shape")
    ceil_mode = bool(ctx.get("ceil_mode", 0))
    n = len(kernel)
    if n not in _MAXPOOL:
        raise ctx.unsupported(f"{n}-D pooling")

    def run(x: list[Tensor | None]) -> tuple[Tensor]:
        data = ctx.required(x, 1)[0]
        strides, dilations, pads = _spatial(ctx, data, kernel)
        fits = _symmetric(pads) and all(p <= k // 2 for p, k in zip(pads[:n], kernel, strict=True))
        if fits:
            return (_MAXPOOL[n](data, kernel, strides, pads[:n], dilations, ceil_mode),)
        data = F.pad(data, _torch_pad(pads), value=-math.inf)
        return (_MAXPOOL[n](data, kernel, strides, 0, dilations, ceil_mode),)

    return run


def _average_pool(ctx: OpContext) -> OpFn:
    kernel = ctx.get("kernel_shape")
    ceil_mode = bool(ctx.get("ceil_mode", 0))
    include_pad = bool(ctx.get("count_include_pad", 0))
    n = len(kernel)
    if n not in _AVGPOOL:
        raise ctx.unsupported(f"{n}-D pooling")
    if any(d != 1 for d in ctx.get("dilations") or []):
        raise ctx.unsupported("dilated AveragePool")

    def run(x: list[Tensor | None]) -> tuple[Tensor]:
        data = ctx.required(x, 1)[0]
        strides, _, pads = _spatial(ctx, data, kernel)
        if not any(pads):
            return (_AVGPOOL[n](data, kernel, strides, 0, ceil_mode),)
        if _symmetric(pads) and all(p <= k // 2 for p, k in zip(pads[:n], kernel, strict=True)):
            return (_AVGPOOL[n](data, kernel, strides, pads[:n], ceil_mode, include_pad),)
        padded = F.pad(data, _torch_pad(pads))
        total = _AVGPOOL[n](padded, kernel, strides, 0, ceil_mode) * math.prod(kernel)
        if include_pad:
            return (total / math.prod(kernel),)
        ones = F.pad(torch.ones_like(data[:1, :1]), _torch_pad(pads))
        count = _AVGPOOL[n](ones, kernel, strides, 0, ceil_mode) * math.prod(kernel)
        return (total / count,)

    return run


def _global_average_pool(ctx: OpContext) -> OpFn:
    def run(x: list[Tensor | None]) -> tuple[Tensor]:
        data = ctx.required(x, 1)[0]
        return (data.mean(dim=tuple(range(2, data.dim())), keepdim=True),)

    return run


OPS: dict[str, Callable[[OpContext], OpFn]] = {
    "Add": _binary(torch.add),
    "Sub": _binary(torch.sub),
    "Mul": _binary(torch.mul),
    "Div": _binary(_div),
    "Pow": _binary(_pow),
    "Mod": _mod,
    "MatMul": _binary(torch.matmul),
    "Equal": _binary(torch.eq),
    "Less": _binary(torch.lt),
    "Greater": _binary(torch.gt),
    "LessOrEqual": _binary(torch.le),
    "GreaterOrEqual": _binary(torch.ge),
    "And": _binary(torch.logical_and),
    "Or": _binary(torch.logical_or),
    "Max": _variadic(torch.maximum),
    "Min": _variadic(torch.minimum),
    "Sum": _variadic(torch.add),
    "Not": _unary(torch.logical_not),
    "Sqrt": _unary(torch.sqrt),
    "Erf": _unary(torch.erf),
    "Tanh": _unary(torch.tanh),
    "Sigmoid": _unary(torch.sigmoid),
    "Relu": _unary(torch.relu),
    "Exp": _unary(torch.exp),
    "Log": _unary(torch.log),
    "Neg": _unary(torch.neg),
    "Abs": _unary(torch.abs),
    "Reciprocal": _unary(torch.reciprocal),
    "Gelu": _gelu,
    "LeakyRelu": _leaky_relu,
    "Clip": _clip,
    "Softmax": _softmax_like(torch.softmax),
    "LogSoftmax": _softmax_like(torch.log_softmax),
    "LayerNormalization": _layer_norm,
    "BatchNormalization": _batch_norm,
    "ReduceMean": _reduce(torch.mean, axes_input_since=18),
    "ReduceSum": _reduce(torch.sum, axes_input_since=13),
    "ReduceMax": _reduce(_reduce_max, axes_input_since=18),
    "Reshape": _reshape,
    "Transpose": _transpose,
    "Gather": _gather,
    "Slice": _slice,
    "Concat": _concat,
    "Split": _split,
    "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze,
    "Shape": _shape,
    "Size": _size,
    "Cast": _cast,
    "Where": _where,
    "Expand": _expand,
    "ConstantOfShape": _constant_of_shape,
    "Range": _range,
    "Tile": _tile,
    "Flatten": _flatten,
    "Dropout": _dropout,
    "Identity": _identity,
    "Gemm": _gemm,
    "Conv": _conv,
    "ConvTranspose": _conv_transpose,
    "MaxPool": _max_pool,
    "AveragePool": _average_pool,
    "GlobalAveragePool": _global_average_pool,
}


def build_op(node: ir.Node, opset: int) -> OpFn:
    """The callable that runs `node`, or `UnsupportedModelError` naming the op and node."""
    name = node.name or ((node.outputs[0].name or "?") if node.outputs else "?")
    if node.domain not in ("", "ai.onnx") or node.op_type not in OPS:
        domain = f"{node.domain}::" if node.domain not in ("", "ai.onnx") else ""
        raise UnsupportedModelError(
            f"op {domain}{node.op_type} (node {name!r}) is not supported by the fine-tune "
            f"executor; supported ops: {', '.join(sorted(OPS))}"
        )
    attributes = {key: attribute_value(attr) for key, attr in node.attributes.items()}
    ctx = OpContext(name, node.op_type, opset, attributes, len(node.outputs))
    return OPS[node.op_type](ctx)
