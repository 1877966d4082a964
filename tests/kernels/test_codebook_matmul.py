"""CodebookMatMul and SparseCodebookMatMul kernels against their numpy references."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from onnx.reference import ReferenceEvaluator

from onnxcompress import runtime
from onnxcompress.formats.kernel_arrays import pack_codebook_indices, to_csr
from onnxcompress.formats.kernel_reference import REFERENCE_OPS
from tests.kernels.sparse_models import codebook_matmul_model, shared, sparse_codebook_model


def _run(model, feeds, threads=1):
    return runtime.session(model, threads=threads).run(None, feeds)[0]


def _close(actual, expected):
    scale = max(1.0, float(np.abs(expected).max(initial=0.0)))
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize(
    ("k", "n", "bits", "entries", "leading"),
    [
        (64, 24, 4, 16, (1,)),  # batch 1, AVX-512 / AVX2 loop of 32 / 16 bytes
        (97, 13, 4, 11, (1,)),  # odd K (padding nibble), codebook smaller than 16, tails
        (40, 17, 8, 200, (1,)),  # 8 bits, large codebook: scalar-load path
        (48, 9, 8, 16, (1,)),  # 8 bits, codebook of 16: permute path
        (33, 20, 4, 16, (3, 5)),  # batched, several leading dims
        (600, 19, 8, 256, (9,)),  # batched, several column blocks of 512
        (31, 12, 4, 3, ()),  # X is 1-D
    ],
)
def test_codebook_matmul_matches_reference(rng, k, n, bits, entries, leading):
    indices, codebook = shared(rng, (k, n), entries)
    packed = pack_codebook_indices(indices, bits)
    bias = rng.standard_normal(n).astype(np.float32)
    x = rng.standard_normal((*leading, k)).astype(np.float32)
    model = codebook_matmul_model(packed, codebook, k, n, bits, [*leading, k], bias)
    actual = _run(model, {"X": x})
    _close(actual, ReferenceEvaluator(model, new_ops=REFERENCE_OPS).run(None, {"X": x})[0])
    dense = codebook[indices.astype(np.int64)].astype(np.float64)  # independent of the packing
    _close(actual, (x.astype(np.float64) @ dense + bias).astype(np.float32))
    np.testing.assert_array_equal(_run(model, {"X": x}, threads=2), actual)


def test_codebook_matmul_malformed(rng):
    indices, codebook = shared(rng, (10, 4), 16)
    packed = pack_codebook_indices(indices, 4)
    model = codebook_matmul_model(packed, codebook[:5], 10, 4, 4, [1, 10], fed=True)
    feeds = {"X": np.ones((1, 10), np.float32), "indices": packed, "codebook": codebook[:5]}
    bad = int(np.argmax(indices.T.reshape(-1) >= 5))
    n, k = divmod(bad, 10)
    expected = f"index of W[{k}, {n}] = {indices[k, n]} is out of range for a codebook of 5 entries"
    with pytest.raises(Exception, match=re.escape(expected)):
        _run(model, feeds)
    with pytest.raises(ValueError, match=re.escape(expected)):
        ReferenceEvaluator(model, new_ops=REFERENCE_OPS).run(None, feeds)
    with pytest.raises(Exception, match=re.escape("indices has shape [4, 4], expected [4, 5]")):
        _run(model, {**feeds, "indices": packed[:, :4], "codebook": codebook})
    with pytest.raises(
        Exception, match=re.escape("codebook has shape [17], expected [C] with 1 <= C <= 16")
    ):
        _run(model, {**feeds, "codebook": np.zeros(17, np.float32)})


@pytest.mark.parametrize("index_dtype", ["uint16", "int32"])
@pytest.mark.parametrize(
    ("entries", "leading"), [(16, (1,)), (40, (1,)), (9, (6,)), (200, (2, 17))]
)
def test_sparse_codebook_matches_reference(rng, index_dtype, entries, leading):
    k, n = 150, 37
    indices, codebook = shared(rng, (k, n), entries, sparsity=0.85)
    dense = codebook[indices.astype(np.int64)]
    dense[:, 3] = 0.0  # an empty row
    csr = to_csr(dense, index_dtype)
    # CSR values -> codebook indices, in CSR order
    transposed_indices = indices.T
    rows = np.repeat(np.arange(n), np.diff(csr.row_ptr))
    stored = transposed_indices[rows, csr.col_indices.astype(np.int64)].astype(np.uint8)
    np.testing.assert_array_equal(codebook[stored], csr.values)
    bias = rng.standard_normal(n).astype(np.float32)
    x = rng.standard_normal((*leading, k)).astype(np.float32)
    model = sparse_codebook_model(stored, csr, codebook, [*leading, k], bias)
    actual = _run(model, {"X": x})
    _close(actual, ReferenceEvaluator(model, new_ops=REFERENCE_OPS).run(None, {"X": x})[0])
    _close(actual, (x.astype(np.float64) @ dense + bias).astype(np.float32))


def test_sparse_codebook_malformed(rng):
    indices, codebook = shared(rng, (12, 5), 8, sparsity=0.5)
    dense = codebook[indices.astype(np.int64)]
    csr = to_csr(dense, "int32")
    stored = np.full(csr.nnz, 3, np.uint8)
    stored[min(2, csr.nnz - 1)] = 8
    model = sparse_codebook_model(stored, csr, codebook, [1, 12], fed=True)
    feeds = {"X": np.ones((1, 12), np.float32), "indices": stored, "col_indices": csr.col_indices,
             "row_ptr": csr.row_ptr, "codebook": codebook}
    expected = f"indices[{min(2, csr.nnz - 1)}] = 8 is out of range for a codebook of 8 entries"
    with pytest.raises(Exception, match=re.escape(expected)):
        _run(model, feeds)
    with pytest.raises(ValueError, match=re.escape(expected)):
        ReferenceEvaluator(model, new_ops=REFERENCE_OPS).run(None, feeds)
    cols = csr.col_indices.copy()
    cols[0] = 12
    with pytest.raises(Exception, match=re.escape("col_indices[0] = 12 is out of range [0, 12)")):
        _run(model, {**feeds, "indices": np.zeros(csr.nnz, np.uint8), "col_indices": cols})


_AVX2_SCRIPT = """
import numpy as np
from onnxcompress import runtime
from onnxcompress.formats.kernel_arrays import pack_codebook_indices
from tests.kernels.sparse_models import codebook_matmul_model, shared
rng = np.random.default_rng(5)
worst = 0.0
for bits, m in ((4, 1), (4, 5), (8, 1)):
    idx, cb = shared(rng, (101, 23), 16)
    x = rng.standard_normal((m, 101)).astype(np.float32)
    model = codebook_matmul_model(pack_codebook_indices(idx, bits), cb, 101, 23, bits, [m, 101])
    y = runtime.session(model, threads=1).run(None, {"X": x})[0]
    expected = x.astype(np.float64) @ cb[idx.astype(np.int64)]
    worst = max(worst, float(np.abs(y - expected).max() / np.abs(expected).max()))
print(worst)
"""


def test_avx2_codebook_path_on_avx512_machines():
    env = {**os.environ, "ONNXCOMPRESS_KERNELS_ISA": "avx2"}
    done = subprocess.run(
        [sys.executable, "-c", _AVX2_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert float(done.stdout.strip()) < 1e-5


@pytest.mark.parametrize("batch", [1, 7])
def test_sparse_codebook_all_zero_matrix(rng, batch):
    csr = to_csr(np.zeros((20, 6), np.float32))
    codebook = np.array([0.0, 1.5], np.float32)
    model = sparse_codebook_model(
        np.zeros(0, np.uint8), csr, codebook, [batch, 20], np.arange(6, dtype=np.float32)
    )
    y = _run(model, {"X": rng.standard_normal((batch, 20)).astype(np.float32)})
    np.testing.assert_array_equal(y, np.broadcast_to(np.arange(6, dtype=np.float32), (batch, 6)))
