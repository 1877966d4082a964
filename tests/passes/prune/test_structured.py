"""prune.structured and prune.dead_neurons: smaller tensors, same outputs as the masked original."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest

from onnxcompress.errors import RecipeError
from onnxcompress.pass_base import PassReport
from onnxcompress.passes.prune.dead_neurons import DeadNeuronPass
from onnxcompress.passes.prune.structured import (
    StructuredPlan,
    StructuredPrunePass,
    apply_plan,
    plan_structured,
)
from tests.builders import mlp, mlp_reference
from tests.passes.prune.models import cnn, run

TOL = dict(rtol=1e-5, atol=1e-5)


def weights(model: ir.Model) -> dict[str, np.ndarray]:
    return {
        name: value.const_value.numpy().copy() for name, value in model.graph.initializers.items()
    }


def set_weights(model: ir.Model, arrays: dict[str, np.ndarray]) -> None:
    for name, array in arrays.items():
        model.graph.initializers[name].const_value = ir.tensor(array, name=name)


def mask_consumers(model: ir.Model, plan: StructuredPlan) -> ir.Model:
    """The original with every removed channel's consumer rows set to zero."""
    arrays = weights(model)
    for group in plan.active():
        for cut in group.cuts:
            if cut.role != "consumer weight":
                continue
            moved = np.moveaxis(arrays[cut.name], cut.axis, 0).copy()
            for channel in group.removed:
                moved[channel * cut.repeat : (channel + 1) * cut.repeat] = 0
            arrays[cut.name] = np.moveaxis(moved, 0, cut.axis)
    masked = model.clone()
    set_weights(masked, arrays)
    return masked


def zero_channels(
    model: ir.Model, producer_cuts: dict[str, list[tuple[str, int, int]]], channels: list[int]
) -> None:
    """Zero producer filters, biases and consumer rows of `channels` (a 'masked' model)."""
    arrays = weights(model)
    for name, axis, repeat in producer_cuts:
        moved = np.moveaxis(arrays[name], axis, 0).copy()
        for channel in channels:
            moved[channel * repeat : (channel + 1) * repeat] = 0
        arrays[name] = np.moveaxis(moved, 0, axis)
    set_weights(model, arrays)


def test_mlp_zeroed_neurons_are_removed_and_outputs_are_unchanged(rng):
    model = mlp(rng, (16, 32, 24, 10))
    dead = [1, 5, 6, 9, 11, 20, 28, 31]
    zero_channels(model, [("fc0.weight", 1, 1), ("fc0.bias", 0, 1), ("fc1.weight", 0, 1)], dead)
    x = rng.standard_normal((7, 16)).astype(np.float32)
    (expected,) = run(model, {"x": x})
    result = StructuredPrunePass(ratio=0.25, exclude=("head.*",))(model)
    assert result.modified
    proto = ir.to_proto(model)
    shapes = {t.name: tuple(t.dims) for t in proto.graph.initializer}
    assert shapes["fc0.weight"] == (16, 24) and shapes["fc0.bias"] == (24,)
    assert shapes["fc1.weight"] == (24, 24) and shapes["fc1.bias"] == (24,)
    assert shapes["head.weight"] == (10, 24) and shapes["head.bias"] == (10,)
    assert result.report.reason_for("fc1.weight") == "weight 'head.weight' is excluded"
    group = result.report.notes["plan"]["groups"][0]
    assert group["removed"] == dead
    (got,) = run(model, {"x": x})
    np.testing.assert_allclose(got, expected, **TOL)
    np.testing.assert_allclose(got, mlp_reference(proto, x), **TOL)
    assert result.report.reason_for("head.weight") == "channels reach graph output 'logits'"


def test_lossy_removal_equals_the_consumer_masked_original(rng):
    model = mlp(rng, (16, 32, 24, 10))
    plan = plan_structured(model, ratio=0.5, criterion="l2")
    masked = mask_consumers(model, plan)
    x = rng.standard_normal((5, 16)).astype(np.float32)
    (expected,) = run(masked, {"x": x})
    (original,) = run(model, {"x": x})
    apply_plan(model, plan)
    (got,) = run(model, {"x": x})
    np.testing.assert_allclose(got, expected, **TOL)
    assert not np.allclose(got, original, atol=1e-3)  # it did remove live neurons


def test_l1_and_l2_keep_the_largest_filters(rng):
    model = mlp(rng, (16, 32, 24, 10))
    fc0 = model.graph.initializers["fc0.weight"].const_value.numpy()
    for criterion, norms in (("l1", np.abs(fc0).sum(0)), ("l2", np.sqrt((fc0**2).sum(0)))):
        plan = plan_structured(model, ratio=0.5, criterion=criterion)
        assert plan.groups[0].keep == sorted(np.argsort(norms)[16:].tolist())
        np.testing.assert_allclose(plan.groups[0].scores, norms, rtol=1e-6)


