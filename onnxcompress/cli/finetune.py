"""`onnxcompress finetune`: retrain a compressed model's weights (the `finetune` pass) as one gated step."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from onnxcompress.cli.common import (
    OutputOption,
    ReportOption,
    compress_file,
    default_output,
    guarded,
    print_summary,
    save_options,
)
from onnxcompress.cli.parallel import ExecutorOption, RayAddressOption
from onnxcompress.errors import UserError
from onnxcompress.fidelity import Gate
from onnxcompress.pipeline import Step


def _has_labels(path: Path) -> bool:
    """Whether an .npz holds a `labels` array (False for a missing file: loading reports it)."""
    if not path.is_file():
        return True
    try:
        with np.load(path, allow_pickle=False) as archive:
            return "labels" in archive.files
    except (OSError, ValueError, EOFError, TypeError, AttributeError, zipfile.BadZipFile):
        return True  # not a readable archive: loading it says why


def _placement(executor: str, address: str | None, workers: int, checkpoint_dir: Path | None) -> dict[str, object]:
    """Where training runs: this process, or `workers` DDP workers on Ray Train."""
    if executor not in ("local", "ray"):
        raise UserError(f"--executor must be local or ray, not {executor!r}")
    on_ray = executor == "ray" or address is not None
    if workers > 1 and not on_ray:
        raise UserError("--workers above 1 trains on Ray: add --executor ray")
    if not on_ray:
        return {}
    placement: dict[str, object] = {"executor": "ray", "workers": workers, "ray_address": address}
    if checkpoint_dir is not None:
        placement["checkpoint_dir"] = str(checkpoint_dir)
    return placement


@guarded
def finetune(
    context: typer.Context,
    model: Annotated[Path, typer.Argument(help="The (compressed) ONNX model.", show_default=False)],
    data: Annotated[
        str, typer.Option("--data", help=".npz keyed by input name (optional 'labels'), or module:function.")
    ],
    output: OutputOption = None,
    epochs: Annotated[int, typer.Option(min=1, help="Passes over the data.")] = 1,
    lr: Annotated[float, typer.Option(help="Learning rate > 0 (Han: ~1/10 of the original).")] = 1e-3,
    batch_size: Annotated[int, typer.Option(min=1, help="Samples per step.")] = 64,
    optimizer: Annotated[str, typer.Option(help="sgd or adam.")] = "sgd",
    distill: Annotated[bool, typer.Option("--distill", help="Distil from the teacher's outputs, not labels.")] = False,
    teacher: Annotated[
        Path | None, typer.Option(help="Teacher (uncompressed) model for distillation; needed without labels.")
    ] = None,
    loss: Annotated[str, typer.Option(help="auto, cross_entropy, kl, mse or cosine.")] = "auto",
    l1: Annotated[float, typer.Option(min=0.0, help="L1 regularisation strength.")] = 0.0,
    l2: Annotated[float, typer.Option(min=0.0, help="L2 regularisation (weight decay).")] = 0.0,
    target_cosine: Annotated[
        float | None, typer.Option(help="Stop early once the output cosine to the teacher reaches this.")
    ] = None,
    seed: Annotated[int, typer.Option(min=0, help="Seed of batch order and dropout.")] = 0,
    report: ReportOption = None,
    min_cosine: Annotated[float | None, typer.Option(
        "--min-cosine", min=-1.0, max=1.0, show_default=False,
        help="Gate: lowest output cosine against the input model (default: none; training moves outputs).")] = None,
    workers: Annotated[int, typer.Option(min=1, help="Data-parallel (DDP) workers; more than 1 needs --executor ray.")] = 1,
    executor: ExecutorOption = "local",
    ray_address: RayAddressOption = None,
    checkpoint_dir: Annotated[Path | None, typer.Option(
        help="With Ray: a folder every worker reaches, for the training checkpoints.", show_default=False)] = None,
) -> None:
    """Retrain weights in PyTorch keeping zeros, codebook indices and low-rank factors.

    Training with labels is meant to move the outputs away from MODEL's, so the output
    gate is off unless --min-cosine is given (compare against the uncompressed model with
    `onnxcompress bench` instead).
    """
    options: dict[str, object] = {
        "epochs": epochs,
        "lr": lr,
        "batch_size": batch_size,
        "optimizer": optimizer,
        "distill": distill,
        "loss": loss,
        "l1": l1,
        "weight_decay": l2,
        "target_cosine": target_cosine,
        "seed": seed,
    }
    if teacher is not None:
        options["teacher"] = str(teacher)
    options.update(_placement(executor, ray_address, workers, checkpoint_dir))
    data_path: Path | None = None
    if data.endswith(".npz"):
        data_path = Path(data)
    else:
        options["data"] = data
    if teacher is None and (distill or (data_path is not None and not _has_labels(data_path))):
        raise UserError(
            "distillation needs a teacher: give --teacher ORIGINAL.onnx (the uncompressed model), "
            "or labels in the data"
        )
    gate = Gate.off() if min_cosine is None else Gate.off().model_copy(update={"min_cosine": min_cosine})
    step = Step(pass_name="finetune", options=options, gate=gate)  # training moves outputs on purpose
    from onnxcompress.finetune.train import show_progress

    with show_progress():
        result = compress_file(
            model, output, [step], data_path=data_path, report_path=report, seed=seed, quiet=True,
            save=save_options(context),
        )
    print_summary(result, output or default_output(model))


def register(app: typer.Typer) -> None:
    app.command()(finetune)
