"""What every command shares: one-line errors with exit codes, the gated run-and-save, tables.

Each pass family registers its commands in its own module `onnxcompress/cli/<family>.py`
with `register(app)`, and runs its pass through `compress_file`, so every command gets the
same gates, atomic write, report and summary.
"""

from __future__ import annotations

import sys

__all__ = [
    "console",
    "guarded",
    "default_output",
    "compress_file",
    "plan_file",
    "print_plan",
    "check_side_file",
    "check_loaded",
    "SideFile",
    "print_summary",
    "DataOption",
    "ValDataOption",
    "OutputOption",
    "ReportOption",
    "MinCosineOption",
    "MinRankOption",
    "MinTop1Option",
    "InputShapeOption",
    "gate_for",
    "pass_help",
    "PassOptionsCommand",
]

import functools
import json
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, TypeVar

import numpy as np
import onnx_ir as ir
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from typer.core import TyperCommand

from onnxcompress import io, writer
from onnxcompress.data import load_npz
from onnxcompress.errors import OnnxCompressError, UserError
from onnxcompress.fidelity import DEFAULT_GATE, Gate, TaskMetric
from onnxcompress.pass_base import PlanTable, get_pass
from onnxcompress.pipeline import PipelineResult, Step, run_steps
from onnxcompress.probes import DEFAULT_PROBES, parse_input_shapes, shapes_as_sizes
from onnxcompress.report import render_report

# Piped output (a log, a CI job) gets room for the widest table rather than rich's 80 columns.
console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
F = TypeVar("F", bound=Callable[..., Any])

def save_options(context: typer.Context) -> io.SaveOptions:
    """How this invocation writes models.

    The app's global options (`--external-data`), which the app callback leaves as the context
    object of the invocation.
    """
    found = context.find_object(io.SaveOptions)
    return found if found is not None else io.SaveOptions()

OutputOption = Annotated[
    Path | None,
    typer.Option("--output", "-o", help="Output model (default: <stem>.compressed.onnx)."),
]
DataOption = Annotated[
    Path | None,
    typer.Option("--data", help=".npz keyed by input name (optional 'labels') for probes."),
]
ValDataOption = Annotated[
    Path | None,
    typer.Option(
        "--val-data",
        show_default=False,
        help="Held-out .npz (same inputs, 'labels' for accuracy) the gates judge on instead of "
        "--data's first samples: samples the model never trained on.",
    ),
]
ReportOption = Annotated[
    Path | None, typer.Option("--report", help="Write a .json, .md or .html report.")
]
MinCosineOption = Annotated[float | None, typer.Option(
    "--min-cosine", min=-1.0, max=1.0, show_default=False,
    help="Gate: lowest cosine of each output, logits for softmax outputs "
         + escape(f"[default: {DEFAULT_GATE.min_cosine}]."))]
MinRankOption = Annotated[float | None, typer.Option(
    "--min-rank-corr", min=-1.0, max=1.0, show_default=False,
    help="Gate: lowest rank correlation over samples "
         + escape(f"[default: {DEFAULT_GATE.min_rank_correlation}]."))]
MinTop1Option = Annotated[float | None, typer.Option(
    "--min-top1", min=0.0, max=1.0, show_default=False,
    help="Gate: lowest top-1 agreement " + escape(f"[default: {DEFAULT_GATE.min_top1}]."))]
MinBoxF1Option = Annotated[float | None, typer.Option(
    "--min-box-f1", min=0.0, max=1.0, show_default=False,
    help="Gate: lowest F1 of a YOLO-style detector's boxes against the original's "
         + escape(f"[default: {DEFAULT_GATE.min_box_f1}]."))]
InputShapeOption = Annotated[
    list[str] | None,
    typer.Option(
        "--input-shape",
        show_default=False,
        help="Probe shape of an input with dynamic dimensions, NAME=DxDx... (repeatable), e.g. "
        "images=1x3x320x320.",
    ),
]


