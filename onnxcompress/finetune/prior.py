"""Soft weight-sharing (Ullrich, Meeds & Welling, ICLR 2017): a learned Gaussian-mixture prior.

Every weight of the regularised layers is drawn from one mixture shared by all layers,

    p(w) = sum_j pi_j N(w | mu_j, sigma_j^2),    j = 0 … J,    mu_0 = 0,  pi_0 fixed,

and retraining minimises ``loss + tau * (-log p(W) - log p(sigma^-2)) / N`` (N training
samples), learning the weights, the means, the variances and the mixing proportions together.
The zero component holds most of the mass (``pi_0 = 0.99`` by default, the paper's
``pi_0 ≈ 0.999`` with ``prior_zero_mass``),
so weights that the task does not need collapse onto 0; the others collapse onto the few
learned means. Gamma hyperpriors on the precisions (the paper's §3.2) keep a component from
shrinking to a point around a single weight. The means start spread evenly over +-max|w|
(the paper's start from a dense net); on a pruned net (`PRUNED_SHARE`) at the k-means fit of
the kept weights, where they already sit.

After training, each weight is set to the mean of its most responsible component (0 for the
zero component): the network then holds at most J + 1 distinct values per layer, which the
`codebook.distinct` pass stores as indices + codebook and `pack` entropy-codes. Lossy: the
quantisation moves each weight to its component's mean (by at most a few sigma_j).
"""

from __future__ import annotations

__all__ = ["MIN_WEIGHTS_LR", "MixturePrior"]

import math

import numpy as np
import torch
from torch import nn

ZERO_MASS = 0.99
#: Gamma(alpha, beta) hyperpriors on the precisions 1 / sigma^2: zero component, the others.
ZERO_GAMMA = (5000.0, 2.0)
OTHER_GAMMA = (250.0, 0.1)
#: Learning rates of the means and of the precisions / mixing proportions (Adam).
MEANS_LR, SHAPE_LR = 5e-4, 5e-3
#: The weights' rate under the prior is at least this (the paper's 5e-4 with Adam): the range test
#: reads the task loss alone, which for a converged net picks a rate too small to move weights
#: onto the mixture's means (LeNet-300-100: 9e-5, 88.6% quantised held-out accuracy after 11
#: epochs; at 5e-4, 97.2% after 20).
MIN_WEIGHTS_LR = 5e-4
#: Weights with at most this share nonzero are a pruned net's: the mixture then starts at the
#: k-means fit of the nonzero weights (the means where they already sit: a clustered model's
#: shared values are reproduced), not at means spread evenly over the range, which on a pruned
#: LeNet-300-100 (weights up to 1.5, 16 means 0.18 apart) quantised to 97.4% held out against
#: 98.5% and stayed there.
PRUNED_SHARE = 0.5
#: A pruned net's zero component starts this many standard deviations below the smallest kept
#: weight, so the start quantises no kept weight to zero.
ZERO_STD_DIVISOR = 4.0


