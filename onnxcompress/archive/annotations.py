"""The torch exporter's debug annotations, which an archive leaves out unless asked to keep them.

`torch.onnx.export` (dynamo) annotates every node and value with ``metadata_props`` for
debugging the export: the Python stack trace of the layer (the exporting machine's file
paths), the FX node it came from, module class hierarchies, the exported program's
signature. None of it is read at inference. In a LeNet-5 archive it is ~1.6 KB of the ~2.5 KB
compressed graph (6% of the file), and it discloses where the model was built. Annotations
under other keys (ours, such as a codebook's bit width, and the model-level ones a user or
a tool wrote, such as YOLO's ``imgsz``) are kept.
"""

from __future__ import annotations

__all__ = ["EXPORTER_KEY_PREFIXES", "strip_exporter_annotations"]

from collections.abc import Iterator
from typing import Any

import onnx

#: Keys the torch exporter writes: "pkg.torch.onnx.stack_trace", "pkg.torch.export..." and
#: the node's module "namespace".
EXPORTER_KEY_PREFIXES = ("pkg.torch.", "namespace")


def strip_exporter_annotations(model: onnx.ModelProto) -> int:
    """Drop the exporter's annotations from every graph of `model` in place; how many went."""
    removed = 0
    for holder in _annotated(model.graph):
        kept = [p for p in holder.metadata_props if not p.key.startswith(EXPORTER_KEY_PREFIXES)]
        if len(kept) != len(holder.metadata_props):
            removed += len(holder.metadata_props) - len(kept)
            del holder.metadata_props[:]
            holder.metadata_props.extend(kept)
    return removed


def _annotated(graph: onnx.GraphProto) -> Iterator[Any]:
    """The graph and everything in it that carries metadata_props, subgraphs included."""
    yield graph
    yield from graph.input
    yield from graph.output
    yield from graph.value_info
    yield from graph.initializer
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from _annotated(attribute.g)
            elif attribute.type == onnx.AttributeProto.GRAPHS:
                for subgraph in attribute.graphs:
                    yield from _annotated(subgraph)
