"""`onnxcompress lowrank`: truncated-SVD factorization as one gated step, or a dry-run plan.

`--dry-run` plans (kind, rank, predicted params/FLOPs, and every skip with its reason) and
writes nothing but the plan file when `--save-plan` asks for it; `--plan` applies a saved plan.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from onnxcompress.cli.common import (
    DataOption,
    InputShapeOption,
    MinCosineOption,
    MinRankOption,
    MinTop1Option,
    OutputOption,
    PassOptionsCommand,
    ReportOption,
    gate_for,
    guarded,
    pass_help,
)
from onnxcompress.cli.one_pass import run_pass_command
from onnxcompress.errors import UserError
from onnxcompress.pipeline import Step

PASS_NAME = "lowrank.svd"


def _options(
    flops: bool, exclude: list[str] | None, plan: Path | None, **given: object
) -> dict[str, object]:
    """The pass options the user gave; the rest keep the config's defaults."""
    options: dict[str, object] = {key: value for key, value in given.items() if value is not None}
    options["exclude"] = tuple(exclude or ())
    if flops:
        options["ratio_metric"] = "flops"
    if plan is not None:
        if not plan.is_file():
            raise UserError(f"{plan}: no such plan file")
        options["plan"] = str(plan)
    return options


@guarded
def lowrank(
    context: typer.Context,
    model: Annotated[Path, typer.Argument(help="The ONNX model.", show_default=False)],
    output: OutputOption = None,
    energy: Annotated[
        float | None, typer.Option(help=pass_help(PASS_NAME, "energy"), show_default=False)
    ] = None,
    ratio: Annotated[
        float | None, typer.Option(help=pass_help(PASS_NAME, "ratio"), show_default=False)
    ] = None,
    flops: Annotated[
        bool, typer.Option("--flops", help="--ratio counts FLOPs, not parameters.")
    ] = False,
    budget: Annotated[
        float | None, typer.Option(help=pass_help(PASS_NAME, "budget"), show_default=False)
    ] = None,
    conv: Annotated[
        str | None, typer.Option(help=pass_help(PASS_NAME, "conv"), show_default=False)
    ] = None,
    clusters: Annotated[
        int | None, typer.Option(help=pass_help(PASS_NAME, "clusters"), show_default=False)
    ] = None,
    speed: Annotated[bool, typer.Option("--speed", help=pass_help(PASS_NAME, "speed"))] = False,
    latency_batch: Annotated[
        int | None, typer.Option(help=pass_help(PASS_NAME, "latency_batch"), show_default=False)
    ] = None,
    min_params: Annotated[
        int | None, typer.Option(help=pass_help(PASS_NAME, "min_params"), show_default=False)
    ] = None,
    exclude: Annotated[
        list[str] | None,
        typer.Option(help=pass_help(PASS_NAME, "exclude") + " Repeatable.", show_default=False),
    ] = None,
    plan: Annotated[
        Path | None, typer.Option("--plan", help=pass_help(PASS_NAME, "plan"), show_default=False)
    ] = None,
    save_plan: Annotated[
        Path | None, typer.Option("--save-plan", help="Write the plan as JSON.")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Plan and print; write no model.")
    ] = False,
    data: DataOption = None,
    report: ReportOption = None,
    min_cosine: MinCosineOption = None,
    min_rank_corr: MinRankOption = None,
    min_top1: MinTop1Option = None,
    input_shape: InputShapeOption = None,
) -> None:
    """Factorize MatMul/Gemm/Conv weights by truncated SVD where it pays (Denton et al. 2014)."""
    options = _options(flops, exclude, plan, energy=energy, ratio=ratio, budget=budget, conv=conv,
                       clusters=clusters,
                       speed=speed or None, latency_batch=latency_batch, min_params=min_params)
    step = Step(
        pass_name=PASS_NAME, options=options, gate=gate_for(min_cosine, min_rank_corr, min_top1)
    )
    run_pass_command(context, step, model, output, data=data, report=report,
                     input_shape=input_shape, dry_run=dry_run, save_plan=save_plan)


def register(app: typer.Typer) -> None:
    """Add `lowrank`; the app lists families, each module its commands."""
    app.command(cls=PassOptionsCommand)(lowrank)