def _kmeans_start(
    nonzero: torch.Tensor, components: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(means, standard deviations, member counts) of the k-means clusters of `nonzero`."""
    from onnxcompress.passes.codebook.kmeans1d import kmeans_1d

    values = nonzero.double().numpy()
    fit = kmeans_1d(values, components, init="linear")
    found = len(fit.centroids)
    means = np.zeros(components)
    means[:found] = fit.centroids
    gap = float(np.min(np.diff(fit.centroids))) if found > 1 else float(np.abs(values).max())
    means[found:] = fit.centroids[-1] + gap * np.arange(1, components - found + 1)
    counts = np.bincount(fit.labels, minlength=components).astype(np.float64)
    stds = np.full(components, gap / 2)
    for j in range(found):
        members = values[fit.labels == j]
        if len(members) > 1:
            stds[j] = max(float(members.std()), gap / 10)
    return (torch.tensor(means, dtype=torch.float32), torch.tensor(stds, dtype=torch.float32),
            torch.tensor(np.maximum(counts, 1.0), dtype=torch.float32))


class MixturePrior(nn.Module):
    """A J + 1 component Gaussian mixture with a fixed zero component, fitted to `weights`."""

    def __init__(
        self, weights: torch.Tensor, components: int, zero_mass: float = ZERO_MASS
    ) -> None:
        super().__init__()
        self.zero_mass = zero_mass
        flat = weights.detach().reshape(-1)
        spread = float(flat.abs().max()) if flat.numel() else 1.0
        spread = spread if spread > 0 else 1.0
        nonzero = flat[flat != 0]
        if flat.numel() and nonzero.numel() <= PRUNED_SHARE * flat.numel():
            means, stds, counts = _kmeans_start(nonzero, components)
        else:
            negative, positive = components // 2, components - components // 2
            means = torch.cat([torch.linspace(-spread, -spread / max(negative, 1), negative),
                               torch.linspace(spread / positive, spread, positive)])
            stds, counts = torch.full((components,), spread / components), torch.ones(components)
        self.means = nn.Parameter(means)
        zero_std = torch.tensor([spread / components])
        if nonzero.numel() and nonzero.numel() <= PRUNED_SHARE * flat.numel():
            # narrow: the pruned zeros are exactly 0, and the smallest kept weight is not one
            zero_std = torch.tensor([float(nonzero.abs().min()) / ZERO_STD_DIVISOR])
        self.log_precision = nn.Parameter(-2 * torch.log(torch.cat([zero_std, stds])))
        self.mixing_logits = nn.Parameter(torch.log(counts))

    def log_weights(self) -> torch.Tensor:
        """log pi_j: pi_0 fixed, the others share 1 - pi_0 by a softmax."""
        others = torch.log_softmax(self.mixing_logits, 0) + math.log(1 - self.zero_mass)
        return torch.cat([torch.tensor([math.log(self.zero_mass)]), others])

    def all_means(self) -> torch.Tensor:
        """The J means with the fixed zero component's first, as the densities index them."""
        return torch.cat([torch.zeros(1), self.means])

    def component_log_densities(self, flat: torch.Tensor) -> torch.Tensor:
        """[n, J + 1]: log pi_j + log N(w | mu_j, sigma_j^2)."""
        precision = self.log_precision.exp()
        diff = flat[:, None] - self.all_means()[None, :]
        log_normal = (
            0.5 * (self.log_precision - math.log(2 * math.pi)) - 0.5 * precision * diff * diff
        )
        return log_normal + self.log_weights()[None, :]

    def negative_log_prob(
        self, weights: list[torch.Tensor], sample: int | None = None
    ) -> torch.Tensor:
        """-log p(W) - log p(precisions): the complexity term of the paper's eq. 4.

        With `sample`, -log p(W) is estimated from that many weights drawn (torch's seeded
        generator) uniformly with replacement, scaled by n / sample: an unbiased estimate whose
        cost does not grow with the network (the exact sum costs ~1 s a step on 266k weights
        on one busy core).
        """
        flat = torch.cat([w.reshape(-1) for w in weights])
        scale = 1.0
        if sample is not None and flat.numel() > sample:
            scale = flat.numel() / sample
            flat = flat[torch.randint(0, flat.numel(), (sample,))]
        data = -torch.logsumexp(self.component_log_densities(flat), dim=1).sum() * scale
        precision = self.log_precision.exp()
        alpha = torch.tensor([ZERO_GAMMA[0]] + [OTHER_GAMMA[0]] * self.means.numel())
        beta = torch.tensor([ZERO_GAMMA[1]] + [OTHER_GAMMA[1]] * self.means.numel())
        hyper = -((alpha - 1) * self.log_precision - beta * precision).sum()
        return data + hyper

    @torch.no_grad()
    def quantise(self, weight: torch.Tensor) -> torch.Tensor:
        """Each weight set to the mean of its most responsible component (0 for the zero one)."""
        flat = weight.reshape(-1)
        chosen = self.component_log_densities(flat).argmax(dim=1)
        return self.all_means()[chosen].reshape(weight.shape).to(weight.dtype)

    def parameter_groups(self) -> list[dict[str, object]]:
        """The mixture's own Adam rates, independent of the weights' rate.

        The paper's ratios: means slow, precisions and proportions ten times faster.
        """
        return [
            {"params": [self.means], "lr": MEANS_LR},
            {"params": [self.log_precision, self.mixing_logits], "lr": SHAPE_LR},
        ]
