"""SparseConv kernel against onnxruntime's own Conv on random geometries, its numpy reference.

Its portable fallback in a stock onnxruntime, and malformed input.
"""

from __future__ import annotations

import re

import numpy as np
import onnxruntime as ort
import pytest
from onnx.reference import ReferenceEvaluator

from onnxcompress import runtime
from onnxcompress.formats.conv_layout import ConvGeometry, conv_csr, dense_from_conv_csr
from onnxcompress.formats.kernel_reference import REFERENCE_OPS
from tests.kernels.sparse_models import dense_conv_model, pruned, sparse_conv_model


def _ort_conv(weight, geometry, x, bias):
    model = dense_conv_model(weight, geometry, list(x.shape), bias)
    return ort.InferenceSession(model.SerializeToString()).run(None, {"X": x})[0]


def _kernel(model, x, threads=1):
    return runtime.session(model, threads=threads).run(None, {"X": x})[0]


def _close(actual, expected):
    scale = max(1.0, float(np.abs(expected).max(initial=0.0)))
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5 * scale)


def _random_case(rng: np.random.Generator):
    """A random 1-D or 2-D Conv: channels, groups, kernel, strides, pads, dilations, input size."""
    spatial = int(rng.integers(1, 3))
    group = int(rng.choice([1, 1, 2, 3]))
    per_group = int(rng.integers(1, 6))
    filters = group * int(rng.integers(1, 9))
    kernel = tuple(int(k) for k in rng.integers(1, 5, size=spatial))
    strides = tuple(int(s) for s in rng.integers(1, 4, size=spatial))
    dilations = tuple(int(d) for d in rng.integers(1, 3, size=spatial))
    pads = tuple(int(p) for p in rng.integers(0, 3, size=2 * spatial))
    size = tuple(
        int(dilations[a] * (kernel[a] - 1) + 1 + rng.integers(0, 40 if spatial == 2 else 150))
        for a in range(spatial)
    )
    geometry = ConvGeometry.of((filters, per_group, *kernel), strides, pads, dilations, group)
    batch = int(rng.integers(1, 3))
    return geometry, (batch, group * per_group, *size), float(rng.choice([0.0, 0.5, 0.9, 0.97]))


@pytest.mark.parametrize("seed", range(40))
def test_random_geometries_match_onnxruntime_conv(seed):
    rng = np.random.default_rng(seed)
    geometry, x_shape, sparsity = _random_case(rng)
    weight = pruned(rng, geometry.weight_shape, sparsity)
    bias = rng.standard_normal(geometry.weight_shape[0]).astype(np.float32) if seed % 3 else None
    x = rng.standard_normal(x_shape).astype(np.float32)
    index_dtype = "int32" if seed % 4 == 0 else "uint16"
    model = sparse_conv_model(conv_csr(weight, index_dtype), geometry, list(x_shape), bias)
    actual = _kernel(model, x, threads=1 + seed % 2)
    expected = _ort_conv(weight, geometry, x, bias)
    assert actual.shape == expected.shape
    _close(actual, expected)


@pytest.mark.parametrize(
    ("weight_shape", "x_shape", "strides", "pads", "dilations", "group"),
    [
        (
            (64, 32, 3, 3),
            (1, 32, 20, 23),
            (1, 1),
            (1, 1, 1, 1),
            (1, 1),
            1,
        ),  # full 64-wide tiles and a tail
        ((48, 64, 1, 1), (1, 64, 14, 14), (1, 1), (0, 0, 0, 0), (1, 1), 1),  # 1x1: X read in place
        (
            (32, 16, 1, 1),
            (2, 16, 15, 15),
            (2, 2),
            (0, 0, 0, 0),
            (1, 1),
            1,
        ),  # 1x1 stride 2: one phase of four
        ((16, 3, 7, 7), (1, 3, 40, 37), (2, 2), (3, 3, 3, 3), (1, 1), 1),  # a ResNet stem
        ((24, 1, 3, 3), (1, 24, 12, 12), (1, 1), (1, 1, 1, 1), (1, 1), 24),  # depthwise
        (
            (20, 8, 3, 5),
            (1, 8, 11, 30),
            (3, 2),
            (2, 0, 1, 4),
            (2, 3),
            1,
        ),  # odd strides, pads, dilations
        ((12, 8, 9), (1, 8, 300), (1,), (4, 4), (1,), 1),  # 1-D, long rows
    ],
)
def test_named_geometries_match_the_numpy_reference(
    rng, weight_shape, x_shape, strides, pads, dilations, group
):
    geometry = ConvGeometry.of(weight_shape, strides, pads, dilations, group)
    weight = pruned(rng, weight_shape, 0.85)
    bias = rng.standard_normal(weight_shape[0]).astype(np.float32)
    x = rng.standard_normal(x_shape).astype(np.float32)
    model = sparse_conv_model(conv_csr(weight), geometry, list(x_shape), bias)
    expected = ReferenceEvaluator(model, new_ops=REFERENCE_OPS).run(None, {"X": x})[0]
    _close(_kernel(model, x), expected)
    _close(_ort_conv(weight, geometry, x, bias), expected)  # the reference is ONNX Conv


