"""`onnxcompress prune` (unstructured or `--structured`) and `onnxcompress sensitivity`."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, cast

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from onnxcompress import io, writer
from onnxcompress.cli.common import (
    DataOption,
    InputShapeOption,
    MinCosineOption,
    MinRankOption,
    MinTop1Option,
    OutputOption,
    PassOptionsCommand,
    ReportOption,
    ValDataOption,
    console,
    gate_for,
    guarded,
    pass_help,
)
from onnxcompress.cli.one_pass import run_pass_command
from onnxcompress.cli.parallel import (
    CacheOption,
    ExecutorOption,
    NoCacheOption,
    RayAddressOption,
    WorkersOption,
    cache_for,
)
from onnxcompress.data import LABELS, load_npz
from onnxcompress.errors import DataError, UserError
from onnxcompress.fidelity import DEFAULT_GATE, Gate
from onnxcompress.parallel import make_executor
from onnxcompress.pipeline import Step
from onnxcompress.report_sensitivity import check_outputs, write_outputs

if TYPE_CHECKING:  # the passes load when a command runs, not when the CLI starts
    from onnxcompress.passes.prune.sensitivity import SensitivityResult

logger = logging.getLogger(__name__)

MAGNITUDE, STRUCTURED = "prune.magnitude", "prune.structured"


def _structured_options(ratio: float | None, criterion: str | None, exclude: list[str] | None,
                        plan_file: Path | None) -> dict[str, object]:
    given = {"ratio": ratio, "criterion": criterion}  # None: the config's default
    options: dict[str, object] = {key: value for key, value in given.items() if value is not None}
    options["exclude"] = tuple(exclude or ())
    if plan_file is not None:
        try:
            options["plan"] = json.loads(plan_file.read_text())
        except (OSError, ValueError) as error:
            raise UserError(f"{plan_file}: not a readable plan ({error})") from None
        except RecursionError:
            raise UserError(f"{plan_file}: not a readable plan (nested too deeply)") from None
    return options


@guarded
def prune(
    context: typer.Context,
    model: Annotated[Path, typer.Argument(help="The ONNX model.", show_default=False)],
    output: OutputOption = None,
    sparsity: Annotated[
        float | None, typer.Option(help=pass_help(MAGNITUDE, "sparsity"), show_default=False)
    ] = None,
    quality: Annotated[
        float | None, typer.Option(help=pass_help(MAGNITUDE, "quality"), show_default=False)
    ] = None,
    global_scope: Annotated[
        bool, typer.Option("--global", help="One threshold over all layers.")
    ] = False,
    structured: Annotated[
        bool, typer.Option("--structured", help="Remove whole neurons / channels.")
    ] = False,
    ratio: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            max=0.999,
            help="--structured: " + pass_help(STRUCTURED, "ratio"),
            show_default=False,
        ),
    ] = None,
    criterion: Annotated[
        str | None,
        typer.Option(
            help="--structured: " + pass_help(STRUCTURED, "criterion"), show_default=False
        ),
    ] = None,
    dead_neurons: Annotated[
        bool,
        typer.Option(
            "--dead-neurons",
            help="After unstructured pruning, remove neurons left without connections (Han).",
        ),
    ] = False,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run", help="--structured or --dead-neurons: print the plan, write nothing."
        ),
    ] = False,
    save_plan: Annotated[
        Path | None, typer.Option(help="--structured: write the plan as JSON.")
    ] = None,
    plan: Annotated[
        Path | None, typer.Option(help="--structured: " + pass_help(STRUCTURED, "plan"))
    ] = None,
    exclude: Annotated[
        list[str] | None,
        typer.Option(help=pass_help(MAGNITUDE, "exclude") + " Repeatable.", show_default=False),
    ] = None,
    data: DataOption = None,
    report: ReportOption = None,
    min_cosine: MinCosineOption = None,
    min_rank_corr: MinRankOption = None,
    min_top1: MinTop1Option = None,
    input_shape: InputShapeOption = None,
) -> None:
    """Zero the smallest weights (Han et al. 2015), or remove neurons/channels (--structured)."""
    if structured:
        if sparsity is not None or quality is not None or global_scope:
            raise UserError(
                "--structured takes --ratio; --sparsity/--quality/--global are for unstructured "
                "pruning"
            )
        options = _structured_options(ratio, criterion, exclude, plan)
        steps = [Step(pass_name=STRUCTURED, options=options,
                      gate=gate_for(min_cosine, min_rank_corr, min_top1))]
    else:
        if save_plan is not None or plan is not None:
            raise UserError("--save-plan and --plan go with --structured")
        if dry_run and (sparsity is not None or quality is not None):
            raise UserError(
                "--dry-run goes with --structured or --dead-neurons alone (magnitude pruning has "
                "no plan)"
            )
        steps = _unstructured_steps(
            sparsity, quality, global_scope, exclude, dead_neurons,
            gate_for(min_cosine, min_rank_corr, min_top1),
        )
    run_pass_command(context, steps, model, output, data=data, report=report,
                     input_shape=input_shape, dry_run=dry_run, save_plan=save_plan)


DEFAULT_RATIOS_TEXT = "0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,0.95"


def _unstructured_steps(
    sparsity: float | None,
    quality: float | None,
    global_scope: bool,
    exclude: list[str] | None,
    dead_neurons: bool,
    gate: Gate,
) -> list[Step]:
    """Magnitude pruning, then dead-neuron removal if asked (--dead-neurons alone: only that)."""
    if sparsity is None and quality is None and not dead_neurons:
        raise UserError(
            "give --sparsity S or --quality Q (or --dead-neurons alone, or --structured)"
        )
    magnitude: dict[str, object] = {"scope": "global" if global_scope else "layer",
                                    "exclude": tuple(exclude or ())}
    if sparsity is not None:
        magnitude["sparsity"] = sparsity
    if quality is not None:
        magnitude["quality"] = quality
    steps = []
    if sparsity is not None or quality is not None or not dead_neurons:
        steps.append(Step(pass_name=MAGNITUDE, options=magnitude, gate=gate))
    if dead_neurons:
        options = {"exclude": tuple(exclude or ())}
        steps.append(Step(pass_name="prune.dead_neurons", options=options, gate=gate))
    return steps


def _parse_ratios(text: str) -> list[float]:
    try:
        ratios = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"--ratios must be comma-separated numbers, got {text!r}") from None
    if not ratios or any(not 0 <= r < 1 for r in ratios):
        raise UserError(f"--ratios must lie in [0, 1), got {text!r}")
    return ratios


@guarded
def sensitivity(
    model: Annotated[Path, typer.Argument(help="The ONNX model.", show_default=False)],
    output_dir: Annotated[
        Path, typer.Option("--output", "-o", help="Folder for sensitivity.json/.csv/.png.")
    ],
    data: DataOption = None,
    val_data: ValDataOption = None,
    ratios: Annotated[
        str,
        typer.Option(
            help="Comma-separated pruning ratios per layer [default with --finetune: up to 0.99]."
        ),
    ] = DEFAULT_RATIOS_TEXT,
    min_cosine: Annotated[
        float,
        typer.Option(
            min=-1.0,
            max=1.0,
            help="Budget without labels: whole-model output cosine (the default gate's).",
        ),
    ] = cast(float, DEFAULT_GATE.min_cosine),
    max_accuracy_drop: Annotated[
        float, typer.Option(min=0.0, max=100.0, help="Budget with labels: accuracy drop in points.")
    ] = 0.5,
    probes: Annotated[
        int, typer.Option(min=1, help="Random probe samples when no --data is given.")
    ] = 64,
    exclude: Annotated[
        list[str] | None, typer.Option(help="Weight-name glob left out (repeatable).")
    ] = None,
    workers: WorkersOption = None,
    executor: ExecutorOption = "local",
    ray_address: RayAddressOption = None,
    cache: CacheOption = None,
    no_cache: NoCacheOption = False,
    seed: Annotated[int, typer.Option(min=0, help="Seed of the random probes.")] = 0,
    min_rank_corr: MinRankOption = None,
    min_top1: MinTop1Option = None,
    finetune: Annotated[
        bool,
        typer.Option(
            "--finetune",
            help="Rates for a pipeline that retrains: recipe.yaml is a ladder of rungs of doubling "
            "tolerance (ratios to 0.99) for `optimize --recipe DIR/recipe.yaml --data train.npz "
            "--finetune`.",
        ),
    ] = False,
) -> None:
    """Prune each layer alone at each ratio (Han et al. Fig. 5); choose rates under a budget.

    With a cosine budget the chosen plan also passes the default gate's other checks (rank
    correlation, top-1; change them with --min-rank-corr / --min-top1), as `optimize` will check.
    Each (layer, ratio) is one evaluation: on this machine's cores, or on a Ray cluster
    (--executor ray); each result is cached, so an interrupted run resumes where it stopped.
    With --val-data the curves are measured on those held-out samples instead of --data's.
    """
    from onnxcompress.passes.prune.retrain_ladder import RETRAIN_RATIOS, ladder_recipe_text
    from onnxcompress.passes.prune.sensitivity import Budget
    from onnxcompress.passes.prune.sensitivity import sensitivity as analyse

    ratio_list = (
        list(RETRAIN_RATIOS)
        if finetune and ratios == DEFAULT_RATIOS_TEXT
        else _parse_ratios(ratios)
    )
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"{output_dir}: exists and is not a folder; give a folder for the results")
    if not output_dir.resolve().parent.is_dir():
        raise UserError(f"{output_dir.parent}: output folder does not exist")
    loaded = io.load(model)
    check_outputs(output_dir, io.protected(loaded))
    scored_on = val_data if val_data is not None else data
    samples = load_npz(scored_on, loaded) if scored_on else None
    if samples is not None and not len(next(iter(samples.values()))):
        raise DataError(f"{scored_on}: no samples")
    if val_data is None and samples is not None and LABELS in samples:
        console.print(SENSITIVITY_TRAINING_NOTE.format(data=data), soft_wrap=True)
    gate = gate_for(min_rank_corr=min_rank_corr, min_top1=min_top1)
    budget = Budget(min_cosine=min_cosine, max_accuracy_drop=max_accuracy_drop / 100.0,
                    min_rank_correlation=gate.min_rank_correlation, min_top1=gate.min_top1)
    results = cache_for(cache, no_cache)
    bar = Progress(
        TextColumn("per-layer sensitivity"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    )
    with make_executor(executor, workers=workers, address=ray_address) as runner, bar as progress:
        task = progress.add_task("layers", total=None)
        result = analyse(
            loaded,
            data=samples,
            ratios=ratio_list,
            budget=budget,
            probes=probes,
            seed=seed,
            exclude=tuple(exclude or ()),
            executor=runner,
            cache=results,
            on_layer=lambda done, total: progress.update(task, completed=done, total=total),
        )
    written = write_outputs(result, output_dir, io.protected(loaded))
    if finetune:  # the plan for a pipeline that retrains replaces the one-step plan
        writer.write_text(
            output_dir / "recipe.yaml", ladder_recipe_text(result), "output", io.protected(loaded)
        )
    _print_sensitivity(result, written)


#: What sensitivity says when it scores accuracy on --data (perhaps the training samples).
SENSITIVITY_TRAINING_NOTE = (
    "note: accuracy is measured on {data}, perhaps samples the model was trained on; give "
    "--val-data held_out.npz for samples it never saw"
)


def _print_sensitivity(result: SensitivityResult, written: list[Path]) -> None:
    """The chosen rate per layer, what they remove together, and the files written."""
    table = Table(title=f"sensitivity ({result.metric}; baseline {result.baseline:.4f})")
    for column in ("layer", "params", "chosen rate"):
        table.add_column(column, justify="left" if column == "layer" else "right")
    for curve in result.curves:
        table.add_row(curve.name, f"{curve.params:,}", f"{curve.chosen:.2f}")
    console.print(table)
    console.print(
        f"chosen rates remove {result.removed_params:,} of {result.total_params:,} weights; "
        f"whole model {result.metric} = {result.joint_value:.6f}", soft_wrap=True,
    )
    for path in written:
        console.print(f"wrote {path}", soft_wrap=True)


def register(app: typer.Typer) -> None:
    """Add `prune` and `sensitivity`; the app lists families, each module its commands."""
    app.command(cls=PassOptionsCommand)(prune)
    app.command()(sensitivity)
