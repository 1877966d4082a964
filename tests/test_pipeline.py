"""The gated pipeline: broken steps are caught, nothing is written, rollback goes on."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest

from onnxcompress import fidelity
from onnxcompress.errors import (
    FidelityGateError,
    QuantizedModelError,
    RecipeError,
    UnsupportedModelError,
)
from onnxcompress.pass_base import CompressionPass, PassReport, register
from onnxcompress.pipeline import Step, reference_probes, run_steps
from onnxcompress.recipe import builtin_recipes, load_recipe, parse_recipe, recipe_schema
from onnxcompress.sites import find_weight_sites
from tests.builders import mlp


@register
class ScrambleWeightsPass(CompressionPass):
    """Deliberately broken: replaces every weight with noise (runs, but is wrong)."""

    name = "test.scramble"

    def rewrite(self, model: ir.Model, report: PassReport) -> bool:
        rng = np.random.default_rng(1)
        for site in find_weight_sites(model, min_params=0).sites:
            site.replace(rng.standard_normal(site.shape).astype(np.float32))
        return True


@register
class DropNodePass(CompressionPass):
    """Deliberately broken: removes a node, leaving a dangling value (invalid model)."""

    name = "test.drop_node"

    def rewrite(self, model: ir.Model, report: PassReport) -> bool:
        node = next(n for n in model.graph if n.op_type == "Relu")
        model.graph.remove(node, safe=False)
        return True


def test_a_wrong_step_fails_its_gate(rng):
    model = mlp(rng)
    with pytest.raises(
        FidelityGateError, match=r"step 1 \(test.scramble\) failed its gate: cosine"
    ):
        run_steps(model, [Step(pass_name="test.scramble")])


def test_a_dry_run_plans_every_step_and_edits_nothing(rng):
    model = mlp(rng)
    before = ir.to_proto(model).SerializeToString()
    steps = [Step(pass_name="prune.structured", options={"ratio": 0.5}),
             Step(pass_name="lowrank.svd", options={"ratio": 0.5, "min_params": 0})]
    result = run_steps(model, steps, dry_run=True)
    assert ir.to_proto(model).SerializeToString() == before
    structured, lowrank = result.steps
    assert [structured.status, lowrank.status] == ["planned", "planned"]
    assert (
        not structured.report.changes
        and structured.report.notes["plan"] == structured.plan.to_dict()
    )
    assert structured.report.reason_for("head.weight") == "channels reach graph output 'logits'"
    # lowrank planned on the model as structured pruning leaves it: fc0 has 32 -> 16 columns
    fc0 = next(layer for layer in lowrank.plan.layers if layer.name == "fc0.weight")
    assert fc0.shape[1] == structured.plan.groups[0].channels // 2
    assert result.after["weight_params"] < result.before["weight_params"]


def test_a_dry_run_refuses_a_pass_without_a_plan_step(rng):
    with pytest.raises(RecipeError, match="prune.magnitude has no plan step"):
        run_steps(
            mlp(rng), [Step(pass_name="prune.magnitude", options={"sparsity": 0.5})], dry_run=True
        )


def test_an_invalid_model_fails_its_gate(rng):
    with pytest.raises(FidelityGateError, match="invalid model"):
        run_steps(mlp(rng), [Step(pass_name="test.drop_node")])


def test_rollback_restores_the_step_and_continues(rng):
    model = mlp(rng)
    steps = [
        Step(pass_name="test.scramble", on_fail="rollback"),
        Step(pass_name="prune.magnitude", options={"sparsity": 0.25},
             gate={"min_cosine": 0.9, "min_rank_correlation": None, "min_top1": None}),
    ]
    result = run_steps(model, steps)
    assert [s.status for s in result.steps] == ["rolled back", "applied"]
    assert result.final_metrics.cosine > 0.9
    # The input model is never modified.
    assert np.count_nonzero(model.graph.initializers["fc0.weight"].const_value.numpy()) == 16 * 32


def test_reference_is_the_original_model(rng):
    """Two 30% steps are compared with the original, not with each other."""
    model = mlp(rng)
    probes = reference_probes(model)  # the probes run_steps draws (same count and seed)
    reference = fidelity.run(model, probes)
    steps = [
        Step(pass_name="prune.magnitude", options={"sparsity": s}, gate=fidelity.Gate.off())
        for s in (0.3, 0.6)
    ]
    result = run_steps(model, steps)
    final = fidelity.run(result.model, probes, reference.views)
    assert result.steps[-1].metrics == fidelity.compare(reference, final)
    after_first = fidelity.compare(
        reference, fidelity.run(run_steps(model, steps[:1]).model, probes, reference.views)
    )
    assert result.steps[0].metrics == after_first != result.steps[-1].metrics


def test_unknown_pass_and_bad_options_fail_before_any_work(rng):
    with pytest.raises(RecipeError, match="unknown pass 'prune.nope'"):
        run_steps(mlp(rng), [Step(pass_name="prune.nope")])
    with pytest.raises(RecipeError, match="sparsity: Input should be less than 1"):
        run_steps(mlp(rng), [Step(pass_name="prune.magnitude", options={"sparsity": 1.5})])


def test_recipe_rejects_unknown_keys_by_name():
    with pytest.raises(RecipeError, match=r"steps.0.sparsity: Extra inputs are not permitted"):
        parse_recipe("steps:\n  - pass: prune.magnitude\n    sparsity: 0.5\n", "r.yaml")
    with pytest.raises(RecipeError, match=r"step 1 \(prune.magnitude\).*spasity"):
        parse_recipe("steps:\n  - pass: prune.magnitude\n    options: {spasity: 0.5}\n", "r.yaml")


def test_quantized_models_are_refused_by_lossy_passes(rng):
    model = mlp(rng)
    node = next(n for n in model.graph if n.op_type == "Relu")
    scale = ir.Value(name="s", const_value=ir.tensor(np.float32(0.1)))
    model.graph.register_initializer(scale)
    quant = ir.node("QuantizeLinear", [node.outputs[0], scale])
    dequant = ir.node("DequantizeLinear", [quant.outputs[0], scale])
    model.graph.insert_after(node, [quant, dequant])
    with pytest.raises(QuantizedModelError, match="DequantizeLinear, QuantizeLinear"):
        run_steps(model, [Step(pass_name="prune.magnitude", options={"sparsity": 0.5})])


@pytest.mark.parametrize("name", sorted(builtin_recipes()))
def test_builtin_recipes_validate(name):
    recipe = load_recipe(name)  # every step's pass and options validated on load
    assert recipe.name == name and recipe.description
    # built-ins keep the last rung that passes
    assert all(step.on_fail == "rollback" for step in recipe.steps)


def test_a_model_exported_for_batch_1_is_probed_batch_by_batch(rng):
    """Data with more samples than the fixed batch size runs one batch at a time."""
    from onnx import TensorProto, helper, numpy_helper

    weight = rng.standard_normal((16, 4)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "fixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(weight, "w")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    model = ir.serde.deserialize_model(proto)
    x = rng.standard_normal((20, 16)).astype(np.float32)
    probes = fidelity.probe_inputs(model, count=8, data={"x": x})
    assert probes["x"].shape == (8, 16)
    (y,) = fidelity.run_model(proto.SerializeToString(), probes)
    np.testing.assert_allclose(y, x[:8] @ weight, rtol=1e-5, atol=1e-5)
    drawn = fidelity.probe_inputs(model, count=8, seed=0)  # without data: 8 random rows, not 1
    assert drawn["x"].shape == (8, 16)
    assert fidelity.run_model(proto.SerializeToString(), drawn)[0].shape == (8, 4)


def test_an_original_with_non_finite_outputs_is_refused(rng):
    """The original's outputs are what every step is compared with: NaN there is refused first."""
    broken = mlp(rng)
    bias = broken.graph.initializers["head.bias"]
    # NaN logits
    bias.const_value = ir.tensor(np.full(bias.shape.numpy(), np.nan, np.float32), name="head.bias")
    with pytest.raises(UnsupportedModelError, match="NaN"):
        run_steps(
            broken,
            [
                Step(
                    pass_name="prune.magnitude", options={"sparsity": 0.1}, gate=fidelity.Gate.off()
                )
            ],
        )


