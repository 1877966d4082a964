"""Run an ONNX graph as a torch `nn.Module`, with its weights as trainable parameters.

Why our own executor (see shared/DESIGN.md): onnx2torch / onnx2pytorch pull a CUDA torch,
fail on what torch 2.13's default exporter writes (opset 18+, Reshape ``allowzero``,
ReduceMean axes as an input) and rename parameters. Here every float initializer and every
float ``Constant`` node output becomes an `nn.Parameter` looked up by its exact ONNX name
(`OnnxModule.parameter(name)`), so masks, codebooks and low-rank factors can be attached as
torch parametrizations (`onnxcompress.finetune.parametrize`) and written back by name.

What is exact: the forward pass computes the graph's function op by op (`ops.OPS`); it
matches onnxruntime up to float rounding (tests: 1e-5 relative). BatchNormalization runs
with its stored statistics (inference semantics) also while training; Dropout nodes drop
only in training mode. An op outside `ops.OPS` raises `UnsupportedModelError` naming the
op and node when the module is built, never later.
"""

from __future__ import annotations

__all__ = ["OnnxModule", "to_ir", "default_trainable"]

import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, cast

import numpy as np
import onnx
import onnx_ir as ir
import torch
from torch import nn

from onnxcompress.errors import DataError, UnsupportedModelError
from onnxcompress.finetune.ops import TORCH_DTYPES, build_op
from onnxcompress.sites import constant_node_array

logger = logging.getLogger(__name__)

# (op, input index) pairs that hold statistics, not learned weights.
_NEVER_TRAINED = {("BatchNormalization", 3), ("BatchNormalization", 4)}
# (op, input index) pairs that hold learned weights or biases, trained even when tiny.
_LEARNED_ROLES = {
    ("BatchNormalization", 1), ("BatchNormalization", 2), ("LayerNormalization", 1),
    ("LayerNormalization", 2), ("Conv", 1), ("Conv", 2), ("ConvTranspose", 1), ("ConvTranspose", 2),
    ("Gemm", 1), ("Gemm", 2),
}


def to_ir(model: ir.Model | onnx.ModelProto) -> ir.Model:
    """An `ir.Model` from either representation (a ModelProto is deserialized, not copied)."""
    if isinstance(model, onnx.ModelProto):
        return ir.serde.deserialize_model(model)
    return model


class _Holder(nn.Module):
    """Holds one ONNX tensor as ``weight`` (a Parameter for floats, a buffer otherwise)."""

    def __init__(self, array: np.ndarray, trainable: bool) -> None:
        super().__init__()
        tensor = torch.from_numpy(np.array(array, copy=True))
        if tensor.is_floating_point():
            self.weight = nn.Parameter(tensor, requires_grad=trainable)
        else:
            self.register_buffer("weight", tensor)


def _constant_array(node: ir.Node) -> np.ndarray:
    """The value of a Constant node (`sites.constant_node_array`), or why it cannot be held."""
    array = constant_node_array(node)
    if array is None:
        raise UnsupportedModelError(
            f"Constant node {node.name!r}: only value / value_float(s) / value_int(s) are supported"
        )
    return array


def _safe_key(name: str, taken: set[str]) -> str:
    """A ModuleDict key for an ONNX name (torch forbids dots); unique, readable."""
    base = re.sub(r"\W", "_", name) or "tensor"
    key, i = base, 1
    while key in taken:
        key, i = f"{base}_{i}", i + 1
    taken.add(key)
    return key


def default_trainable(model: ir.Model) -> set[str]:
    """The tensors trained by default: those that look like learned weights.

    Float tensors of more than one element, or read where an op takes a learned weight or
    bias (a one-channel BatchNorm scale); never BatchNormalization statistics nor Constant
    literals (value_float / value_floats).
    """
    frozen: set[str] = set()
    learned: set[str] = set()
    for node in model.graph:
        for index, value in enumerate(node.inputs):
            if value is None:
                continue
            if (node.op_type, index) in _NEVER_TRAINED:
                frozen.add(value.name or "")
            elif (node.op_type, index) in _LEARNED_ROLES:
                learned.add(value.name or "")
    # value_float(s) Constants are literals (write-back keeps tensors only)
    for node in model.graph:
        if node.op_type == "Constant" and "value" not in node.attributes:
            frozen.add(node.outputs[0].name or "")
    names: set[str] = set()
    for name, array in _constants(model).items():
        if array.dtype.kind == "f" and (array.size > 1 or name in learned) and name not in frozen:
            names.add(name)
    return names


