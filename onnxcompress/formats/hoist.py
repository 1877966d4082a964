"""Weights in Constant nodes or inside If/Loop/Scan subgraphs, moved to main-graph initializers.

Why: every in-graph representation here (the codebook of `formats.codebook`, its bit-packed
indices in `formats.packed`) is written beside the weight as main-graph initializers and nodes,
and `codebook_layers`, `inspect`, `pack` and the fine-tune bridge find it there. A subgraph may
read any value of an enclosing graph, so a weight read inside an If branch or a Loop body can
be held (and decoded) in the main graph and read from the outer scope: the model computes the
same thing and every tool keeps one place to look.

Why not decode inside the branch: both forms are constant-folded by onnxruntime at session
load, across scopes too. Measured on silero-vad (28 Constant weights in both branches of an
If, its LSTM weights sliced and concatenated inside a nested If; onnxruntime 1.32, 1 thread):
with the codebooks decoded in the main graph or inside the branches, the optimised graphs hold
the same nodes as the original (no Gather, Cast, Slice left; FusedConv and LSTM kept) and
batch-1 latency is the original's within noise (`benchmarks/optimize_real.py`: 0.97x). Where no
folding runs, the main-graph form decodes both branches' weights at every call; that is the
cost of one place to look.
"""

from __future__ import annotations

__all__ = ["hoist_constant"]

from collections import Counter

import onnx_ir as ir


def hoist_constant(main: ir.Graph, value: ir.Value) -> ir.Value:
    """`value` as an initializer of `main`, read by all its former readers (any depth).

    `value` is an initializer of `main` (returned as is), of a subgraph, or a Constant node's
    output (in any graph; the node is removed). The name is kept unless another graph of the
    model defines it too (sibling If branches may reuse a name); then a suffix is added.
    The caller checks that `value` is no graph output.
    """
    if value.name is not None and main.initializers.get(value.name) is value:
        return value
    producer = value.producer()
    tensor = value.const_value
    if producer is not None:
        attribute = producer.attributes.get("value") if producer.op_type == "Constant" else None
        tensor = attribute.as_tensor() if attribute is not None else None
    if tensor is None:
        raise ValueError(f"{value.name}: not a constant, cannot hoist it")
    hoisted = ir.Value(
        name=_free_name(main, value.name or "weight"),
        const_value=tensor,
        shape=ir.Shape(tensor.shape.numpy()),
        type=ir.TensorType(tensor.dtype),
    )
    ir.convenience.replace_all_uses_with(value, hoisted)
    if producer is not None:
        assert producer.graph is not None
        producer.graph.remove(producer, safe=True)
    else:
        assert value.graph is not None and value.name is not None
        value.graph.initializers.pop(value.name)
        value.const_value = None  # detach: onnx_ir renames a value's tensor with it
    main.register_initializer(hoisted)
    return hoisted


def _free_name(main: ir.Graph, wanted: str) -> str:
    """`wanted` when only the value being hoisted defines it, else `wanted_1`, `wanted_2`, ..."""
    defined = _definitions(main)
    if defined[wanted] <= 1:
        return wanted
    name, counter = wanted, 1
    while name in defined:
        name, counter = f"{wanted}_{counter}", counter + 1
    return name


def _definitions(main: ir.Graph) -> Counter[str]:
    """How many times each value name is defined across the model's graphs (SSA per scope)."""
    count: Counter[str] = Counter()
    for graph in (main, *main.subgraphs()):
        count.update(list(graph.initializers))
        count.update(v.name for v in graph.inputs if v.name)
        count.update(v.name for node in graph for v in node.outputs if v.name)
    return count
