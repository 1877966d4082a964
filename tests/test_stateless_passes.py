"""Passes are stateless (as onnx_ir's): one instance runs on many models and keeps nothing.

Everything a pass needs comes in at construction (config, context); everything it found leaves
in the result (`result.report`). Running it must not add or rebind an attribute.
"""

from __future__ import annotations

import onnx_ir as ir
import pytest

from onnxcompress.pass_base import CompressionResult, PassContext, get_pass
from tests.builders import mlp_proto

CASES = [
    ("prune.magnitude", {"sparsity": 0.5, "min_params": 0}),
    ("prune.structured", {"ratio": 0.25}),
    ("prune.dead_neurons", {}),
    ("lowrank.svd", {"ratio": 0.5, "min_params": 0}),
    ("codebook.kmeans", {"bits": 4, "min_params": 0}),
    ("cast.fp16", {}),
    ("quant.int8", {"min_params": 0}),
    ("sparse.csr", {"decide": "always", "min_sparsity": 0.0, "min_params": 0}),
]


@pytest.mark.parametrize(("name", "options"), CASES, ids=[name for name, _ in CASES])
def test_running_a_pass_twice_leaves_the_instance_as_constructed(rng, name, options):
    compression = get_pass(name)(**options, context=PassContext(seed=3))
    before = dict(vars(compression))
    proto = mlp_proto(rng, (16, 32, 24, 10))
    results = [compression(ir.from_proto(proto)) for _ in range(2)]  # the same model, twice
    assert vars(compression).keys() == before.keys()
    assert all(vars(compression)[key] is value for key, value in before.items())
    assert all(isinstance(result, CompressionResult) for result in results)
    first, second = (result.report for result in results)
    assert first is not second and first.to_dict() == second.to_dict()  # a fresh report per run
