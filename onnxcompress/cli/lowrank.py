"""`onnxcompress lowrank`: truncated-SVD factorization as one gated step, or a dry-run plan.

`--dry-run` plans (kind, rank, predicted params/FLOPs, and every skip with its reason) and
writes nothing but the plan file when `--save-plan` asks for it; `--plan` applies a saved plan.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from onnxcompress import io, writer
from onnxcompress.cli.common import (
    DataOption,
    InputShapeOption,
    MinCosineOption,
    MinRankOption,
    MinTop1Option,
    OutputOption,
    ReportOption,
    SideFile,
    check_loaded,
    check_side_file,
    compress_file,
    console,
    gate_for,
    guarded,
)
from onnxcompress.data import load_npz
from onnxcompress.errors import UserError
from onnxcompress.pass_base import PassContext, get_pass, make_config
from onnxcompress.pipeline import Step

PASS_NAME = "lowrank.svd"


def _options(
    energy: float | None, ratio: float | None, flops: bool, budget: float | None, conv: str, speed: bool,
    latency_batch: int, min_params: int, exclude: list[str] | None, plan: Path | None,
    clusters: int | None = None,
) -> dict[str, object]:
    options: dict[str, object] = {"conv": conv, "speed": speed, "latency_batch": latency_batch,
                                  "min_params": min_params, "exclude": tuple(exclude or ())}
    if clusters is not None:
        if conv != "clustered":
            raise UserError("--clusters applies to --conv clustered only")
        options["clusters"] = clusters
    for key, value in (("energy", energy), ("ratio", ratio), ("budget", budget)):
        if value is not None:
            options[key] = value
    if flops:
        options["ratio_metric"] = "flops"
    if plan is not None:
        if not plan.is_file():
            raise UserError(f"{plan}: no such plan file")
        options["plan"] = str(plan)
    return options


def _print_plan(plan_dict: dict[str, object]) -> None:
    table = Table(title="low-rank plan")
    for column, justify in (("weight", "left"), ("op", "left"), ("kind", "left"), ("rank", "right"),
                            ("params", "right"), ("FLOPs", "right"), ("energy", "right"), ("rel. error", "right")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for layer in plan_dict["layers"]:  # type: ignore[union-attr]
        table.add_row(
            layer["name"], layer["op"], layer["kind"], f"{layer['rank']}/{layer['max_rank']}",
            f"{layer['params_before']:,} → {layer['params_after']:,}",
            f"×{layer['flops_after'] / layer['flops_before']:.2f}",
            f"{layer['energy']:.4f}", f"{layer['rel_error']:.4f}",
        )
    console.print(table)
    totals = plan_dict["totals"]
    if plan_dict["layers"]:
        console.print(f"planned layers: params {totals['params_before']:,} → {totals['params_after']:,} "  # type: ignore[index]
                      f"(×{totals['params_after'] / totals['params_before']:.3f})")  # type: ignore[index]
    for item in plan_dict["skipped"]:  # type: ignore[union-attr]
        console.print(f"skipped {item['name']}: {item['reason']}", soft_wrap=True)


@guarded
def lowrank(
    model: Annotated[Path, typer.Argument(help="The ONNX model.", show_default=False)],
    output: OutputOption = None,
    energy: Annotated[float | None, typer.Option(help="Keep this fraction of each weight's energy ‖W‖²_F.")] = None,
    ratio: Annotated[float | None, typer.Option(help="Per-layer size after/before, in (0, 1).")] = None,
    flops: Annotated[bool, typer.Option("--flops", help="--ratio counts FLOPs, not parameters.")] = False,
    budget: Annotated[float | None, typer.Option(help="Lowest output cosine; greedy per-layer rank search.")] = None,
    conv: Annotated[str, typer.Option(
        help="Conv form: auto, channel, spatial, clustered (Denton's filter clustering) or off.",
    )] = "auto",
    clusters: Annotated[int | None, typer.Option(
        help="With --conv clustered: k-means groups of filters, each its own rank (default 4).",
    )] = None,
    speed: Annotated[bool, typer.Option("--speed", help="Keep a layer only if onnxruntime runs it faster.")] = False,
    latency_batch: Annotated[int, typer.Option(help="Batch size of the --speed latency test.")] = 64,
    min_params: Annotated[int, typer.Option(help="Leave weights smaller than this alone.")] = 4096,
    exclude: Annotated[list[str] | None, typer.Option(help="Weight-name glob never factorized (repeatable).")] = None,
    plan: Annotated[Path | None, typer.Option("--plan", help="Apply a saved plan (JSON).")] = None,
    save_plan: Annotated[Path | None, typer.Option("--save-plan", help="Write the plan as JSON.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Plan and print; write no model.")] = False,
    data: DataOption = None,
    report: ReportOption = None,
    min_cosine: MinCosineOption = None,
    min_rank_corr: MinRankOption = None,
    min_top1: MinTop1Option = None,
    input_shape: InputShapeOption = None,
) -> None:
    """Factorize MatMul/Gemm/Conv weights by truncated SVD where it pays (Denton et al. 2014)."""
    options = _options(energy, ratio, flops, budget, conv, speed, latency_batch, min_params,
                       exclude, plan, clusters)
    if save_plan is not None:
        check_side_file(save_plan, "plan", model, output)
    if dry_run:
        cls = get_pass(PASS_NAME)
        compression = cls(make_config(cls.Config, options))
        loaded = io.load(model)
        protected = check_loaded(loaded, [(save_plan, "plan")])
        compression.requires(loaded)
        compression.context = PassContext(data=load_npz(data, loaded) if data else None, original=loaded)
        plan_dict = compression.plan_model(loaded).to_dict()  # type: ignore[attr-defined]
        _print_plan(plan_dict)
        if save_plan is not None:
            writer.write_text(save_plan, _plan_text(plan_dict), "plan", protected)
        return
    step = Step(pass_name=PASS_NAME, options=options, gate=gate_for(min_cosine, min_rank_corr, min_top1))
    side_files: list[SideFile] = []
    if save_plan is not None:
        side_files.append((save_plan, "plan", lambda result: _plan_text(result.steps[0].report.notes.get("plan", {}))))
    compress_file(model, output, [step], data_path=data, report_path=report, side_files=side_files,
                  input_shapes=input_shape)


def _plan_text(plan_dict: object) -> str:
    return json.dumps(plan_dict, indent=2) + "\n"


def register(app: typer.Typer) -> None:
    app.command()(lowrank)
