"""Fuzz the command line with the seeded corpus: whatever the input, it fails cleanly or works.

For every case: exit 0, 2 (one `error: ...` line, at most one more) or 3; nothing written on
2 or 3; the input files untouched and no temporary left behind in any case.

CI runs the first `ONNXCOMPRESS_FUZZ_CASES` cases (default 160, under a minute on two
cores); the long run draws thousands, e.g. `ONNXCOMPRESS_FUZZ_CASES=5000 pytest tests/fuzz -q`.
`ONNXCOMPRESS_FUZZ_START` skips ahead, to replay one case: START=1234 CASES=1.
`ONNXCOMPRESS_FUZZ_LOG=path` appends each case's exit code and error line there, for a tally.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from tests.builders import NO_GATE, mlp_proto
from tests.fuzz.corpus import SEED_FILES, make_case, plan
from tests.run_cli import Outcome, run_cli

START = int(os.environ.get("ONNXCOMPRESS_FUZZ_START", "0"))
COUNT = int(os.environ.get("ONNXCOMPRESS_FUZZ_CASES", "160"))
#: Long-mode cases that once crashed (a manifest whose blob references are not [offset, length]
#: pairs, exit 1), kept in every run as regressions.
ONCE_CRASHED = (1419, 1627, 1643, 2323, 4047, 4387)
INDICES = (
    sorted({*range(START, START + COUNT), *ONCE_CRASHED})
    if "ONNXCOMPRESS_FUZZ_START" not in os.environ
    else range(START, START + COUNT)
)
LOG = os.environ.get("ONNXCOMPRESS_FUZZ_LOG")
RECIPE = """\
name: fuzz
seed: 0
probes: 8
steps:
  - pass: prune.magnitude
    options: {sparsity: 0.5}
    gate: {min_cosine: 0.9}
    on_fail: rollback
  - pass: codebook.kmeans
    options: {bits: 5}
    gate: {min_cosine: 0.5}
"""


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """The unbroken files every case mutates one of; the archive is made by `pack` itself."""
    folder = tmp_path_factory.mktemp("seeds")
    rng = np.random.default_rng(0)
    onnx.save(mlp_proto(rng), folder / "mlp.onnx")
    np.savez(folder / "data.npz", x=rng.standard_normal((20, 16)).astype(np.float32),
             labels=rng.integers(0, 10, 20))
    (folder / "recipe.yaml").write_text(RECIPE)
    for args in (("cluster", "mlp.onnx", "--bits", "4", *NO_GATE, "-o", "clustered.onnx"),
                 ("pack", "clustered.onnx", "-o", "mlp.onnxc", "--quiet")):
        outcome = run_cli(args, cwd=folder)
        assert outcome.code == 0, outcome.stderr
    return {name: (folder / name).read_bytes() for name in SEED_FILES.values()}


def _state(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}


def _params() -> list[object]:
    params = []
    for index in INDICES:
        kind, mutation, command = plan(index)
        params.append(pytest.param(index, id=f"{index:05d}-{kind}-{mutation}-{command[0]}"))
    return params


@pytest.mark.parametrize("index", _params())
def test_case_fails_cleanly_or_works(index: int, seeds: dict[str, bytes], tmp_path: Path) -> None:
    case = make_case(index, seeds)
    for name, data in seeds.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / case.file).write_bytes(case.data)
    before = _state(tmp_path)
    outcome = run_cli(case.args, cwd=tmp_path)
    after = _state(tmp_path)
    _log(case.id, outcome)
    assert outcome.code in (0, 2, 3), f"exit {outcome.code}: {outcome.stderr[-3000:]}"
    if outcome.code == 2:
        assert outcome.stderr.startswith("error: ") and len(outcome.error_lines) <= 2, (
            outcome.stderr
        )
    assert {name: after.get(name) for name in before} == before, "an input was changed or removed"
    new = sorted(set(after) - set(before))
    if outcome.code in (2, 3):
        assert new == [], f"exit {outcome.code} but wrote {new}"
    assert not [name for name in new if name.startswith(".")], f"temporary files left: {new}"
    shutil.rmtree(tmp_path, ignore_errors=True)


def _log(case_id: str, outcome: Outcome) -> None:
    if LOG:
        with open(LOG, "a") as log:
            log.write(f"{case_id}\t{outcome.code}\t{(outcome.error_lines or [''])[-1][:200]}\n")
