"""`--executor local|ray`, `--ray-address`, `--workers`.

`--cache`/`--no-cache` on the commands that sweep: the same files either way, each evaluation
cached, bad options one error line.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

from tests.builders import mlp_proto, save_proto
from tests.run_cli import run_cli


@pytest.fixture
def model_path(rng, tmp_path):
    return save_proto(mlp_proto(rng, (16, 32, 10)), tmp_path / "mlp.onnx")


@pytest.fixture
def data_path(rng, tmp_path):
    path = tmp_path / "calib.npz"
    np.savez(path, x=rng.standard_normal((48, 16)).astype(np.float32))
    return path


def sensitivity(model, folder, *options):
    outcome = run_cli(["sensitivity", model, "-o", folder, "--ratios", "0.3,0.7", *options])
    assert outcome.code == 0, outcome.stderr
    return (folder / "sensitivity.json").read_bytes()


def test_sensitivity_on_ray_writes_the_local_files(ray_cluster, model_path, tmp_path):
    local = sensitivity(model_path, tmp_path / "local", "--workers", "1", "--no-cache")
    assert sensitivity(model_path, tmp_path / "ray", "--executor", "ray", "--no-cache") == local
    assert (tmp_path / "ray" / "sensitivity.csv").read_bytes() == (
        tmp_path / "local" / "sensitivity.csv"
    ).read_bytes()


def test_sensitivity_caches_each_evaluation_where_told(model_path, tmp_path):
    first = sensitivity(model_path, tmp_path / "a", "--workers", "1", "--cache", tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("sweeps/*/*.json"))) == 2 * 2  # (layer, ratio) pairs
    assert (
        sensitivity(model_path, tmp_path / "b", "--workers", "1", "--cache", tmp_path / "cache")
        == first
    )


def test_optimize_searches_on_ray_and_writes_the_local_model(
    ray_cluster, model_path, data_path, tmp_path
):
    outputs = {}
    for name, options in (
        ("local", ["--no-cache"]),
        ("ray", ["--executor", "ray", "--cache", tmp_path / "c"]),
    ):
        out = tmp_path / f"{name}.onnx"
        outcome = run_cli(["optimize", model_path, "--data", data_path, "-o", out, *options])
        assert outcome.code == 0, outcome.stderr
        outputs[name] = out.read_bytes()
    assert outputs["ray"] == outputs["local"]
    assert list((tmp_path / "c").glob("sweeps/*/*.json"))  # the search's errors were cached


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--executor", "dask"], "--executor must be local or ray, not 'dask'"),
        (["--cache", "{tmp}/c", "--no-cache"], "--cache and --no-cache exclude each other"),
        (["--cache", "{model}"], "exists and is not a folder"),
    ],
)
def test_bad_executor_options_are_one_error_line(model_path, tmp_path, options, message):
    filled = [o.format(tmp=tmp_path, model=model_path) for o in options]
    outcome = run_cli(["sensitivity", model_path, "-o", tmp_path / "s", "--ratios", "0.5", *filled])
    assert outcome.code == 2 and outcome.error_lines == [f"error: {outcome.error_lines[0][7:]}"]
    assert message in outcome.stderr


def test_the_ray_executor_without_ray_says_how_to_install_it(model_path, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed: `import ray` fails
    outcome = run_cli(["sensitivity", model_path, "-o", tmp_path / "s", "--executor", "ray"])
    assert outcome.code == 2
    assert outcome.error_lines == [
        "error: the Ray executor needs Ray: pip install 'onnxcompress[ray]'"
    ]
