"""Per-layer pruning rates for a pipeline that retrains: a ladder of sensitivity tolerances.

Han et al. 2015 (§3.2, Fig. 5): with retraining, every layer can be pruned far past the knee
of its no-retraining curve, and the layers keep their order of sensitivity (the first conv
layer the most sensitive, the big fully connected ones the least; LeNet-300-100 keeps 8% /
9% / 26%). So the per-layer curves that `sensitivity` measures set the *shape* of the plan --
how much each layer gives relative to the others -- and retraining sets the *level*.

Rung k prunes each layer to the largest measured ratio whose alone-drop (no retraining) stays
within the tolerance ``t_k = t_0 · 2^k``, from the budget's own drop ``t_0`` up to the
baseline itself (a layer alone at chance); rungs that would prune exactly as the one before
are dropped. Run under ``optimize --finetune``, each rung is followed by a fine-tune round and
gated on the accuracy lost after retraining; a rung that loses too much is rolled back and
the next, higher one is still tried against the model as it stands. The ladder ends with
`codebook.kmeans` at the paper's bits.

Exact arithmetic on the measured curves; what the model keeps is the gate's to judge.
"""

from __future__ import annotations

__all__ = ["RETRAIN_RATIOS", "tolerance_ladder", "ladder_recipe_text"]

from typing import Any

from onnxcompress.passes.prune.sensitivity import SensitivityResult, _glob_escape, _rates_for

#: The ratios measured when fine-tuning follows: past 0.95, where retraining still recovers.
RETRAIN_RATIOS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.97, 0.98, 0.99)


def tolerance_ladder(result: SensitivityResult) -> list[dict[str, float]]:
    """Per-layer rates of each rung (weight name -> ratio), each rung pruning more than the last."""
    tolerance = result.budget.allowed_drop(result.metric)
    ceiling = max(result.baseline, tolerance)
    rungs: list[dict[str, float]] = []
    while True:
        rates = _rates_for(result.curves, result.baseline, tolerance)
        if not rungs or rates != rungs[-1]:
            if any(rates.values()):
                rungs.append(rates)
        if tolerance >= ceiling:
            return rungs
        tolerance = min(2 * tolerance, ceiling)


def ladder_recipe_text(result: SensitivityResult) -> str:
    """The ladder as a recipe for ``optimize --recipe DIR/recipe.yaml --data train.npz --finetune``."""
    import yaml

    steps: list[dict[str, Any]] = [
        {"pass": "prune.magnitude", "on_fail": "rollback",
         "options": {"sparsity": 0.0, "min_params": 0,
                     "overrides": {_glob_escape(name): rate for name, rate in rates.items()}}}
        for rates in tolerance_ladder(result)
    ]
    steps.append({"pass": "codebook.kmeans", "on_fail": "rollback"})
    recipe = {"name": "sensitivity-ladder", "description": (
        f"Per-layer rates from `onnxcompress sensitivity --finetune` ({result.metric}, baseline "
        f"{result.baseline:.6f}): {len(steps) - 1} rungs of doubling tolerance, then k-means. Run with "
        "`optimize --data train.npz --finetune`: every rung is retrained and gated on accuracy."),
        "seed": 0, "steps": steps}
    return yaml.safe_dump(recipe, sort_keys=False)
