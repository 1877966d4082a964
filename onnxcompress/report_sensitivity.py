"""The files of a sensitivity analysis: JSON and CSV for machines, a recipe, a plot for people.

`onnxcompress sensitivity -o DIR` writes `sensitivity.json` (curves, budget, chosen rates),
`sensitivity.csv` (one row per layer and ratio), `recipe.yaml` (the chosen rates as a one-step
recipe for `optimize --recipe`) and, with matplotlib, `sensitivity.png` (Han et al. Fig. 5).
The analysis itself is `onnxcompress.passes.prune.sensitivity`; this module only renders it.
"""

from __future__ import annotations

__all__ = ["OUTPUT_NAMES", "recipe_text", "csv_text", "plot", "check_outputs", "write_outputs"]

import csv
import io
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from onnxcompress.errors import UserError
from onnxcompress.writer import batch, check, refuse_protected

if TYPE_CHECKING:
    from onnxcompress.passes.prune.sensitivity import SensitivityResult

logger = logging.getLogger(__name__)

OUTPUT_NAMES = ("sensitivity.json", "sensitivity.csv", "recipe.yaml", "sensitivity.png")


def recipe_text(result: SensitivityResult) -> str:
    """The plan as a one-step recipe: `onnxcompress optimize MODEL --recipe DIR/recipe.yaml`.

    A cosine budget becomes the step's gate (the default gate with that cosine: the rates were
    checked against all of it); an accuracy budget was checked on labelled data the gate cannot
    see, so its gate only asks that the outputs stay finite.
    """
    import yaml

    budget = result.budget
    gate = (
        {
            "min_cosine": budget.min_cosine,
            "min_rank_correlation": budget.min_rank_correlation,
            "min_top1": budget.min_top1,
        }
        if result.metric == "cosine"
        else {"min_cosine": None, "min_rank_correlation": None, "min_top1": None,
              "min_string_agreement": None, "min_box_f1": None}
    )
    step = {**result.plan(), "gate": gate}
    recipe = {
        "name": "sensitivity-plan",
        "description": (
            "Per-layer rates chosen by `onnxcompress sensitivity` "
            f"({result.metric} {result.joint_value:.6f} "
            f"against a baseline of {result.baseline:.6f}; "
            f"{result.removed_params:,} of {result.total_params:,} "
            "weights removed)."
        ),
        "seed": 0,
        "steps": [step],
    }
    return yaml.safe_dump(recipe, sort_keys=False)


def check_outputs(folder: Path, protected: Mapping[Path, str]) -> None:
    """Before the analysis: refuse a folder whose files would replace a protected file or folder."""
    for name in OUTPUT_NAMES:
        if folder.is_dir():
            check(folder / name, "output", protected)
        else:
            refuse_protected(folder / name, "output", protected)


def csv_text(result: SensitivityResult) -> str:
    """One row per layer and ratio: the metric measured with that layer alone pruned."""
    rows = io.StringIO()
    table = csv.writer(rows)
    table.writerow(["layer", "op", "params", "ratio", result.metric, "chosen"])
    for curve in result.curves:
        for ratio, value in zip(curve.ratios, curve.values, strict=True):
            table.writerow(
                [curve.name, curve.op, curve.params, ratio, f"{value:.6g}", curve.chosen]
            )
    return rows.getvalue()


def write_outputs(
    result: SensitivityResult, folder: Path, protected: Mapping[Path, str] | None = None
) -> list[Path]:
    """sensitivity.json, .csv, recipe.yaml and (with matplotlib) sensitivity.png in `folder`.

    All go through one guarded batch: every file or none, never over a `protected` one.
    """
    files = {
        "sensitivity.json": (json.dumps(result.to_dict(), indent=2) + "\n").encode(),
        "sensitivity.csv": csv_text(result).encode(),
        "recipe.yaml": recipe_text(result).encode(),
    }
    png = plot(result)
    if png is not None:
        files["sensitivity.png"] = png
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with batch(protected or {}) as staged:
            for name, data in files.items():
                staged.stage(folder / name, "output").write_bytes(data)
    except OSError as error:
        raise UserError(f"cannot create {folder}: {error.strerror or error}") from None
    except UserError:
        if created:  # leave nothing behind
            folder.rmdir()
        raise
    return [folder / name for name in files]


def plot(result: SensitivityResult) -> bytes | None:
    """One curve per layer, as in Han et al. Fig. 5 (needs matplotlib; None without it)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning(
            "matplotlib is not installed: sensitivity.png not written (pip install matplotlib)"
        )
        return None
    figure, axes = plt.subplots(figsize=(7, 4.5), dpi=100)
    for curve in result.curves:
        axes.plot(
            [100 * r for r in curve.ratios],
            curve.values,
            marker="o",
            markersize=3,
            label=curve.name,
        )
    if result.metric == "accuracy":
        floor = result.baseline - result.budget.max_accuracy_drop
        axes.set_ylabel("accuracy")
    else:
        floor = result.budget.min_cosine
        axes.set_ylabel("output cosine vs. original")
    axes.axhline(floor, color="grey", linestyle="--", linewidth=1, label="budget")
    axes.set_xlabel("parameters pruned away (%)")
    axes.set_title("Pruning sensitivity per layer")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, loc="lower left")
    figure.tight_layout()
    image = io.BytesIO()
    figure.savefig(image, format="png", metadata={"Software": None})
    plt.close(figure)
    return image.getvalue()
