"""Per-layer ranks under a fidelity budget, by a greedy search.

It follows AIMET's greedy compression-ratio selection (Qualcomm AIMET,
`GreedyCompRatioSelectAlgo`).

1. Per-layer eval table: for every eligible layer ℓ and candidate c (a kind and a rank),
   score(ℓ, c) = output cosine of the model with only ℓ factorized as c, against the original.
2. For a threshold t, each layer takes its cheapest candidate with score ≥ t (none: the layer is
   left alone). Lower t compresses more. The search looks, by bisection over the sorted distinct
   scores, for the lowest t whose joint choice still keeps the whole model's cosine ≥ budget,
   evaluating the joint model at each probe (AIMET bisects the same way on its eval scores).
3. The joint choice at that t is the plan; it has been evaluated, so the budget is met on the
   probe inputs (not guaranteed on other inputs: the pipeline's fidelity gate still applies).

Assumes that fidelity falls monotonically as t falls; where it does not, bisection may stop at
a t that is not the lowest feasible one, never at an infeasible one.
"""

from __future__ import annotations

__all__ = ["Candidate", "Selection", "greedy_select"]

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One way to factorize one layer, and what it costs."""

    kind: str
    rank: int
    cost: int


@dataclasses.dataclass(frozen=True)
class Selection:
    """The chosen candidate per layer, the joint score, and the per-layer eval table."""

    choice: dict[str, Candidate]
    score: float
    threshold: float | None
    table: dict[str, list[tuple[Candidate, float]]]


Evaluate = Callable[[Mapping[str, Candidate]], float]


def _choose(
    table: Mapping[str, Sequence[tuple[Candidate, float]]], threshold: float
) -> dict[str, Candidate]:
    choice = {}
    for layer, rows in table.items():
        passing = [candidate for candidate, score in rows if score >= threshold]
        if passing:
            choice[layer] = min(passing, key=lambda c: (c.cost, c.rank))
    return choice


def greedy_select(
    candidates: Mapping[str, Sequence[Candidate]],
    evaluate: Evaluate,
    budget: float,
) -> Selection:
    """The most compressive per-layer choice found whose joint score stays ≥ `budget`."""
    table: dict[str, list[tuple[Candidate, float]]] = {}
    for layer, options in candidates.items():
        table[layer] = [(candidate, evaluate({layer: candidate})) for candidate in options]
        logger.debug(
            "eval table %s: %s", layer, [(c.kind, c.rank, round(s, 6)) for c, s in table[layer]]
        )
    thresholds = sorted({score for rows in table.values() for _, score in rows if score >= budget})
    best: dict[str, Candidate] = {}
    best_score, best_threshold = 1.0, None
    low, high = 0, len(thresholds) - 1
    while low <= high:
        middle = (low + high) // 2
        choice = _choose(table, thresholds[middle])
        score = evaluate(choice) if choice else 1.0
        logger.debug(
            "threshold %.6f: %d layers, joint score %.6f", thresholds[middle], len(choice), score
        )
        if score >= budget:
            best, best_score, best_threshold = choice, score, thresholds[middle]
            high = middle - 1
        else:
            low = middle + 1
    return Selection(best, best_score, best_threshold, table)
