"""Every fine-tuning setting, declared once: the pass, the training loop and the CLI read it.

The defaults are meant to work without hand-set numbers (Han et al. 2015 retrain at about
1/10 of the original learning rate, until the held-out accuracy stops improving):

* ``lr=None``: a short learning-rate range test (Smith 2017, "Cyclical Learning Rates",
  §3.3) raises the rate geometrically over a few dozen steps from the starting weights and
  takes 1/10 of the rate at the smoothed loss minimum -- Han's "1/10 of the original", read
  from the data instead of a training log that an ONNX file does not carry;
* ``epochs=None``: train until the held-out metric (accuracy with labels, the loss
  otherwise) has not improved for ``patience`` epochs, and keep the best epoch's weights. A
  cycle is ``max_steps`` optimizer steps (at least 3 epochs) of cosine decay; while a cycle
  still improved the held-out result, another follows from the best weights at half the rate
  (warm restarts, at most ``max_cycles``), so the retraining budget grows with how much a
  round removed instead of stopping at a fixed cap. ``validation_split`` of the
  samples (seeded) are held out for it and never trained on;
* ``optimizer="adam"`` with a cosine decay over the planned steps.

With an explicit ``epochs`` every sample is trained on for exactly that many epochs (the
targets may still stop it early), as before. Regularisers (`regularise`) and the
soft weight-sharing prior (`prior`) are options here too; a CLI option of the same name
reads its help text from this class, so the two cannot drift.

This module imports neither torch nor any pass.
"""

from __future__ import annotations

__all__ = ["FinetuneConfig", "GROUP_KINDS", "help_of"]

from typing import Literal

import pydantic

from onnxcompress.pass_base import PassConfig

#: Wen et al. 2016 (SSL) group shapes: output filters, input channels, filter shapes, whole layer.
GROUP_KINDS = ("filters", "channels", "shapes", "depth")


