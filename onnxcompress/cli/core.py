"""Commands that are not one pass: inspect, optimize (recipes), passes, recipe schema."""

from __future__ import annotations

import dataclasses
import json
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import onnx_ir as ir
import typer
from rich.table import Table

from onnxcompress import io
from onnxcompress.cli.common import (
    DataOption,
    InputShapeOption,
    MinBoxF1Option,
    MinCosineOption,
    MinRankOption,
    MinTop1Option,
    OutputOption,
    ReportOption,
    ValDataOption,
    compress_file,
    console,
    default_output,
    guarded,
    save_options,
)
from onnxcompress.cli.parallel import (
    CacheOption,
    ExecutorOption,
    NoCacheOption,
    RayAddressOption,
    WorkersOption,
    cache_for,
    with_sweep_options,
)
from onnxcompress.compare import compare_models, file_bytes, interleaved_latency
from onnxcompress.data import LABELS, load_npz, sample_axis
from onnxcompress.errors import FidelityGateError, UserError
from onnxcompress.fidelity import DEFAULT_GATE, TaskMetric
from onnxcompress.pass_base import describe, get_pass, make_config, pass_names, quantized_ops
from onnxcompress.pipeline import PipelineResult, Step
from onnxcompress.probes import parse_input_shapes, shapes_as_sizes
from onnxcompress.recipe import load_recipe, recipe_schema
from onnxcompress.summary import layer_table, totals

ModelArgument = Annotated[Path, typer.Argument(help="The ONNX model.", show_default=False)]


