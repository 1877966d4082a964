"""Codebooks for weights held in Constant nodes and read inside If / Loop / Scan subgraphs.

Each model is a small seeded one shaped like the real exports that keep their weights there
(silero-vad: Constant weights in both branches of an If, its LSTM weights sliced and
concatenated inside a nested If). The written model must pass the full checker, run in stock
onnxruntime, be smaller, and compute exactly what the dense model computes with
codebook[indices] in place of each weight.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcompress.formats.codebook import codebook_layers, dense_weight
from onnxcompress.pass_base import get_pass
from onnxcompress.sites import find_weight_sites
from tests.builders import finish

D = 64  # features: every weight is [D, D] (4096 values, 16 KiB dense)


def _const(name: str, array: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(array, name))


def _ints(name: str, values: list[int]) -> onnx.NodeProto:
    return _const(name, np.array(values, np.int64))


def _weight(rng: np.random.Generator) -> np.ndarray:
    return (rng.standard_normal((D, D)) / np.sqrt(D)).astype(np.float32)


def _if_model(rng: np.random.Generator, then_name: str = "then_w",
              else_name: str = "else_w") -> onnx.ModelProto:
    """If(not cond): then: MatMul(x, Constant) plus a weight read through Slice + Concat.

    else: a Constant read two levels down, inside a nested If (as silero-vad's LSTM).
    """
    swap = [
        _ints("top", [0]), _ints("mid", [D // 2]), _ints("end", [D]),
        helper.make_node("Slice", ["then_r", "mid", "end"], ["r_low"]),
        helper.make_node("Slice", ["then_r", "top", "mid"], ["r_high"]),
        helper.make_node("Concat", ["r_low", "r_high"], ["r_swapped"], axis=0),
    ]
    then_branch = helper.make_graph(
        [_const(then_name, _weight(rng)), _const("then_r", _weight(rng)), *swap,
         helper.make_node("MatMul", ["x", then_name], ["t1"]),
         helper.make_node("MatMul", ["x", "r_swapped"], ["t2"]),
         helper.make_node("Add", ["t1", "t2"], ["y_then"])],
        "then", [], [helper.make_tensor_value_info("y_then", TensorProto.FLOAT, ["n", D])],
    )
    inner = {
        side: helper.make_graph(
            [helper.make_node("MatMul", ["x", else_name], [f"inner_{side}"])],
            f"inner_{side}", [],
            [helper.make_tensor_value_info(f"inner_{side}", TensorProto.FLOAT, ["n", D])],
        )
        for side in ("then", "else")
    }
    else_branch = helper.make_graph(
        [_const(else_name, _weight(rng)),
         helper.make_node("If", ["cond"], ["y_else"], then_branch=inner["then"],
                          else_branch=inner["else"])],
        "else", [], [helper.make_tensor_value_info("y_else", TensorProto.FLOAT, ["n", D])],
    )
    graph = helper.make_graph(
        [helper.make_node("Not", ["cond"], ["not_cond"]),
         helper.make_node("If", ["not_cond"], ["y"], then_branch=then_branch,
                          else_branch=else_branch)],
        "branches",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", D]),
         helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", D])],
    )
    return finish(graph)


def _loop_model(rng: np.random.Generator) -> onnx.ModelProto:
    """Loop body: h <- tanh(h @ W + h @ V), W an outer initializer, V a Constant in the body."""
    body = helper.make_graph(
        [_const("body_v", _weight(rng)),
         helper.make_node("MatMul", ["h_in", "outer_w"], ["hw"]),
         helper.make_node("MatMul", ["h_in", "body_v"], ["hv"]),
         helper.make_node("Add", ["hw", "hv"], ["pre"]),
         helper.make_node("Tanh", ["pre"], ["h_out"]),
         helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_in", TensorProto.FLOAT, [2, D])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_out", TensorProto.FLOAT, [2, D])],
    )
    graph = helper.make_graph(
        [helper.make_node("Loop", ["steps", "", "x"], ["y"], body=body)],
        "loop",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, D])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, D])],
        [numpy_helper.from_array(_weight(rng), "outer_w"),
         numpy_helper.from_array(np.array(3, np.int64), "steps")],
    )
    return finish(graph)


def _scan_model(rng: np.random.Generator) -> onnx.ModelProto:
    """Scan over a sequence: s <- tanh(x_t @ W + s), W an outer initializer."""
    body = helper.make_graph(
        [helper.make_node("MatMul", ["x_t", "outer_w"], ["xw"]),
         helper.make_node("Add", ["xw", "s_in"], ["pre"]),
         helper.make_node("Tanh", ["pre"], ["s_out"]),
         helper.make_node("Identity", ["s_out"], ["y_t"])],
        "body",
        [helper.make_tensor_value_info("s_in", TensorProto.FLOAT, [2, D]),
         helper.make_tensor_value_info("x_t", TensorProto.FLOAT, [2, D])],
        [helper.make_tensor_value_info("s_out", TensorProto.FLOAT, [2, D]),
         helper.make_tensor_value_info("y_t", TensorProto.FLOAT, [2, D])],
    )
    graph = helper.make_graph(
        [helper.make_node("Scan", ["s0", "seq"], ["s_last", "ys"], body=body, num_scan_inputs=1)],
        "scan",
        [helper.make_tensor_value_info("s0", TensorProto.FLOAT, [2, D]),
         helper.make_tensor_value_info("seq", TensorProto.FLOAT, [3, 2, D])],
        [helper.make_tensor_value_info("s_last", TensorProto.FLOAT, [2, D]),
         helper.make_tensor_value_info("ys", TensorProto.FLOAT, [3, 2, D])],
        [numpy_helper.from_array(_weight(rng), "outer_w")],
    )
    return finish(graph)


def _feeds(model: onnx.ModelProto, rng: np.random.Generator) -> list[dict[str, np.ndarray]]:
    """Inputs for every path: both values of a bool condition."""
    names = {i.name for i in model.graph.input}
    if "cond" in names:
        x = rng.standard_normal((2, D)).astype(np.float32)
        return [{"x": x, "cond": np.array(flag)} for flag in (True, False)]
    if "seq" in names:
        return [{"s0": rng.standard_normal((2, D)).astype(np.float32),
                 "seq": rng.standard_normal((3, 2, D)).astype(np.float32)}]
    return [{"x": rng.standard_normal((2, D)).astype(np.float32)}]


def _with_weights(model: onnx.ModelProto, weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of `model` with each named weight (initializer or Constant, any graph) replaced."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)

    def visit(graph: onnx.GraphProto) -> None:
        for tensor in graph.initializer:
            if tensor.name in weights:
                tensor.CopyFrom(numpy_helper.from_array(weights[tensor.name], tensor.name))
        for node in graph.node:
            if node.op_type == "Constant" and node.output[0] in weights:
                node.attribute[0].t.CopyFrom(numpy_helper.from_array(weights[node.output[0]]))
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.GRAPH:
                    visit(attribute.g)

    visit(copy.graph)
    return copy


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Stock onnxruntime: no library of ours registered."""
    session = onnxruntime.InferenceSession(
        model.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    return session.run(None, feeds)


def _originals(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {site.name: site.array().copy()
            for site in find_weight_sites(ir.from_proto(model), derived=True).sites}


@pytest.mark.parametrize(
    ("build", "expected"),
    [
        (_if_model, {"then_w", "then_r", "else_w"}),
        (_loop_model, {"outer_w", "body_v"}),
        (_scan_model, {"outer_w"}),
    ],
    ids=["if-branches", "loop-body", "scan-body"],
)
def test_subgraph_weights_become_codebooks_that_run_in_stock_onnxruntime(rng, build, expected):
    original = build(rng)
    weights = _originals(original)
    assert set(weights) == expected
    model = ir.from_proto(original)
    result = get_pass("codebook.kmeans")(bits=4)(model)
    assert result.modified
    assert {change.name for change in result.report.changes} == expected
    assert not result.report.skipped
    written = ir.to_proto(model)
    onnx.checker.check_model(written, full_check=True)
    assert written.ByteSize() < original.ByteSize() / 3
    layers = {layer.name: layer for layer in codebook_layers(model)}
    assert set(layers) == expected  # one place to look: the main graph
    decoded = {}
    for name, layer in layers.items():
        codebook = layer.codebook()
        decoded[name] = dense_weight(layer)
        assert layer.bits == 4 and codebook.size <= 16
        # every weight is its nearest centroid (the k-means assignment)
        nearest = codebook[np.argmin(np.abs(weights[name][..., None] - codebook), axis=-1)]
        np.testing.assert_array_equal(decoded[name], nearest)
    reference = _with_weights(original, decoded)  # the dense model with codebook[indices]
    for feeds in _feeds(original, rng):
        got, want = _run(written, feeds), _run(reference, feeds)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)
        assert not np.allclose(got[0], _run(original, feeds)[0])  # the codebooks are in use


def test_sibling_branches_may_reuse_a_weight_name(rng):
    """Each branch is its own scope; moved to the main graph, the two get distinct names."""
    original = _if_model(rng, then_name="w", else_name="w")
    branches = {a.g.name: a.g for node in original.graph.node for a in node.attribute if a.g.name}
    then_w, else_w = (
        numpy_helper.to_array(next(n for n in branches[side].node if n.output[0] == "w")
                              .attribute[0].t)
        for side in ("then", "else")
    )
    model = ir.from_proto(original)
    result = get_pass("codebook.kmeans")(bits=4)(model)
    assert sorted(change.name for change in result.report.changes) == ["then_r", "w", "w"]
    written = ir.to_proto(model)
    onnx.checker.check_model(written, full_check=True)
    layers = {layer.name: dense_weight(layer) for layer in codebook_layers(model)}
    assert sorted(layers) == ["then_r", "w", "w_1"]
    # which hoisted name holds which branch's weight: the one closest to it
    then_name = min(("w", "w_1"), key=lambda name: np.abs(layers[name] - then_w).max())
    else_name = "w_1" if then_name == "w" else "w"
    assert np.abs(layers[else_name] - else_w).max() < np.abs(layers[then_name] - else_w).max()
    swapped = np.concatenate([layers["then_r"][D // 2 :], layers["then_r"][: D // 2]])
    for feeds in _feeds(original, rng):
        x = feeds["x"].astype(np.float64)
        want = x @ layers[else_name] if feeds["cond"] else x @ layers[then_name] + x @ swapped
        np.testing.assert_allclose(_run(written, feeds)[0], want, rtol=1e-5, atol=1e-5)


def test_a_weight_read_through_slice_and_concat_is_a_site_only_when_asked(rng):
    model = ir.from_proto(_if_model(rng))
    assert "then_r" not in find_weight_sites(model).by_name()
    site = find_weight_sites(model, derived=True).by_name()["then_r"]
    assert not site.direct and site.through == ("Slice", "Concat")
    assert (site.out_axis, site.in_axis) == (None, None)  # its layout does not hold
    assert site.op_type == "MatMul" and site.holder == "constant"
    direct = find_weight_sites(model, derived=True).by_name()["else_w"]
    assert direct.direct and direct.out_axis == -1


def test_codebook_search_compresses_branch_weights_within_its_gate(rng):
    """optimize's default step on weights in branches: scored by their own error, verified.

    Without a captured input each is scored by its relative error (H = I); the whole model is
    still verified on the data.
    """
    from onnxcompress import fidelity
    from onnxcompress.pipeline import Step, run_steps

    model = ir.from_proto(_if_model(rng))
    data = {"x": rng.standard_normal((32, D)).astype(np.float32), "cond": np.array(True)}
    gate = fidelity.Gate(min_cosine=0.999, min_rank_correlation=None, min_top1=None)
    step = Step(pass_name="codebook.search", options={}, gate=gate, on_fail="rollback")
    result = run_steps(model, [step], data=data)
    report = result.steps[0].report
    assert result.steps[0].status == "applied"
    # cond=True runs the else branch (through Not): its weight is compressed and verified
    assert "else_w" in {change.name for change in report.changes}
    assert all("weight error" in change.detail for change in report.changes)
    written = ir.to_proto(result.model)
    onnx.checker.check_model(written, full_check=True)
    reference = fidelity.run(model, data)
    assert not gate.failures(
        fidelity.compare(reference, fidelity.run(result.model, data, reference.views))
    )


def test_codebook_search_leaves_weights_that_share_a_name_with_the_reason(rng):
    """The search keys codebooks by weight name: two sibling branches' "w" would swap."""
    from onnxcompress import fidelity
    from onnxcompress.pipeline import Step, run_steps

    model = ir.from_proto(_if_model(rng, then_name="w", else_name="w"))
    data = {"x": rng.standard_normal((32, D)).astype(np.float32), "cond": np.array(True)}
    gate = fidelity.Gate(min_cosine=0.5, min_rank_correlation=None, min_top1=None)
    step = Step(pass_name="codebook.search", options={}, gate=gate, on_fail="rollback")
    report = run_steps(model, [step], data=data).steps[0].report
    assert [change.name for change in report.changes] == ["then_r"]
    assert report.reason_for("w").startswith("another weight has the same name")
