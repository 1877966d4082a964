"""Greedy CTC decoding, for judging a sequence model on the strings it reads, not on its steps.

A CTC output holds one class score vector per time step; the reading is the arg-max path with
repeats collapsed and the blank dropped (Graves et al., 2006, best-path decoding). Many step
decisions never reach that string: a boundary step that flips between the blank and the
neighbouring character, or one step of a run of the same character, leaves it as it was. A
gate that counts every step fails models whose strings did not change.

Which class is the blank is not written in the graph. The heuristic: the class most often the
arg-max over the reference's steps, when it wins at least `BLANK_SHARE` of them. A CTC model
emits the blank between and around characters, so it wins most steps (ddddocr: 80%); a
per-frame tagger or a classifier rarely has one class winning half of every step, and for
those (or one sequence per sample: nothing to collapse) the caller keeps the per-step rule.
"""

from __future__ import annotations

__all__ = ["BLANK_SHARE", "blank_class", "same_strings", "absorbed_flips"]

import numpy as np

#: Share of all time steps the blank must win for an output to be read as CTC.
BLANK_SHARE = 0.5

_EDGE = -1  # a class no step holds: before the first step and after the last
_GONE = -2  # a window position that emits nothing (a repeat, the blank or the edge)


def blank_class(rows: np.ndarray, samples: int | None) -> int | None:
    """The blank of stacked CTC scores [samples * steps, 1, classes] (sample-major), or None.

    None unless each sample is a sequence of at least two steps and one class wins at least
    `BLANK_SHARE` of them (see the module docstring).
    """
    if rows.ndim != 3 or rows.shape[1] != 1 or rows.shape[-1] < 2 or not samples:
        return None
    if rows.shape[0] % samples or rows.shape[0] // samples < 2:
        return None
    winners = np.bincount(rows.reshape(-1, rows.shape[-1]).argmax(-1), minlength=rows.shape[-1])
    blank = int(winners.argmax())
    return blank if winners[blank] >= BLANK_SHARE * rows.shape[0] else None


def _decoded(path: np.ndarray, blank: int) -> tuple[int, ...]:
    """One sample's best path read out: repeats collapsed, then the blank dropped."""
    keep = np.ones(path.shape, bool)
    keep[1:] = path[1:] != path[:-1]
    keep &= path != blank
    return tuple(int(c) for c in path[keep])


def same_strings(reference: np.ndarray, candidate: np.ndarray, blank: int) -> np.ndarray:
    """Per sample, whether both best paths [samples, steps] decode to the same labels."""
    return np.array(
        [_decoded(r, blank) == _decoded(c, blank) for r, c in zip(reference, candidate,
                                                                  strict=True)],
        dtype=bool,
    )


def _window_reading(left: np.ndarray, middle: np.ndarray, right: np.ndarray,
                    blank: int) -> np.ndarray:
    """What three consecutive steps emit, compacted to the left: [rows, 3], `_GONE`-padded."""
    window = np.stack([left, middle, right], axis=-1)
    emits = np.ones(window.shape, bool)
    emits[:, 1:] = window[:, 1:] != window[:, :-1]
    emits &= (window != blank) & (window != _EDGE)
    order = np.argsort(~emits, axis=-1, kind="stable")  # emitting positions first, in order
    return np.where(np.take_along_axis(emits, order, -1), np.take_along_axis(window, order, -1),
                    _GONE)


def absorbed_flips(paths: np.ndarray, targets: np.ndarray, blank: int) -> np.ndarray:
    """Per step of best paths [samples, steps]: would changing it to `targets` keep the string?

    Decoding is local: what step t emits depends on steps t-1..t+1 only, and the steps
    around them emit the same either way, so the string keeps iff the window t-1..t+1 reads
    the same with step t changed. True for a flip between the blank and an adjacent run's
    character at the run's edge, or from one end of a run to its neighbour's class.
    """
    left = np.full(paths.shape, _EDGE, paths.dtype)
    right = np.full(paths.shape, _EDGE, paths.dtype)
    left[:, 1:], right[:, :-1] = paths[:, :-1], paths[:, 1:]
    flat = [a.reshape(-1) for a in (left, paths, targets, right)]
    before = _window_reading(flat[0], flat[1], flat[3], blank)
    after = _window_reading(flat[0], flat[2], flat[3], blank)
    return np.all(before == after, axis=-1).reshape(paths.shape)
