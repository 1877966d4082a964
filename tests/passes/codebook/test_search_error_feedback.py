"""codebook.search, `method: auto`: GPTQ candidates join only where 8-bit k-means misses the gate.

The model below reads inputs that share one large offset its weights are blind to (W^T c = 0),
as a layer after a normalisation with a large mean can. Rounding each weight on its own moves
W^T c far from 0, an error as large as the output itself; GPTQ pushes each column's error onto
the columns not yet assigned, along the inputs' directions, and cancels it.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from onnxcompress import fidelity
from onnxcompress.calibration import LayerHessian
from onnxcompress.passes.codebook.search import REFIT_BUDGET, refit_affordable
from onnxcompress.pipeline import Step, run_steps
from tests.builders import finish, mlp

FEATURES, OUTPUTS, SAMPLES = 64, 32, 64


def offset_reader(rng: np.random.Generator) -> tuple[ir.Model, np.ndarray]:
    """x [batch, 64] -> MatMul W [64, 32] (no bias) -> y, and inputs 30 c + noise, W^T c = 0."""
    offset = rng.standard_normal(FEATURES)
    offset /= np.linalg.norm(offset)
    weight = rng.standard_normal((FEATURES, OUTPUTS)) / 8
    weight -= np.outer(offset, offset @ weight)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "offset_reader",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", FEATURES])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", OUTPUTS])],
        [numpy_helper.from_array(weight.astype(np.float32), "w")],
    )
    x = 30 * offset + rng.standard_normal((SAMPLES, FEATURES))
    return ir.from_proto(finish(graph)), x.astype(np.float32)


def search(  # type: ignore[no-untyped-def]
    model: ir.Model, x: np.ndarray, gate: fidelity.Gate = fidelity.DEFAULT_GATE, **options: object
):
    step = Step(pass_name="codebook.search", options=options, gate=gate, on_fail="rollback")
    result = run_steps(model, [step], data={"x": x})
    return result.steps[0], result.model


def details(step) -> list[str]:  # type: ignore[no-untyped-def]
    return [change.detail for change in step.report.changes]


QUICK = {"bits": (8, 5), "sensitivity": False, "refine_trials": 0}  # the search, kept short


def test_gptq_joins_where_8_bit_kmeans_misses_the_gate(rng):
    model, x = offset_reader(rng)
    reference = fidelity.run(model.clone(), {"x": x})
    plain, _ = search(model.clone(), x, method="kmeans", **QUICK)
    assert plain.status == "unchanged"  # even 8 bits breaks it
    step, written = search(model, x, **QUICK)  # method: auto, the default
    assert step.status == "applied" and not step.failures
    assert details(step) and all("assigned by GPTQ" in d for d in details(step))
    outputs = fidelity.run(written, {"x": x}, reference.views)  # checked independently
    assert not fidelity.DEFAULT_GATE.failures(fidelity.compare(reference, outputs))


def test_a_model_kmeans_holds_at_8_bits_is_searched_without_gptq(rng):
    x = rng.standard_normal((SAMPLES, 32)).astype(np.float32)
    outputs_only = fidelity.Gate(min_top1=None)  # random logits: close calls everywhere
    step, _ = search(mlp(rng, (32, 64, 10)), x, outputs_only, **QUICK)
    assert step.status == "applied"
    assert details(step) and not any("GPTQ" in d for d in details(step))


def test_gptq_refits_centroids_only_where_it_costs_seconds():
    def stats(features: int) -> LayerHessian:
        eye = np.eye(features)[None]
        return LayerHessian("w", eye, 1, np.zeros((1, features)))

    assert refit_affordable(stats(64), 64 * 32)
    assert not refit_affordable(stats(1024), 8210 * 1024)  # ddddocr's projection: a minute
    assert refit_affordable(None, 10**9)  # no H: nothing to refit under
    assert 8210 * 1024 * 1024 > REFIT_BUDGET
