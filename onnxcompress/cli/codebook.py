"""`onnxcompress cluster | pack | unpack`: weight sharing and Deep Compression storage.

`cluster` runs `codebook.kmeans` as one gated step. `pack` writes the `.onnxc` archive
(relative indices, codebook indices and codebooks, entropy-coded) and prints the paper's
Table 1 for it; `unpack` restores the ONNX model bit for bit. A corrupt, truncated or foreign
archive is a one-line error with exit code 2.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from onnxcompress import io, runtime, writer
from onnxcompress.archive.limits import DEFAULT_MAX_RATIO
from onnxcompress.cli.common import (
    DataOption,
    InputShapeOption,
    MinCosineOption,
    MinRankOption,
    MinTop1Option,
    OutputOption,
    PassOptionsCommand,
    ReportOption,
    check_side_file,
    console,
    gate_for,
    guarded,
    pass_help,
    save_options,
)
from onnxcompress.cli.one_pass import run_pass_command
from onnxcompress.errors import UserError
from onnxcompress.pipeline import Step

KMEANS = "codebook.kmeans"


def _parse_overrides(items: list[str] | None) -> dict[str, int]:
    overrides: dict[str, int] = {}
    for item in items or ():
        pattern, sep, bits = item.rpartition("=")
        if not sep or not pattern or not bits.strip().isdigit():
            raise UserError(f"--layer-bits {item!r}: expected GLOB=BITS, e.g. 'conv1.*=8'")
        overrides[pattern] = int(bits)
    return overrides


@guarded
def cluster(
    context: typer.Context,
    model: Annotated[
        Path, typer.Argument(help="The ONNX model (pruned or not).", show_default=False)
    ],
    output: OutputOption = None,
    bits: Annotated[
        int | None, typer.Option(help=pass_help(KMEANS, "bits"), show_default=False)
    ] = None,
    layer_bits: Annotated[
        list[str] | None,
        typer.Option(help="GLOB=BITS for matching weights (repeatable, first match wins)."),
    ] = None,
    init: Annotated[
        str | None, typer.Option(help=pass_help(KMEANS, "init"), show_default=False)
    ] = None,
    exclude: Annotated[
        list[str] | None,
        typer.Option(help=pass_help(KMEANS, "exclude") + " Repeatable.", show_default=False),
    ] = None,
    data: DataOption = None,
    report: ReportOption = None,
    min_cosine: MinCosineOption = None,
    min_rank_corr: MinRankOption = None,
    min_top1: MinTop1Option = None,
    input_shape: InputShapeOption = None,
) -> None:
    """Share weights by per-layer k-means (Deep Compression): uint8/uint4 indices + codebook."""
    options: dict[str, object] = {
        "bits": bits,
        "overrides": _parse_overrides(layer_bits),
        "exclude": tuple(exclude or ()),
    }
    if init is not None:
        options["init"] = init
    step = Step(
        pass_name=KMEANS, options=options, gate=gate_for(min_cosine, min_rank_corr, min_top1)
    )
    run_pass_command(context, step, model, output, data=data, report=report,
                     input_shape=input_shape)


@guarded
def pack(
    model: Annotated[
        Path, typer.Argument(help="A model (typically pruned and clustered).", show_default=False)
    ],
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Archive (default: <stem>.onnxc).")
    ] = None,
    coder: Annotated[
        str, typer.Option(help="ans (rANS: within a fraction of a percent of the entropy) or "
                          "huffman (as in the paper).")
    ] = "ans",
    index_bits: Annotated[
        str,
        typer.Option(
            help="Relative-index width: 'auto' (per layer the 2..10 bits estimated smallest), "
            "'paper' (8 conv, 5 others) or 1..16 bits for all layers."
        ),
    ] = "auto",
    keep_annotations: Annotated[
        bool,
        typer.Option(help="Keep the torch exporter's debug annotations (stack traces, FX nodes)."),
    ] = False,
    report: ReportOption = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Do not print the table.")] = False,
) -> None:
    """Write a Deep Compression archive (.onnxc) and print its Table-1 report."""
    from onnxcompress.archive import compression_table, table_markdown
    from onnxcompress.archive import pack as pack_model
    from onnxcompress.archive.format import INDEX_WIDTH_RULES

    if report is not None and report.suffix not in (".json", ".md", ".markdown"):
        raise UserError(f"{report}: report format must be .json or .md")
    output = output or model.with_suffix(".onnxc")
    writer.check(output, "archive", {model.resolve(): "the input model"})
    if report is not None:
        check_side_file(report, "report", model, output)
    width: int | str = index_bits
    if index_bits not in INDEX_WIDTH_RULES:
        if not index_bits.isdigit():
            raise UserError(
                f"--index-bits {index_bits!r}: expected a number of bits, 'auto' or 'paper'"
            )
        width = int(index_bits)
    loaded = io.load(model)
    protected = io.protected(loaded)
    for path, what in ((output, "archive"), (report, "report")):
        if path is not None:
            writer.check(path, what, protected)
    kernel_ops = sorted({n.op_type for n in loaded.graph if n.domain == runtime.DOMAIN})
    if kernel_ops:
        console.print(
            f"note: layers held by {', '.join(kernel_ops)} are stored as raw CSR/index arrays; "
            "pack the model from before `sparsify` for Deep Compression coding",
            soft_wrap=True,
        )
    result = pack_model(
        loaded, coder=coder, index_bits=width, keep_annotations=keep_annotations  # type: ignore[arg-type]
    )
    if result.annotations_dropped:
        console.print(
            f"note: left out {result.annotations_dropped} debug annotations of the torch "
            "exporter (stack traces, FX nodes; --keep-annotations keeps them)", soft_wrap=True
        )
    table = compression_table(result)
    text = table_markdown(table, title=f"{model.name} → {output.name} ({coder})")
    with writer.batch(protected) as staged:
        staged.stage(output, "archive").write_bytes(result.data)
        if report is not None:
            body = json.dumps(table, indent=2) if report.suffix == ".json" else text + "\n"
            staged.stage(report, "report").write_text(body, encoding="utf-8")
    if not quiet:
        console.print(text, markup=False)


@guarded
def unpack(
    context: typer.Context,
    archive: Annotated[Path, typer.Argument(help="An .onnxc archive.", show_default=False)],
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Model (default: <stem>.onnx).")
    ] = None,
    max_ratio: Annotated[
        float,
        typer.Option(
            "--max-ratio",
            min=1.0,
            help="Refuse an archive that would restore to more than this many times its size "
            "(decompression bombs); real archives stay far below.",
        ),
    ] = DEFAULT_MAX_RATIO,
) -> None:
    """Restore the ONNX model from an .onnxc archive, every weight bit-identical."""
    from onnxcompress.archive import unpack_file

    output = output or archive.with_suffix(".onnx")
    written = unpack_file(
        archive, output, max_ratio=max_ratio, external_data=save_options(context).external_data
    )
    console.print(f"wrote {written}", markup=False)


def register(app: typer.Typer) -> None:
    """Add the weight-sharing commands; the app lists families, each module its commands."""
    app.command(cls=PassOptionsCommand)(cluster)
    app.command()(pack)
    app.command()(unpack)
