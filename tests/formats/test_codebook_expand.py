"""`expand_codebook`: a shared-weight layer back to the plain weight it computes with."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from onnxcompress.formats.codebook import codebook_layers, dense_weight, expand_codebook
from onnxcompress.pass_base import get_pass
from onnxcompress.sites import find_weight_sites
from tests.builders import mlp_proto
from tests.formats.test_codebook_scaled import scaled_model

SIZES = (64, 128, 64, 10)


def run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(
        ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    return session.run(None, {"x": x})[0]


def clustered(pack_indices: bool) -> ir.Model:
    model = ir.from_proto(mlp_proto(np.random.default_rng(0), SIZES))
    get_pass("prune.magnitude")(sparsity=0.5)(model)
    get_pass("codebook.kmeans")(bits=3, pack_indices=pack_indices, min_params=0)(model)
    return model


@pytest.mark.parametrize("pack_indices", [False, True])
def test_expanded_layers_are_plain_weights_with_the_same_outputs(pack_indices):
    model = clustered(pack_indices)
    x = np.random.default_rng(1).standard_normal((5, SIZES[0])).astype(np.float32)
    before = run(model, x)
    layers = codebook_layers(model)
    weights = {layer.name: dense_weight(layer) for layer in layers}
    assert len(layers) == 3
    for layer in layers:
        expand_codebook(model.graph, layer)
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    assert codebook_layers(model) == []
    assert sorted(n.op_type for n in model.graph) == ["Add", "Add", "Gemm", "MatMul", "MatMul",
                                                       "Relu", "Relu"]
    assert not any("codebook" in name or "unpack" in name for name in model.graph.initializers)
    sites = {site.name: site for site in find_weight_sites(model, min_params=0).sites}
    for name, weight in weights.items():
        np.testing.assert_array_equal(sites[name].value.const_value.numpy(), weight)
        assert np.mean(weight == 0) >= 0.5  # the pruned zeros are still there, exactly
    np.testing.assert_array_equal(run(model, x), before)


def test_a_channel_scaled_layer_expands_to_shared_values_times_scales(rng):
    _, model = scaled_model(rng)
    (layer,) = codebook_layers(model)
    weight = dense_weight(layer)
    x = rng.standard_normal((3, 64)).astype(np.float32)
    before = run(model, x)
    value = expand_codebook(model.graph, layer)
    assert value.name == "fc0.weight"
    np.testing.assert_array_equal(value.const_value.numpy(), weight)
    assert [n.op_type for n in model.graph if n.op_type in ("Gather", "Mul", "Cast")] == []
    np.testing.assert_array_equal(run(model, x), before)