def guarded(function: F) -> F:
    """Turn our errors into one `error: ...` line on stderr and the error's exit code."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except OnnxCompressError as error:
            typer.echo(f"error: {error}", err=True)
            raise typer.Exit(error.exit_code) from None

    return wrapper  # type: ignore[return-value]


#: Said once when a command gates on drawn probes instead of the user's data.
WEAK_PROXY_NOTE = (
    "note: no --data: the gates compare outputs on random probes, a weak proxy for real inputs; "
    "give --data calib.npz (real samples) for a trustworthy check"
)


def default_output(model_path: Path) -> Path:
    """`model.compressed.onnx` beside the input: never the input itself."""
    return model_path.with_name(f"{model_path.stem}.compressed.onnx")


#: A file a command writes beside its model: (path, what it is, how to render it from the result).
SideFile = tuple[Path, str, Callable[[PipelineResult], str | bytes]]


def _check_destinations(model_path: Path, output: Path, report: Path | None) -> None:
    """Refuse bad destinations before any work is done (and before loading)."""
    writer.check(output, "output", {model_path.resolve(): "the input model"})
    if report is not None:
        if report.suffix not in (".json", ".md", ".markdown", ".html", ".htm"):
            raise UserError(f"{report}: report format must be .json, .md or .html")
        check_side_file(report, "report", model_path, output)


def check_side_file(path: Path, what: str, model_path: Path, output: Path | None = None) -> None:
    """Refuse a report or plan path over the model or its output, in no folder, or a folder."""
    model_output = output or default_output(model_path)
    writer.check(
        path,
        what,
        {model_path.resolve(): "the input model", model_output.resolve(): "the output model"},
    )


def check_loaded(
    model: ir.Model, destinations: Sequence[tuple[Path | None, str]]
) -> dict[Path, str]:
    """Once the model is loaded (and before any work), refuse destinations over the files it maps.

    Returns the protected files, for the writes that follow.
    """
    protected = io.protected(model)
    seen: set[Path] = set()
    for path, what in destinations:
        if path is None:
            continue
        resolved = writer.check(path, what, protected)
        if resolved in seen:
            raise UserError(f"{path}: named twice as a destination; give each output its own name")
        seen.add(resolved)
    return protected


def compress_file(
    model_path: Path,
    output: Path | None,
    steps: Sequence[Step],
    *,
    data_path: Path | None = None,
    report_path: Path | None = None,
    probes: int = DEFAULT_PROBES,
    seed: int = 0,
    quiet: bool = False,
    input_shapes: Sequence[str] | None = None,
    before_save: Callable[[ir.Model, PipelineResult], dict[str, Any]] | None = None,
    side_files: Sequence[SideFile] = (),
    task_metric: Callable[[ir.Model, Mapping[str, np.ndarray] | None], TaskMetric | None]
    | None = None,
    save: io.SaveOptions | None = None,
    gate_data_path: Path | None = None,
) -> PipelineResult:
    """Load, run the gated steps, write the model, report and side files together, print a summary.

    Every destination is checked before the steps run; all are written in one guarded batch,
    so a failing report (a full disk) leaves no model behind either. `gate_data_path`: held-out
    samples the gates (and `task_metric`) judge on instead of the data's first ones.
    """
    output = output or default_output(model_path)
    _check_destinations(model_path, output, report_path)
    extra: dict[str, Any] = {}  # what `before_save` measures (latency), for the report
    if report_path is not None:
        side_files = [
            *side_files,
            (report_path, "report", lambda result: render_report(result, report_path, extra)),
        ]
    model = io.load(model_path)
    save = save if save is not None else io.SaveOptions()
    external = io.uses_external_data(model, save.external_data)
    protected = check_loaded(
        model,
        [
            (output, "output"),
            (io.data_path(output) if external else None, "output"),
            *((path, what) for path, what, _ in side_files),
        ],
    )
    data = load_npz(data_path, model) if data_path else None
    gate_data = load_npz(gate_data_path, model) if gate_data_path else None
    judged_on = gate_data if gate_data is not None else data
    # for gates with min_task
    metric = task_metric(model, judged_on) if task_metric is not None else None
    sizes = shapes_as_sizes(parse_input_shapes(input_shapes, model)) if input_shapes else None
    if data is None and not quiet:
        console.print(WEAK_PROXY_NOTE, soft_wrap=True)
    with Progress(
        SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
        console=console, transient=True, disable=quiet or not console.is_terminal,
    ) as progress:
        task = progress.add_task("loading", total=len(steps))

        def on_step(index: int, count: int, step: Step) -> None:
            progress.update(
                task, completed=index, description=f"step {index + 1}/{count}: {step.pass_name}"
            )

        def on_progress(line: str) -> None:
            progress.update(task, description=line)

        result = run_steps(model, steps, data=data, probe_count=probes, seed=seed, on_step=on_step,
                           input_sizes=sizes, on_progress=on_progress, task=metric,
                           gate_data=gate_data)
    extra.update(before_save(model, result) if before_save is not None else {})
    texts = [(path, what, render(result)) for path, what, render in side_files]
    with writer.batch(protected) as staged:
        io.stage_model(staged, result.model, output, save)
        for path, what, text in texts:
            if isinstance(text, bytes):
                if text:  # an empty image: nothing to draw (no matplotlib)
                    staged.stage(path, what).write_bytes(text)
            else:
                staged.stage(path, what).write_text(text, encoding="utf-8")
    if not quiet:
        print_summary(result, output)
    return result


def plan_file(model_path: Path, steps: Sequence[Step], *, data_path: Path | None = None,
              save_plan: Path | None = None) -> PipelineResult:
    """Every command's dry run: plan each step, print each plan, write the last as JSON if asked.

    Nothing else is written. The caller has checked `save_plan` against the model paths.
    """
    model = io.load(model_path)
    protected = check_loaded(model, [(save_plan, "plan")])
    data = load_npz(data_path, model) if data_path else None
    result = run_steps(model, steps, data=data, dry_run=True)
    for step in result.steps:
        if step.plan is not None:
            print_plan(step.plan.table())
    if save_plan is not None and result.steps:
        text = plan_text(result.steps[-1].report.notes["plan"])
        writer.write_text(save_plan, text, "plan", protected)
    return result


def plan_text(plan: object) -> str:
    """A plan's JSON file: what `--save-plan` writes and `--plan` reads back."""
    return json.dumps(plan, indent=2) + "\n"


