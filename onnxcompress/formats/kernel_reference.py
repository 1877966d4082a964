"""numpy references of the `ai.onnxcompress` ops for `onnx.reference.ReferenceEvaluator`.

    from onnx.reference import ReferenceEvaluator
    ReferenceEvaluator(model, new_ops=REFERENCE_OPS).run(None, feeds)

One `OpRun` per entry of the kernel-op table (`kernel_ops.KERNEL_OPS`), built from it: each
calls the entry's `reference` with the node's inputs (an absent bias as None) and then its
attributes in table order. They compute densely in float64 from the stored arrays
(`kernel_arrays`), independently of the C++ kernels, and reject malformed arrays with the same
messages. Tests use them as oracles; an op added to the table gets its reference here for free.
"""

from __future__ import annotations

__all__ = ["REFERENCE_OPS", "reference_op"]

from typing import Any

import numpy as np
from onnx.reference.op_run import OpRun

from onnxcompress.formats.kernel_ops import DOMAIN, INTS, KERNEL_OPS, KernelOp


def reference_op(op: KernelOp) -> type[OpRun]:
    """The `OpRun` class of one table entry (named after the op, as onnx.reference requires)."""

    def _run(self: OpRun, *inputs: np.ndarray | None, **attributes: Any) -> tuple[np.ndarray]:
        required = [name for name, default in op.attributes.items() if default in (None, INTS)]
        if any(attributes.get(name) is None for name in required):
            raise ValueError(f"{op.name} needs the attributes {' and '.join(required)}")
        given = {name: value for name, value in attributes.items() if value is not None}
        values = [
            tuple(int(v) for v in given[name])
            if default == INTS
            else int(given.get(name, default or 0))
            for name, default in op.attributes.items()
        ]
        padded = [*inputs, *([None] * (len(op.inputs) - len(inputs)))]
        return (op.reference(*padded, *values),)

    return type(op.name, (OpRun,), {"op_domain": DOMAIN, "_run": _run, "__doc__": op.doc})


REFERENCE_OPS = [reference_op(op) for op in KERNEL_OPS.values()]
