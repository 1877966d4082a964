"""`finetune`: retrain a compressed model's weights in PyTorch and write them back in place.

Han et al. 2015 (retraining after pruning, connections held at zero, L1/L2, dropout
rescaled by eq. 2) and Han, Mao & Dally 2016 (fine-tuning shared centroids). The graph runs
in `onnxcompress.finetune.executor.OnnxModule`; the structure is kept by parametrizations
(`onnxcompress.finetune.parametrize`): zeros stay exactly zero, codebook indices are never
touched, low-rank factors are trained as the two initializers they are.

Write-back is an ordinary, gated pass: the same tensor names, shapes and dtypes; no node,
input or output is added, removed or rewired (a prior's codebook expansion aside, below).
Lossy by design (it retrains toward labels or the original model's outputs); the pipeline's
fidelity gate judges the result.
torch is imported only when the pass runs. The options are
`onnxcompress.finetune.config.FinetuneConfig`, declared once for the pass, the training loop and
the CLI. With ``prior: gmm`` the weights end quantised to the mixture's means (`codebook.kmeans`
at ceil(log2(J + 1)) bits stores them exactly); codebook layers (a clustered model) are first
expanded back to plain weights, their zeros held, so the prior re-shares every weight. With
the pipeline's data, the gate's probe samples (its first samples) are left out of training.
With held-out data beside it (`--val-data`), early stopping reads that instead of a share of
the training samples: a share of samples the model was first trained on says little once it
has memorised them.
"""

from __future__ import annotations

__all__ = ["FinetuneConfig", "FinetunePass"]

import logging
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from onnxcompress.errors import DataError
from onnxcompress.finetune.config import FinetuneConfig
from onnxcompress.pass_base import CompressionPass, PassReport, register

logger = logging.getLogger(__name__)

@register
class FinetunePass(CompressionPass):
    """Retrain weights in torch with the compressed structure held; write them back by name."""

    name = "finetune"
    summary = (
        "Retrain weights in PyTorch keeping zeros, codebook indices and factors (Han et al. "
        "2015/2016)."
    )
    Config = FinetuneConfig
    config: FinetuneConfig

    def requires(self, model: ir.Model) -> None:
        """Refuse early when torch is missing: before the step starts, not deep in training."""
        super().requires(model)
        from onnxcompress.finetune import require_torch

        require_torch()

    def _data(self) -> object:
        from onnxcompress.finetune.data import load_data

        if self.config.data is not None:
            return load_data(self.config.data)
        if self.context.data is None:
            raise DataError(
                "finetune needs training data: give --data (an .npz) or the 'data' option"
            )
        return _without_gate_samples(dict(self.context.data), self.context.probes)

    def _teacher(self) -> ir.Model | None:
        if self.config.teacher is None:
            return self.context.original
        from onnxcompress import io

        return io.load(self.config.teacher)

    def rewrite(self, model: ir.Model, report: PassReport) -> bool:
        """Train in torch, then write the changed tensors back in their stored forms."""
        from onnxcompress.finetune.executor import OnnxModule
        from onnxcompress.finetune.train import finetune, write_back

        data = self._data()
        expanded = _expand_codebooks(model) if self.config.prior == "gmm" else []
        module = OnnxModule(model)  # unsupported ops fail here, before any edit
        options = self.config
        if options.seed is None:
            options = options.model_copy(update={"seed": self.context.seed})
        if options.executor == "ray":
            from onnxcompress.finetune.distributed import finetune_on_ray

            result = finetune_on_ray(model, data, original=self._teacher(), options=options,  # type: ignore[arg-type]
                                     workers=options.workers, address=options.ray_address,
                                     storage=options.checkpoint_dir)
        else:
            result = finetune(model, data, original=self._teacher(), options=options, module=module,  # type: ignore[arg-type]
                              progress=self.context.progress, held_out=self.context.held_out)
        consumers = _consumer_ops(model)
        changed = write_back(model, result.arrays)
        for name, before, after in changed:
            kept = result.structure.get(name, "")
            detail = f"retrained ({kept})" if kept == "mask" else "retrained"
            if self.config.prior == "gmm":
                detail += f", quantised to the prior's {len(result.prior_means)} means"
            report.changed(name, consumers.get(name, "?"), before, after, detail=detail)
        trained = set(result.arrays)
        for name in sorted(trained - {c[0] for c in changed}):
            report.skip(name, "values unchanged by training")
        report.notes.update(result.summary())
        if expanded:
            report.notes["expanded_codebooks"] = expanded
        logger.info(
            "finetune: %d tensors retrained over %d epochs", len(changed), len(result.history)
        )
        return bool(changed)


def _expand_codebooks(model: ir.Model) -> list[str]:
    """Shared-weight layers back to plain weights (zeros kept), for the prior to re-share.

    A codebook model (the default pipeline's result) trains only its centroids; soft
    weight-sharing moves every weight onto the mixture's means, so it starts from the weights
    the layers compute with. `codebook.kmeans` after it stores the means as a new codebook.
    """
    from onnxcompress.formats.codebook import codebook_layers, expand_codebook

    names = []
    for layer in codebook_layers(model):
        names.append(expand_codebook(model.graph, layer).name or "")
    if names:
        logger.info("finetune: %d codebook layers expanded for the prior", len(names))
    return names


def _without_gate_samples(
    data: dict[str, np.ndarray], probes: Mapping[str, np.ndarray] | None
) -> dict[str, np.ndarray]:
    """The pipeline's data less its first samples when those are the gate's probes.

    The step is judged on samples it never trained on (kept whole when too few would remain).
    """
    if not probes:
        return data
    count = min(len(np.asarray(v)) for v in probes.values())
    total = min(len(np.asarray(v)) for v in data.values())
    same = all(
        name in data and np.array_equal(np.asarray(data[name])[:count], np.asarray(value)[:count])
        for name, value in probes.items()
    )
    if not same or total - count < max(count, 32):
        return data
    logger.info(
        "finetune: the gate's %d samples are left out of training (%d remain)", count, total - count
    )
    return {name: np.asarray(value)[count:] for name, value in data.items()}


def _consumer_ops(model: ir.Model) -> dict[str, str]:
    """The op type of the first node that reads each tensor, for the report."""
    ops: dict[str, str] = {}
    for node in model.graph:
        for value in node.inputs:
            if value is not None and value.name and value.name not in ops:
                ops[value.name] = node.op_type
    return ops

