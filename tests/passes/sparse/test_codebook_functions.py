"""Portable CodebookMatMul / SparseCodebookMatMul functions in a stock onnxruntime, and packing."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnxcompress.formats.kernel_arrays import (
    pack_codebook_indices,
    to_csr,
    unpack_codebook_indices,
)
from tests.kernels.sparse_models import codebook_matmul_model, shared, sparse_codebook_model
from tests.passes.sparse.test_sparse_csr import stock_session


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("k", [1, 8, 33])
def test_pack_round_trip(rng, bits, k):
    indices, _ = shared(rng, (k, 6), 16 if bits == 4 else 256)
    packed = pack_codebook_indices(indices, bits)
    assert packed.shape == (6, k if bits == 8 else (k + 1) // 2)
    np.testing.assert_array_equal(unpack_codebook_indices(packed, k, bits), indices)
    if bits == 4:
        assert packed[0, 0] == indices[0, 0] | (indices[1, 0] << 4 if k > 1 else 0)


@pytest.mark.parametrize(
    ("k", "bits", "entries", "leading"), [(33, 4, 16, (1,)), (20, 8, 100, (2, 3)), (7, 4, 5, (4,))]
)
def test_codebook_function_without_the_library(rng, k, bits, entries, leading):
    n = 11
    indices, codebook = shared(rng, (k, n), entries)
    bias = rng.standard_normal(n).astype(np.float32)
    model = codebook_matmul_model(
        pack_codebook_indices(indices, bits),
        codebook,
        k,
        n,
        bits,
        [*leading, k],
        bias,
        portable=True,
    )
    onnx.checker.check_model(model)
    x = rng.standard_normal((*leading, k)).astype(np.float32)
    expected = x.astype(np.float64) @ codebook[indices.astype(np.int64)] + bias
    np.testing.assert_allclose(
        stock_session(model).run(None, {"X": x})[0], expected, rtol=1e-5, atol=1e-5
    )


def test_sparse_codebook_function_without_the_library(rng):
    k, n = 40, 13
    indices, codebook = shared(rng, (k, n), 12, sparsity=0.8)
    dense = codebook[indices.astype(np.int64)]
    csr = to_csr(dense)
    rows = np.repeat(np.arange(n), np.diff(csr.row_ptr))
    stored = indices.T[rows, csr.col_indices.astype(np.int64)].astype(np.uint8)
    bias = rng.standard_normal(n).astype(np.float32)
    model = sparse_codebook_model(stored, csr, codebook, [3, k], bias, portable=True)
    onnx.checker.check_model(model)
    x = rng.standard_normal((3, k)).astype(np.float32)
    np.testing.assert_allclose(
        stock_session(model).run(None, {"X": x})[0],
        x.astype(np.float64) @ dense + bias,
        rtol=1e-5,
        atol=1e-5,
    )