class FinetuneConfig(PassConfig):
    """How to retrain a compressed model (the `finetune` pass's options)."""

    epochs: int | None = pydantic.Field(
        None,
        ge=1,
        le=100_000,
        description="Passes over the training data (default: until the held-out metric stops "
        "improving).",
    )
    lr: float | None = pydantic.Field(
        None,
        gt=0.0,
        le=10.0,
        description="Learning rate (default: 1/10 of the loss minimum of a short range test, Han's "
        "1/10 rule).",
    )
    batch_size: int = pydantic.Field(
        64, ge=1, le=1_000_000, description="Samples per optimizer step."
    )
    optimizer: Literal["sgd", "adam"] = pydantic.Field(
        "adam", description="adam, or sgd with momentum."
    )
    lr_schedule: Literal["constant", "cosine"] = pydantic.Field(
        "cosine", description="cosine decay from lr to 0 over the planned steps, or constant."
    )
    momentum: float = pydantic.Field(0.9, ge=0.0, lt=1.0, description="SGD momentum.")
    max_steps: int = pydantic.Field(
        4000, ge=1, le=10_000_000,
        description="With epochs unset: optimizer steps of one cosine cycle (at least 3 epochs).",
    )
    max_cycles: int = pydantic.Field(
        4, ge=1, le=100,
        description="With epochs unset: cycles at most; another (from the best weights, at half "
        "the rate) follows only a cycle that improved the held-out result.",
    )
    patience: int = pydantic.Field(
        3,
        ge=1,
        le=1000,
        description="With epochs unset: stop after this many epochs without held-out gain.",
    )
    validation_split: float = pydantic.Field(
        0.1, ge=0.0, lt=1.0,
        description="With epochs unset: share of the samples held out for early stopping (seeded).",
    )
    l2: float = pydantic.Field(
        0.0, ge=0.0, le=1.0, description="L2 regularisation (the optimizer's weight decay)."
    )
    l1: float = pydantic.Field(
        0.0, ge=0.0, le=1.0, description="L1 regularisation: adds l1 * sum|W| over weights."
    )
    group_lasso: float = pydantic.Field(
        0.0, ge=0.0, le=10.0,
        description="Wen et al. 2016 group lasso strength: sum over groups of sqrt(|g|) * ||W_g||, "
        "with a proximal step that sets whole groups to exact zero.",
    )
    groups: tuple[Literal["filters", "channels", "shapes", "depth"], ...] = pydantic.Field(
        ("channels",),
        description="Group lasso groups: filters, channels, shapes and/or depth (Wen's SSL).",
    )
    biased_decay: float = pydantic.Field(
        0.0,
        ge=0.0,
        le=10.0,
        description="Hanson & Pratt 1989 biased weight decay strength (small weights pushed to "
        "zero, large kept).",
    )
    biased_decay_kind: Literal["hyperbolic", "exponential"] = pydantic.Field(
        "hyperbolic", description="hyperbolic: w^2 / (1 + w^2); exponential: 1 - exp(-w^2)."
    )
    regularise: tuple[str, ...] = pydantic.Field(
        (), description="Weight-name globs the regularisers apply to (default: every weight layer)."
    )
    prior: Literal["none", "gmm"] = pydantic.Field(
        "none",
        description="gmm: Ullrich et al. 2017 soft weight-sharing, a learned Gaussian mixture with "
        "a zero component, then quantisation to its means (writes a codebook model).",
    )
    prior_components: int = pydantic.Field(
        16, ge=2, le=256, description="gmm: mixture components besides the zero one."
    )
    prior_strength: float = pydantic.Field(
        0.005,
        ge=0.0,
        le=100.0,
        description="gmm: weight of the prior's -log p(W) per training sample (tau).",
    )
    prior_zero_mass: float = pydantic.Field(
        0.99,
        gt=0.0,
        lt=1.0,
        description="gmm: the zero component's fixed mixing proportion pi_0 (Ullrich et al.: "
        "0.99-0.999; higher prunes more).",
    )
    prior_sample: int | None = pydantic.Field(
        16384,
        ge=1,
        description="gmm: weights the complexity term is estimated on per step (unbiased; None: "
        "all of them).",
    )
    loss: Literal["auto", "cross_entropy", "kl", "mse", "cosine"] = pydantic.Field(
        "auto",
        description="auto: cross-entropy with labels, else KL on 2-D logits, else MSE against the "
        "original model.",
    )
    distill: bool = pydantic.Field(
        False, description="Distil from the original model's outputs even when the data has labels."
    )
    temperature: float = pydantic.Field(
        1.0, gt=0.0, le=100.0, description="Softening temperature of the KL loss."
    )
    teacher: str | None = pydantic.Field(
        None,
        description="Path of the teacher model for distillation (default: the model before the "
        "first step).",
    )
    data: str | None = pydantic.Field(
        None,
        description=".npz path or 'module:function' returning dict batches (default: the "
        "pipeline's data).",
    )
    target_cosine: float | None = pydantic.Field(
        None,
        ge=-1.0,
        le=1.0,
        description="Stop early once the output cosine against the original reaches this.",
    )
    target_accuracy: float | None = pydantic.Field(
        None,
        ge=0.0,
        le=1.0,
        description="Stop early once the accuracy on the training data reaches this.",
    )
    dropout_rescale: bool = pydantic.Field(
        True,
        description="Han's D_new = D_old * sqrt(C_new / C_old) for Dropout nodes after pruned "
        "layers.",
    )
    trainable: tuple[str, ...] = pydantic.Field(
        (),
        description="Tensor-name globs to train (default: every float tensor of more than one "
        "value).",
    )
    freeze: tuple[str, ...] = pydantic.Field((), description="Tensor-name globs never trained.")
    keep_zeros: bool = pydantic.Field(
        True, description="Hold every zero of a weight or codebook at exactly zero."
    )
    max_samples: int | None = pydantic.Field(
        None, ge=1, description="Use at most this many training samples."
    )
    probe_samples: int = pydantic.Field(
        256, ge=1, le=1_000_000, description="Samples the cosine target is measured on."
    )
    seed: int | None = pydantic.Field(
        None, ge=0, description="Seed of batch order and dropout (default: the pipeline's)."
    )
    executor: Literal["local", "ray"] = pydantic.Field(
        "local",
        description="local: this process; ray: Ray Train's TorchTrainer, `workers` DDP workers "
        "(pip install 'onnxcompress[ray]').",
    )
    workers: int = pydantic.Field(
        1, ge=1, le=4096, description="Data-parallel workers (more than 1 needs ray)."
    )
    ray_address: str | None = pydantic.Field(
        None, description="Ray cluster to join (auto, ray://host:port); None starts a local one.")
    checkpoint_dir: str | None = pydantic.Field(
        None,
        description="Folder every Ray worker reaches for the training checkpoints (default: a "
        "temporary one).",
    )

    @pydantic.model_validator(mode="before")
    @classmethod
    def _renamed(cls, values: object) -> object:
        """`weight_decay` (recipes written before `l2`) still reads as `l2`."""
        if isinstance(values, dict) and "weight_decay" in values:
            if "l2" in values:
                raise ValueError("give l2 or its old name weight_decay, not both")
            values = {
                ("l2" if key == "weight_decay" else key): value for key, value in values.items()
            }
        return values

    @pydantic.model_validator(mode="after")
    def _workers_need_ray(self) -> FinetuneConfig:
        if self.workers > 1 and self.executor != "ray":
            raise ValueError(
                "more than 1 worker trains on Ray: set executor to ray (--executor ray)"
            )
        return self

    @property
    def auto_epochs(self) -> bool:
        """Whether the run length comes from early stopping on held-out data."""
        return self.epochs is None

    @property
    def regularised(self) -> bool:
        """Whether any regulariser is on: the loop then adds its terms to every step's loss."""
        return self.l1 > 0 or self.group_lasso > 0 or self.biased_decay > 0


def help_of(field: str) -> str:
    """The documented meaning of a setting, for the CLI's help text."""
    description = FinetuneConfig.model_fields[field].description
    return description or field
