"""lowrank.svd end to end: graph structure, onnxruntime against numpy, skip reasons, plans."""

from __future__ import annotations

import dataclasses
import json
import types

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcompress import runtime
from onnxcompress.errors import RecipeError
from onnxcompress.fidelity import compare, probe_inputs, run_model
from onnxcompress.pass_base import CompressionResult, PassContext, PassReport
from onnxcompress.passes.lowrank.decompose import Decomposition
from onnxcompress.passes.lowrank.latency import PairLatency
from onnxcompress.passes.lowrank.plan import Plan
from onnxcompress.passes.lowrank.rewrite import apply_factors
from onnxcompress.passes.lowrank.svd import LowRankSVDPass
from onnxcompress.sites import find_weight_sites
from tests.builders import finish
from tests.passes.lowrank.reference import conv2d, truncated

F = TensorProto.FLOAT


def factorize(model: ir.Model, **options) -> tuple[CompressionResult, Plan]:
    """Run lowrank.svd: the result, and the plan its report carries."""
    result = LowRankSVDPass(**options)(model)
    return result, Plan.from_dict(result.report.notes["plan"])


def info(name: str, shape: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, F, shape)


def array(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


def run(proto_or_model, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    model = (
        proto_or_model if isinstance(proto_or_model, ir.Model) else ir.from_proto(proto_or_model)
    )
    proto = ir.to_proto(model)
    onnx.checker.check_model(proto, full_check=True)
    return runtime.session(proto.SerializeToString(), threads=1).run(None, feed)


def matmul_proto(rng, weight: np.ndarray, x_shape: list[int]) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "mm",
        [info("x", x_shape)], [info("y", [*x_shape[:-1], weight.shape[1]])],
        [numpy_helper.from_array(weight, "w")],
    )
    return finish(graph)


def gemm_proto(
    weight: np.ndarray, bias: np.ndarray | None, x_shape: list[int], out: list[int], **attrs
) -> onnx.ModelProto:
    inputs = ["x", "w"] + (["c"] if bias is not None else [])
    inits = [numpy_helper.from_array(weight, "w")] + (
        [numpy_helper.from_array(bias, "c")] if bias is not None else []
    )
    graph = helper.make_graph(
        [helper.make_node("Gemm", inputs, ["y"], name="gemm", **attrs)],
        "gemm",
        [info("x", x_shape)],
        [info("y", out)],
        inits,
    )
    return finish(graph)


def conv_proto(
    weight: np.ndarray, bias: np.ndarray, x_shape: list[int], **attrs
) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", **attrs)], "conv",
        [info("x", x_shape)], [info("y", [x_shape[0], weight.shape[0], None, None])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")],
    )
    return finish(graph)


# ---- numerics through onnxruntime ---------------------------------------------------------
def test_matmul_with_batched_left_operand_matches_numpy(rng):
    weight = array(rng, 64, 96)
    x = array(rng, 2, 3, 64)
    model = ir.from_proto(matmul_proto(rng, weight, [2, 3, 64]))
    result, plan = factorize(model, ratio=0.5, min_params=0)
    assert result.modified
    rank = (64 * 96 // 2) // (64 + 96)
    assert plan.layers[0].rank == rank
    assert [n.op_type for n in model.graph] == ["MatMul", "MatMul"]
    assert "w" not in model.graph.initializers  # the original weight is gone
    (y,) = run(model, {"x": x})
    np.testing.assert_allclose(
        y, x.astype(np.float64) @ truncated(weight, rank), rtol=1e-4, atol=1e-4
    )
    change = result.report.changes[0]
    assert (change.params_before, change.params_after) == (64 * 96, rank * (64 + 96))


@pytest.mark.parametrize(("trans_a", "trans_b"), [(0, 0), (0, 1), (1, 0), (1, 1)])
def test_gemm_keeps_trans_alpha_beta_and_bias(rng, trans_a, trans_b):
    k, n, batch = 80, 48, 5
    weight = array(rng, n, k) if trans_b else array(rng, k, n)
    bias = array(rng, n)
    x = array(rng, k, batch) if trans_a else array(rng, batch, k)
    proto = gemm_proto(
        weight, bias, list(x.shape), [batch, n], alpha=0.5, beta=2.0, transA=trans_a, transB=trans_b
    )
    model = ir.from_proto(proto)
    result, plan = factorize(model, ratio=0.4, min_params=0)
    assert result.modified
    rank = plan.layers[0].rank
    (y,) = run(model, {"x": x})
    w_r = truncated(weight, rank)  # the stored matrix, truncated
    op_x = x.T if trans_a else x
    op_w = w_r.T if trans_b else w_r
    np.testing.assert_allclose(
        y, 0.5 * op_x.astype(np.float64) @ op_w + 2.0 * bias, rtol=1e-4, atol=1e-4
    )


def test_gemm_without_bias(rng):
    weight = array(rng, 64, 40)
    x = array(rng, 3, 64)
    model = ir.from_proto(gemm_proto(weight, None, [3, 64], [3, 40]))
    _, plan = factorize(model, ratio=0.5, min_params=0)
    rank = plan.layers[0].rank
    (y,) = run(model, {"x": x})
    np.testing.assert_allclose(
        y, x.astype(np.float64) @ truncated(weight, rank), rtol=1e-4, atol=1e-4
    )


CONV_CASES = [
    dict(strides=[1, 1], pads=[1, 1, 1, 1], dilations=[1, 1], group=1),
    dict(strides=[2, 1], pads=[1, 0, 2, 1], dilations=[1, 2], group=2),
    dict(strides=[2, 2], pads=[0, 2, 1, 0], dilations=[2, 1], group=4),
]


@pytest.mark.parametrize("form", ["channel", "spatial"])
@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_forms_through_onnxruntime_match_numpy(rng, form, case):
    g = case["group"]
    weight = array(rng, 16, 16 // g, 3, 3)
    bias = array(rng, 16)
    x = array(rng, 2, 16, 11, 10)
    model = ir.from_proto(conv_proto(weight, bias, [2, 16, 11, 10], **case))
    result, plan = factorize(model, ratio=0.5, min_params=0, conv=form)
    assert result.modified
    layer = plan.layers[0]
    assert layer.kind == f"conv_{form}"
    (y,) = run(model, {"x": x})
    kernel = _rank_r_kernel(weight, layer.kind, g, layer.rank)  # numpy truncation, independent
    expected = conv2d(
        x, kernel, bias, tuple(case["strides"]), tuple(case["pads"]), tuple(case["dilations"]), g
    )
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)
    assert [n.op_type for n in model.graph] == ["Conv", "Conv"]
    d = Decomposition(layer.kind, weight, group=g, svd_method="exact")
    assert d.relative_error(layer.rank) == pytest.approx(layer.rel_error, abs=1e-6)


def _rank_r_kernel(weight: np.ndarray, kind: str, group: int, rank: int) -> np.ndarray:
    m, cg, kh, kw = weight.shape
    per = m // group
    out = np.empty(weight.shape)
    for j in range(group):
        block = weight[j * per : (j + 1) * per].astype(np.float64)
        if kind == "conv_channel":
            out[j * per : (j + 1) * per] = truncated(block.reshape(per, -1), rank).reshape(
                block.shape
            )
        else:
            matrix = np.einsum("mcij->cimj", block).reshape(cg * kh, per * kw)
            out[j * per : (j + 1) * per] = np.einsum(
                "cimj->mcij", truncated(matrix, rank).reshape(cg, kh, per, kw)
            )
    return out


@pytest.mark.parametrize("kind", ["matmul", "gemm", "conv_channel", "conv_spatial"])
def test_full_rank_rewrite_is_exact(rng, kind):
    if kind == "matmul":
        weight, feed = array(rng, 32, 24), {"x": array(rng, 4, 32)}
        proto = matmul_proto(rng, weight, [4, 32])
    elif kind == "gemm":
        weight, feed = array(rng, 24, 32), {"x": array(rng, 4, 32)}
        proto = gemm_proto(weight, array(rng, 24), [4, 32], [4, 24], transB=1, alpha=0.7)
    else:
        weight, feed = array(rng, 8, 6, 3, 3), {"x": array(rng, 1, 6, 7, 8)}
        proto = conv_proto(weight, array(rng, 8), [1, 6, 7, 8], strides=[2, 1], pads=[1, 2, 0, 1])
    (reference,) = run(proto, feed)
    model = ir.from_proto(proto)
    site = find_weight_sites(model, min_params=0).sites[0]
    conv = None
    if kind.startswith("conv"):
        from onnxcompress.passes.lowrank.decompose import conv_attributes
        from onnxcompress.passes.lowrank.rewrite import plain_attributes

        conv = conv_attributes(plain_attributes(site.node), (3, 3))
    d = Decomposition(kind, weight, trans_b=kind == "gemm", width_stride=1)
    first, second = d.factors(min(d.rows, d.cols))
    apply_factors(model, site, kind, first, second, conv)
    (y,) = run(model, feed)
    np.testing.assert_allclose(y, reference, rtol=0, atol=1e-5)


def test_weight_in_a_constant_node_is_replaced_and_the_constant_removed(rng):
    weight = array(rng, 64, 64)
    graph = helper.make_graph(
        [helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(weight, "w")),
         helper.make_node("MatMul", ["x", "w"], ["y"])],
        "const", [info("x", [2, 64])], [info("y", [2, 64])],
    )
    model = ir.from_proto(finish(graph))
    x = array(rng, 2, 64)
    assert LowRankSVDPass(ratio=0.5, min_params=0)(model).modified
    assert [n.op_type for n in model.graph] == ["MatMul", "MatMul"]
    (y,) = run(model, {"x": x})
    np.testing.assert_allclose(
        y, x.astype(np.float64) @ truncated(weight, 16), rtol=1e-4, atol=1e-4
    )


# ---- where it does not pay: skipped, with the reason --------------------------------------
def test_skip_reasons(rng):
    shared = array(rng, 64, 64)
    nodes = [
        helper.make_node("MatMul", ["x", "shared"], ["a"]),
        helper.make_node("MatMul", ["a", "shared"], ["b"]),
        helper.make_node("MatMul", ["b", "tiny"], ["c"]),           # 2×2: no rank saves
        helper.make_node("MatMul", ["c", "cube"], ["d"]),           # 3-D weight
        helper.make_node("MatMul", ["d", "small"], ["e"]),          # under min_params
        helper.make_node("MatMul", ["e", "full"], ["y"]),           # energy 1.0 needs full rank
    ]
    inits = {
        "shared": shared, "tiny": array(rng, 64, 1), "cube": array(rng, 4, 2, 2),
        "small": array(rng, 2, 3), "full": array(rng, 3, 40),
    }
    graph = helper.make_graph(
        nodes, "skips", [info("x", [4, 64])], [info("y", [4, 4, 4, 40])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    model = ir.from_proto(finish(graph))
    result, plan = factorize(model, energy=1.0, min_params=7)
    assert not result.modified
    reasons = {s.name: s.reason for s in result.report.skipped}
    assert reasons["shared"].startswith("shared by 2 readers")
    assert reasons["tiny"] == ("no rank saves parameters (64×1 matrix needs r < mn/(m+n) = 0.98)")
    assert reasons["cube"] == "MatMul weight is 3-D [4, 2, 2], not a matrix"
    assert reasons["small"] == "too small (6 < min_params=7)"
    assert reasons["full"].startswith("matmul: energy 1.0 needs rank > 2")
    assert plan.reason_for("full") == reasons["full"]


def test_depthwise_conv_channel_form_saves_nothing(rng):
    weight = array(rng, 8, 1, 3, 3)
    model = ir.from_proto(
        conv_proto(weight, array(rng, 8), [1, 8, 6, 6], group=8, pads=[1, 1, 1, 1])
    )
    report = LowRankSVDPass(ratio=0.5, min_params=0, conv="channel")(model).report
    assert (
        report.reason_for("w") == "no rank saves parameters (1×9 matrix needs r < mn/(m+n) = 0.90)"
    )


def test_spatial_form_refuses_same_padding_and_off_turns_conv_off(rng):
    weight = array(rng, 16, 16, 3, 3)
    proto = conv_proto(weight, array(rng, 16), [1, 16, 6, 6], auto_pad="SAME_UPPER")
    report = LowRankSVDPass(ratio=0.5, min_params=0, conv="spatial")(ir.from_proto(proto)).report
    assert report.reason_for("w") == (
        "spatial decomposition impossible: auto_pad=SAME_UPPER cannot be split between the two "
        "convolutions"
    )
    off = LowRankSVDPass(ratio=0.5, min_params=0, conv="off")(ir.from_proto(proto))
    assert off.report.reason_for("w") == "Conv factorization turned off (conv=off)"
    # the channel form keeps auto_pad on the k×k conv and stays exact to the rank-r kernel
    model = ir.from_proto(proto)
    channel, plan = factorize(model, ratio=0.5, min_params=0, conv="channel")
    assert channel.modified
    x = array(rng, 1, 16, 6, 6)
    (y,) = run(model, {"x": x})
    kernel = _rank_r_kernel(weight, "conv_channel", 1, plan.layers[0].rank)
    bias = numpy_helper.to_array(proto.graph.initializer[1])
    np.testing.assert_allclose(y, conv2d(x, kernel, bias, pads=(1, 1, 1, 1)), rtol=1e-4, atol=1e-4)


def test_pair_that_is_not_faster_is_not_applied(rng):
    model = ir.from_proto(matmul_proto(rng, array(rng, 64, 64), [4, 64]))
    slower = LowRankSVDPass(
        ratio=0.5,
        min_params=0,
        speed=True,
        latency=lambda *args, **kwargs: PairLatency(original_ms=1.0, pair_ms=1.25),
    )(model)
    assert not slower.modified
    assert slower.report.reason_for("w") == (
        "factor pair not faster: 1.250 ms vs 1.000 ms for the original at input [64, 64] (rank 16, "
        "matmul)"
    )
    faster = LowRankSVDPass(
        ratio=0.5,
        min_params=0,
        speed=True,
        min_speedup=1.2,
        latency=lambda *args, **kwargs: PairLatency(original_ms=1.3, pair_ms=1.0),
    )
    plan = faster.plan(model)  # timed while planning: the plan records both latencies
    assert plan.layers[0].latency_before_ms == 1.3
    assert faster.apply(model, plan, PassReport(faster.name))


class CostClock:
    """Stands in for `time.perf_counter` in `onnxcompress.timing`: each run adds a set cost.

    The sessions are real; only the clock is replaced, so which of the two is "faster" is
    decided by the test, never by a race on a shared machine.
    """

    def __init__(self, original_ms: float, pair_ms: float) -> None:
        self.now = 0.0
        # by node count: the original, the pair
        self.cost = {1: original_ms / 1e3, 2: pair_ms / 1e3}
        self.runs: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {1: [], 2: []}

    def perf_counter(self) -> float:
        return self.now

    def session(self, model: ir.Model, **options):
        inner = runtime.session(model, **options)
        nodes = len(model.graph)
        clock = self

        class Timed:
            def run(self, names, feed):
                outputs = inner.run(names, feed)
                clock.runs[nodes].append((feed["x"], outputs[0]))
                clock.now += clock.cost[nodes]
                return outputs

        return Timed()


@pytest.mark.parametrize("op", ["MatMul", "Conv"])
@pytest.mark.parametrize(
    ("original_ms", "pair_ms", "applied"), [(2.0, 1.0, True), (1.0, 1.0, False), (1.0, 1.5, False)]
)
def test_speed_check_measures_both_with_onnxruntime(
    rng, monkeypatch, op, original_ms, pair_ms, applied
):
    from onnxcompress import timing
    from onnxcompress.passes.lowrank import latency

    if op == "MatMul":
        weight, bias = array(rng, 128, 128), None
        proto = matmul_proto(rng, weight, ["batch", 128])
    else:
        weight, bias = array(rng, 32, 32, 3, 3), array(rng, 32)
        proto = conv_proto(weight, bias, ["batch", 32, 8, 8], pads=[1, 1, 1, 1])
    clock = CostClock(original_ms, pair_ms)
    monkeypatch.setattr(latency, "session", clock.session)
    monkeypatch.setattr(timing, "time", types.SimpleNamespace(perf_counter=clock.perf_counter))
    model = ir.from_proto(proto)
    result, plan = factorize(model, ratio=0.25, min_params=0, speed=True, latency_batch=4)
    assert result.modified is applied

    # both ran in onnxruntime, equally often, on the same batch-4 input
    assert len(clock.runs[1]) == len(clock.runs[2]) == 2 + 20  # warm-up + repeats
    (x, y_original), (x_pair, y_pair) = clock.runs[1][-1], clock.runs[2][-1]
    assert x.shape[0] == 4 and x is x_pair
    # ... and the pair that was timed is the rank-r factorization the plan describes
    planned = (
        plan.layers[0]
        if applied
        else LowRankSVDPass(ratio=0.25, min_params=0).plan(ir.from_proto(proto)).layers[0]
    )
    if op == "MatMul":
        np.testing.assert_allclose(y_original, x.astype(np.float64) @ weight, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(
            y_pair, x.astype(np.float64) @ truncated(weight, planned.rank), rtol=1e-4, atol=1e-4
        )
    else:
        np.testing.assert_allclose(
            y_original, conv2d(x, weight, bias, pads=(1, 1, 1, 1)), rtol=1e-4, atol=1e-4
        )
        kernel = _rank_r_kernel(weight, planned.kind, 1, planned.rank)
        np.testing.assert_allclose(
            y_pair, conv2d(x, kernel, bias, pads=(1, 1, 1, 1)), rtol=1e-4, atol=1e-4
        )

    # the decision follows the measured medians
    if applied:
        assert (planned.latency_before_ms, planned.latency_after_ms) == (original_ms, pair_ms)
        assert [n.op_type for n in model.graph] == [op, op]
    else:
        shape = [4, 128] if op == "MatMul" else [4, 32, 8, 8]
        assert result.report.reason_for("w") == (
            f"factor pair not faster: {pair_ms:.3f} ms vs {original_ms:.3f} ms for the original at "
            f"input {shape} (rank {planned.rank}, {planned.kind})"
        )
        assert [n.op_type for n in model.graph] == [op]


def test_ratio_never_plans_a_rank_without_saving(rng):
    for shape in [(64, 3), (5, 7), (64, 64), (100, 9)]:
        d = Decomposition("matmul", rng.standard_normal(shape))
        for ratio in (0.05, 0.5, 0.95, 0.999):
            rank = d.rank_for_ratio(ratio)
            assert rank > d.max_rank or d.params_after(rank) < d.params_before
    model = ir.from_proto(matmul_proto(rng, array(rng, 64, 3), [4, 64]))
    result, plan = factorize(model, ratio=0.999, min_params=0)
    assert result.modified
    layer = plan.layers[0]
    assert (layer.rank, layer.max_rank, layer.params_after) == (2, 2, 134)  # 134 < 192


def test_a_plan_with_a_rank_that_saves_nothing_is_refused(rng, tmp_path):
    proto = matmul_proto(rng, array(rng, 64, 32), [4, 64])
    plan = LowRankSVDPass(ratio=0.5, min_params=0).plan(ir.from_proto(proto))
    bad = Plan(
        [dataclasses.replace(plan.layers[0], rank=plan.layers[0].max_rank + 1)], [], plan.settings
    )
    bad.save(tmp_path / "plan.json")
    model = ir.from_proto(proto)
    with pytest.raises(RecipeError, match=r"rank 22 saves nothing \(must be in 1..21\)"):
        LowRankSVDPass(plan=str(tmp_path / "plan.json"))(model)
    assert [n.op_type for n in model.graph] == ["MatMul"]  # nothing changed


# ---- plan first, apply second ---------------------------------------------------------------
def test_dry_run_plan_leaves_the_model_and_a_saved_plan_reproduces_the_result(rng, tmp_path):
    proto = matmul_proto(rng, array(rng, 96, 64), ["batch", 96])
    model = ir.from_proto(proto)
    before = ir.to_proto(model).SerializeToString()
    plan = LowRankSVDPass(energy=0.5, min_params=0).plan(model)
    assert ir.to_proto(model).SerializeToString() == before
    data = json.loads(plan.to_json())
    assert data["layers"][0]["kind"] == "matmul" and data["totals"]["params_before"] == 96 * 64
    assert Plan.from_dict(data).layers == plan.layers
    plan.save(tmp_path / "plan.json")

    direct = ir.from_proto(proto)
    LowRankSVDPass(energy=0.5, min_params=0)(direct)
    replayed = ir.from_proto(proto)
    LowRankSVDPass(plan=str(tmp_path / "plan.json"))(replayed)
    assert ir.to_proto(direct).SerializeToString() == ir.to_proto(replayed).SerializeToString()


def test_energy_rank_keeps_the_requested_energy(rng):
    u, _ = np.linalg.qr(rng.standard_normal((128, 64)))
    v, _ = np.linalg.qr(rng.standard_normal((64, 64)))
    weight = ((u * 0.8 ** np.arange(64)) @ v.T).astype(np.float32)
    model = ir.from_proto(matmul_proto(rng, weight, [4, 128]))
    _, plan = factorize(model, energy=0.99, min_params=0)
    layer = plan.layers[0]
    sigma2 = 0.8 ** (2 * np.arange(64))
    expected = int(np.argmax(np.cumsum(sigma2) / sigma2.sum() >= 0.99)) + 1
    assert layer.rank == expected
    assert layer.energy >= 0.99


def test_config_rejects_two_modes_and_bad_values():
    with pytest.raises(RecipeError, match="at most one of energy, ratio, budget"):
        LowRankSVDPass(energy=0.9, ratio=0.5)
    with pytest.raises(RecipeError, match="ratio"):
        LowRankSVDPass(ratio=1.5)
    with pytest.raises(RecipeError, match="budget_ratios"):
        LowRankSVDPass(budget=0.99, budget_ratios=(0.5, 1.2))


# ---- fidelity budget -----------------------------------------------------------------------
def low_rank_mlp(rng) -> onnx.ModelProto:
    """x → MatMul → Relu → MatMul → Relu → Gemm: weights of rank ~6 plus small noise."""
    def weight(m: int, n: int, rank: int = 6) -> np.ndarray:
        w = rng.standard_normal((m, rank)) @ rng.standard_normal((rank, n)) / np.sqrt(m * rank)
        return (w + 0.01 * rng.standard_normal((m, n)) / np.sqrt(m)).astype(np.float32)

    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h1"]),
            helper.make_node("Relu", ["h1"], ["r1"]),
            helper.make_node("MatMul", ["r1", "w2"], ["h2"]),
            helper.make_node("Relu", ["h2"], ["r2"]),
            helper.make_node("Gemm", ["r2", "w3", "b3"], ["y"], transB=1),
        ],
        "mlp",
        [info("x", ["batch", 48])],
        [info("y", ["batch", 10])],
        [
            numpy_helper.from_array(weight(48, 96), "w1"),
            numpy_helper.from_array(weight(96, 64), "w2"),
            numpy_helper.from_array(weight(10, 64, 10), "w3"),
            numpy_helper.from_array(array(rng, 10), "b3"),
        ],
    )
    return finish(graph)


@pytest.mark.parametrize("budget", [0.99, 0.9999])
def test_budget_search_meets_the_budget_on_the_probes(rng, budget):
    proto = low_rank_mlp(rng)
    original = ir.from_proto(proto)
    model = ir.from_proto(proto)
    compression = LowRankSVDPass(
        budget=budget, min_params=0, probes=16, context=PassContext(original=original)
    )
    plan = compression.plan(model)
    assert compression.apply(model, plan, PassReport(compression.name))
    probes = probe_inputs(original, count=16, seed=0)
    metrics = compare(run_model(original, probes), run_model(model, probes))
    assert metrics.cosine >= budget
    assert plan.settings["budget_search"]["joint_cosine"] == pytest.approx(metrics.cosine, abs=1e-9)
    names = {layer.name for layer in plan.layers}
    assert {"w1", "w2"} <= names  # rank-6 weights compress well below their bound
    assert plan.totals()["params_after"] < plan.totals()["params_before"]


def test_budget_too_strict_leaves_layers_with_the_reason(rng):
    proto = matmul_proto(rng, array(rng, 64, 64), ["batch", 64])  # random: flat spectrum
    result = LowRankSVDPass(budget=0.999999, min_params=0, probes=8)(ir.from_proto(proto))
    assert not result.modified
    assert result.report.reason_for("w").startswith("no candidate rank keeps the output cosine")


def test_a_pruned_layer_is_left_sparse(rng):
    """prune → lowrank would trade 80% zeros for dense factors: the layer is skipped, with why."""
    from onnxcompress.pass_base import get_pass
    from tests.builders import mlp

    model = mlp(rng, (64, 96, 10))
    get_pass("prune.magnitude")(sparsity=0.8, min_params=0)(model)
    result = LowRankSVDPass(ratio=0.5, min_params=0)(model)
    assert not result.modified
    assert result.report.reason_for("fc0.weight").startswith(
        "already pruned (80% zeros > max_sparsity 0.5)"
    )
    # when asked to
    assert LowRankSVDPass(ratio=0.5, min_params=0, max_sparsity=0.9)(model).modified
