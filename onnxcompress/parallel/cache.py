"""Results of sweeps on disk, one small file per task, so a sweep resumes and a re-run is free.

Key: the sweep's key (the hash of its payload: model bytes, probe data, settings; see
`Sweep.key`) and the task's (layer, method, setting). Each result is written to a temporary
file and renamed into place as soon as it arrives, so a sweep killed at any moment (or a
lost Ray head node) leaves only whole results behind, and the next run asks the workers
only for the rest. Files hold JSON: floats round-trip exactly, so a cached table is the
same table, to the bit.

Default folder: `$ONNXCOMPRESS_CACHE`, else `$XDG_CACHE_HOME/onnxcompress`, else
`~/.cache/onnxcompress`; `sweeps/<key>/` inside it.
"""

from __future__ import annotations

__all__ = ["SweepCache", "default_folder"]

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

from onnxcompress.parallel.sweep import Result, Sweep, Task

logger = logging.getLogger(__name__)


def default_folder() -> Path:
    """$ONNXCOMPRESS_CACHE, else the XDG cache folder: results outlive the run that made them."""
    if os.environ.get("ONNXCOMPRESS_CACHE"):
        return Path(os.environ["ONNXCOMPRESS_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "onnxcompress"


class SweepCache:
    """Task results by sweep and task, under `folder` (created on first write)."""

    def __init__(self, folder: Path | None = None) -> None:
        self.folder = Path(folder) if folder is not None else default_folder()
        self.hits = 0
        self.stored = 0

    def _path(self, sweep: Sweep, task: Task) -> Path:
        name = hashlib.sha256(
            json.dumps([task.layer, task.method, task.setting]).encode()
        ).hexdigest()[:32]
        return self.folder / "sweeps" / sweep.key / f"{name}.json"

    def get(self, sweep: Sweep, task: Task) -> tuple[bool, Result]:
        """(True, result) when this task of this sweep was stored before, else (False, None)."""
        path = self._path(sweep, task)
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            return False, None  # absent, or unreadable: evaluate again
        if record.get("task") != [task.layer, task.method, task.setting]:
            return False, None  # a hash collision of names: never return another task's result
        self.hits += 1
        return True, record["result"]

    def put(self, sweep: Sweep, task: Task, result: Result) -> None:
        """Store atomically: write a temporary file beside the target, then rename it."""
        path = self._path(sweep, task)
        text = json.dumps({"task": [task.layer, task.method, task.setting], "result": result})
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
            with os.fdopen(handle, "w") as file:
                file.write(text)
            os.replace(temporary, path)
            self.stored += 1
        except OSError as error:  # a full or read-only cache costs speed, never the sweep
            logger.warning(
                "sweep cache: cannot store a result in %s: %s", path.parent, error.strerror or error
            )
