"""A pass command's run: its gated step, planned (`--dry-run`) or written with its files.

`cluster`, `sparsify`, `lowrank` and `prune` differ only in their options; how the step is
gated, planned, written with its report and plan file, and summarised is the same for all, so
it is said once here and each command reads as its options plus one call.
"""

from __future__ import annotations

__all__ = ["run_pass_command"]

from collections.abc import Sequence
from pathlib import Path

import typer

from onnxcompress.cli.common import (
    SideFile,
    check_side_file,
    compress_file,
    plan_file,
    plan_text,
    save_options,
)
from onnxcompress.pipeline import PipelineResult, Step


def run_pass_command(
    context: typer.Context,
    steps: Step | Sequence[Step],
    model: Path,
    output: Path | None,
    *,
    data: Path | None = None,
    report: Path | None = None,
    input_shape: Sequence[str] | None = None,
    dry_run: bool = False,
    save_plan: Path | None = None,
) -> None:
    """Plan the step(s) and print each plan (`dry_run`), or run them gated and write the model.

    `save_plan` is checked against the model's paths before any work, and written with the model
    (so a failed gate writes neither) or, on a dry run, alone.
    """
    steps = [steps] if isinstance(steps, Step) else list(steps)
    if save_plan is not None:
        check_side_file(save_plan, "plan", model, output)
    if dry_run:
        plan_file(model, steps, data_path=data, save_plan=save_plan)
        return
    side_files: list[SideFile] = []
    if save_plan is not None:
        side_files.append((save_plan, "plan", _first_plan))
    compress_file(model, output, steps, data_path=data, report_path=report, side_files=side_files,
                  input_shapes=input_shape, save=save_options(context))


def _first_plan(result: PipelineResult) -> str:
    """The plan file: the first step's plan as it was carried out."""
    return plan_text(result.steps[0].report.notes.get("plan", {}))
