"""An archive leaves out the torch exporter's debug annotations, and keeps everything else."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper

from onnxcompress.archive import pack, unpack
from onnxcompress.archive.annotations import strip_exporter_annotations
from onnxcompress.formats.codebook import BITS_KEY, codebook_layers, dense_weight
from onnxcompress.pass_base import get_pass
from tests.builders import mlp_proto

TRACE = 'File "/home/someone/secret_project/model.py", line 42, in forward\n    x = self.fc0(x)'


def _annotate_as_the_exporter_does(proto: onnx.ModelProto) -> onnx.ModelProto:
    for node in proto.graph.node:
        helper.set_metadata_props(node, {"pkg.torch.onnx.stack_trace": TRACE,
                                         "namespace": ": Net/fc0: torch.nn.Linear"})
    for value in proto.graph.input:
        helper.set_metadata_props(value, {"pkg.torch.export.graph_signature.InputSpec.kind": "X"})
    helper.set_metadata_props(proto.graph, {"pkg.torch.export.ExportedProgram.signature": "#"})
    helper.set_metadata_props(proto, {"imgsz": "[640, 640]"})  # a user's: not the exporter's
    return proto


def _clustered_annotated(rng: np.random.Generator) -> ir.Model:
    model = ir.from_proto(_annotate_as_the_exporter_does(mlp_proto(rng, (96, 64, 10))))
    get_pass("prune.magnitude")(sparsity=0.9)(model)
    get_pass("codebook.kmeans")(min_params=0)(model)
    return model


def _keys(proto: onnx.ModelProto) -> set[str]:
    holders = [proto.graph, *proto.graph.node, *proto.graph.input, *proto.graph.value_info]
    return {p.key for holder in holders for p in holder.metadata_props}


def test_the_archive_drops_the_exporters_annotations_and_keeps_ours(rng):
    model = _clustered_annotated(rng)
    result = pack(model)
    restored = unpack(result.data)
    assert result.annotations_dropped > 0
    assert not any(key.startswith("pkg.torch.") or key == "namespace" for key in _keys(restored))
    assert BITS_KEY in _keys(restored)  # the codebook's own annotation
    assert {p.key: p.value for p in restored.metadata_props} == {"imgsz": "[640, 640]"}
    assert b"secret_project" not in restored.SerializeToString()
    weights = {x.name: dense_weight(x) for x in codebook_layers(ir.from_proto(restored))}
    assert len(weights) == 2
    for layer in codebook_layers(model):
        np.testing.assert_array_equal(weights[layer.name], dense_weight(layer))
    assert len(result.data) < len(pack(model, keep_annotations=True).data)


def test_kept_annotations_round_trip_exactly(rng):
    model = _clustered_annotated(rng)
    kept = pack(model, keep_annotations=True)
    assert kept.annotations_dropped == 0
    assert unpack(kept.data).SerializeToString() == ir.to_proto(model).SerializeToString()


def test_subgraphs_are_stripped_too():
    inner = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "branch", [],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    helper.set_metadata_props(inner.node[0], {"pkg.torch.onnx.fx_node": "%y", "ours": "1"})
    node = helper.make_node("If", ["c"], ["y"], then_branch=inner, else_branch=inner)
    graph = helper.make_graph([node], "g", [], [])
    model = helper.make_model(graph)
    assert strip_exporter_annotations(model) == 2
    for branch in (model.graph.node[0].attribute[0].g, model.graph.node[0].attribute[1].g):
        assert [p.key for p in branch.node[0].metadata_props] == ["ours"]