def _torch_compatible(array: np.ndarray, name: str) -> np.ndarray:
    """The array in a dtype torch holds; other types torch lacks are refused by name.

    4-bit integers (ml_dtypes uint4/int4, as codebook indices may be stored) widen to 8 bits.
    """
    kind = str(array.dtype)
    if kind == "uint4":
        return array.astype(np.uint8)
    if kind == "int4":
        return array.astype(np.int8)
    if array.dtype.kind == "V" or kind.startswith("float8") or kind.startswith("float4"):
        raise UnsupportedModelError(
            f"tensor {name!r} has type {kind}, which the fine-tune executor cannot hold"
        )
    return array


def _constants(model: ir.Model) -> dict[str, np.ndarray]:
    """Every initializer and Constant-node output of the main graph, by name."""
    found: dict[str, np.ndarray] = {}
    for name, value in model.graph.initializers.items():
        if value.const_value is not None:
            found[name] = _torch_compatible(np.array(value.const_value.numpy()), name)
    for node in model.graph:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            name = node.outputs[0].name or ""
            found[name] = _torch_compatible(_constant_array(node), name)
    return found


class OnnxModule(nn.Module):
    """An ONNX graph as a torch module; weights are parameters keyed by their ONNX names.

    ``trainable`` selects which float tensors get ``requires_grad`` (names, or a predicate on
    the name); by default `default_trainable`. Call with positional inputs in graph order or
    keyword inputs by graph-input name; returns one tensor for a single-output graph and a
    tuple otherwise.
    """

    def __init__(
        self,
        model: ir.Model | onnx.ModelProto,
        *,
        trainable: Iterable[str] | Callable[[str], bool] | None = None,
    ) -> None:
        super().__init__()
        model = to_ir(model)
        graph = model.graph
        opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 17))
        constants = _constants(model)
        if trainable is None:
            wanted: Callable[[str], bool] = default_trainable(model).__contains__
        elif callable(trainable):
            wanted = trainable
        else:
            wanted = set(trainable).__contains__

        self.tensors = nn.ModuleDict()
        self._keys: dict[str, str] = {}
        taken: set[str] = set()
        for name, array in constants.items():
            key = _safe_key(name, taken)
            self._keys[name] = key
            self.tensors[key] = _Holder(
                array, trainable=bool(wanted(name)) and array.dtype.kind == "f"
            )

        self.input_names = [v.name or "" for v in graph.inputs if (v.name or "") not in constants]
        self.optional_inputs = [v.name or "" for v in graph.inputs if (v.name or "") in constants]
        self.output_names = [v.name or "" for v in graph.outputs]
        self.input_dtypes = {
            v.name or "": TORCH_DTYPES.get(int(v.dtype), torch.float32)
            if v.dtype
            else torch.float32
            for v in graph.inputs
        }
        self._steps: list[tuple[Callable[..., Any], list[str], list[str]]] = []
        self._labels: list[str] = []
        self._dropouts: dict[str, Callable[..., Any]] = {}
        for node in graph:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                continue
            self._check_no_subgraph(node)
            fn = build_op(node, int(opset))
            if node.op_type == "Dropout":
                self._dropouts[node.name or node.outputs[0].name or ""] = fn
            ins = [(v.name or "") if v is not None else "" for v in node.inputs]
            outs = [v.name or "" for v in node.outputs]
            self._steps.append((fn, ins, outs))
            self._labels.append(f"{node.op_type} node {node.name or outs[0]!r}")
        logger.debug(
            "executor: %d nodes, %d tensors (%d trainable)",
            len(self._steps),
            len(constants),
            sum(p.requires_grad for p in self.parameters()),
        )

    @staticmethod
    def _check_no_subgraph(node: ir.Node) -> None:
        for attr in node.attributes.values():
            if attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
                raise UnsupportedModelError(
                    f"op {node.op_type} (node {node.name!r}) has a subgraph; the fine-tune "
                    "executor runs flat graphs only"
                )

    # --- tensors by ONNX name ---------------------------------------------------------------

    @property
    def onnx_names(self) -> list[str]:
        """The ONNX names of every tensor the module holds (initializers, Constants)."""
        return list(self._keys)

    def holder(self, name: str) -> nn.Module:
        """The submodule whose ``weight`` is the ONNX tensor `name` (parametrize this)."""
        try:
            return self.tensors[self._keys[name]]
        except KeyError:
            raise KeyError(f"no initializer or Constant named {name!r} in the model") from None

    def tensor(self, name: str) -> torch.Tensor:
        """The current value of `name`, after any parametrization."""
        # Module.__getattr__ is typed Tensor | Module; a holder's `weight` is always a tensor
        return cast(torch.Tensor, self.holder(name).weight)

    def parameter(self, name: str) -> nn.Parameter:
        """The raw trainable parameter behind `name` (the original, when parametrized)."""
        holder = self.holder(name)
        parametrizations = getattr(holder, "parametrizations", None)
        if parametrizations is not None and "weight" in parametrizations:
            originals = self.originals(name)
            if len(originals) != 1:
                raise KeyError(
                    f"{name!r} is parametrized by {len(originals)} tensors; use originals()"
                )
            return originals[0]
        weight = holder.weight
        if not isinstance(weight, nn.Parameter):
            raise KeyError(f"{name!r} is not a float tensor, so it has no parameter")
        return weight

    def originals(self, name: str) -> list[nn.Parameter]:
        """Every trainable tensor behind `name`: one, or two for a low-rank parametrization."""
        holder = self.holder(name)
        parametrizations = getattr(holder, "parametrizations", None)
        if parametrizations is not None and "weight" in parametrizations:
            entry = parametrizations.weight
            if hasattr(entry, "original"):
                return [entry.original]
            return [
                getattr(entry, f"original{i}")
                for i in range(len(list(entry.parameters(recurse=False))))
            ]
        weight = holder.weight
        return [weight] if isinstance(weight, nn.Parameter) else []

    def onnx_parameters(self, trainable_only: bool = True) -> dict[str, torch.Tensor]:
        """Parameters keyed by ONNX name: what the optimizer steps (originals when parametrized)."""
        out: dict[str, torch.Tensor] = {}
        for name, key in self._keys.items():
            holder = self.tensors[key]
            params = list(holder.parameters())
            if params and (not trainable_only or any(p.requires_grad for p in params)):
                out[name] = self.parameter(name) if len(params) == 1 else params[0]
        return out

    def trainable_names(self) -> list[str]:
        """ONNX names of the tensors that receive gradients."""
        return [
            name
            for name, key in self._keys.items()
            if any(p.requires_grad for p in self.tensors[key].parameters())
        ]

    def arrays(self, names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """Current values (after parametrizations) as numpy, by ONNX name."""
        selected = self.trainable_names() if names is None else list(names)
        with torch.no_grad():
            return {name: self.tensor(name).detach().cpu().numpy().copy() for name in selected}

    def set_dropout_ratio(self, node_name: str, ratio: float | None) -> None:
        """Override the training-time ratio of one Dropout node (None restores the node's)."""
        if node_name not in self._dropouts:
            raise KeyError(f"no Dropout node named {node_name!r}")
        self._dropouts[node_name].ratio_override = ratio  # type: ignore[attr-defined]

    @property
    def dropout_nodes(self) -> list[str]:
        """Dropout nodes by name, for `set_dropout_ratio` (Han's rescaled ratios after pruning)."""
        return list(self._dropouts)

    # --- running ------------------------------------------------------------------------------

    def _feeds(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        if len(args) > len(self.input_names):
            raise DataError(f"the model takes {len(self.input_names)} inputs, got {len(args)}")
        feeds = dict(zip(self.input_names, args, strict=False))
        feeds.update(kwargs)
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise DataError(f"missing model inputs: {', '.join(missing)}")
        out = {}
        for name, value in feeds.items():
            if not isinstance(value, torch.Tensor):
                value = torch.as_tensor(np.asarray(value))
            out[name] = value.to(self.input_dtypes.get(name, value.dtype))
        return out

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Run the graph node by node on torch tensors: gradients reach every trainable tensor."""
        env: dict[str, Any] = {"": None}
        for name, key in self._keys.items():
            env[name] = self.tensors[key].weight
        env.update(self._feeds(args, kwargs))
        for fn in self._dropouts.values():
            fn.training = self.training  # type: ignore[attr-defined]
        for index, (fn, ins, outs) in enumerate(self._steps):
            try:
                results = fn([env[n] for n in ins])
            except RuntimeError as error:
                shapes = [
                    tuple(env[n].shape) if isinstance(env[n], torch.Tensor) else None for n in ins
                ]
                raise DataError(
                    f"{self._labels[index]} failed on inputs of shapes {shapes}: "
                    f"{str(error).splitlines()[0]} (a model exported with a fixed batch size only "
                    "runs "
                    "batches of that size)"
                ) from error
            for name, value in zip(outs, results, strict=False):
                if name:
                    env[name] = value
        outputs = tuple(env[name] for name in self.output_names)
        return outputs[0] if len(outputs) == 1 else outputs

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Inference on numpy inputs (eval mode, no gradients), like `InferenceSession.run`."""
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                result = self(**{k: v for k, v in feeds.items() if k in self.input_dtypes})
        finally:
            self.train(was_training)
        results = result if isinstance(result, tuple) else (result,)
        return [r.detach().cpu().numpy() for r in results]
