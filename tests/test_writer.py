"""The guarded writer (issue 14): full disks, read-only folders, crashes mid-save.

Tests may run as root, where chmod does not stop a write, so failures are injected as the
OSError the system would raise, or produced for real with RLIMIT_FSIZE in a subprocess.
"""

from __future__ import annotations

import errno
import os
import resource
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import numpy_helper
from typer.testing import CliRunner

from onnxcompress import io, writer
from onnxcompress.cli import app
from onnxcompress.errors import UserError
from tests.builders import NO_GATE, mlp_proto, save_proto

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture
def model_path(rng, tmp_path) -> Path:
    return Path(save_proto(mlp_proto(rng, (32, 64, 48, 10)), tmp_path / "m.onnx"))


def _no_space(path, data: object = b"") -> None:  # type: ignore[no-untyped-def]
    raise OSError(errno.ENOSPC, "No space left on device", str(path))


# --- full disk, read-only folder: one error line, exit 2, nothing left --------------------


def test_a_full_disk_is_one_error_line_and_leaves_nothing(model_path, tmp_path, monkeypatch):
    def half_written(model, path, **kwargs):  # type: ignore[no-untyped-def]
        Path(path).write_bytes(b"half a model")
        _no_space(path)

    monkeypatch.setattr(ir, "save", half_written)  # the external-data path
    monkeypatch.setattr(onnx, "save", half_written)  # the embedded one
    result = invoke("prune", model_path, "--sparsity", "0.5", *NO_GATE, "-o", tmp_path / "out.onnx")
    assert result.exit_code == 2, result.output
    assert (
        result.stderr == f"error: cannot write {tmp_path / 'out.onnx'}: No space left on device\n"
    )
    assert _names(tmp_path) == ["m.onnx"]


