"""`onnxcompress prune`: magnitude pruning (unstructured) as one gated step."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from onnxcompress.cli.common import (
    DataOption,
    MinCosineOption,
    OutputOption,
    ReportOption,
    compress_file,
    gate_for,
    guarded,
)
from onnxcompress.pipeline import Step


@guarded
def prune(
    model: Annotated[Path, typer.Argument(help="The ONNX model.", show_default=False)],
    output: OutputOption = None,
    sparsity: Annotated[float | None, typer.Option(help="Share of weights set to zero, in [0, 1).")] = None,
    quality: Annotated[float | None, typer.Option(help="Han's rule: zero |w| < quality × std(layer).")] = None,
    global_scope: Annotated[bool, typer.Option("--global", help="One threshold over all layers.")] = False,
    exclude: Annotated[list[str] | None, typer.Option(help="Weight-name glob never pruned (repeatable).")] = None,
    data: DataOption = None,
    report: ReportOption = None,
    min_cosine: MinCosineOption = 0.0,
) -> None:
    """Zero the smallest-magnitude weights (Han et al. 2015)."""
    options: dict[str, object] = {"scope": "global" if global_scope else "layer", "exclude": tuple(exclude or ())}
    if sparsity is not None:
        options["sparsity"] = sparsity
    if quality is not None:
        options["quality"] = quality
    step = Step(pass_name="prune.magnitude", options=options, gate=gate_for(min_cosine))
    compress_file(model, output, [step], data_path=data, report_path=report)


def register(app: typer.Typer) -> None:
    app.command()(prune)
