"""The layer both reconstruction test files score: 48 outputs of 64 correlated inputs, and H."""

from __future__ import annotations

import numpy as np
import pytest

from tests.passes.reconstruct.models import correlated


@pytest.fixture
def layer(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    x = correlated(rng, 512, 64)
    return rng.standard_normal((48, 64)), x.T @ x
