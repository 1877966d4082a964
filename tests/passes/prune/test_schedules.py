"""Schedules as pure functions, and their expansion into gated pipeline steps."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

from onnxcompress import fidelity
from onnxcompress.errors import RecipeError
from onnxcompress.fidelity import Gate
from onnxcompress.passes.prune.schedules import (
    RetrainOptions,
    cubic_schedule,
    cubic_sparsity,
    dropout_ratio,
    expand_schedule,
    fixed_steps,
)
from onnxcompress.pipeline import run_steps
from onnxcompress.recipe import Recipe, parse_recipe, recipe_schema
from tests.builders import mlp


def test_fixed_steps_reach_the_target_exactly():
    assert fixed_steps(0.9, 0.2) == [0.2, 0.4, 0.6, 0.8, 0.9]
    assert fixed_steps(0.6, 0.2) == [0.2, 0.4, 0.6]
    assert fixed_steps(0.5, 1.0) == [0.5]


def test_cubic_schedule_follows_zhu_and_gupta():
    # s_t = s_f + (s_i - s_f)(1 - (t - t0)/(n dt))^3 at t = t0 + k dt
    got = cubic_schedule(0.9, 4, initial=0.1)
    expected = [0.9 + (0.1 - 0.9) * (1 - k / 4) ** 3 for k in range(1, 5)]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-10)
    assert got[-1] == pytest.approx(0.9)
    steps = np.diff([0.1, *got])
    assert all(a > b for a, b in zip(steps, steps[1:], strict=False))  # fast first, slow last
    assert cubic_sparsity(-5, initial=0.1, final=0.9, start=0, steps=4, interval=100) == 0.1
    assert cubic_sparsity(
        10_000, initial=0.1, final=0.9, start=0, steps=4, interval=100
    ) == pytest.approx(0.9)
    assert cubic_sparsity(
        200, initial=0.0, final=0.8, start=0, steps=4, interval=100
    ) == pytest.approx(0.8 * (1 - 0.125))


def test_han_dropout_rescale():
    assert dropout_ratio(0.5, 1000, 250) == pytest.approx(0.25)
    assert dropout_ratio(0.5, 1000, 1000) == 0.5
    assert dropout_ratio(0.4, 0, 10) == 0.4
    assert dropout_ratio(0.5, 100, 10) == pytest.approx(0.5 * math.sqrt(0.1))


@pytest.mark.parametrize(("call", "message"), [
    (lambda: fixed_steps(1.0, 0.1), "final = 1.0 is outside"),
    (lambda: fixed_steps(0.5, 0.0), "step = 0.0 must be in"),
    (lambda: cubic_schedule(0.5, 0), "rounds = 0 must be"),
    (lambda: expand_schedule([0.5, 0.3]), "never lowers the sparsity"),
])
def test_bad_schedules_are_refused(call, message):
    with pytest.raises(RecipeError, match=message):
        call()


def test_expansion_with_retraining_passes_hans_options_and_validates_as_a_recipe():
    retrain = RetrainOptions(original_lr=0.05, regularisation="l1", strength=1e-4, epochs=2)
    steps = expand_schedule(fixed_steps(0.6, 0.3), overrides={"fc1.*": 0.9}, retrain=retrain,
                            gate=Gate(min_cosine=0.95))
    assert [s.pass_name for s in steps] == ["prune.magnitude", "finetune"] * 2
    assert steps[0].options["overrides"] == {"fc1.*": 0.45} and steps[2].options["overrides"] == {
        "fc1.*": 0.9
    }
    finetune = steps[1].options
    assert (
        finetune["lr"] == pytest.approx(0.005)
        and finetune["l1"] == 1e-4
        and finetune["epochs"] == 2
    )
    assert "weight_decay" not in finetune and finetune["dropout_rescale"] is True
    assert steps[0].gate.min_cosine is None and steps[1].gate.min_cosine == 0.95
    Recipe(steps=steps)  # every step's options validate against its pass


def test_prune_only_schedule_runs_gated_without_data(rng):
    model = mlp(rng, (16, 32, 24, 10))
    steps = expand_schedule(fixed_steps(0.9, 0.1), prune_options={"min_params": 0},
                            gate=Gate(min_cosine=0.9, min_rank_correlation=0.9, min_top1=None),
                            on_fail="rollback")
    result = run_steps(model, steps, probe_count=16)
    statuses = [s.status for s in result.steps]
    assert statuses[0] == "applied"
    assert "rolled back" in statuses  # 95% of a random MLP's weights do not keep cosine 0.9
    assert result.final_metrics.cosine >= 0.975  # verified with the margin held back
    applied = [s.step.options["sparsity"] for s in result.steps if s.status == "applied"]
    weights = [
        result.model.graph.initializers[n].const_value.numpy() for n in ("fc0.weight", "fc1.weight")
    ]
    sparsity = 1 - sum(np.count_nonzero(w) for w in weights) / sum(w.size for w in weights)
    assert sparsity == pytest.approx(max(applied), abs=2e-3)


@pytest.mark.slow
def test_schedule_with_retraining_runs_prune_and_finetune_rounds(rng):
    pytest.importorskip("torch")
    model = mlp(rng, (16, 32, 24, 10))
    x = rng.standard_normal((64, 16)).astype(np.float32)
    steps = expand_schedule(fixed_steps(0.8, 0.4), prune_options={"min_params": 0},
                            retrain=RetrainOptions(original_lr=0.1, epochs=1, batch_size=32),
                            gate=Gate(min_cosine=0.5, min_rank_correlation=None, min_top1=None))
    steps = [step.model_copy(update={"margin": 0.0}) for step in steps]  # the bare 0.5
    result = run_steps(model, steps, data={"x": x}, probe_count=16)
    assert [s.status for s in result.steps] == ["applied"] * 4
    assert result.steps[1].report.notes["epochs_run"] == 1
    fc1 = result.model.graph.initializers["fc1.weight"].const_value.numpy()
    assert np.count_nonzero(fc1 == 0) == round(0.8 * fc1.size)  # retraining kept the zeros


def test_a_recipe_schedule_entry_expands_into_its_rounds():
    recipe = parse_recipe(
        """
