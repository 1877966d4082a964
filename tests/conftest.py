"""Shared fixtures: one seeded generator, so every test model is the same on every run."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)
