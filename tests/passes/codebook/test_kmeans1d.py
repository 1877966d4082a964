"""1-D k-means: exact Lloyd against a textbook numpy oracle, inertia against scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.cluster import KMeans

from onnxcompress.passes.codebook.kmeans1d import (
    assign_nearest,
    initial_centroids,
    kmeans_1d,
)


def _sample(rng: np.random.Generator, kind: str, n: int) -> np.ndarray:
    if kind == "normal":
        return rng.standard_normal(n).astype(np.float32)
    if kind == "laplace":
        return rng.laplace(size=n).astype(np.float32)
    return rng.uniform(-1.0, 1.0, n).astype(np.float32)


def _inertia(values: np.ndarray, centroids: np.ndarray) -> float:
    """Sum of squared distances to the nearest centroid, by brute force in float64."""
    x = values.astype(np.float64)[:, None]
    return float(np.min((x - centroids.astype(np.float64)[None, :]) ** 2, axis=1).sum())


def _textbook_lloyd(values: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Lloyd with an O(nk) argmin assignment, until the labels stop changing."""
    x = values.astype(np.float64)
    c = np.sort(centroids.astype(np.float64))
    labels = None
    for _ in range(10_000):
        new = np.argmin(np.abs(x[:, None] - c[None, :]), axis=1)
        if labels is not None and np.array_equal(new, labels):
            return c
        labels = new
        c = np.array([x[labels == j].mean() for j in range(c.size)])
    raise AssertionError("textbook Lloyd did not converge")


@pytest.mark.parametrize("kind", ["normal", "laplace", "uniform"])
@pytest.mark.parametrize("k", [8, 32])
def test_optimal_init_within_one_percent_of_sklearn(rng, kind, k):
    values = _sample(rng, kind, 4000)
    reference = KMeans(k, n_init=3, random_state=0).fit(values.reshape(-1, 1).astype(np.float64))
    result = kmeans_1d(values, k, init="optimal")
    assert result.inertia <= 1.01 * reference.inertia_
    assert result.inertia == pytest.approx(_inertia(values, result.centroids), rel=1e-9)


@pytest.mark.parametrize("init", ["linear", "density", "random", "optimal"])
@pytest.mark.parametrize("kind", ["normal", "laplace"])
def test_never_worse_than_its_initialisation(rng, init, kind):
    values = _sample(rng, kind, 5000)
    result = kmeans_1d(values, 16, init=init, seed=3)
    assert result.centroids.size == 16
    if init != "optimal":
        start = initial_centroids(np.sort(values), 16, init, np.random.default_rng(3))
        assert result.inertia <= _inertia(values, start) * (1 + 1e-12)


def test_lloyd_is_exact_against_textbook_oracle(rng):
    values = rng.standard_normal(3000).astype(np.float32)
    result = kmeans_1d(values, 8, init="linear")
    start = initial_centroids(np.sort(values), 8, "linear", rng)
    expected = _textbook_lloyd(values, start)
    np.testing.assert_allclose(result.centroids, expected.astype(np.float32), rtol=1e-6, atol=1e-7)


def test_labels_are_the_nearest_centroid(rng):
    values = rng.laplace(size=4000).astype(np.float32)
    result = kmeans_1d(values, 32)
    assert result.labels.dtype == np.uint8
    assert result.centroids.dtype == np.float32
    assert np.all(np.diff(result.centroids) > 0)
    chosen = np.abs(values - result.centroids[result.labels])
    nearest = np.min(np.abs(values[:, None] - result.centroids[None, :]), axis=1)
    np.testing.assert_array_equal(chosen, nearest)


def test_few_distinct_values_are_kept_exactly(rng):
    levels = np.array([-0.5, 0.25, 0.75, 3.0], dtype=np.float32)
    values = rng.choice(levels, size=500)
    result = kmeans_1d(values, 8)
    np.testing.assert_array_equal(result.centroids, levels)
    np.testing.assert_array_equal(result.centroids[result.labels], values)
    assert result.inertia == 0.0


def test_empty_clusters_are_reseeded(rng):
    # Three tight groups far apart: linear initialisation leaves most centroids empty.
    values = np.concatenate(
        [rng.normal(centre, 0.01, 400) for centre in (-10.0, 0.0, 10.0)]
    ).astype(np.float32)
    result = kmeans_1d(values, 8, init="linear")
    counts = np.bincount(result.labels, minlength=8)
    assert result.centroids.size == 8
    assert np.all(counts > 0)
    start = initial_centroids(np.sort(values), 8, "linear", rng)
    assert result.inertia < _inertia(values, start)


def test_float16_keeps_its_dtype(rng):
    values = rng.standard_normal(2000).astype(np.float16)
    result = kmeans_1d(values, 8)
    assert result.centroids.dtype == np.float16
    np.testing.assert_array_equal(result.labels, assign_nearest(values, result.centroids))


def test_rejects_non_finite_values():
    with pytest.raises(ValueError, match="finite"):
        kmeans_1d(np.array([0.0, np.nan, 1.0], dtype=np.float32), 2)