def print_plan(table: PlanTable) -> None:
    """A plan's table on the console; the plan itself only knows plain strings."""
    rich_table = Table(title=table.title)
    for column in table.columns:
        rich_table.add_column(column, justify="right" if column in table.right_aligned else "left")
    for row in table.rows:
        rich_table.add_row(*row)
    console.print(rich_table)
    for line in table.notes:
        console.print(line, soft_wrap=True)


def print_summary(result: PipelineResult, output: Path) -> None:
    """What a command wrote and what each step did, for a person (the report is for machines)."""
    console.print(f"wrote {output}", soft_wrap=True)
    table = Table()
    for column in ("", "before", "after"):
        table.add_column(column, justify="right")
    for key, label in (
        ("weight_params", "weight params"),
        ("nonzero_weight_params", "non-zero weights"),
        ("tensor_bytes", "tensor bytes"),
    ):
        table.add_row(label, f"{result.before[key]:,}", f"{result.after[key]:,}")
    console.print(table)
    for step in result.steps:
        metrics = f" — {step.metrics}" if step.metrics else ""
        console.print(
            f"{step.step.pass_name} {step.step.options}: {step.status} in "
            f"{step.seconds:.2f}s{metrics}",
            soft_wrap=True,
        )
        for failure in step.failures:
            console.print(f"  gate: {failure}")
    logging.getLogger(__name__).debug("summary printed")


_PASS_FIELD = re.compile(r"\{pass:([\w.]+):(\w+)\}")


def pass_help(pass_name: str, field: str) -> str:
    """The help of an option that sets `field` of a pass: the field's description and default.

    The pass config is the one place an option is documented (and its default declared). The
    text is looked up when help is shown (`PassOptionsCommand`), so listing the commands imports
    no pass; an option left at None takes the config's default.
    """
    return f"{{pass:{pass_name}:{field}}}"


def field_help(pass_name: str, field: str) -> str:
    """A pass config field's description, with its default when it has one worth showing."""
    info = get_pass(pass_name).Config.model_fields[field]
    text = info.description or ""
    default = None if info.is_required() else info.get_default(call_default_factory=True)
    if default not in (None, (), {}, False):
        text += escape(f" [default: {default}]")  # brackets are rich markup: shown literally
    return text


def resolve_pass_help(text: str) -> str:
    return _PASS_FIELD.sub(lambda match: field_help(match[1], match[2]), text)


class PassOptionsCommand(TyperCommand):
    """A command whose options' help comes from pass configs (see `pass_help`)."""

    def format_help(self, ctx: Any, formatter: Any) -> None:
        """Resolve each option's pass-help reference just before click renders the help."""
        for param in self.params:
            help_text = getattr(param, "help", None)
            if isinstance(help_text, str):
                param.help = resolve_pass_help(help_text)  # type: ignore[attr-defined]
        super().format_help(ctx, formatter)


def gate_for(min_cosine: float | None = None, min_rank_corr: float | None = None,
             min_top1: float | None = None) -> Gate:
    """The default gate, with the thresholds the user gave on the command line."""
    given = {"min_cosine": min_cosine, "min_rank_correlation": min_rank_corr, "min_top1": min_top1}
    return DEFAULT_GATE.model_copy(update={k: v for k, v in given.items() if v is not None})
