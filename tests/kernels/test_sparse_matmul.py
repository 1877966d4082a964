"""SparseMatMul kernel against the numpy reference: shapes, sparsities, paths, bad input."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx.reference import ReferenceEvaluator

from onnxcompress import runtime
from onnxcompress.formats.kernel_arrays import CsrWeight, to_csr
from onnxcompress.formats.kernel_reference import REFERENCE_OPS
from tests.kernels.sparse_models import pruned, sparse_matmul_model

RTOL, ATOL = 1e-5, 1e-5


def _run(model, feeds, threads=1):
    return runtime.session(model, threads=threads).run(None, feeds)[0]


def _reference(model, feeds):
    return ReferenceEvaluator(model, new_ops=REFERENCE_OPS).run(None, feeds)[0]


def _close(actual: np.ndarray, expected: np.ndarray) -> None:
    scale = max(1.0, float(np.abs(expected).max(initial=0.0)))
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=ATOL * scale)


def test_library_lists_the_op():
    assert "SparseMatMul" in runtime.available_ops()


@pytest.mark.parametrize("index_dtype", ["uint16", "int32"])
@pytest.mark.parametrize(
    ("k", "n", "sparsity", "leading"),
    [
        (37, 23, 0.7, (1,)),  # batch-1 path, rows shorter than one vector
        (300, 129, 0.9, (1,)),  # batch-1 path, long rows (32-wide unrolled loop) and tails
        (64, 40, 0.5, ()),  # X is 1-D
        (50, 31, 0.8, (7,)),  # batched path, one partial 8-wide tile
        (50, 31, 0.95, (2, 3, 5)),  # several leading dims, M = 30
        # batched: a full 64-wide AVX-512 tile (two 32-wide with AVX2) and a 6-wide one
        (96, 17, 0.6, (70,)),
        (64, 33, 0.7, (45,)),  # batched: a 48-wide AVX-512 tile (three vectors)
        (40, 9, 0.7, (3, 200)),  # M = 600: three chunks of X^T (256, 256, 88 rows)
        (129, 65, 0.0, (4, 9)),  # dense stored as CSR
    ],
)
def test_matches_reference(rng, index_dtype, k, n, sparsity, leading):
    weight = pruned(rng, (k, n), sparsity)
    csr = to_csr(weight, index_dtype)
    assert csr.col_indices.dtype == np.dtype(index_dtype)
    bias = rng.standard_normal(n).astype(np.float32)
    x = rng.standard_normal((*leading, k)).astype(np.float32)
    model = sparse_matmul_model(csr, [*leading, k], bias)
    actual = _run(model, {"X": x})
    expected = _reference(model, {"X": x})
    assert actual.shape == (*leading, n)
    _close(actual, expected)
    _close(actual, (x.astype(np.float64) @ weight + bias).astype(np.float32))  # independent of CSR


@pytest.mark.parametrize("batch", [1, 12])
def test_empty_rows_and_all_zero_matrix(rng, batch):
    weight = pruned(rng, (40, 30), 0.8)
    weight[:, ::3] = 0.0  # every third output neuron has no input: empty CSR rows
    weight[:, -5:] = 0.0  # trailing empty rows: row_ptr ends on repeats of nnz
    x = rng.standard_normal((batch, 40)).astype(np.float32)
    bias = rng.standard_normal(30).astype(np.float32)
    y = _run(sparse_matmul_model(to_csr(weight), [batch, 40], bias), {"X": x})
    _close(y, (x.astype(np.float64) @ weight + bias).astype(np.float32))
    np.testing.assert_array_equal(y[:, ::3], np.broadcast_to(bias[::3], (batch, 10)))

    zero = to_csr(np.zeros((40, 30), np.float32))
    assert zero.nnz == 0
    y = _run(sparse_matmul_model(zero, [batch, 40]), {"X": x})
    np.testing.assert_array_equal(y, np.zeros((batch, 30), np.float32))


def test_no_bias_and_empty_batch(rng):
    weight = pruned(rng, (20, 9), 0.5)
    model = sparse_matmul_model(to_csr(weight), ["M", 20])
    x = rng.standard_normal((3, 20)).astype(np.float32)
    _close(_run(model, {"X": x}), (x.astype(np.float64) @ weight).astype(np.float32))
    empty = _run(model, {"X": np.zeros((0, 20), np.float32)})
    assert empty.shape == (0, 9)


def test_two_threads_give_the_same_result(rng):
    weight = pruned(rng, (512, 384), 0.9)
    model = sparse_matmul_model(to_csr(weight), ["M", 512])
    for batch in (1, 40):
        x = rng.standard_normal((batch, 512)).astype(np.float32)
        np.testing.assert_array_equal(
            _run(model, {"X": x}, threads=2), _run(model, {"X": x}, threads=1)
        )


def test_duplicate_entries_add_up(rng):
    csr = CsrWeight(
        values=np.array([1.0, 2.0, 3.0], np.float32),
        col_indices=np.array([4, 4, 0], np.uint16),
        row_ptr=np.array([0, 2, 3], np.int32),
        in_features=5,
        out_features=2,
    )
    x = rng.standard_normal((1, 5)).astype(np.float32)
    y = _run(sparse_matmul_model(csr, [1, 5]), {"X": x})
    np.testing.assert_allclose(y, [[3.0 * x[0, 4], 3.0 * x[0, 0]]], rtol=1e-6)


def _bad(csr: CsrWeight, **changes) -> CsrWeight:
    fields = {
        f: getattr(csr, f)
        for f in ("values", "col_indices", "row_ptr", "in_features", "out_features")
    }
    fields.update(changes)
    return CsrWeight(**fields)


@pytest.fixture
def small_csr(rng) -> CsrWeight:
    weight = pruned(rng, (16, 6), 0.5)
    weight[3, 2] = 1.0  # at least one entry in row 2
    return to_csr(weight, "int32")


@pytest.mark.parametrize("fed", [True, False], ids=["fed", "initializer"])
@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("col_out_of_range", "col_indices[{j}] = 16 is out of range [0, 16)"),
        ("col_negative", "col_indices[{j}] = -3 is out of range [0, 16)"),
        ("row_ptr_short", "row_ptr has 6 entries, expected N + 1 = 7"),
        ("row_ptr_decreasing", "row_ptr decreases at 3"),
        ("row_ptr_end", "row_ptr[N] = {end} but col_indices has {nnz} entries"),
        ("values_short", "values has {short} entries but col_indices has {nnz}"),
    ],
)
def test_malformed_csr_is_an_error_with_the_values(rng, small_csr, fed, case, message):
    csr = small_csr
    j = int(csr.row_ptr[2])
    cols = csr.col_indices.copy()
    row_ptr = csr.row_ptr.copy()
    bad = {
        "col_out_of_range": lambda: _bad(csr, col_indices=_set(cols, j, 16)),
        "col_negative": lambda: _bad(csr, col_indices=_set(cols, j, -3)),
        "row_ptr_short": lambda: _bad(csr, row_ptr=row_ptr[:-1]),
        "row_ptr_decreasing": lambda: _bad(
            csr, row_ptr=_set(row_ptr, 3, int(row_ptr[2]) - 1 if row_ptr[2] else -1)
        ),
        "row_ptr_end": lambda: _bad(csr, row_ptr=_set(row_ptr, 6, csr.nnz + 1)),
        "values_short": lambda: _bad(csr, values=csr.values[:-1]),
    }[case]()
    expected = message.format(j=j, end=csr.nnz + 1, nnz=csr.nnz, short=csr.nnz - 1)
    model = sparse_matmul_model(bad, [2, 16], fed=fed)
    feeds = {"X": rng.standard_normal((2, 16)).astype(np.float32)}
    if fed:
        feeds.update(values=bad.values, col_indices=bad.col_indices, row_ptr=bad.row_ptr)
    with pytest.raises((ort.capi.onnxruntime_pybind11_state.InvalidArgument,
                        ort.capi.onnxruntime_pybind11_state.Fail)) as error:
        _run(model, feeds)
    assert expected in str(error.value)
    with pytest.raises(ValueError, match=re.escape(expected)):
        _reference(model, feeds)


def _set(array: np.ndarray, index: int, value: int) -> np.ndarray:
    out = array.copy()
    out[index] = value
    return out


def test_wrong_x_width_and_bias_size(rng, small_csr):
    model = sparse_matmul_model(small_csr, [2, "K"])
    with pytest.raises(
        Exception, match=r"X has shape \[2, 15\], its last dimension must be K = 16"
    ):
        _run(model, {"X": np.zeros((2, 15), np.float32)})
    model = sparse_matmul_model(small_csr, [2, 16], np.zeros(5, np.float32), fed=True)
    feeds = {
        "X": np.zeros((2, 16), np.float32),
        "values": small_csr.values,
        "col_indices": small_csr.col_indices,
        "row_ptr": small_csr.row_ptr,
        "bias": np.zeros(5, np.float32),
    }
    with pytest.raises(Exception, match=r"bias has shape \[5\], expected \[6\]"):
        _run(model, feeds)


def test_fed_arrays_are_checked_on_every_run(rng, small_csr):
    """Validation is cached only for constant initializers: a later bad feed still fails."""
    model = sparse_matmul_model(small_csr, [1, 16], fed=True)
    session = runtime.session(model, threads=1)
    x = rng.standard_normal((1, 16)).astype(np.float32)
    good = {
        "X": x,
        "values": small_csr.values,
        "col_indices": small_csr.col_indices,
        "row_ptr": small_csr.row_ptr,
    }
    session.run(None, good)
    bad_cols = small_csr.col_indices.copy()
    bad_cols[0] = 99
    with pytest.raises(Exception, match=r"col_indices\[0\] = 99 is out of range \[0, 16\)"):
        session.run(None, {**good, "col_indices": bad_cols})


_AVX2_SCRIPT = """
import numpy as np
from onnxcompress import runtime
from onnxcompress.formats.kernel_arrays import to_csr
from tests.kernels.sparse_models import pruned, sparse_matmul_model
rng = np.random.default_rng(3)
worst = 0.0
for m in (2, 9, 17, 33, 70):
    w = pruned(rng, (150, 61), 0.85)
    b = rng.standard_normal(61).astype(np.float32)
    x = rng.standard_normal((m, 150)).astype(np.float32)
    session = runtime.session(sparse_matmul_model(to_csr(w), [m, 150], b), threads=2)
    y = session.run(None, {"X": x})[0]
    expected = x.astype(np.float64) @ w + b
    worst = max(worst, float(np.abs(y - expected).max() / np.abs(expected).max()))
print(worst)
"""


def test_avx2_batched_path_on_avx512_machines():
    """The library picks AVX-512 tiles at run time where the CPU has them; check AVX2's too."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "ONNXCOMPRESS_KERNELS_ISA": "avx2"}
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", _AVX2_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        cwd=root,
    )
    assert float(done.stdout.strip()) < 1e-5


_OLD_RUNTIME_SCRIPT = """
from onnxcompress import runtime
try:
    runtime.session_options()
except Exception as error:
    print(error)
"""


def test_runtime_older_than_headers_is_a_clear_error():
    """Registration asks for the headers' API; an older runtime gets a message, not a crash."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "ONNXCOMPRESS_KERNELS_API_VERSION": "999"}
    done = subprocess.run(
        [sys.executable, "-c", _OLD_RUNTIME_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert done.returncode == 0, done.stderr
    assert (
        "onnxcompress kernels were built for onnxruntime API 999 but this onnxruntime ("
        in done.stdout
    )
    assert f"({ort.__version__}) is older" in done.stdout
