"""sparse.csr on weight-shared layers (the codebook passes' Cast -> Gather pattern)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import numpy_helper

from onnxcompress.formats.codebook import codebook_layers, insert_codebook
from onnxcompress.pass_base import get_pass
from tests.builders import mlp_proto
from tests.passes.sparse.test_sparse_csr import stock_session

SparseCsr = get_pass("sparse.csr")


def shared_mlp(rng: np.random.Generator) -> onnx.ModelProto:
    """MLP 48-64-40-10: fc0 pruned to 90% and shared (16 entries, 0 reserved), fc1, head shared."""
    proto = mlp_proto(rng, (48, 64, 40, 10))
    model = ir.serde.deserialize_model(proto)
    graph = model.graph
    for name, entries, sparsity in (
        ("fc0.weight", 16, 0.9),
        ("fc1.weight", 16, 0.0),
        ("head.weight", 40, 0.0),
    ):
        value = graph.initializers[name]
        weight = value.const_value.numpy().copy()
        if sparsity:
            weight[rng.random(weight.shape) < sparsity] = 0.0
        codebook = np.linspace(weight.min(), weight.max(), entries).astype(np.float32)
        if sparsity:
            codebook[0] = 0.0
        indices = np.abs(weight[..., None] - codebook).argmin(axis=-1).astype(np.uint8)
        if sparsity:
            indices[weight == 0] = 0
        insert_codebook(graph, value, indices, codebook, bits=4 if entries <= 16 else 8,
                        zero_entry=bool(sparsity), packed=False)
    out = ir.to_proto(model)
    assert len(codebook_layers(ir.serde.deserialize_model(out))) == 3
    return out


def test_shared_layers_become_codebook_ops(rng):
    proto = shared_mlp(rng)
    result = SparseCsr(decide="always", min_params=16)(ir.serde.deserialize_model(proto))
    out = ir.to_proto(result.model)
    onnx.checker.check_model(out)
    ops = {n.op_type for n in out.graph.node}
    assert {"SparseCodebookMatMul", "CodebookMatMul"} <= ops
    assert "Gather" not in ops and "Cast" not in ops  # the decode pairs are gone
    assert not any(i.name.endswith(".codebook_indices") for i in out.graph.initializer)
    details = {c.name: c.detail for c in result.report.changes}
    assert details["fc0.weight"].startswith("SparseCodebookMatMul, sparsity 0.9")
    assert details["fc1.weight"].startswith("CodebookMatMul, sparsity 0.0")
    assert "4-bit indices" in details["fc1.weight"]
    assert "8-bit indices" in details["head.weight"]  # 40 entries
    packed = next(
        numpy_helper.to_array(i)
        for i in out.graph.initializer
        if i.name.startswith("fc1.weight.codebook")
    )
    assert packed.dtype == np.uint8 and packed.shape == (40, 32)  # W^T rows, two indices per byte
    assert sorted(f.name for f in out.functions) == ["CodebookMatMul", "SparseCodebookMatMul"]

    x = rng.standard_normal((3, 48)).astype(np.float32)
    expected = stock_session(proto).run(None, {"x": x})[0]
    np.testing.assert_allclose(
        stock_session(out).run(None, {"x": x})[0], expected, rtol=1e-5, atol=1e-5
    )


def test_shared_weight_read_twice_stays(rng):
    proto = shared_mlp(rng)
    model = ir.serde.deserialize_model(proto)
    layer = next(layer for layer in codebook_layers(model) if layer.name == "fc1.weight")
    # a second reader of the decoded weight
    extra = ir.node("Identity", [layer.gather.outputs[0]], num_outputs=1)
    extra.outputs[0].name = "fc1_copy"
    model.graph.append(extra)
    model.graph.outputs.append(extra.outputs[0])
    report = SparseCsr(decide="always", min_params=16)(model).report
    assert report.reason_for("fc1.weight") == "shared weight read by 2 nodes"
