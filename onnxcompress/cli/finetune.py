"""`onnxcompress finetune`: retrain a compressed model's weights as one gated step.

Every option's meaning is `FinetuneConfig`'s (help text read from it). Two options add a
follow-up step: `--group-lasso` is followed by `prune.dead_neurons` (the zeroed channels
removed, exactly), `--prior gmm` by `codebook.kmeans` at the bits that hold the mixture's
means exactly (a codebook model that `pack` codes).
"""

from __future__ import annotations

import math
import zipfile
from pathlib import Path
from typing import Annotated, cast

import numpy as np
import typer

from onnxcompress.cli.common import (
    OutputOption,
    SideFile,
    ValDataOption,
    compress_file,
    default_output,
    guarded,
    print_summary,
    save_options,
)
from onnxcompress.cli.parallel import ExecutorOption, RayAddressOption
from onnxcompress.errors import UserError
from onnxcompress.fidelity import Gate
from onnxcompress.finetune.config import FinetuneConfig, help_of
from onnxcompress.pass_base import make_config
from onnxcompress.pipeline import PipelineResult, Step


def _has_labels(path: Path) -> bool:
    """Whether an .npz holds a `labels` array (False for a missing file: loading reports it)."""
    if not path.is_file():
        return True
    try:
        with np.load(path, allow_pickle=False) as archive:
            return "labels" in archive.files
    except (OSError, ValueError, EOFError, TypeError, AttributeError, zipfile.BadZipFile):
        return True  # not a readable archive: loading it says why


def follow_up_steps(config: FinetuneConfig) -> list[Step]:
    """The steps a regulariser or prior implies after training (exact, or exact on the means)."""
    steps = []
    if config.group_lasso > 0:
        steps.append(Step(pass_name="prune.dead_neurons", gate=Gate.off()))
    if config.prior == "gmm":
        bits = max(1, math.ceil(math.log2(config.prior_components + 1)))
        steps.append(
            Step(
                pass_name="codebook.kmeans",
                options={"bits": bits, "min_params": 0},
                gate=Gate.off(),
            )
        )
    return steps


def _curve_file(report: Path | None) -> list[SideFile]:
    """`<report>.curve.png` beside a report: the training / held-out curve."""
    if report is None:
        return []

    def render(result: PipelineResult) -> bytes:
        from onnxcompress.finetune.curve import curve_png

        notes = next((s.report.notes for s in result.steps if s.step.pass_name == "finetune"), {})
        return curve_png(notes.get("history", []), notes.get("best_epoch")) or b""

    return [(report.with_suffix(".curve.png"), "report", render)]


def _placement(
    executor: str, address: str | None, workers: int, checkpoint_dir: Path | None
) -> dict[str, object]:
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


def _npz_or_loader(data: str, val_data: Path | None, options: dict[str, object]) -> Path | None:
    """--data as the .npz the pipeline loads, or a 'module:function' the pass calls (an option)."""
    if data.endswith(".npz"):
        return Path(data)
    if val_data is not None:
        raise UserError("--val-data goes with --data train.npz (not with a module:function)")
    options["data"] = data
    return None


