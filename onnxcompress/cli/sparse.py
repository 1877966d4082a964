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
    ReportOption,
    compress_file,
    gate_for,
    guarded,
)
from onnxcompress.pipeline import Step

PASS_NAME = "sparse.csr"


@guarded
def sparsify(
    model: Annotated[Path, typer.Argument(help="The (pruned) ONNX model.", show_default=False)],
    output: OutputOption = None,
    min_sparsity: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Layers with fewer zero weights stay dense.")
    ] = 0.7,
    batch: Annotated[int, typer.Option(min=1, help="Batch size the speed decision is measured at.")] = 1,
    portable: Annotated[
        bool,
        typer.Option("--portable/--no-portable", help="Also write model-local ONNX functions (stock onnxruntime runs it)."),
    ] = True,
    always: Annotated[
        bool, typer.Option("--always", help="Convert every layer >= --min-sparsity without measuring speed.")
    ] = False,
    min_speedup: Annotated[
        float, typer.Option(help="Measured dense/sparse time ratio a layer must reach (> 0).")
    ] = 1.1,
    threads: Annotated[int | None, typer.Option(min=1, help="onnxruntime threads for the measurement.")] = None,
    min_params: Annotated[int, typer.Option(min=0, help="Weights with fewer parameters stay dense.")] = 1024,
    exclude: Annotated[list[str] | None, typer.Option(help="Weight-name glob never converted (repeatable).")] = None,
    data: DataOption = None,
    report: ReportOption = None,
    min_cosine: MinCosineOption = None,
    min_rank_corr: MinRankOption = None,
    min_top1: MinTop1Option = None,
    input_shape: InputShapeOption = None,
) -> None:
    """Run pruned MatMul/Gemm/Conv layers with sparse kernels where measurably faster (exact)."""
    options: dict[str, object] = {
        "min_sparsity": min_sparsity,
        "batch": batch,
        "portable": portable,
        "decide": "always" if always else "measure",
        "min_speedup": min_speedup,
        "threads": threads,
        "min_params": min_params,
        "exclude": tuple(exclude or ()),
    }
    step = Step(pass_name=PASS_NAME, options=options, gate=gate_for(min_cosine, min_rank_corr, min_top1))
    compress_file(model, output, [step], data_path=data, report_path=report, input_shapes=input_shape)


def register(app: typer.Typer) -> None:
    app.command()(sparsify)