def test_cnn_with_batchnorm_residual_and_flatten(rng):
    model = cnn(rng)
    plan = plan_structured(model, ratio=0.5)
    by_name = {g.name: g for g in plan.groups}
    residual = by_name["conv1.weight+conv2.weight"]
    assert residual.skip_reason is None
    cut_names = {(c.name, c.axis) for c in residual.cuts}
    assert {("conv1.weight", 0), ("conv2.weight", 0), ("conv2.weight", 1), ("conv3.weight", 1),
            ("bn1.mean", 0), ("bn2.var", 0), ("conv1.bias", 0)} <= cut_names
    flatten = by_name["conv3.weight"]
    assert [(c.name, c.axis, c.repeat) for c in flatten.cuts if c.role == "consumer weight"] == [
        ("head.weight", 1, 16)
    ]

    # Zero the channels the plan removes (filters, biases, BN shift, consumer rows): the
    # masked original and the smaller model must agree.
    residual_removed, flatten_removed = residual.removed, flatten.removed
    zero_channels(
        model,
        [
            ("conv1.weight", 0, 1),
            ("conv2.weight", 0, 1),
            ("conv2.weight", 1, 1),
            ("conv3.weight", 1, 1),
            ("conv1.bias", 0, 1),
            ("conv2.bias", 0, 1),
        ],
        residual_removed,
    )
    zero_channels(
        model,
        [("conv3.weight", 0, 1), ("conv3.bias", 0, 1), ("head.weight", 1, 16)],
        flatten_removed,
    )
    x = rng.standard_normal((4, 3, 8, 8)).astype(np.float32)
    (expected,) = run(model, {"x": x})
    changed = apply_plan(model, plan)
    assert changed["conv2.weight"][1].shape == (4, 4, 3, 3)
    assert changed["conv3.weight"][1].shape == (3, 4, 3, 3)
    assert changed["bn1.scale"][1].shape == (4,)
    assert changed["head.weight"][1].shape == (10, 48)
    (got,) = run(model, {"x": x})
    np.testing.assert_allclose(got, expected, **TOL)


@pytest.mark.parametrize("reshape", [False, True], ids=["flatten", "reshape"])
def test_cnn_lossy_removal_equals_the_consumer_masked_original(rng, reshape):
    model = cnn(rng, reshape=reshape)
    plan = plan_structured(model, ratio=0.5, criterion="l2")
    masked = mask_consumers(model, plan)
    x = rng.standard_normal((3, 3, 8, 8)).astype(np.float32)
    (expected,) = run(masked, {"x": x})
    changed = apply_plan(model, plan)
    if reshape:
        assert changed["flat_shape"][1].tolist() == [-1, 48]
    (got,) = run(model, {"x": x})
    np.testing.assert_allclose(got, expected, **TOL)


def test_unhandled_concat_group_is_skipped_with_its_reason(rng):
    model = cnn(rng, concat=True)
    report = StructuredPrunePass(ratio=0.5)(model).report
    assert (
        report.reason_for("conv3.weight") == "Concat reads the channels: index mapping not handled"
    )
    # outputs whole
    assert model.graph.initializers["conv3.weight"].const_value.shape == (6, 4, 3, 3)
    assert model.graph.initializers["conv1.weight"].const_value.shape == (4, 3, 3, 3)
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    assert run(model, {"x": x})[0].shape == (2, 10)


def test_plan_is_serialisable_and_reapplies_identically(rng):
    model = cnn(rng)
    twin = model.clone()
    plan = plan_structured(model, ratio=0.5)
    restored = StructuredPlan.from_dict(json.loads(plan.to_json()))
    StructuredPrunePass(plan=restored.to_dict())(twin)
    apply_plan(model, plan)
    for name, array in weights(model).items():
        np.testing.assert_array_equal(array, twin.graph.initializers[name].const_value.numpy())


def test_gemm_reading_transposed_is_skipped(rng):
    from onnx import TensorProto, helper, numpy_helper

    from tests.builders import finish

    w0 = rng.standard_normal((8, 16)).astype(np.float32)
    w1 = rng.standard_normal((16, 4)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w0"], ["h"]),
            helper.make_node("Transpose", ["h"], ["t"]),
            helper.make_node("Gemm", ["t", "w1"], ["y"], transA=1),
        ],
        "t",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        [numpy_helper.from_array(w0, "w0"), numpy_helper.from_array(w1, "w1")],
    )
    model = ir.from_proto(finish(graph))
    result = StructuredPrunePass(ratio=0.5)(model)
    assert result.modified is False
    assert (
        result.report.reason_for("w0") == "Transpose reads the channels: index mapping not handled"
    )


