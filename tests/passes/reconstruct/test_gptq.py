"""codebook.gptq and gptq_quantize: error feedback beats plain k-means at equal bits."""

from __future__ import annotations

import numpy as np
import pytest

from onnxcompress.formats.codebook import codebook_layers, dense_weight
from onnxcompress.pass_base import PassContext, get_pass
from onnxcompress.passes.codebook.kmeans import cluster_weights
from onnxcompress.passes.reconstruct.obs import (
    codebook_quantizer,
    gptq_quantize,
    integer_quantizer,
    reconstruction_error,
)
from tests.passes.reconstruct.models import (
    conv_case,
    embedding_case,
    mlp_case,
    run,
    serialized,
)


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_codebook_beats_kmeans_with_the_same_centroids(layer, bits, act_order):
    weights, hessian = layer
    indices, codebook, _ = cluster_weights(weights.astype(np.float32), bits)
    plain = codebook[indices].astype(np.float64)
    gptq = gptq_quantize(weights, hessian, codebook_quantizer(codebook), act_order=act_order)
    assert np.all(np.isin(gptq, codebook.astype(np.float64)))
    assert reconstruction_error(weights, gptq, hessian) < 0.8 * reconstruction_error(
        weights, plain, hessian
    )


def test_blocksize_does_not_change_the_result(layer):
    weights, hessian = layer
    _, codebook, _ = cluster_weights(weights.astype(np.float32), 3)
    quantizer = codebook_quantizer(codebook)
    np.testing.assert_allclose(gptq_quantize(weights, hessian, quantizer, blocksize=8),
                               gptq_quantize(weights, hessian, quantizer, blocksize=128))


@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_integer_levels_beat_round_to_nearest(layer, symmetric):
    weights, hessian = layer
    quantizer, scale, zero_point = integer_quantizer(weights, 4, symmetric=symmetric)
    nearest = np.stack([quantizer(weights[:, j], j) for j in range(weights.shape[1])], axis=1)
    gptq = gptq_quantize(weights, hessian, quantizer)
    levels = gptq / scale[:, None] + zero_point[:, None]
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-9)
    assert (
        levels.min() >= (-8 if symmetric else 0) - 1e-9
        and levels.max() <= (7 if symmetric else 15) + 1e-9
    )
    assert reconstruction_error(weights, gptq, hessian) < 0.8 * reconstruction_error(
        weights, nearest, hessian
    )


def test_kept_zeros_stay_exact(layer):
    weights, hessian = layer
    weights = np.where(np.abs(weights) < 0.7, 0.0, weights)
    _, codebook, _ = cluster_weights(weights.astype(np.float32), 3)
    gptq = gptq_quantize(weights, hessian, codebook_quantizer(codebook[1:]), keep_zeros=True)
    np.testing.assert_array_equal(gptq == 0, weights == 0)


def _cluster(model, data, **options):
    result = get_pass("codebook.gptq")(**options, context=PassContext(data=data))(model)
    return result.report, result.modified


def _check_codebooks(model, names, bits):
    layers = {layer.name: layer for layer in codebook_layers(model)}
    assert sorted(layers) == sorted(names)
    for layer in layers.values():
        assert layer.bits == bits and layer.k <= 1 << bits
        assert np.all(np.isin(dense_weight(layer), layer.codebook()))


@pytest.mark.parametrize("bits", [3, 4])
def test_pass_on_an_mlp_in_the_kmeans_graph_form(rng, bits):
    model, data = mlp_case(rng)
    report, modified = _cluster(model, data, bits=bits, min_params=0)
    assert modified
    _check_codebooks(model, ["fc0.weight", "fc1.weight", "head.weight"], bits)
    kmeans, _ = mlp_case(np.random.default_rng(0))
    get_pass("codebook.kmeans")(bits=bits, min_params=0)(kmeans)
    form = {
        layer.name: (layer.index_dtype, layer.k, layer.shape, layer.zero_entry)
        for layer in codebook_layers(kmeans)
    }
    assert {layer.name: (layer.index_dtype, layer.k, layer.shape, layer.zero_entry)
            for layer in codebook_layers(model)} == form
    assert {form[name][0] for name in form} == ({"packed", "uint4"} if bits == 3 else {"uint4"})
    assert report.notes["gptq_error"] < 0.8 * report.notes["kmeans_error"]
    (out,) = run(model, {"x": data["x"][:4]})
    assert out.shape == (4, 10) and np.all(np.isfinite(out))


