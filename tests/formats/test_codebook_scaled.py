"""The channel-scaled codebook form: one codebook over channels divided by their own scales."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from onnxcompress.archive.format import pack, unpack
from onnxcompress.formats.codebook import codebook_layers, dense_weight, insert_codebook
from onnxcompress.formats.detect import is_codebook_decoded
from onnxcompress.formats.packed import pack_codebook_indices
from onnxcompress.sites import find_weight_sites
from onnxcompress.summary import layer_table
from tests.builders import mlp


def scaled_model(rng: np.random.Generator, bits: int = 3) -> tuple[ir.Model, ir.Model]:
    """(original MLP, the same with its first weight [in, out] as a channel-scaled codebook)."""
    original = mlp(rng, (64, 128, 10))
    model = original.clone()
    site = find_weight_sites(model, min_params=0).sites[0]
    shape = site.shape
    scales = rng.uniform(0.1, 3.0, (1, shape[1])).astype(np.float32)
    indices = rng.integers(0, 1 << bits, shape).astype(np.uint8)
    codebook = np.linspace(-1, 1, 1 << bits).astype(np.float32)
    insert_codebook(model.graph, site.value, indices, codebook, bits=bits, zero_entry=False,
                    packed=False, scales=scales)
    return original, model


def run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(
        ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    return session.run(None, {"x": x})[0]


def test_the_weight_is_the_shared_values_times_its_channel_scales(rng):
    original, model = scaled_model(rng)
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    (layer,) = codebook_layers(model)
    assert layer.weight_name == "fc0.weight" and layer.name != layer.weight_name
    expected = layer.codebook()[layer.indices()] * layer.scales()
    np.testing.assert_array_equal(dense_weight(layer), expected)
    reference = original.clone()
    find_weight_sites(reference, min_params=0).sites[0].replace(expected.astype(np.float32))
    x = rng.standard_normal((3, 64)).astype(np.float32)
    np.testing.assert_array_equal(run(model, x), run(reference, x))


def test_it_is_a_coded_weight_no_pass_rewrites_and_summary_counts_its_scales(rng):
    _, model = scaled_model(rng)
    assert is_codebook_decoded(next(v for v in _values(model) if v.name == "fc0.weight"))
    assert "fc0.weight" not in {site.name for site in find_weight_sites(model).sites}
    (row,) = [row for row in layer_table(model) if row.holder == "codebook"]
    assert row.name == "fc0.weight" and row.op == "MatMul"
    assert row.bytes == 64 * 128 + 8 * 4 + 128 * 4  # indices + codebook + scales


def test_packed_indices_and_the_archive_keep_it_exact(rng):
    _, model = scaled_model(rng)
    x = rng.standard_normal((3, 64)).astype(np.float32)
    before = run(model, x)
    assert pack_codebook_indices(model)
    assert codebook_layers(model)[0].index_dtype == "packed"
    np.testing.assert_array_equal(run(model, x), before)
    restored = ir.from_proto(unpack(pack(model).data))
    np.testing.assert_array_equal(run(restored, x), before)


def _values(model: ir.Model) -> list[ir.Value]:
    return [output for node in model.graph for output in node.outputs]