def test_dead_neurons_after_unstructured_pruning_are_removed_exactly(rng):
    model = mlp(rng, (16, 32, 24, 10))
    arrays = weights(model)
    arrays["fc0.weight"][:, [3, 4, 7]] = 0  # no incoming connections ...
    arrays["fc0.bias"][[3, 4]] = -0.5  # ... and a negative bias: Relu gives exactly 0
    arrays["fc0.bias"][7] = 0.3  # a constant 0.3 reaches fc1: must stay
    arrays["fc1.weight"][[10, 12], :] = 0  # no outgoing connections: removable as is
    arrays["head.weight"][:, [0, 23]] = 0
    set_weights(model, arrays)
    x = rng.standard_normal((6, 16)).astype(np.float32)
    (expected,) = run(model, {"x": x})
    compression = DeadNeuronPass()
    plan = compression.plan(model)  # decided, nothing edited yet: what --dry-run prints
    assert {group.name: group.removed for group in plan.active()} == {"fc0.weight": [3, 4, 10, 12],
                                                                      "fc1.weight": [0, 23]}
    assert plan.constant_channels_kept == 1
    report = PassReport(compression.name)
    assert compression.apply(model, plan, report)
    assert report.notes["constant_channels_kept"] == 1
    assert report.notes["plan"] == plan.to_dict()
    (got,) = run(model, {"x": x})
    np.testing.assert_allclose(got, expected, **TOL)
    assert DeadNeuronPass()(model).modified is False


def test_dead_channels_through_batchnorm_use_the_normalised_constant(rng):
    model = cnn(rng)
    arrays = weights(model)
    arrays["conv3.weight"][2] = 0
    arrays["conv3.bias"][2] = -1.0  # Relu(-1) = 0: removable
    arrays["conv3.weight"][4] = 0
    arrays["conv3.bias"][4] = 1.0  # Relu(1) = 1 flows into the head: kept
    set_weights(model, arrays)
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    (expected,) = run(model, {"x": x})
    report = DeadNeuronPass()(model).report
    assert model.graph.initializers["conv3.weight"].const_value.shape == (5, 8, 3, 3)
    assert model.graph.initializers["head.weight"].const_value.shape == (10, 80)
    assert report.reason_for("conv1.weight+conv2.weight") == "no dead neurons"
    (got,) = run(model, {"x": x})
    np.testing.assert_allclose(got, expected, **TOL)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"ratio": 1.0}, "ratio: Input should be less than 1"),
        ({"criterion": "l3"}, "criterion: Input should be"),
    ],
)
def test_invalid_options_are_named(options, message):
    with pytest.raises(RecipeError, match=message):
        StructuredPrunePass(**options)


def _tiny(nodes, inits, in_shape, out_shape):
    from onnx import TensorProto, helper, numpy_helper

    from tests.builders import finish

    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
        [numpy_helper.from_array(a, n) for n, a in inits.items()],
    )
    return ir.from_proto(finish(graph))


def test_other_unmappable_groups_are_skipped_with_their_reasons(rng):
    from onnx import helper

    w = {
        n: rng.standard_normal(s).astype(np.float32)
        for n, s in (
            ("a", (8, 8)),
            ("b", (8, 4)),
            ("dw", (8, 1, 3, 3)),
            ("c", (8, 8, 1, 1)),
            ("head", (8, 4)),
        )
    }
    residual_from_input = _tiny(
        [helper.make_node("MatMul", ["x", "a"], ["h"]), helper.make_node("Add", ["h", "x"], ["r"]),
         helper.make_node("MatMul", ["r", "b"], ["y"])], {"a": w["a"], "b": w["b"]}, [2, 8], [2, 4])
    grouped = _tiny(
        [
            helper.make_node("Conv", ["x", "c"], ["h"]),
            helper.make_node("Conv", ["h", "dw"], ["d"], group=8, pads=[1, 1, 1, 1]),
            helper.make_node("GlobalAveragePool", ["d"], ["p"]),
            helper.make_node("Flatten", ["p"], ["f"]),
            helper.make_node("MatMul", ["f", "head"], ["y"]),
        ],
        {"c": w["c"], "dw": w["dw"], "head": w["head"]},
        [2, 8, 4, 4],
        [2, 4],
    )
    shared = _tiny(
        [
            helper.make_node("MatMul", ["x", "a"], ["h"]),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("MatMul", ["r", "a"], ["h2"]),
            helper.make_node("MatMul", ["h2", "b"], ["y"]),
        ],
        {"a": w["a"], "b": w["b"]},
        [2, 8],
        [2, 4],
    )
    cases = [
        (residual_from_input, "a", "channels come from graph input 'x'"),
        (grouped, "c", "Conv is a grouped Conv (group > 1 ties in and out channels)"),
        (shared, "a", "weight 'a' is shared by several nodes"),
    ]
    for model, name, reason in cases:
        assert StructuredPrunePass(ratio=0.5)(model).report.reason_for(name) == reason