def test_refine_and_act_order_options_each_beat_kmeans(rng):
    for options in ({"refine": False}, {"act_order": True, "sequential": True}):
        model, data = mlp_case(rng)
        report, _ = _cluster(model, data, bits=3, min_params=0, **options)
        assert report.notes["gptq_error"] < 0.8 * report.notes["kmeans_error"]


def test_a_pruned_layer_keeps_its_zeros_as_the_reserved_entry(rng):
    model, data = mlp_case(rng)
    get_pass("prune.obs")(sparsity=0.5, context=PassContext(data=data))(model)
    zeros = {name: model.graph.initializers[name].const_value.numpy() == 0
             for name in ("fc0.weight", "fc1.weight", "head.weight")}
    report, _ = _cluster(model, data, bits=3, min_params=0)
    for layer in codebook_layers(model):
        assert layer.zero_entry and layer.codebook()[0] == 0
        np.testing.assert_array_equal(dense_weight(layer) == 0, zeros[layer.name])
    assert report.notes["gptq_error"] < report.notes["kmeans_error"]
    run(model, {"x": data["x"][:2]})


def test_conv_and_grouped_conv(rng):
    model, data = conv_case(rng)
    report, _ = _cluster(model, data, bits=3, min_params=0, probes=32)
    _check_codebooks(model, ["conv1.weight", "conv2.weight"], 3)
    assert all("GPTQ" in c.detail for c in report.changes)
    assert report.notes["gptq_error"] < 0.8 * report.notes["kmeans_error"]
    run(model, {"x": data["x"][:2]})


def test_embedding_falls_back_to_plain_kmeans_with_the_reason(rng):
    model, data = embedding_case(rng)
    report, _ = _cluster(model, data, bits=4, min_params=0)
    details = {c.name: c.detail for c in report.changes}
    assert "plain k-means fallback (an embedding table (Gather)" in details["embed.weight"]
    assert "GPTQ" in details["proj.weight"]
    table = next(layer for layer in codebook_layers(model) if layer.name == "embed.weight")
    assert table.k == 16
    run(model, {"ids": data["ids"][:2]})


def test_skips_are_recorded(rng):
    model, data = mlp_case(rng)
    report, _ = _cluster(model, data, bits=8, exclude=("head.*",), min_params=2100)
    assert report.reason_for("head.weight") is not None  # excluded
    assert report.reason_for("fc0.weight") is not None  # 2048 weights < min_params
    assert [c.name for c in report.changes] == ["fc1.weight"]


def test_deterministic(rng):
    model, data = conv_case(rng)
    first, second = model.clone(), model.clone()
    _cluster(first, data, bits=4, min_params=0, probes=16)
    _cluster(second, data, bits=4, min_params=0, probes=16)
    assert serialized(first) == serialized(second)
    assert get_pass("codebook.gptq")(bits=8).needs_calibration()


def test_codebook_pack_reads_the_output(rng):
    model, data = mlp_case(rng)
    _cluster(model, data, bits=5, min_params=0, pack_indices=False)
    before = {layer.name: dense_weight(layer) for layer in codebook_layers(model)}
    get_pass("codebook.pack")()(model)
    after = {layer.name: layer for layer in codebook_layers(model)}
    assert after["fc0.weight"].index_dtype == "packed"
    for name, weight in before.items():
        np.testing.assert_array_equal(dense_weight(after[name]), weight)
    run(model, {"x": data["x"][:2]})