def test_layout_round_trips_bit_for_bit(rng):
    weight = pruned(rng, (10, 4, 3, 2), 0.7)
    csr = conv_csr(weight)
    np.testing.assert_array_equal(
        dense_from_conv_csr(csr.values, csr.col_indices, csr.row_ptr, weight.shape), weight
    )
    assert csr.nnz == np.count_nonzero(weight) and csr.row_ptr.size == 11


def test_portable_model_runs_in_stock_onnxruntime(rng):
    """Without the library onnxruntime inlines the model-local function: the same output."""
    geometry = ConvGeometry.of((16, 4, 3, 3), (2, 1), (1, 0, 1, 2), (1, 2), 2)
    weight = pruned(rng, geometry.weight_shape, 0.8)
    bias = rng.standard_normal(16).astype(np.float32)
    x = rng.standard_normal((2, 8, 13, 17)).astype(np.float32)
    model = sparse_conv_model(conv_csr(weight), geometry, [2, 8, 13, 17], bias, portable=True)
    stock = ort.InferenceSession(model.SerializeToString())  # no custom-op library registered
    _close(stock.run(None, {"X": x})[0], _ort_conv(weight, geometry, x, bias))
    _close(_kernel(model, x), _ort_conv(weight, geometry, x, bias))


def test_two_threads_and_empty_filters(rng):
    geometry = ConvGeometry.of((40, 24, 3, 3), pads=(1, 1, 1, 1))
    weight = pruned(rng, geometry.weight_shape, 0.9)
    weight[::4] = 0.0  # empty CSR rows: those channels are the bias alone
    bias = rng.standard_normal(40).astype(np.float32)
    x = rng.standard_normal((1, 24, 30, 30)).astype(np.float32)
    model = sparse_conv_model(conv_csr(weight), geometry, [1, 24, 30, 30], bias)
    one, two = _kernel(model, x, threads=1), _kernel(model, x, threads=2)
    np.testing.assert_array_equal(one, two)
    np.testing.assert_array_equal(one[0, ::4], np.broadcast_to(bias[::4, None, None], (10, 30, 30)))


@pytest.mark.parametrize(
    ("x_shape", "message"),
    [
        ((1, 7, 9, 9), "X has 7 channels, expected group * C/group = 8"),
        ((1, 8, 9), "X has shape [1, 8, 9], expected 4-D"),
        ((1, 8, 2, 9), "X has shape [1, 8, 2, 9], smaller than the dilated kernel"),
    ],
)
def test_bad_input_is_one_clear_error(rng, x_shape, message):
    geometry = ConvGeometry.of((4, 4, 3, 3), group=2)
    model = sparse_conv_model(conv_csr(pruned(rng, (4, 4, 3, 3), 0.5)), geometry, None)
    with pytest.raises(Exception, match=re.escape(f"SparseConv: {message}")):
        _kernel(model, np.zeros(x_shape, np.float32))


def test_fed_csr_is_validated_on_every_run(rng):
    geometry = ConvGeometry.of((6, 2, 3, 3))
    csr = conv_csr(pruned(rng, (6, 2, 3, 3), 0.5), "int32")
    model = sparse_conv_model(csr, geometry, [1, 2, 8, 8], fed=True)
    session = runtime.session(model, threads=1)
    feeds = {
        "X": rng.standard_normal((1, 2, 8, 8)).astype(np.float32),
        "values": csr.values,
        "col_indices": csr.col_indices,
        "row_ptr": csr.row_ptr,
    }
    session.run(None, feeds)
    bad = csr.col_indices.copy()
    bad[0] = 18
    with pytest.raises(
        Exception, match=r"SparseConv: col_indices\[0\] = 18 is out of range \[0, 18\)"
    ):
        session.run(None, {**feeds, "col_indices": bad})
