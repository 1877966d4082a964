"""The options every command with a parallel sweep shares (sensitivity, optimize's search).

Where its evaluations run, and the cache that lets a run resume.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import typer

from onnxcompress.errors import UserError
from onnxcompress.parallel import SweepCache
from onnxcompress.pipeline import Step

ExecutorOption = Annotated[
    str,
    typer.Option(
        "--executor",
        help="Where evaluations run: local (this machine's processes) or ray (a Ray cluster; "
        "pip install 'onnxcompress[ray]').",
    ),
]
RayAddressOption = Annotated[
    str | None,
    typer.Option(
        "--ray-address",
        show_default=False,
        help="Ray cluster to join: auto (one started with `ray start --head`) or ray://host:port "
        "[default: a local cluster for this run]. Implies --executor ray.",
    ),
]
WorkersOption = Annotated[
    int | None,
    typer.Option(
        min=1,
        help="Processes (local), or CPUs of the local Ray cluster [default: local: only when >1 "
        "core "
        "is free; ray: every core].",
    ),
]
CacheOption = Annotated[
    Path | None,
    typer.Option(
        "--cache",
        show_default=False,
        help="Folder caching each evaluation by model hash, layer, method and setting, so an "
        "interrupted run "
        "resumes and a re-run is free [default: $ONNXCOMPRESS_CACHE or ~/.cache/onnxcompress].",
    ),
]
NoCacheOption = Annotated[
    bool, typer.Option("--no-cache", help="Evaluate everything; store nothing.")
]


def cache_for(folder: Path | None, disabled: bool) -> SweepCache | None:
    """The sweep cache the options ask for: none with --no-cache, else --cache or the default."""
    if disabled:
        if folder is not None:
            raise UserError("--cache and --no-cache exclude each other")
        return None
    if folder is not None and folder.exists() and not folder.is_dir():
        raise UserError(f"{folder}: exists and is not a folder; give a folder for --cache")
    return SweepCache(folder)


#: The passes whose candidates are measured by a sweep, and so take the options above.
SWEEPING_PASSES = ("codebook.search",)


def with_sweep_options(
    steps: Sequence[Step],
    kind: str,
    address: str | None,
    workers: int | None,
    cache: SweepCache | None,
) -> list[Step]:
    """`optimize`'s steps with the command's executor and cache in each sweeping pass's options.

    A recipe's own settings are kept where the command leaves the default.
    """
    if kind not in ("local", "ray"):
        raise UserError(f"--executor must be local or ray, not {kind!r}")
    given: dict[str, Any] = {}
    if kind == "ray" or address is not None:
        given.update(executor="ray", ray_address=address)
    if workers is not None:
        given["workers"] = workers
    updated = []
    for step in steps:
        if step.pass_name in SWEEPING_PASSES:
            cached = (
                {} if cache is None or "cache" in step.options else {"cache": str(cache.folder)}
            )
            step = step.model_copy(update={"options": {**cached, **step.options, **given}})
        updated.append(step)
    return updated
