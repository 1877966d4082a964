"""Denton's filter clustering (lowrank.svd conv=clustered): k-means groups, each its own SVD."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from onnxcompress.errors import RecipeError
from onnxcompress.pass_base import make_config
from onnxcompress.passes.lowrank.clustered import ClusteredDecomposition, cluster_filters
from onnxcompress.passes.lowrank.plan import Plan
from onnxcompress.passes.lowrank.svd import LowRankConfig, LowRankSVDPass
from tests.passes.lowrank.reference import conv2d, truncated
from tests.passes.lowrank.test_lowrank_pass import array, conv_proto
from tests.run_cli import run_cli


def families(rng: np.random.Generator, groups: int, per_group: int, shape=(8, 3, 3)) -> np.ndarray:
    """Filters from `groups` families, each the multiples (of either sign) of one filter, shuffled.

    One SVD of all of them needs rank `groups`, each family rank 1.
    """
    columns = int(np.prod(shape))
    blocks = [
        rng.standard_normal((per_group, 1)) @ rng.standard_normal((1, columns))
        for _ in range(groups)
    ]
    weight = np.concatenate(blocks)[rng.permutation(groups * per_group)]
    return weight.reshape(groups * per_group, *shape).astype(np.float32)


def stock(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_clustering_finds_the_families_and_each_group_is_exactly_low_rank(rng):
    weight = families(rng, groups=4, per_group=8)
    d = ClusteredDecomposition(weight, clusters=4)
    assert sorted(m.size for m in d.members) == [8, 8, 8, 8]
    assert d.ranks(4) == [1, 1, 1, 1] and d.relative_error(4) < 1e-6  # one rank-one term per family
    assert d.params_after(4) == 4 * 72 + 32  # against 32 * 72 dense
    first, second = d.factors(4)
    reconstructed = np.einsum("mr,rchw->mchw", second[:, :, 0, 0], first)
    np.testing.assert_allclose(reconstructed, weight, atol=1e-4)
    flat = weight.reshape(32, -1)
    assert np.linalg.norm(flat - truncated(flat, 2)) > 0.3 * np.linalg.norm(
        flat
    )  # one SVD at those params: rank 2


@pytest.mark.parametrize("total", [4, 7, 13, 20])
def test_reconstruction_error_is_exactly_the_discarded_spectrum_of_each_group(rng, total):
    weight = array(rng, 24, 6, 3, 3)
    d = ClusteredDecomposition(weight, clusters=4, seed=3)
    first, second = d.factors(total)
    assert first.shape[0] == sum(d.ranks(total)) == max(total, 4) and min(d.ranks(total)) >= 1
    reconstructed = np.einsum(
        "mr,rchw->mchw", second[:, :, 0, 0].astype(np.float64), first.astype(np.float64)
    )
    bound = 0.0
    for members, rank in d.blocks(total):  # Eckart–Young per group: the best a rank r_g can do
        group = weight.reshape(24, -1)[members].astype(np.float64)
        np.testing.assert_allclose(
            reconstructed.reshape(24, -1)[members], truncated(group, rank), atol=1e-4
        )
        bound += float(np.sum(np.linalg.svd(group, compute_uv=False)[rank:] ** 2))
    error = float(np.sum((weight - reconstructed) ** 2))
    assert error == pytest.approx(bound, rel=1e-4, abs=1e-6)
    assert error == pytest.approx(d.discarded_energy(total), rel=1e-4, abs=1e-6)
    assert d.relative_error(total) == pytest.approx(
        np.sqrt(error) / np.linalg.norm(weight), rel=1e-4
    )
    assert d.params_after(total) == sum(r * (54 + m.size) for m, r in d.blocks(total))


def test_kmeans_is_seeded_and_partitions_the_filters(rng):
    weight = array(rng, 30, 4, 3, 3)
    groups = cluster_filters(weight, 5, seed=7)
    assert sorted(np.concatenate(groups).tolist()) == list(range(30))
    assert [g.tolist() for g in groups] == [g.tolist() for g in cluster_filters(weight, 5, seed=7)]
    assert [int(g[0]) for g in groups] == sorted(int(g[0]) for g in groups)


@pytest.mark.parametrize(
    "attributes",
    [
        {"pads": [1, 1, 1, 1]},
        {"strides": [2, 1], "pads": [0, 1, 2, 1], "dilations": [1, 2]},
        {"auto_pad": "SAME_UPPER"},
    ],
)
def test_rewritten_conv_runs_in_stock_onnxruntime_as_conv_with_the_reconstructed_weight(
    rng, attributes
):
    weight = families(rng, groups=3, per_group=6, shape=(12, 3, 3)) + 0.01 * array(
        rng, 18, 12, 3, 3
    )
    bias = array(rng, 18)
    proto = conv_proto(weight, bias, [2, 12, 9, 10], **attributes)
    model = ir.from_proto(proto)
    result = LowRankSVDPass(conv="clustered", clusters=3, energy=0.99, min_params=0)(model)
    assert result.modified
    out = ir.to_proto(result.model)
    onnx.checker.check_model(out, full_check=True)
    ops = [n.op_type for n in out.graph.node]
    assert ops == ["Conv", "Split", "Conv", "Conv", "Conv", "Concat", "Gather"]
    (change,) = result.report.changes
    assert "3 filter groups of ranks [1, 1, 1]" in change.detail
    assert change.params_after == 3 * 108 + 18 < weight.size
    d = ClusteredDecomposition(weight, clusters=3)
    first, second = d.factors(3)
    reconstructed = np.einsum("mr,rchw->mchw", second[:, :, 0, 0], first)
    x = array(rng, 2, 12, 9, 10)
    expected = stock(
        conv_proto(reconstructed.astype(np.float32), bias, [2, 12, 9, 10], **attributes)
    ).run(None, {"x": x})[0]
    actual = stock(out).run(None, {"x": x})[0]
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4)
    if "auto_pad" not in attributes:
        np.testing.assert_allclose(
            actual,
            conv2d(
                x,
                reconstructed,
                bias,
                tuple(attributes.get("strides", (1, 1))),
                tuple(attributes["pads"]),
                tuple(attributes.get("dilations", (1, 1))),
            ),
            rtol=1e-4,
            atol=1e-4,
        )


def test_clustering_beats_one_svd_at_the_same_parameter_budget(rng):
    weight = families(rng, groups=8, per_group=8, shape=(16, 3, 3)) + 0.01 * array(
        rng, 64, 16, 3, 3
    )
    bias = array(rng, 64)
    errors = {}
    for form in ("channel", "clustered"):
        options = {"clusters": 8} if form == "clustered" else {}
        model = ir.from_proto(conv_proto(weight, bias, [1, 16, 8, 8], pads=[1, 1, 1, 1]))
        result = LowRankSVDPass(conv=form, ratio=0.15, min_params=0, **options)(model)
        assert result.modified
        (layer,) = Plan.from_dict(result.report.notes["plan"]).layers
        assert layer.params_after <= 0.15 * weight.size
        errors[form] = layer.rel_error
    assert errors["clustered"] < 0.05 < errors["channel"]


def test_reasons_and_config_errors(rng):
    grouped = conv_proto(array(rng, 8, 2, 3, 3), array(rng, 8), [1, 8, 6, 6], group=4)
    result = LowRankSVDPass(conv="clustered", clusters=2, min_params=0)(ir.from_proto(grouped))
    assert not result.modified
    assert (
        result.report.reason_for("w")
        == "filter clustering needs group = 1, the Conv has group 4"
    )
    few = conv_proto(array(rng, 4, 8, 3, 3), array(rng, 4), [1, 8, 6, 6])
    result = LowRankSVDPass(conv="clustered", clusters=4, min_params=0)(ir.from_proto(few))
    assert not result.modified
    assert result.report.reason_for("w") == "4 filters cannot form 4 clusters"
    with pytest.raises(RecipeError, match="speed is not measured for conv=clustered"):
        make_config(LowRankConfig, {"conv": "clustered", "speed": True})


def test_the_lowrank_command_takes_conv_clustered(rng, tmp_path):
    """`onnxcompress lowrank --conv clustered --clusters G` as a user runs it."""
    weight = families(rng, groups=4, per_group=6, shape=(8, 3, 3)) + 0.001 * array(rng, 24, 8, 3, 3)
    source, target = tmp_path / "conv.onnx", tmp_path / "small.onnx"
    onnx.save(conv_proto(weight, array(rng, 24), [1, 8, 10, 10], pads=[1, 1, 1, 1]), source)
    done = run_cli(["lowrank", source, "-o", target, "--conv", "clustered", "--clusters", "4",
                    "--energy", "0.99", "--min-params", "0"])
    assert done.code == 0, done.stderr
    ops = [n.op_type for n in onnx.load(target).graph.node]
    assert ops == ["Conv", "Split", "Conv", "Conv", "Conv", "Conv", "Concat", "Gather"]