def test_non_finite_candidate_outputs_fail_every_gate():
    reference = [np.array([[1.0, 2.0, 0.5], [0.5, -1.0, 3.0], [2.0, 0.0, 1.0]], np.float32)]
    for bad in (np.nan, np.inf):
        candidate = [reference[0].copy()]
        candidate[0][1, 0] = bad
        metrics = fidelity.compare(reference, candidate)
        for gate in (
            fidelity.DEFAULT_GATE,
            fidelity.Gate.off(),
            fidelity.Gate(min_cosine=None, min_top1=0.5),
        ):
            assert gate.failures(metrics) == [
                "outputs are not finite (NaN or inf), or the original's are not"
            ]


def test_json_reports_are_strict_json(rng, tmp_path):
    from onnxcompress.report import write_report

    model = mlp(rng, (8, 16, 4))
    step = Step(
        **{
            "pass": "prune.magnitude",
            "options": {"sparsity": 0.5, "min_params": 0},
            "gate": fidelity.Gate.off(),
        }
    )
    result = run_steps(model, [step], probe_count=4)
    # a failed metric
    result.steps[0].metrics = fidelity.Metrics(float("nan"), float("inf"), float("inf"), None)
    path = write_report(result, tmp_path / "r.json")

    def refuse(constant: str) -> None:
        raise ValueError(constant)

    report = json.loads(path.read_text(), parse_constant=refuse)
    assert report["steps"][0]["metrics"]["cosine"] is None