def test_a_read_only_folder_is_one_error_line(model_path, tmp_path, monkeypatch):
    def read_only(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise OSError(errno.EROFS, "Read-only file system", str(kwargs.get("dir")))

    monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    for args in (("prune", model_path, "--sparsity", "0.5", *NO_GATE, "-o", tmp_path / "out.onnx"),
                 ("pack", model_path, "-o", tmp_path / "a.onnxc", "-q")):
        result = invoke(*args)
        assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
        assert "Read-only file system" in result.stderr
    assert _names(tmp_path) == ["m.onnx"]


def test_a_report_that_cannot_be_written_leaves_no_model(model_path, tmp_path, monkeypatch):
    """The model and its report are committed together: a failing report leaves neither."""
    real = Path.write_text

    def report_fails(self, text, *args, **kwargs):  # type: ignore[no-untyped-def]
        if self.name == "r.json":
            _no_space(self)
        return real(self, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", report_fails)
    result = invoke(
        "prune",
        model_path,
        "--sparsity",
        "0.5",
        *NO_GATE,
        "-o",
        tmp_path / "out.onnx",
        "--report",
        tmp_path / "r.json",
    )
    assert result.exit_code == 2 and "No space left on device" in result.output, result.output
    assert _names(tmp_path) == ["m.onnx"]


def test_a_real_write_failure_exits_2_without_a_traceback(model_path, tmp_path):
    """RLIMIT_FSIZE makes the kernel fail the write (EFBIG), as a full disk would."""

    def small_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    archive = tmp_path / "archive" / "m.onnxc"
    archive.parent.mkdir()
    assert invoke("pack", model_path, "-o", archive, "-q").exit_code == 0
    for args in (
        ("prune", model_path, "--sparsity", "0.5", *NO_GATE, "-o", tmp_path / "out.onnx"),
        (
            "--external-data",
            "prune",
            model_path,
            "--sparsity",
            "0.5",
            *NO_GATE,
            "-o",
            tmp_path / "out.onnx",
        ),
        ("pack", model_path, "-o", tmp_path / "a.onnxc", "-q"),
        ("unpack", archive, "-o", tmp_path / "r.onnx"),
        ("sensitivity", model_path, "-o", tmp_path / "sens", "--ratios", "0.5", "--workers", "1"),
    ):
        result = subprocess.run(
            [sys.executable, "-m", "onnxcompress", *map(str, args)],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
            preexec_fn=small_files,
        )
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith("error: cannot write") and result.stderr.count("\n") == 1, (
            result.stderr
        )
    assert _names(tmp_path) == ["archive", "m.onnx"]


# --- crashes: stale staging folders, model and data never mismatched ----------------------


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


KILLED_MID_SAVE = """
import os, signal, sys
from pathlib import Path
from onnxcompress import writer
with writer.batch() as staged:
    staged.stage(Path(sys.argv[1]), "output").write_bytes(bytes(100_000))
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_staging_folders_of_killed_processes_are_swept_on_the_next_write(model_path, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_MID_SAVE, str(tmp_path / "out.onnx")], env=env, timeout=120
    )
    assert killed.returncode == -signal.SIGKILL
    [stale] = [p for p in tmp_path.iterdir() if p.name.startswith(writer.PREFIX)]
    assert (stale / "out.onnx").stat().st_size == 100_000  # what a SIGKILL mid-save leaves
    kept = [tmp_path / f"{writer.staging_prefix(os.getppid())}running",  # a live process
            tmp_path / f"{writer.PREFIX}{_dead_pid()}.00000000-elsewhere",  # another machine's pid
            tmp_path / ".onnxcompress-notes"]  # not ours
    for folder in kept:
        folder.mkdir()
    io.save(io.load(model_path), tmp_path / "out.onnx")
    assert _names(tmp_path) == sorted([*(folder.name for folder in kept), "m.onnx", "out.onnx"])


def test_a_crash_between_data_and_model_never_pairs_an_old_model_with_new_data(
    rng, tmp_path, monkeypatch
):
    out = tmp_path / "out.onnx"
    io.save(ir.from_proto(mlp_proto(rng)), out, external_data=True)
    new = mlp_proto(np.random.default_rng(99))
    real = os.replace

    def crash_before_the_model(src, dst):  # type: ignore[no-untyped-def]
        if Path(dst) == out:
            raise OSError(errno.EIO, "Input/output error", str(dst))
        real(src, dst)

    monkeypatch.setattr(os, "replace", crash_before_the_model)
    with pytest.raises(UserError):
        io.save(ir.from_proto(new), out, external_data=True)
    monkeypatch.undo()
    if out.exists():  # whatever is left must be one model with its own data
        restored = onnx.load(str(out))
        assert [numpy_helper.to_array(t).tobytes() for t in restored.graph.initializer] == [
            numpy_helper.to_array(t).tobytes() for t in new.graph.initializer]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(writer.PREFIX)]


def test_a_second_save_replaces_model_and_data_together(rng, tmp_path):
    out = tmp_path / "out.onnx"
    io.save(ir.from_proto(mlp_proto(rng)), out, external_data=True)
    new = mlp_proto(np.random.default_rng(5))
    io.save(ir.from_proto(new), out, external_data=True)
    restored = onnx.load(str(out))
    assert [numpy_helper.to_array(t).tobytes() for t in restored.graph.initializer] == [
        numpy_helper.to_array(t).tobytes() for t in new.graph.initializer]
    assert _names(tmp_path) == ["out.onnx", "out.onnx.data"]


def test_one_command_may_not_name_a_destination_twice(model_path, tmp_path):
    result = invoke(
        "lowrank",
        model_path,
        "--ratio",
        "0.5",
        "--min-params",
        "0",
        "-o",
        tmp_path / "o.onnx",
        "--save-plan",
        tmp_path / "p.json",
        "--report",
        tmp_path / "p.json",
    )
    assert result.exit_code == 2 and result.output.startswith("error: "), result.output
    assert _names(tmp_path) == ["m.onnx"]


@pytest.mark.parametrize("command", [("prune", "--structured", "--ratio", "0.9"),
                                     ("lowrank", "--ratio", "0.1", "--min-params", "0")])
def test_a_failed_gate_writes_no_plan_either(model_path, tmp_path, command):
    result = invoke(
        command[0],
        model_path,
        *command[1:],
        "--min-cosine",
        "0.99999",
        "-o",
        tmp_path / "o.onnx",
        "--save-plan",
        tmp_path / "p.json",
        "--report",
        tmp_path / "r.md",
    )
    assert result.exit_code == 3, result.output
    assert _names(tmp_path) == ["m.onnx"]
