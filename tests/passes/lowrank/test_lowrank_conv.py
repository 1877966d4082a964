"""Conv channel (k×k → 1×1) and spatial (kh×1 → 1×kw) decompositions against a numpy convolution."""

from __future__ import annotations

import numpy as np
import pytest

from onnxcompress.passes.lowrank.decompose import Decomposition
from tests.passes.lowrank.reference import conv2d, truncated

CASES = [
    dict(strides=(1, 1), pads=(1, 1, 1, 1), dilations=(1, 1), group=1),
    dict(strides=(2, 1), pads=(1, 0, 2, 1), dilations=(1, 1), group=2),
    dict(strides=(1, 2), pads=(0, 2, 1, 0), dilations=(2, 1), group=1),
    dict(strides=(2, 2), pads=(2, 2, 2, 2), dilations=(2, 2), group=4),
]


def compose(
    kind: str, x: np.ndarray, first: np.ndarray, second: np.ndarray, bias: np.ndarray, case: dict
) -> np.ndarray:
    """The two convolutions the rewrite emits, as numpy convolutions."""
    (sh, sw), (dh, dw), (top, left, bottom, right), g = (
        case["strides"],
        case["dilations"],
        case["pads"],
        case["group"],
    )
    if kind == "conv_channel":
        hidden = conv2d(x, first, None, (sh, sw), (top, left, bottom, right), (dh, dw), g)
        return conv2d(hidden, second, bias, (1, 1), (0, 0, 0, 0), (1, 1), g)
    hidden = conv2d(x, first, None, (sh, 1), (top, 0, bottom, 0), (dh, 1), g)
    return conv2d(hidden, second, bias, (1, sw), (0, left, 0, right), (1, dw), g)




def channel_reference(w: np.ndarray, group: int, rank: int) -> np.ndarray:
    """W_r for the channel form: each group's (M/g) × (C/g·kh·kw) matrix truncated."""
    per = w.shape[0] // group
    blocks = [
        truncated(w[j * per : (j + 1) * per].reshape(per, -1), rank).reshape(per, *w.shape[1:])
        for j in range(group)
    ]
    return np.concatenate(blocks)


def spatial_reference(w: np.ndarray, group: int, rank: int) -> np.ndarray:
    """W_r for the spatial form: each group's (C/g·kh) × (M/g·kw) matrix truncated."""
    m, cg, kh, kw = w.shape
    per = m // group
    out = np.empty_like(w, dtype=np.float64)
    for j in range(group):
        block = w[j * per : (j + 1) * per]  # (per, cg, kh, kw)
        matrix = np.einsum("mcij->cimj", block).reshape(cg * kh, per * kw)
        out[j * per : (j + 1) * per] = np.einsum(
            "cimj->mcij", truncated(matrix, rank).reshape(cg, kh, per, kw)
        )
    return out


@pytest.mark.parametrize("kind", ["conv_channel", "conv_spatial"])
@pytest.mark.parametrize("case", CASES)
def test_full_rank_pair_equals_the_original_conv(rng, kind, case):
    g = case["group"]
    w = rng.standard_normal((8, 12 // g, 3, 3))
    bias = rng.standard_normal(8)
    x = rng.standard_normal((2, 12, 9, 10))
    d = Decomposition(kind, w, group=g, width_stride=case["strides"][1], svd_method="exact")
    first, second = d.factors(min(d.rows, d.cols))
    expected = conv2d(x, w, bias, case["strides"], case["pads"], case["dilations"], g)
    np.testing.assert_allclose(
        compose(kind, x, first, second, bias, case), expected, rtol=0, atol=1e-9
    )


@pytest.mark.parametrize(
    ("kind", "reference"),
    [("conv_channel", channel_reference), ("conv_spatial", spatial_reference)],
)
@pytest.mark.parametrize("case", CASES)
def test_truncated_pair_equals_conv_with_the_rank_r_kernel(rng, kind, reference, case):
    g = case["group"]
    w = rng.standard_normal((8, 12 // g, 3, 3))
    bias = rng.standard_normal(8)
    x = rng.standard_normal((2, 12, 9, 10))
    rank = 2
    d = Decomposition(kind, w, group=g, width_stride=case["strides"][1], svd_method="exact")
    first, second = d.factors(rank)
    w_r = reference(w, g, rank)
    expected = conv2d(x, w_r, bias, case["strides"], case["pads"], case["dilations"], g)
    np.testing.assert_allclose(
        compose(kind, x, first, second, bias, case), expected, rtol=0, atol=1e-9
    )
    # the kernel lost exactly the discarded singular values (Eckart–Young, per group)
    assert d.relative_error(rank) == pytest.approx(
        np.linalg.norm(w - w_r) / np.linalg.norm(w), rel=1e-9
    )


def test_factor_shapes_and_costs(rng):
    w = rng.standard_normal((64, 32, 3, 3)).astype(np.float32)
    channel = Decomposition("conv_channel", w)
    first, second = channel.factors(10)
    assert first.shape == (10, 32, 3, 3) and second.shape == (64, 10, 1, 1)
    assert first.dtype == np.float32
    assert channel.params_after(10) == first.size + second.size == 10 * (288 + 64)
    spatial = Decomposition("conv_spatial", w, width_stride=2)
    first, second = spatial.factors(10)
    assert first.shape == (10, 32, 3, 1) and second.shape == (64, 10, 1, 3)
    assert spatial.params_after(10) == first.size + second.size
    # the kh×1 conv runs at every input column: s_w times the output positions
    assert spatial.flops_after(10) == 2 * (10 * 32 * 3 * 2 + 64 * 10 * 3)
    assert channel.flops_before == spatial.flops_before == 2 * w.size


def test_grouped_factors_keep_groups_apart(rng):
    w = rng.standard_normal((8, 3, 3, 3))
    d = Decomposition("conv_channel", w, group=2)
    first, second = d.factors(2)
    assert first.shape == (4, 3, 3, 3)  # g·r filters of C/g channels
    assert second.shape == (8, 2, 1, 1)  # each output reads the r channels of its group
    assert d.params_after(2) == first.size + second.size
