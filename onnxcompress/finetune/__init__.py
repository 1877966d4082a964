"""The PyTorch fine-tune bridge: run ONNX graphs in torch, retrain weights, write them back.

An optional extra (``pip install onnxcompress[torch]``). Importing this package does not
import torch; the submodules do. `require_torch()` turns a missing torch into a clear
`MissingDependencyError`.

* `executor`   -- `OnnxModule`: the graph as an `nn.Module`, weights keyed by ONNX name.
* `parametrize` -- mask / codebook / low-rank parametrizations that training cannot undo.
* `train`      -- the training loop (labels or distillation), data loading, write-back.
* `gradients`  -- first-order Taylor and OBD saliencies for the pruning passes.
"""

from __future__ import annotations

__all__ = ["require_torch"]

import importlib.util

from onnxcompress.errors import MissingDependencyError


def require_torch() -> None:
    """Raise `MissingDependencyError` unless torch can be imported."""
    if importlib.util.find_spec("torch") is None:
        raise MissingDependencyError(
            "fine-tuning needs PyTorch: pip install 'onnxcompress[torch]' (CPU: torch==2.13.0)"
        )
