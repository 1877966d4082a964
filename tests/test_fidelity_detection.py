"""A YOLO-style detector output is judged on the boxes it reports, not on every anchor's scores.

The reference below is laid out as YOLOv8 writes it, `[samples, 4 + classes, anchors]`: a few
confident anchors per image (its boxes) among hundreds whose class scores stay near zero. A
compressed model may reshuffle those low scores (rank correlation falls) without one box
changing, and the gate must let it; losing or moving boxes must fail it.
"""

from __future__ import annotations

import numpy as np
import pytest

from onnxcompress import detection, fidelity

SAMPLES, CLASSES, ANCHORS, BOXES = 6, 3, 300, 3


def detector_output(seed: int = 0) -> np.ndarray:
    """[samples, 4 + classes, anchors]: BOXES confident anchors an image, far apart, the rest ~0."""
    rng = np.random.default_rng(seed)
    rows = np.empty((SAMPLES, ANCHORS, 4 + CLASSES), np.float32)
    rows[..., :2] = rng.uniform(0, 320, (SAMPLES, ANCHORS, 2))
    rows[..., 2:4] = rng.uniform(5, 30, (SAMPLES, ANCHORS, 2))
    rows[..., 4:] = rng.uniform(0, 0.05, (SAMPLES, ANCHORS, CLASSES))
    for k in range(BOXES):  # one box per column of the image, each of its own class
        rows[:, k, :4] = [50 + 100 * k, 160, 40, 60]
        rows[:, k, 4 + k % CLASSES] = 0.9
    return np.swapaxes(rows, 1, 2).copy()


def test_the_layout_is_recognised_either_way_round_and_nothing_else_is() -> None:
    output = detector_output()
    assert detection.anchor_rows(output).shape == (SAMPLES, ANCHORS, 4 + CLASSES)
    assert detection.anchor_rows(np.swapaxes(output, 1, 2)).shape == (SAMPLES, ANCHORS,
                                                                        4 + CLASSES)
    logits = output.copy()
    logits[:, 4:] += 3.0  # class scores that are no probabilities
    assert detection.anchor_rows(logits) is None
    assert detection.anchor_rows(output[:, :, :20]) is None  # too few anchors for its rows
    assert detection.anchor_rows(output[:, 0]) is None  # a (samples, classes) classifier


def test_jittered_anchor_scores_keep_every_box() -> None:
    reference = detector_output()
    candidate = reference.copy()
    rng = np.random.default_rng(1)
    candidate[:, 4:, BOXES:] = rng.uniform(0, 0.05, candidate[:, 4:, BOXES:].shape)

    metrics = fidelity.compare([reference], [candidate])

    assert metrics.box_f1 == 1.0
    assert metrics.rank_correlation is None  # replaced by the boxes for this output
    assert fidelity.DEFAULT_GATE.failures(metrics) == []


def test_a_lost_box_and_a_moved_box_lower_f1() -> None:
    reference = detector_output()
    candidate = reference.copy()
    candidate[0, 4:, 0] = 0.1  # image 0 loses its first box (below the threshold)
    candidate[1, 0, 1] += 200.0  # image 1's second box moves away: unmatched

    n = SAMPLES * BOXES
    expected = 2 * (n - 2) / (n + n - 1)
    assert detection.box_f1(reference, candidate) == pytest.approx(expected)


def test_a_destroyed_detector_fails_the_default_gate() -> None:
    reference = detector_output()
    silent = reference.copy()
    silent[:, 4:] = 0.01  # no class score reaches the threshold: no boxes at all

    metrics = fidelity.compare([reference], [silent])

    assert metrics.box_f1 == 0.0
    assert any(f.startswith("box_f1 0 <") for f in fidelity.DEFAULT_GATE.failures(metrics))


def test_too_few_reference_boxes_keep_the_rank_rule() -> None:
    reference = detector_output()
    reference[:, 4:, :BOXES] = 0.02  # the original itself reports no box
    metrics = fidelity.compare([reference], [reference])
    assert metrics.box_f1 is None
    assert metrics.rank_correlation == pytest.approx(1.0)


def test_duplicate_anchors_are_suppressed_before_matching() -> None:
    reference = detector_output()
    candidate = reference.copy()
    candidate[:, :, BOXES] = candidate[:, :, 0]  # a second anchor on box 0, same class
    candidate[:, 4, BOXES] = 0.8
    assert detection.box_f1(reference, candidate) == 1.0
