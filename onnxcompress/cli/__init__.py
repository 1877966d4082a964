"""The `onnxcompress` command: one typer app; each pass family adds its commands.

Exit codes: 0 ok; 2 bad input or recipe (one `error: ...` line on stderr); 3 a fidelity gate
failed (nothing written); 1 a bug (traceback kept).
"""

from __future__ import annotations

__all__ = ["app", "main"]

import importlib
import logging
import os
import sys

import typer

app = typer.Typer(
    name="onnxcompress",
    help="Make trained ONNX models smaller and faster: prune, factorize, share weights, sparsify.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

#: Command modules, each with `register(app)`. Missing optional families are simply absent.
FAMILIES = ("core", "prune", "lowrank", "codebook", "sparse", "finetune")

@app.callback()
def _options(
    context: typer.Context,
    external_data: bool = typer.Option(
        False,
        "--external-data",
        help="Write weights to <output>.data beside the model (automatic above 1.8 GB).",
    ),
) -> None:
    """Options for every command, given before it: `onnxcompress --external-data prune ...`."""
    from onnxcompress.io import SaveOptions

    # cli.common.save_options
    context.obj = SaveOptions(external_data=True if external_data else None)


for _family in FAMILIES:
    try:
        _module = importlib.import_module(f"onnxcompress.cli.{_family}")
    except ModuleNotFoundError as _error:
        if _error.name != f"onnxcompress.cli.{_family}":
            raise
        continue
    _module.register(app)


try:  # typer >= 0.25 vendors click
    from typer._click.exceptions import UsageError
except ImportError:  # pragma: no cover - older typer on click
    # the same class from click itself: mypy cannot see that only one import runs
    from click.exceptions import UsageError  # type: ignore[no-redef, assignment]


def main() -> None:
    """The console script: usage errors (a bad option value, no argument) are one line too."""
    logging.basicConfig(
        level=os.environ.get("ONNXCOMPRESS_LOG", "WARNING").upper(),
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        code = app(standalone_mode=False)
    except UsageError as error:
        if type(error).__name__ == "NoArgsIsHelpError" and error.ctx is not None:
            print(error.ctx.get_help())
        elif error.ctx is None:
            print(f"error: {error.format_message()}", file=sys.stderr)
        else:
            hint = f" (see `{error.ctx.command_path} --help`)"
            print(f"error: {error.format_message()}{hint}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code if isinstance(code, int) else 0)