@guarded
def finetune(
    context: typer.Context,
    model: Annotated[Path, typer.Argument(help="The (compressed) ONNX model.", show_default=False)],
    data: Annotated[
        str,
        typer.Option(
            "--data", help=".npz keyed by input name (optional 'labels'), or module:function."
        ),
    ],
    output: OutputOption = None,
    val_data: ValDataOption = None,
    epochs: Annotated[
        int | None, typer.Option(min=1, help=help_of("epochs"), show_default=False)
    ] = None,
    lr: Annotated[float | None, typer.Option(help=help_of("lr"), show_default=False)] = None,
    batch_size: Annotated[int, typer.Option(min=1, help=help_of("batch_size"))] = 64,
    optimizer: Annotated[str, typer.Option(help=help_of("optimizer"))] = "adam",
    lr_schedule: Annotated[str, typer.Option(help=help_of("lr_schedule"))] = "cosine",
    patience: Annotated[int, typer.Option(min=1, help=help_of("patience"))] = 3,
    max_steps: Annotated[int, typer.Option(min=1, help=help_of("max_steps"))] = 4000,
    max_cycles: Annotated[int, typer.Option(min=1, max=100, help=help_of("max_cycles"))] = 4,
    distill: Annotated[bool, typer.Option("--distill", help=help_of("distill"))] = False,
    teacher: Annotated[
        Path | None,
        typer.Option(help="Teacher (uncompressed) model for distillation; needed without labels."),
    ] = None,
    loss: Annotated[str, typer.Option(help=help_of("loss"))] = "auto",
    l1: Annotated[float, typer.Option(min=0.0, help=help_of("l1"))] = 0.0,
    l2: Annotated[float, typer.Option(min=0.0, help=help_of("l2"))] = 0.0,
    group_lasso: Annotated[
        float,
        typer.Option(min=0.0, help=help_of("group_lasso") + " Followed by prune.dead_neurons."),
    ] = 0.0,
    groups: Annotated[list[str] | None, typer.Option("--groups", help=help_of("groups"))] = None,
    regularise: Annotated[
        list[str] | None,
        typer.Option("--regularise", help=help_of("regularise") + " Repeatable.",
                     show_default=False),
    ] = None,
    biased_decay: Annotated[float, typer.Option(min=0.0, help=help_of("biased_decay"))] = 0.0,
    biased_decay_kind: Annotated[
        str, typer.Option(help=help_of("biased_decay_kind"))
    ] = "hyperbolic",
    prior: Annotated[str, typer.Option(help=help_of("prior"))] = "none",
    prior_components: Annotated[int, typer.Option(min=2, help=help_of("prior_components"))] = 16,
    prior_strength: Annotated[float, typer.Option(min=0.0, help=help_of("prior_strength"))] = 0.005,
    prior_zero_mass: Annotated[
        float, typer.Option(min=0.0, max=1.0, help=help_of("prior_zero_mass"))
    ] = 0.99,
    target_cosine: Annotated[float | None, typer.Option(help=help_of("target_cosine"))] = None,
    seed: Annotated[int, typer.Option(min=0, help=help_of("seed"))] = 0,
    report: Annotated[
        Path | None,
        typer.Option(
            "--report",
            help="Write a .json, .md or .html report, and the training curve as "
            "<report>.curve.png.",
        ),
    ] = None,
    min_cosine: Annotated[
        float | None,
        typer.Option(
            "--min-cosine",
            min=-1.0,
            max=1.0,
            show_default=False,
            help="Gate: lowest output cosine against the input model (default: none; training "
            "moves outputs).",
        ),
    ] = None,
    workers: Annotated[
        int,
        typer.Option(min=1, help="Data-parallel (DDP) workers; more than 1 needs --executor ray."),
    ] = 1,
    executor: ExecutorOption = "local",
    ray_address: RayAddressOption = None,
    checkpoint_dir: Annotated[
        Path | None,
        typer.Option(
            help="With Ray: a folder every worker reaches, for the training checkpoints.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Retrain weights in PyTorch keeping zeros, codebook indices and low-rank factors.

    Without options: Adam, a learning rate from a short range test, early stopping on 10% of
    the samples held out (on --val-data instead, when given: samples the model never saw).
    Training with labels is meant to move the outputs away from MODEL's, so the output gate is
    off unless --min-cosine is given (compare against the uncompressed model with
    `onnxcompress bench` instead).
    """
    options: dict[str, object] = {
        "epochs": epochs,
        "lr": lr,
        "batch_size": batch_size,
        "optimizer": optimizer,
        "lr_schedule": lr_schedule,
        "patience": patience,
        "max_steps": max_steps,
        "max_cycles": max_cycles,
        "distill": distill,
        "loss": loss,
        "l1": l1,
        "l2": l2,
        "group_lasso": group_lasso,
        "biased_decay": biased_decay,
        "biased_decay_kind": biased_decay_kind,
        "prior": prior,
        "prior_components": prior_components,
        "prior_strength": prior_strength,
        "prior_zero_mass": prior_zero_mass,
        "target_cosine": target_cosine,
        "seed": seed,
    }
    if groups:
        options["groups"] = tuple(groups)
    if regularise:
        options["regularise"] = tuple(regularise)
    if teacher is not None:
        options["teacher"] = str(teacher)
    options.update(_placement(executor, ray_address, workers, checkpoint_dir))
    data_path = _npz_or_loader(data, val_data, options)
    if teacher is None and (distill or (data_path is not None and not _has_labels(data_path))):
        raise UserError(
            "distillation needs a teacher: give --teacher ORIGINAL.onnx (the uncompressed model), "
            "or labels in the data"
        )
    # a bad value: one line, before loading
    config = cast(FinetuneConfig, make_config(FinetuneConfig, options))
    gate = (
        Gate.off()
        if min_cosine is None
        else Gate.off().model_copy(update={"min_cosine": min_cosine})
    )
    steps = [Step(pass_name="finetune", options=options, gate=gate), *follow_up_steps(config)]
    result = compress_file(
        model,
        output,
        steps,
        data_path=data_path,
        report_path=report,
        seed=seed,
        quiet=data_path is None,
        side_files=_curve_file(report),
        save=save_options(context),
        gate_data_path=val_data,
    )
    if data_path is None:
        print_summary(result, output or default_output(model))


def register(app: typer.Typer) -> None:
    """Add `finetune`; the app lists families, each module its commands."""
    app.command()(finetune)
