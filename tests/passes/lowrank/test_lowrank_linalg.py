"""Truncated SVD against its theory: exact at full rank, Eckart–Young error, the no-saving bound."""

from __future__ import annotations

import numpy as np
import pytest

from onnxcompress.passes.lowrank.linalg import (
    energy_rank,
    exact_svd,
    gram_svd,
    max_useful_rank,
    randomized_svd,
    split_factors,
    truncated_svd,
)


def decaying(rng: np.random.Generator, m: int, n: int, decay: float = 0.9) -> np.ndarray:
    """A matrix with singular values decay**i (as trained weights have, unlike random ones)."""
    u, _ = np.linalg.qr(rng.standard_normal((m, min(m, n))))
    v, _ = np.linalg.qr(rng.standard_normal((n, min(m, n))))
    return (u * decay ** np.arange(min(m, n))) @ v.T


def test_full_rank_factors_reconstruct_exactly(rng):
    w = rng.standard_normal((48, 30)).astype(np.float32)
    svd = truncated_svd(w)
    a, b = split_factors(svd, 30)
    assert a.shape == (48, 30) and b.shape == (30, 30)
    np.testing.assert_allclose(a @ b, w, rtol=0, atol=1e-5)


@pytest.mark.parametrize("rank", [1, 5, 17, 29])
def test_error_equals_the_discarded_singular_values(rng, rank):
    w = rng.standard_normal((40, 30))
    sigma = np.linalg.svd(w, compute_uv=False)  # independent reference
    a, b = split_factors(truncated_svd(w, rank, method="exact"), rank)
    residual = w - a @ b
    assert np.linalg.norm(residual, "fro") ** 2 == pytest.approx(
        np.sum(sigma[rank:] ** 2), rel=1e-9
    )
    assert np.linalg.norm(residual, 2) == pytest.approx(sigma[rank], rel=1e-9)


def test_discarded_energy_is_reported_exactly(rng):
    w = rng.standard_normal((20, 12))
    sigma = np.linalg.svd(w, compute_uv=False)
    svd = exact_svd(w)
    assert svd.discarded_energy(4) == pytest.approx(np.sum(sigma[4:] ** 2), rel=1e-9)
    assert svd.energy(4) == pytest.approx(np.sum(sigma[:4] ** 2) / np.sum(sigma**2), rel=1e-12)


def test_randomized_svd_is_near_optimal_on_a_decaying_spectrum(rng):
    w = decaying(rng, 600, 300, decay=0.97)
    rank = 40
    sigma = np.linalg.svd(w, compute_uv=False)
    svd = randomized_svd(w, rank, seed=3)
    a, b = split_factors(svd, rank)
    optimal = np.sqrt(np.sum(sigma[rank:] ** 2))
    assert np.linalg.norm(w - a @ b, "fro") <= optimal * 1.001
    np.testing.assert_allclose(svd.s, sigma[:rank], rtol=1e-4)
    assert np.all(svd.s <= sigma[:rank] * (1 + 1e-9))


def test_randomized_svd_is_deterministic_for_a_seed(rng):
    w = rng.standard_normal((300, 200))
    first = randomized_svd(w, 10, seed=7)
    again = randomized_svd(w, 10, seed=7)
    assert np.array_equal(first.u, again.u) and np.array_equal(first.s, again.s)


def test_auto_uses_the_randomized_path_only_for_large_matrices(rng):
    small = rng.standard_normal((64, 64))
    np.testing.assert_allclose(
        truncated_svd(small, 8).s, np.linalg.svd(small, compute_uv=False)[:8], rtol=1e-12
    )
    large = rng.standard_normal((2048, 600)).astype(np.float32)
    svd = truncated_svd(large, 16)
    assert svd.rank == 16 and not svd.exact
    # singular values from a sketch are lower bounds of the true ones
    true = np.linalg.svd(large.astype(np.float64), compute_uv=False)[:16]
    assert np.all(svd.s <= true * (1 + 1e-9))


@pytest.mark.parametrize(
    ("m", "n", "expected"),
    [
        (4, 4, 1),
        (2, 2, 0),
        (1, 100, 0),
        (3, 5, 1),
        (1024, 4096, 819),
        (8192, 1024, 910),
        (10, 10, 4),
    ],
)
def test_max_useful_rank_is_the_last_rank_that_saves(m, n, expected):
    assert max_useful_rank(m, n) == expected
    r = max_useful_rank(m, n)
    assert r * (m + n) < m * n or r == 0
    assert (r + 1) * (m + n) >= m * n


def test_energy_rank_is_the_smallest_rank_reaching_the_fraction():
    s = np.array([3.0, 2.0, 1.0, 1.0])  # energies 9, 4, 1, 1 of 15
    assert energy_rank(s, 15.0, 0.6) == 1
    assert energy_rank(s, 15.0, 0.61) == 2
    assert energy_rank(s, 15.0, 14 / 15) == 3
    assert energy_rank(s, 15.0, 1.0) == 4
    assert energy_rank(s[:2], 15.0, 0.9) is None


@pytest.mark.parametrize("shape", [(1100, 1000), (1000, 1100)])
def test_gram_path_matches_lapack(rng, shape):
    w = decaying(rng, *shape, decay=0.99) + 1e-3 * rng.standard_normal(shape)
    assert w.size > 1 << 20  # exact_svd takes the Gram path here
    reference = np.linalg.svd(w, compute_uv=False)
    svd = exact_svd(w)
    np.testing.assert_allclose(svd.s[:300], reference[:300], rtol=1e-9)
    for rank in (10, 300):
        a, b = split_factors(svd, rank)
        error = np.linalg.norm(w - a @ b, "fro") ** 2
        assert error == pytest.approx(np.sum(reference[rank:] ** 2), rel=1e-8)


def test_gram_path_reconstructs_a_well_conditioned_matrix(rng):
    w = rng.standard_normal((60, 40)) + 5 * np.eye(60, 40)
    a, b = split_factors(gram_svd(w), 40)
    np.testing.assert_allclose(a @ b, w, rtol=0, atol=1e-9)
