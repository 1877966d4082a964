"""CUDAExecutionProvider kernels against the numpy references (run only where a GPU is).

Skipped cleanly without onnxruntime-gpu and a device; with a device but no CUDA build of the
library they skip, or fail under ONNXCOMPRESS_REQUIRE_KERNELS=1.
"""

from __future__ import annotations

import os
import re

import numpy as np
import onnxruntime as ort
import pytest

from onnxcompress import runtime
from onnxcompress.formats.kernel_arrays import pack_codebook_indices, to_csr
from tests.kernels.sparse_models import codebook_matmul_model, pruned, shared, sparse_matmul_model

pytestmark = pytest.mark.gpu
CUDA = ["CUDAExecutionProvider", "CPUExecutionProvider"]


@pytest.fixture(autouse=True)
def cuda_library() -> None:
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("no CUDAExecutionProvider (onnxruntime-gpu and a GPU are needed)")
    if not any(op.startswith("cuda:") for op in runtime.available_ops(cuda=True)):
        message = (
            "the CUDA build of the kernel library is missing (ONNXCOMPRESS_CUDA=1 pip install -e .)"
        )
        if os.environ.get("ONNXCOMPRESS_REQUIRE_KERNELS") == "1":
            pytest.fail(message)
        pytest.skip(message)


def _cuda_session(model):
    session = runtime.session(model, providers=CUDA)
    assert session.get_providers()[0] == "CUDAExecutionProvider"
    return session


@pytest.mark.parametrize("index_dtype", ["uint16", "int32"])
@pytest.mark.parametrize(
    ("k", "n", "sparsity", "leading"),
    [(300, 129, 0.9, (1,)), (96, 17, 0.6, (70,)), (50, 31, 1.0, (2, 3))],
)
def test_sparse_matmul_on_gpu(rng, index_dtype, k, n, sparsity, leading):
    weight = pruned(rng, (k, n), sparsity)
    bias = rng.standard_normal(n).astype(np.float32)
    x = rng.standard_normal((*leading, k)).astype(np.float32)
    y = _cuda_session(sparse_matmul_model(to_csr(weight, index_dtype), [*leading, k], bias)).run(
        None, {"X": x}
    )[0]
    np.testing.assert_allclose(y, x.astype(np.float64) @ weight + bias, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits", [4, 8])
def test_codebook_matmul_on_gpu(rng, bits):
    indices, codebook = shared(rng, (97, 33), 16)
    x = rng.standard_normal((5, 97)).astype(np.float32)
    model = codebook_matmul_model(
        pack_codebook_indices(indices, bits), codebook, 97, 33, bits, [5, 97]
    )
    y = _cuda_session(model).run(None, {"X": x})[0]
    np.testing.assert_allclose(
        y, x.astype(np.float64) @ codebook[indices.astype(np.int64)], rtol=1e-4, atol=1e-4
    )


def test_malformed_csr_on_gpu(rng):
    csr = to_csr(pruned(rng, (16, 6), 0.5), "int32")
    cols = csr.col_indices.copy()
    cols[1] = 16
    model = sparse_matmul_model(csr, [1, 16], fed=True)
    feeds = {
        "X": np.ones((1, 16), np.float32),
        "values": csr.values,
        "col_indices": cols,
        "row_ptr": csr.row_ptr,
    }
    with pytest.raises(Exception, match=re.escape("col_indices[1] = 16 is out of range [0, 16)")):
        _cuda_session(model).run(None, feeds)
