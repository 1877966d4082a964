"""The one guarded, atomic way every command writes a file: model, data file, archive, report, plan.

One writer because each command used to check its own destinations, and each missed a case
(an archive named like the input's data file, a report over the weights the model maps).

* Refuse: every `protected` file (the input, each file the loaded model maps), a missing
  folder, a folder, and one destination named twice by the same command.
* Stage: every file goes first into a hidden folder `.onnxcompress-<pid>.<host>-*` beside
  its destination. A full disk or a read-only folder fails there, before any destination
  changes: one `UserError` (exit 2), and the staging folders are removed.
* Commit: `os.replace` each staged file into place, in the order staged. A file staged with
  `unpairs=` (a model's external data) first removes that file (the old model) when it
  replaces an existing one: a crash between the renames leaves no model, never an old
  model reading new data.
* Sweep: a staging folder whose process is gone (SIGKILL, power loss) is removed on the next
  write to its folder; folders of live processes are left alone, and so are those of other
  machines or containers (`<host>`, a hash of the host name: their pids mean nothing here).
"""

from __future__ import annotations

__all__ = [
    "PREFIX",
    "staging_prefix",
    "Protected",
    "Batch",
    "batch",
    "check",
    "refuse_protected",
    "sweep",
    "write_bytes",
    "write_text",
]

import contextlib
import hashlib
import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

from onnxcompress.errors import UserError

logger = logging.getLogger(__name__)

PREFIX = ".onnxcompress-"
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_STAGING = re.compile(rf"^{re.escape(PREFIX)}(\d+)\.([0-9a-f]{{8}})-")


def staging_prefix(pid: int) -> str:
    """The name a staging folder of process `pid` on this machine starts with."""
    return f"{PREFIX}{pid}.{_HOST}-"

#: Files no command may write, each with what it is ("the input model", ...).
Protected = Mapping[Path, str]


def refuse_protected(path: Path, what: str, protected: Protected) -> Path:
    """The resolved destination; UserError if it is a protected file."""
    resolved = path.resolve()
    if resolved in protected:
        raise UserError(
            f"{path}: refusing to overwrite {protected[resolved]}; choose another {what} name"
        )
    return resolved


def check(path: Path, what: str, protected: Protected = {}) -> Path:  # noqa: B006 - read only
    """Refuse a destination that is protected, in a missing folder, or a folder."""
    resolved = refuse_protected(path, what, protected)
    if not resolved.parent.is_dir():
        raise UserError(f"{path.parent}: {what} folder does not exist")
    if resolved.is_dir():
        raise UserError(f"{path}: is a folder; give a file name for the {what}")
    return resolved


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except (OverflowError, ValueError):  # no process could have this id
        return False
    return True


def sweep(folder: Path) -> None:
    """Remove staging folders left in `folder` by processes that no longer run."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        found = _STAGING.match(entry.name)
        if found is None or found[2] != _HOST or not entry.is_dir(follow_symlinks=False):
            continue
        pid = int(found[1])
        if pid != os.getpid() and not _alive(pid):
            logger.info("removing %s, left by a process that no longer runs", entry.path)
            shutil.rmtree(entry.path, ignore_errors=True)


class Batch:
    """Files staged together and committed together (see the module docstring)."""

    def __init__(self, protected: Protected) -> None:
        self.protected = protected
        self._staging: dict[Path, Path] = {}
        self._moves: list[tuple[Path, Path, Path | None]] = []

    def stage(self, path: Path, what: str, *, unpairs: Path | None = None) -> Path:
        """Where to write the file that will become `path`."""
        dest = check(path, what, self.protected)
        if any(dest == moved for _, moved, _ in self._moves):
            raise UserError(f"{path}: named twice as a destination; give each output its own name")
        folder = self._staging.get(dest.parent)
        if folder is None:
            sweep(dest.parent)
            folder = Path(tempfile.mkdtemp(prefix=staging_prefix(os.getpid()), dir=dest.parent))
            self._staging[dest.parent] = folder
        self._moves.append((folder / dest.name, dest, unpairs))
        return folder / dest.name

    def drop(self, path: Path) -> None:
        """Do not commit `path` after all (the writer made no such file)."""
        self._moves = [move for move in self._moves if move[1] != path.resolve()]

    def destinations(self) -> list[Path]:
        """The final paths, in the order staged, to name them all when a write fails."""
        return [dest for _, dest, _ in self._moves]

    def commit(self) -> None:
        """Rename each staged file over its destination (see the module docstring's Commit)."""
        for staged, dest, unpairs in self._moves:
            if unpairs is not None and dest.exists():
                unpairs.unlink(missing_ok=True)
            os.replace(staged, dest)
            logger.info("wrote %s", dest)

    def discard(self) -> None:
        """Remove the staging folders: empty after a commit, partial files after a failure."""
        for folder in self._staging.values():
            shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def batch(protected: Protected = {}) -> Iterator[Batch]:  # noqa: B006 - read only
    """Stage files in the block; commit them all when it ends, or leave nothing behind."""
    staged = Batch(protected)
    try:
        yield staged
        staged.commit()
    except OSError as error:
        names = ", ".join(str(dest) for dest in staged.destinations()) or str(error.filename)
        raise UserError(f"cannot write {names}: {error.strerror or error}") from None
    finally:
        staged.discard()


def write_bytes(path: Path, data: bytes, what: str = "output", protected: Protected = {}) -> Path:  # noqa: B006
    """One file through a one-file batch: a reader sees the old file or the new one, never half."""
    with batch(protected) as staged:
        staged.stage(path, what).write_bytes(data)
    return path


def write_text(path: Path, text: str, what: str = "output", protected: Protected = {}) -> Path:  # noqa: B006
    """`write_bytes` of UTF-8 text, so no platform encoding leaks into reports."""
    return write_bytes(path, text.encode("utf-8"), what, protected)
