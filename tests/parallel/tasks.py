"""Sweep functions for the executor tests: module-level, so worker processes can import them."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from onnxcompress.parallel import Task


def payload(offset: float, markers: Path | None = None) -> bytes:
    return json.dumps({"offset": offset, "markers": str(markers) if markers else None}).encode()


def setup(payload: bytes) -> dict[str, Any]:
    return {**json.loads(payload), "pid": os.getpid()}


def square(state: dict[str, Any], task: Task) -> float:
    return task.setting**2 + state["offset"]


def square_dying_once(state: dict[str, Any], task: Task) -> float:
    """Kills its own process the first time it sees a task (a marker file remembers it)."""
    marker = Path(state["markers"]) / f"{task.layer}-{task.setting}"
    if not marker.exists():
        marker.touch()
        os._exit(1)
    return square(state, task)


def always_dying(state: dict[str, Any], task: Task) -> float:
    os._exit(1)


def worker_pid(state: dict[str, Any], task: Task) -> list[int]:
    """The process that built the state, and the one running the task (equal: built once)."""
    return [state["pid"], os.getpid()]
