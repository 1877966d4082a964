"""onnxcompress: post-training compression of ONNX models.

Example:
    import onnxcompress
    model = onnxcompress.load("model.onnx")
    result = onnxcompress.compress(model, "default")        # a recipe name, file or Recipe
    onnxcompress.save(result.model, "small.onnx")
"""

from __future__ import annotations

__all__ = ["__version__", "load", "save", "compress"]

__version__ = "0.1.0"

from collections.abc import Mapping
from typing import TYPE_CHECKING

from onnxcompress.io import load, save

if TYPE_CHECKING:
    import numpy as np
    import onnx_ir as ir

    from onnxcompress.fidelity import TaskMetric
    from onnxcompress.pipeline import PipelineResult
    from onnxcompress.recipe import Recipe


def compress(
    model: ir.Model,
    recipe: str | Recipe = "default",
    *,
    data: Mapping[str, np.ndarray] | None = None,
    task: TaskMetric | None = None,
    input_sizes: Mapping[tuple[str, int], int] | None = None,
) -> PipelineResult:
    """Run a recipe's gated steps on a copy of `model`; the input model is not modified.

    `task(reference_outputs, candidate_outputs) -> float` (higher is better) is reported for
    every step and gates the steps whose gate sets `min_task`. `input_sizes` fixes dynamic
    dimensions of the probes: {(input name, axis): size}.
    """
    from onnxcompress.pipeline import run_steps
    from onnxcompress.recipe import Recipe, load_recipe

    chosen = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    return run_steps(model, chosen.steps, data=data, probe_count=chosen.probes, seed=chosen.seed,
                     task=task, input_sizes=input_sizes)
