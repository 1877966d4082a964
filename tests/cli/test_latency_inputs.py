"""optimize times the model on the gates' own probes, `batch` samples along each sample axis."""

from __future__ import annotations

import numpy as np

from onnxcompress.cli.core import _samples_at


def test_a_recurrent_state_takes_the_batch_on_its_own_axis():
    state = np.arange(2 * 5 * 4, dtype=np.float32).reshape(2, 5, 4)
    batch = _samples_at(state, 1, 3)
    assert batch.shape == (2, 3, 4)
    np.testing.assert_array_equal(batch, state[:, :3])


def test_fewer_probes_than_the_batch_are_repeated():
    chunk = np.arange(2 * 6, dtype=np.float32).reshape(2, 6)
    np.testing.assert_array_equal(_samples_at(chunk, 0, 3), chunk[[0, 1, 0]])


def test_a_scalar_input_keeps_its_real_value():
    rate = np.array(16000, dtype=np.int64)
    assert _samples_at(rate, None, 8) == 16000
