"""Run the console script's `main` in this process: a subprocess per case is too slow to fuzz.

What a shell would see is kept: the exit code, stdout and stderr. An exception escaping
`main` is our bug, as it would be in a shell: exit 1, with the traceback as stderr.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from onnxcompress.cli import main


@dataclasses.dataclass(frozen=True)
class Outcome:
    code: int
    stdout: str
    stderr: str

    @property
    def error_lines(self) -> list[str]:
        return self.stderr.splitlines()


def run_cli(args: Sequence[str | os.PathLike[str]], cwd: Path | None = None) -> Outcome:
    """`onnxcompress ARGS` run in `cwd` (the current folder when None)."""
    stdout, stderr = io.StringIO(), io.StringIO()
    argv, folder = sys.argv, Path.cwd()
    sys.argv = ["onnxcompress", *map(str, args)]
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                main()
                code = 0
            except SystemExit as done:
                code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
            except Exception:  # the traceback is the finding
                traceback.print_exc(file=sys.stderr)
                code = 1
    finally:
        sys.argv = argv
        os.chdir(folder)
    return Outcome(code, stdout.getvalue(), stderr.getvalue())