steps:
  - schedule: {kind: fixed, final: 0.6, step: 0.3}
    overrides: {"fc1.*": 0.9}
    retrain: {original_lr: 0.05, regularisation: l1, strength: 1.0e-4, epochs: 2}
    gate: {min_cosine: 0.95}
  - pass: prune.dead_neurons
""",
        "r.yaml",
    )
    expected = expand_schedule(
        fixed_steps(0.6, 0.3),
        overrides={"fc1.*": 0.9},
        gate=Gate(min_cosine=0.95),
        retrain=RetrainOptions(original_lr=0.05, regularisation="l1", strength=1e-4, epochs=2),
    )
    assert recipe.steps[:-1] == expected
    assert recipe.steps[-1].pass_name == "prune.dead_neurons"
    cubic = parse_recipe("steps:\n  - schedule: {final: 0.9, rounds: 3}\n", "c.yaml")
    assert [s.options["sparsity"] for s in cubic.steps] == cubic_schedule(0.9, 3)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("{schedule: {kind: fixed, final: 0.6}}", "a fixed schedule needs 'step'"),
        ("{schedule: {final: 1.5}}", "schedule.final"),
        ("{schedule: {final: 0.5}, retrain: {epocs: 2}}", "retrain.epocs"),
        ("{schedule: {final: 0.5}, prune_pass: prune.structured}", "prune_pass"),
    ],
)
def test_bad_schedule_entries_name_the_problem(entry, message):
    with pytest.raises(RecipeError, match=re.escape(message)):
        parse_recipe(f"steps:\n  - {entry}\n", "r.yaml")


def test_a_schedule_entry_sets_the_margin_of_every_round():
    recipe = parse_recipe(
        "steps:\n  - schedule: {final: 0.9, rounds: 3}\n    retrain: {epochs: 1}\n"
        "    margin: 0\n  - pass: prune.dead_neurons\n",
        "m.yaml",
    )
    rounds, plain = recipe.steps[:-1], recipe.steps[-1]
    assert len(rounds) == 6 and {step.margin for step in rounds} == {0.0}
    assert plain.margin == fidelity.MARGIN  # a step the schedule did not write keeps its own
    assert rounds[1].verified_gate == rounds[1].gate  # margin 0: the bare gate
    default = parse_recipe("steps:\n  - schedule: {final: 0.9, rounds: 2}\n", "d.yaml")
    assert {step.margin for step in default.steps} == {fidelity.MARGIN}
    with pytest.raises(RecipeError, match="margin"):
        parse_recipe("steps:\n  - schedule: {final: 0.9}\n    margin: 2\n", "bad.yaml")


def test_the_recipe_schema_offers_schedule_steps():
    schema = json.dumps(recipe_schema())
    assert "ScheduleStep" in schema and "rounds" in schema


def test_a_round_whose_fine_tune_fails_is_undone_whole(rng):
    """With retraining, rollback takes back the round's prune step too, not only the fine-tune."""
    pytest.importorskip("torch")
    model = mlp(rng, (16, 32, 24, 10))
    x = rng.standard_normal((32, 16)).astype(np.float32)
    steps = expand_schedule(
        fixed_steps(0.9, 0.45),
        prune_options={"min_params": 0},
        on_fail="rollback",
        retrain=RetrainOptions(original_lr=0.1, epochs=1, batch_size=32),
        gate=Gate(min_cosine=0.999999),
    )  # no round at 45% or 90% keeps this
    result = run_steps(model, steps, data={"x": x}, probe_count=16)
    assert [s.status for s in result.steps] == ["rolled back"] * 4
    fc1 = result.model.graph.initializers["fc1.weight"].const_value.numpy()
    assert np.count_nonzero(fc1 == 0) == 0  # the model is the original again
    assert result.final_metrics.cosine == pytest.approx(1.0)
