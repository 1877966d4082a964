"""Box agreement, for judging a detector on the boxes it reports, not on every anchor's scores.

A YOLO-style detector (YOLOv8: `[samples, 4 + classes, anchors]`, or that transposed) scores
thousands of anchors per image, and all but a few dozen stay far below any confidence
threshold. Rank correlation over the anchors measures mostly the jitter of those scores, which
no box ever shows: on nudenet (YOLOv8n) the default search stopped at 3.8x with rank 0.995 on
the calibration images while the boxes had barely moved (F1 0.98 on held-apart images); judged
on its boxes the same search reaches 5.7x at F1 0.97 there.

The boxes are read as ultralytics and nudenet read them: an anchor is a box where its best class
score is at least `SCORE_THRESHOLD`; overlapping boxes (IoU above `NMS_IOU`) are suppressed,
best first. The candidate's boxes are matched to the original's (same class, IoU at least
`MATCH_IOU`, greedily, best first) and F1 is pooled over the samples.

Recognising the layout is a heuristic, as the graph does not say: one axis of at least
`MIN_ROWS` rows is short against the anchor axis (`MIN_ANCHORS_PER_ROW` anchors a row or more),
the class rows hold probabilities (all in [0, 1]) and the widths and heights are not negative.
With fewer than `MIN_BOXES` reference boxes there is nothing to judge on, and the caller keeps
its rank correlation.
"""

from __future__ import annotations

__all__ = ["SCORE_THRESHOLD", "NMS_IOU", "MATCH_IOU", "MIN_BOXES", "anchor_rows", "box_f1"]

import numpy as np

SCORE_THRESHOLD = 0.25  # ultralytics' default confidence
NMS_IOU = 0.45
MATCH_IOU = 0.5
#: Fewest boxes the original must report over the probes for F1 to mean anything.
MIN_BOXES = 8
MIN_ROWS = 5  # 4 box coordinates and at least one class
MIN_ANCHORS_PER_ROW = 8

Boxes = tuple[np.ndarray, np.ndarray, np.ndarray]  # classes [n], scores [n], xyxy [n, 4]


def anchor_rows(output: np.ndarray) -> np.ndarray | None:
    """The output as [samples, anchors, 4 + classes] when it looks like YOLO boxes, else None."""
    array = np.asarray(output)
    if array.ndim != 3 or not np.issubdtype(array.dtype, np.floating) or not array.size:
        return None
    short, long = sorted(array.shape[1:])
    if short < MIN_ROWS or long < MIN_ANCHORS_PER_ROW * short:
        return None
    rows = array if array.shape[2] == short else np.swapaxes(array, 1, 2)
    scores, sizes = rows[..., 4:], rows[..., 2:4]
    if not np.isfinite(rows).all() or scores.min() < 0 or scores.max() > 1 or sizes.min() < 0:
        return None
    return rows


def _xyxy(rows: np.ndarray) -> np.ndarray:
    centre, size = rows[:, :2].astype(np.float64), rows[:, 2:4].astype(np.float64)
    return np.concatenate([centre - size / 2, centre + size / 2], axis=1)


def _iou(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    """IoU of one xyxy box with each of `others` [n, 4]."""
    low = np.maximum(box[:2], others[:, :2])
    high = np.minimum(box[2:], others[:, 2:])
    inter = np.prod(np.clip(high - low, 0, None), axis=1)
    area = np.prod(box[2:] - box[:2])
    areas = np.prod(others[:, 2:] - others[:, :2], axis=1)
    union = area + areas - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def boxes(rows: np.ndarray) -> Boxes:
    """One sample's boxes [anchors, 4 + classes]: thresholded, then greedy class-agnostic NMS."""
    class_scores = rows[:, 4:]
    scores = class_scores.max(axis=1)
    order = np.flatnonzero(scores >= SCORE_THRESHOLD)
    order = order[np.argsort(-scores[order], kind="stable")]
    xyxy = _xyxy(rows[order])
    kept: list[int] = []
    for i in range(len(order)):
        if not kept or _iou(xyxy[i], xyxy[kept]).max() <= NMS_IOU:
            kept.append(i)
    chosen = order[kept]
    return class_scores[chosen].argmax(axis=1), scores[chosen], xyxy[kept]


def _matches(reference: Boxes, candidate: Boxes) -> int:
    """Candidate boxes (best first) matched to free reference boxes of their class."""
    ref_classes, _, ref_xyxy = reference
    free = np.ones(len(ref_classes), bool)
    matched = 0
    for cls, box in zip(candidate[0], candidate[2], strict=True):
        overlap = np.where(free & (ref_classes == cls), _iou(box, ref_xyxy), -1.0)
        if overlap.size and overlap.max() >= MATCH_IOU:
            free[int(overlap.argmax())] = False
            matched += 1
    return matched


def box_f1(reference: np.ndarray, candidate: np.ndarray) -> float | None:
    """Pooled F1 of the candidate's boxes against the original's, both raw outputs.

    None when the reference is no YOLO-style output (`anchor_rows`) or reports fewer than
    `MIN_BOXES` boxes over all samples. The candidate is read in the reference's layout.
    """
    ref_rows = anchor_rows(reference)
    if ref_rows is None:
        return None
    cand_rows = np.asarray(candidate)
    if cand_rows.shape != ref_rows.shape:
        cand_rows = np.swapaxes(cand_rows, 1, 2)
    pairs = [(boxes(r), boxes(c)) for r, c in zip(ref_rows, cand_rows, strict=True)]
    n_ref = sum(len(r[0]) for r, _ in pairs)
    if n_ref < MIN_BOXES:
        return None
    n_cand = sum(len(c[0]) for _, c in pairs)
    return 2.0 * sum(_matches(r, c) for r, c in pairs) / (n_ref + n_cand)