def test_a_rung_that_passes_only_the_bare_gate_is_rolled_back(rng):
    """A pruning ladder is verified with the margin held back, as silero-vad showed it must.

    The 20% rung keeps cosine 0.992 on the probes: over the bare 0.99, under the verified
    0.9975. A rung kept only because it passed on these probes missed the bar on other inputs.
    """
    model = mlp(rng)
    data = {"x": rng.standard_normal((64, 16)).astype(np.float32)}
    gate = fidelity.Gate(min_cosine=0.99, min_rank_correlation=None, min_top1=None)
    ladder = [Step(pass_name="prune.magnitude", options={"sparsity": rate}, gate=gate,
                   on_fail="rollback") for rate in (0.1, 0.2)]
    bare = run_steps(model, [s.model_copy(update={"margin": 0.0}) for s in ladder], data=data)
    assert [s.status for s in bare.steps] == ["applied", "applied"]
    assert 0.99 <= bare.steps[1].metrics.cosine < 0.9975

    result = run_steps(model, ladder, data=data)
    assert [s.status for s in result.steps] == ["applied", "rolled back"]
    assert result.steps[1].failures == [f"cosine {bare.steps[1].metrics.cosine:.6g} < 0.9975"]
    assert result.after["nonzero_weight_params"] > bare.after["nonzero_weight_params"]
    assert result.steps[1].to_dict()["margin"] == fidelity.MARGIN == 0.75


def test_the_margin_moves_only_bounds_whose_ideal_is_one():
    gate = fidelity.Gate(min_cosine=0.99, min_rank_correlation=0.98, min_top1=None, max_abs=0.5,
                         min_task=-0.01)
    tightened = gate.tightened(0.75)
    assert tightened.min_cosine == pytest.approx(0.9975)
    assert tightened.min_rank_correlation == pytest.approx(0.995)
    assert (tightened.min_top1, tightened.max_abs, tightened.min_task) == (None, 0.5, -0.01)
    assert gate.tightened(0.0) == gate
    assert tightened.min_box_f1 == pytest.approx(0.975)
    anything = fidelity.Gate(min_cosine=-1, min_rank_correlation=-1, min_top1=0, min_box_f1=0)
    assert anything.tightened(0.75) == anything  # the lowest values ask for no check
    assert fidelity.Gate.off().tightened(0.75) == fidelity.Gate.off()


def test_a_recipe_step_may_set_its_own_margin():
    recipe = parse_recipe(
        "steps:\n  - {pass: prune.magnitude, options: {sparsity: 0.5}, margin: 0}\n", "inline"
    )
    assert recipe.steps[0].margin == 0 and recipe.steps[0].verified_gate == fidelity.DEFAULT_GATE
    with pytest.raises(RecipeError, match="margin"):
        parse_recipe("steps:\n  - {pass: prune.magnitude, margin: 1.5}\n", "inline")
    assert "margin" in recipe_schema()["$defs"]["Step_prune_magnitude"]["properties"]
