"""Fresh value names: every representation here adds initializers and nodes beside the weight."""

from __future__ import annotations

__all__ = ["unique_name"]

import onnx_ir as ir


def unique_name(graph: ir.Graph, wanted: str) -> str:
    """`wanted`, or `wanted_1`, `wanted_2`, ...: the first no initializer, input or output has."""
    taken = set(graph.initializers) | {v.name for n in graph for v in n.outputs}
    taken |= {v.name for v in graph.inputs}
    name, counter = wanted, 1
    while name in taken:
        name, counter = f"{wanted}_{counter}", counter + 1
    return name