@guarded
def inspect(
    model: ModelArgument,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Per-weight table: op, shape, params, sparsity, distinct values, bytes; and totals.

    Shared-weight (codebook) layers add their index bits and codebook size.
    """
    loaded = io.load(model)
    rows = layer_table(loaded)
    summary = totals(rows)
    if as_json:
        typer.echo(
            json.dumps(
                {"model": str(model), "layers": [r.to_dict() for r in rows], **summary}, indent=2
            )
        )
        return
    shared = any(row.bits is not None for row in rows)
    table = Table(title=str(model))
    columns = [("name", "left"), ("op", "left"), ("shape", "left"), ("params", "right"),
               ("sparsity", "right"), ("distinct", "right"), ("bytes", "right")]
    columns += [("bits", "right"), ("codebook", "right")] if shared else []
    for column, justify in columns:
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for row in rows:
        distinct = f"{row.distinct:,}" if row.distinct_exact else f"≥{row.distinct:,}"
        extra = [str(row.bits or ""), str(row.codebook_size or "")] if shared else []
        table.add_row(row.name, row.op, "×".join(map(str, row.shape)), f"{row.params:,}",
                      f"{row.sparsity:.1%}", distinct, f"{row.bytes:,}", *extra)
    table.add_section()
    table.add_row("total", "", "", f"{summary['total_params']:,}", f"{summary['sparsity']:.1%}", "",
                  f"{summary['total_bytes']:,}", *([""] * (len(columns) - 7)))
    console.print(table)


@guarded
def optimize(
    context: typer.Context,
    model: ModelArgument,
    output: OutputOption = None,
    recipe: Annotated[
        str | None,
        typer.Option(
            "--recipe",
            show_default=False,
            help="Built-in recipe name or a YAML file [default: 'default' with --data, 'data-free' "
            "without].",
        ),
    ] = None,
    data: DataOption = None,
    val_data: ValDataOption = None,
    report: ReportOption = None,
    input_shape: InputShapeOption = None,
    trust_random_probes: Annotated[
        bool,
        typer.Option(
            "--trust-random-probes",
            help="Without --data, run pruning and low-bit steps anyway, gated on random probes "
            "only.",
        ),
    ] = False,
    min_cosine: MinCosineOption = None,
    min_rank_corr: MinRankOption = None,
    min_top1: MinTop1Option = None,
    min_box_f1: MinBoxF1Option = None,
    batch: Annotated[
        int, typer.Option(min=1, max=4096, help="Batch size at which latency is measured.")
    ] = 1,
    max_latency_ratio: Annotated[
        float | None,
        typer.Option(
            min=0.01,
            show_default=False,
            help="Refuse a result slower than this many times the original at --batch (e.g. 1.05).",
        ),
    ] = None,
    workers: WorkersOption = None,
    executor: ExecutorOption = "local",
    ray_address: RayAddressOption = None,
    cache: CacheOption = None,
    no_cache: NoCacheOption = False,
    finetune: Annotated[
        bool,
        typer.Option(
            "--finetune",
            help="Retrain after every pruning and k-means step (needs labels in --data); each "
            "round gated on the accuracy change on --val-data (else on --data's first samples), "
            "which are never trained on.",
        ),
    ] = False,
    max_accuracy_drop: Annotated[
        float,
        typer.Option(
            min=0.0,
            max=1.0,
            help="With --finetune: the most top-1 accuracy a round may lose (0.003 = 0.3 points).",
        ),
    ] = 0.003,
) -> None:
    """Compress with a recipe of gated steps.

    With --data, per-layer codebook bits found by search; without, float16 storage only. Latency
    before/after is measured at --batch. The search's per-layer errors run on this machine or a Ray
    cluster (--executor ray), cached on disk. --finetune retrains after each pruning and k-means
    step (Han's retraining); --val-data gives the gates held-out samples the model never saw.
    """
    if finetune and data is None:
        raise UserError(
            "--finetune retrains on labelled samples: give --data train.npz with a 'labels' array"
        )
    if val_data is not None and data is None:
        raise UserError("--val-data is judged on beside --data: give --data train.npz as well")
    if recipe is None:
        recipe = "default" if data is not None or trust_random_probes else "data-free"
    chosen = load_recipe(recipe)
    steps_to_run = _without_lossy_steps_if_quantized(model, chosen.steps)
    if data is None and not trust_random_probes:
        _refuse_steps_needing_data(steps_to_run, recipe)
    given = {"min_cosine": min_cosine, "min_rank_correlation": min_rank_corr, "min_top1": min_top1,
             "min_box_f1": min_box_f1}
    given = {key: value for key, value in given.items() if value is not None}
    steps = [s.model_copy(update={"gate": s.gate.model_copy(update=given)}) for s in steps_to_run]
    steps = with_sweep_options(steps, executor, ray_address, workers, cache_for(cache, no_cache))
    task = None
    probes = chosen.probes
    if finetune:
        steps, task, probes = _retraining(steps, data, val_data, max_accuracy_drop, chosen.probes)

    def check_latency(original: ir.Model, result: PipelineResult) -> dict[str, Any]:
        return _latency(original, result, batch, max_latency_ratio)

    result = compress_file(model, output, steps, data_path=data, report_path=report, probes=probes,
                           seed=chosen.seed, input_shapes=input_shape, before_save=check_latency,
                           task_metric=task, save=save_options(context), gate_data_path=val_data)
    _say_if_not_smaller(model, output or default_output(model), result)


#: With --finetune, the gates' samples (never trained on): this many, or a fifth of the data.
RETRAIN_PROBES = 2000
#: With --finetune and --val-data: the gates judge on this many of its samples at most.
VAL_PROBES = 10_000


def _retraining(
    steps: Sequence[Step], data: Path | None, val_data: Path | None, max_drop: float, probes: int
) -> tuple[
    list[Step], Callable[[ir.Model, Mapping[str, np.ndarray] | None], TaskMetric | None], int
]:
    """`--finetune`: retraining rounds, the accuracy-change metric, and how many gate samples.

    Without `val_data` the gate's samples are the data's first ones, left out of retraining but
    perhaps trained on before (a net that memorised them hides what a round loses): said once.
    """
    from onnxcompress.finetune.retrain import accuracy_change, with_retraining

    assert data is not None  # checked first thing by optimize
    judged_on = val_data if val_data is not None else data
    if val_data is not None:
        count = max(probes, min(VAL_PROBES, _label_count(val_data)))
    else:
        count = max(probes, min(RETRAIN_PROBES, _label_count(data) // 5))
        console.print(TRAINING_GATE_NOTE.format(count=count, data=data), soft_wrap=True)

    def metric(model: ir.Model, arrays: Mapping[str, np.ndarray] | None) -> TaskMetric | None:
        if arrays is None or LABELS not in arrays:
            raise UserError(f"--finetune needs labels: {judged_on} has no 'labels' array")
        return accuracy_change(np.asarray(arrays[LABELS])[:count])

    return with_retraining(steps, max_drop=max_drop), metric, count


#: What optimize --finetune says when its gate samples come from the training data.
TRAINING_GATE_NOTE = (
    "note: the gates judge accuracy on the first {count} samples of {data}, left out of "
    "retraining but perhaps trained on before; give --val-data held_out.npz for samples the "
    "model never saw"
)


def _label_count(path: Path) -> int:
    """Samples in an .npz's labels (0 when unreadable: loading it later says why)."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            return len(archive["labels"]) if "labels" in archive.files else 0
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile):
        return 0


def _latency(
    original: ir.Model, result: PipelineResult, batch: int, max_ratio: float | None
) -> dict[str, Any]:
    """Batch latency of the original and the result (interleaved medians).

    Refused when the result is slower than `max_ratio` times the original.
    """
    inputs = {  # the gates' own probes, `batch` samples along each input's sample axis
        value.name: _samples_at(result.probes[value.name], sample_axis(original, value), batch)
        for value in original.graph.inputs
        if value.name in result.probes
    }
    before, after = interleaved_latency([original, result.model], inputs)
    ratio = after / before if before > 0 else 1.0
    console.print(
        f"latency at batch {batch}: {before:.3f} ms -> {after:.3f} ms ({ratio:.2f}x the original)",
        soft_wrap=True,
    )
    if max_ratio is not None and ratio > max_ratio:
        raise FidelityGateError(
            f"the result runs {ratio:.2f}x the original's time at batch {batch}, over "
            f"--max-latency-ratio {max_ratio}; nothing was written"
        )
    return {"latency_ms": {"batch": batch, "before": before, "after": after, "ratio": ratio}}


def _samples_at(array: np.ndarray, axis: int | None, batch: int) -> np.ndarray:
    """`batch` samples of a probe array (repeated when it holds fewer; a scalar kept whole).

    Real probe values, not random ones: a sample rate or a recurrent state must stay valid.
    """
    array = np.asarray(array)
    if axis is None:
        return array
    return np.take(array, np.arange(batch) % array.shape[axis], axis=axis)


def _without_lossy_steps_if_quantized(model: Path, steps: Sequence[Step]) -> list[Step]:
    """An already quantized model runs as it is: lossy steps are left out, and the user is told."""
    found = quantized_ops(io.load(model))
    if not found:
        return list(steps)
    kept = [s for s in steps if not get_pass(s.pass_name).lossy]
    console.print(
        f"note: {model} is already quantized ({', '.join(found)}); lossy steps are left out "
        f"({len(steps) - len(kept)} of {len(steps)})",
        soft_wrap=True,
    )
    return kept


def _refuse_steps_needing_data(steps: Sequence[Step], recipe: str) -> None:
    """Random probes cannot vouch for input-dependent error: such steps need real samples."""
    needing = [
        f"{s.pass_name} (step {i + 1})"
        for i, s in enumerate(steps)
        if get_pass(s.pass_name)(
            make_config(get_pass(s.pass_name).Config, s.options)
        ).needs_calibration()
    ]
    if needing:
        raise UserError(
            f"recipe {recipe!r} has steps whose error depends on the inputs "
            f"({', '.join(needing)}): give --data calib.npz with real samples, or "
            "--trust-random-probes"
        )


def _say_if_not_smaller(model: Path, output: Path, result: PipelineResult) -> None:
    """One line when the written file is not smaller than the input, with the likely reason."""
    before, after = file_bytes(model), file_bytes(output)
    if after < before:
        return
    applied = [s.step.pass_name for s in result.steps if s.status == "applied"]
    if not result.steps:
        why = "no step of the recipe applies to this model (see the note above)"
    elif not applied:
        why = "every step was rolled back by its gate or changed nothing (see above)"
    elif all(name.startswith("prune.") for name in applied):
        why = "pruned zeros are stored dense; a codebook step (cluster) or `pack` makes them pay"
    else:
        why = "the applied steps add graph nodes without removing enough weight bytes"
    console.print(
        f"note: {output} is not smaller than the input ({after:,} vs {before:,} bytes): {why}",
        soft_wrap=True,
    )


@guarded
def passes(
    describe_name: Annotated[
        str | None, typer.Option("--describe", help="Show one pass's options.")
    ] = None,
) -> None:
    """List the registered passes, or describe one pass's options."""
    if describe_name is None:
        for name in pass_names():
            console.print(f"{name:24} {get_pass(name).summary}", soft_wrap=True)
        return
    cls = get_pass(describe_name)
    console.print(f"{cls.name}: {cls.summary}", soft_wrap=True)
    table = Table()
    for column in ("option", "type = default", "description"):
        table.add_column(column)
    for row in describe(cls):
        table.add_row(*row)
    console.print(table)


@guarded
def bench(
    original: ModelArgument,
    compressed: Annotated[Path, typer.Argument(help="The compressed model.", show_default=False)],
    batch: Annotated[int, typer.Option(min=1, help="Batch size of the probe inputs.")] = 1,
    runs: Annotated[int, typer.Option(min=1, help="Timed runs per model (interleaved).")] = 50,
    data: DataOption = None,
    input_shape: InputShapeOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Size, onnxruntime latency and fidelity of two models, side by side (the gates' metrics)."""
    loaded = io.load(original)
    samples = load_npz(data, loaded) if data else None
    sizes = shapes_as_sizes(parse_input_shapes(input_shape, loaded)) if input_shape else None
    result = compare_models(
        original, compressed, batch=batch, runs=runs, data=samples, input_sizes=sizes
    )
    if as_json:
        typer.echo(
            json.dumps(
                {
                    **dataclasses.asdict(result),
                    "metrics": result.metrics.to_dict(),
                    "size_ratio": result.size_ratio,
                    "speedup": result.speedup,
                },
                indent=2,
            )
        )
        return
    table = Table()
    for column in ("", str(original), str(compressed), "ratio"):
        table.add_column(column, justify="right")
    table.add_row(
        "bytes on disk", f"{result.bytes_a:,}", f"{result.bytes_b:,}", f"{result.size_ratio:.2f}×"
    )
    table.add_row(f"latency ms (batch {batch}, median)", f"{result.latency_ms_a:.3f}",
                  f"{result.latency_ms_b:.3f}", f"{result.speedup:.2f}×")
    if result.accuracy_a is not None and result.accuracy_b is not None:
        table.add_row("accuracy (labels)", f"{result.accuracy_a:.2%}", f"{result.accuracy_b:.2%}",
                      f"{(result.accuracy_b - result.accuracy_a) * 100:+.2f} pt")
    console.print(table)
    console.print(f"fidelity over {result.samples} samples: {result.metrics}", soft_wrap=True)
    failures = DEFAULT_GATE.failures(result.metrics)
    console.print(
        f"default gate: {'passes' if not failures else 'fails: ' + '; '.join(failures)}",
        soft_wrap=True,
    )


recipe_app = typer.Typer(help="Recipes: YAML lists of gated passes.", no_args_is_help=True)


@recipe_app.command("schema")
@guarded
def schema() -> None:
    """Print the JSON Schema that recipes are validated against."""
    typer.echo(json.dumps(recipe_schema(), indent=2))


@recipe_app.command("show")
@guarded
def show(name: Annotated[str, typer.Argument(help="Built-in recipe name or YAML file.")]) -> None:
    """Print a recipe after validation, as the engine will run it."""
    typer.echo(json.dumps(load_recipe(name).model_dump(by_alias=True), indent=2))


def register(app: typer.Typer) -> None:
    """Add the commands every install has; the app lists families, each module its commands."""
    app.command()(inspect)
    app.command()(optimize)
    app.command()(passes)
    app.command()(bench)
    app.add_typer(recipe_app, name="recipe")
