"""`onnxcompress sparsify`: pruned MatMul/Gemm -> SparseMatMul, Conv -> SparseConv, where faster.

Runs the `sparse.csr` pass as one gated step. The rewrite is exact, so the default fidelity
gate is strict. `--portable` (default) keeps the model runnable by a stock onnxruntime.
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
from onnxcompress.pipeline import Step

PASS_NAME = "sparse.csr"


@guarded
def sparsify(
    context: typer.Context,
    model: Annotated[Path, typer.Argument(help="The (pruned) ONNX model.", show_default=False)],
    output: OutputOption = None,
    min_sparsity: Annotated[
        float | None,
        typer.Option(
            min=0.0, max=1.0, help=pass_help(PASS_NAME, "min_sparsity"), show_default=False
        ),
    ] = None,
    batch: Annotated[
        int | None, typer.Option(min=1, help=pass_help(PASS_NAME, "batch"), show_default=False)
    ] = None,
    portable: Annotated[
        bool,
        typer.Option(
            "--portable/--no-portable", help=pass_help(PASS_NAME, "portable"), show_default=False
        ),
    ] = True,
    always: Annotated[
        bool,
        typer.Option(
            "--always", help="Convert every layer >= --min-sparsity without measuring speed."
        ),
    ] = False,
    min_speedup: Annotated[
        float | None, typer.Option(help=pass_help(PASS_NAME, "min_speedup"), show_default=False)
    ] = None,
    threads: Annotated[
        int | None, typer.Option(min=1, help=pass_help(PASS_NAME, "threads"), show_default=False)
    ] = None,
    min_params: Annotated[
        int | None, typer.Option(min=0, help=pass_help(PASS_NAME, "min_params"), show_default=False)
    ] = None,
    exclude: Annotated[
        list[str] | None,
        typer.Option(help=pass_help(PASS_NAME, "exclude") + " Repeatable.", show_default=False),
    ] = None,
    data: DataOption = None,
    report: ReportOption = None,
    min_cosine: MinCosineOption = None,
    min_rank_corr: MinRankOption = None,
    min_top1: MinTop1Option = None,
    input_shape: InputShapeOption = None,
) -> None:
    """Run pruned MatMul/Gemm/Conv layers with sparse kernels where measurably faster (exact)."""
    given = {
        "min_sparsity": min_sparsity,
        "batch": batch,
        "min_speedup": min_speedup,
        "threads": threads,
        "min_params": min_params,
    }  # None: the config's default
    options: dict[str, object] = {key: value for key, value in given.items() if value is not None}
    options.update(
        portable=portable, decide="always" if always else "measure", exclude=tuple(exclude or ())
    )
    step = Step(
        pass_name=PASS_NAME, options=options, gate=gate_for(min_cosine, min_rank_corr, min_top1)
    )
    run_pass_command(context, step, model, output, data=data, report=report,
                     input_shape=input_shape)


def register(app: typer.Typer) -> None:
    """Add `sparsify`; the app lists families, each module its commands."""
    app.command(cls=PassOptionsCommand)(sparsify)
