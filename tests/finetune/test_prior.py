"""Soft weight-sharing (`finetune --prior gmm`): the mixture, its quantisation, the codebooks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from typer.testing import CliRunner

from onnxcompress.cli import app
from onnxcompress.finetune.prior import ZERO_MASS, MixturePrior


def test_mixture_log_density_matches_the_formula() -> None:
    torch.manual_seed(0)
    weights = torch.randn(500) * 0.1
    prior = MixturePrior(weights, components=6)
    assert prior.all_means()[0] == 0 and prior.all_means().numel() == 7
    assert float(prior.log_weights().exp().sum()) == pytest.approx(1.0, abs=1e-6)
    assert float(prior.log_weights()[0].exp()) == pytest.approx(ZERO_MASS)
    w = weights.double().numpy()
    means = prior.all_means().detach().double().numpy()
    variances = 1 / prior.log_precision.detach().exp().double().numpy()
    mixing = prior.log_weights().detach().exp().double().numpy()
    density = (
        mixing
        / np.sqrt(2 * np.pi * variances)
        * np.exp(-((w[:, None] - means) ** 2) / (2 * variances))
    ).sum(1)
    got = torch.logsumexp(prior.component_log_densities(weights), dim=1).detach().double().numpy()
    np.testing.assert_allclose(got, np.log(density), rtol=1e-5, atol=1e-6)  # float32 arithmetic


def test_the_zero_mass_is_the_option_given_and_a_larger_one_sends_more_weights_to_zero() -> None:
    weights = torch.linspace(-0.3, 0.3, 61)
    light, heavy = (MixturePrior(weights, components=4, zero_mass=m) for m in (0.5, 0.999))
    assert float(light.log_weights()[0].exp()) == pytest.approx(0.5)
    assert float(heavy.log_weights()[0].exp()) == pytest.approx(0.999)
    assert float(heavy.log_weights().exp().sum()) == pytest.approx(1.0, abs=1e-6)
    zeros = [int((prior.quantise(weights) == 0).sum()) for prior in (light, heavy)]
    assert zeros[0] < zeros[1]


def _pruned_clustered(shared: torch.Tensor, size: int = 4000) -> torch.Tensor:
    """`size` weights drawn from the `shared` values, about 90% of them pruned to exact zero."""
    generator = torch.Generator().manual_seed(0)
    weights = shared[torch.randint(0, len(shared), (size,), generator=generator)]
    weights[torch.rand(size, generator=generator) < 0.9] = 0.0
    return weights


def test_on_a_pruned_clustered_net_the_mixture_starts_at_its_shared_values() -> None:
    """The means at the shared values: a kept weight the zero component does not claim stays."""
    shared = torch.tensor([-0.9, -0.5, -0.2, -0.1, 0.08, 0.15, 0.4, 1.2])
    weights = _pruned_clustered(shared)
    prior = MixturePrior(weights, components=8)
    np.testing.assert_allclose(np.sort(prior.means.detach().numpy()), shared.numpy(), atol=1e-6)
    quantised, kept = prior.quantise(weights), weights != 0
    claimed = kept & (quantised == 0)
    np.testing.assert_allclose(quantised[kept & ~claimed].numpy(), weights[kept & ~claimed].numpy(),
                               atol=1e-6)
    dense = MixturePrior(torch.linspace(-1, 1, 4000), components=8)  # not pruned: spread evenly
    assert float(dense.means.min()) == pytest.approx(-1.0)


def test_on_a_pruned_net_the_zero_component_starts_wide_and_the_pruned_zeros_narrow_it() -> None:
    """An annealed start: sigma_0 = the median kept |w|, claiming small kept weights at first.

    Fitting the mixture to the weights (the exact zeros included) then shrinks it below them.
    """
    shared = torch.tensor([-0.9, -0.5, -0.2, -0.1, 0.08, 0.15, 0.4, 1.2])
    weights = _pruned_clustered(shared, 10_000)
    prior = MixturePrior(weights, components=8, zero_mass=0.99)
    kept = weights[weights != 0]
    zero_std = float(prior.log_precision.detach()[0].exp() ** -0.5)
    assert zero_std == pytest.approx(float(kept.abs().median()), rel=0.01)
    claimed = (prior.quantise(kept) == 0) & (kept.abs() <= 0.1)
    assert int(claimed.sum()) > 0  # the start claims small kept weights
    optimizer = torch.optim.Adam(prior.parameter_groups())
    for _ in range(1500):  # the mixture alone, the weights held: what the zeros do to sigma_0
        optimizer.zero_grad()
        prior.negative_log_prob([weights]).backward()
        optimizer.step()
    assert float(prior.log_precision.detach()[0].exp() ** -0.5) < 0.25 * float(kept.abs().min())


def test_quantise_picks_the_most_responsible_mean() -> None:
    prior = MixturePrior(torch.linspace(-1, 1, 11), components=4)
    weights = torch.tensor([0.0, 0.01, 0.9, -0.95, 0.45])
    quantised = prior.quantise(weights)
    means = set(prior.all_means().tolist())
    assert set(quantised.tolist()) <= means
    assert quantised[0] == 0 and quantised[1] == 0  # the zero component takes the small ones
    densities = prior.component_log_densities(weights)
    np.testing.assert_array_equal(
        quantised.numpy(), prior.all_means()[densities.argmax(1)].detach().numpy()
    )


def test_cli_prior_gmm_writes_a_codebook_model_of_the_prior_means_that_pack_codes(
    mlp_pair, digits, tmp_path
) -> None:
    from onnxcompress.formats.codebook import codebook_layers

    _, proto = mlp_pair
    x, y = digits
    name = proto.graph.input[0].name
    model, data, out, report = (tmp_path / n for n in ("m.onnx", "d.npz", "gmm.onnx", "r.json"))
    onnx.save(proto, model)
    np.savez(data, **{name: x[:500], "labels": y[:500]})
    runner = CliRunner()
    result = runner.invoke(
        app,
        [
            "finetune",
            str(model),
            "--data",
            str(data),
            "-o",
            str(out),
            "--prior",
            "gmm",
            "--prior-components",
            "8",
            "--epochs",
            "3",
            "--lr",
            "0.001",
            "--report",
            str(report),
        ],
    )
    assert result.exit_code == 0, result.output
    steps = json.loads(report.read_text())["steps"]
    assert [s["pass"] for s in steps] == ["finetune", "codebook.kmeans"]
    means = np.asarray(steps[0]["notes"]["prior_means"], dtype=np.float32)
    assert 0.0 in means and len(means) <= 9

    layers = codebook_layers(ir.load(out))
    assert {layer.name for layer in layers} == {
        "layers.0.weight",
        "layers.1.weight",
        "layers.2.weight",
    }
    for layer in layers:
        codebook = layer.codebook()
        # every shared value is a mean of the mixture (entry 0: the exact zero)
        for value in codebook:
            assert np.min(np.abs(means - value)) <= 1e-6 * max(1.0, abs(value)), (
                layer.name,
                value,
                means,
            )
        assert layer.bits == 4  # ceil(log2(8 + 1))

    result = runner.invoke(app, ["pack", str(out), "-o", str(tmp_path / "m.onnxc")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "m.onnxc").stat().st_size < 0.25 * model.stat().st_size


def test_under_the_prior_the_rate_is_at_least_the_papers(digits_mlp) -> None:
    from onnxcompress.finetune.config import FinetuneConfig
    from onnxcompress.finetune.executor import to_ir
    from onnxcompress.finetune.prior import MIN_WEIGHTS_LR
    from onnxcompress.finetune.train import _prepare, find_lr

    proto, train, _ = digits_mlp
    plain = find_lr(_prepare(to_ir(proto), train, None, FinetuneConfig(seed=0), None, None))
    under_prior = find_lr(
        _prepare(to_ir(proto), train, None, FinetuneConfig(seed=0, prior="gmm"), None, None)
    )
    assert plain < MIN_WEIGHTS_LR  # a converged net: the range test alone picks a small rate
    assert under_prior == MIN_WEIGHTS_LR


def test_cli_prior_gmm_on_a_clustered_model_re_shares_its_weights_and_keeps_its_zeros(
    mlp_pair, digits, tmp_path
) -> None:
    """The default pipeline's result (pruned + k-means) is expanded, re-shared, re-coded."""
    from onnxcompress.formats.codebook import codebook_layers, dense_weight
    from onnxcompress.pass_base import get_pass

    _, proto = mlp_pair
    x, y = digits
    clustered = ir.from_proto(proto)
    get_pass("prune.magnitude")(sparsity=0.6)(clustered)
    get_pass("codebook.kmeans")(bits=5, min_params=0)(clustered)
    pruned = {layer.name: dense_weight(layer) == 0 for layer in codebook_layers(clustered)}
    model = tmp_path / "m.onnx"
    ir.save(clustered, model)
    out, notes = _finetune_under_prior(
        model, proto, x[:500], y[:500], "--prior-zero-mass", "0.9", "--epochs", "2"
    )
    assert sorted(notes["expanded_codebooks"]) == sorted(pruned)
    means = np.asarray(notes["prior_means"], dtype=np.float32)
    layers = codebook_layers(ir.load(out))
    assert sorted(layer.name for layer in layers) == sorted(pruned)
    for layer in layers:
        assert layer.bits == 3  # ceil(log2(4 + 1)): the prior's means, no longer k-means' 32
        assert all(np.min(np.abs(means - v)) <= 1e-6 for v in layer.codebook())
        assert np.all(dense_weight(layer)[pruned[layer.name]] == 0)  # pruned stays pruned


def test_cli_regularise_limits_the_prior_to_the_named_layers(mlp_pair, digits, tmp_path) -> None:
    from onnxcompress.formats.codebook import codebook_layers

    _, proto = mlp_pair
    x, y = digits
    model = tmp_path / "m.onnx"
    onnx.save(proto, model)
    out, notes = _finetune_under_prior(
        model, proto, x[:300], y[:300], "--regularise", "layers.0.*", "--epochs", "1"
    )
    means = notes["prior_means"]
    codebooks = {layer.name: layer.codebook() for layer in codebook_layers(ir.load(out))}
    assert all(np.min(np.abs(np.asarray(means) - v)) <= 1e-6 for v in codebooks["layers.0.weight"])
    # the others were trained as plain weights; k-means then shares them in its own values
    assert not all(np.min(np.abs(np.asarray(means) - v)) <= 1e-6
                   for v in codebooks["layers.1.weight"])


def _finetune_under_prior(
    model: Path, proto: onnx.ModelProto, x: np.ndarray, y: np.ndarray, *options: str
) -> tuple[Path, dict]:
    """`finetune MODEL --prior gmm` (4 components) on (x, y) beside it: the output, its notes."""
    data, out, report = (model.parent / n for n in ("d.npz", "gmm.onnx", "r.json"))
    np.savez(data, **{proto.graph.input[0].name: x, "labels": y})
    result = CliRunner().invoke(app, [
        "finetune", str(model), "--data", str(data), "-o", str(out), "--prior", "gmm",
        "--prior-components", "4", "--lr", "0.001", "--report", str(report), *options,
    ])
    assert result.exit_code == 0, result.output
    return out, json.loads(report.read_text())["steps"][0]["notes"]


def test_distilling_under_the_prior_keeps_the_epoch_of_best_quantised_held_out_accuracy(
    digits_mlp,
) -> None:
    """With a teacher's loss the run still keeps what it will write: the quantised weights."""
    from onnxcompress.finetune.config import FinetuneConfig
    from onnxcompress.finetune.train import finetune

    proto, train, held_out = digits_mlp
    config = FinetuneConfig(seed=0, prior="gmm", prior_components=4, distill=True, max_steps=60,
                            max_cycles=1, lr=1e-3)
    result = finetune(proto, train, options=config, held_out=held_out)
    assert result.loss_kind == "kl"
    scores = [record["held_out_accuracy_quantised"] for record in result.history]
    assert result.best_epoch == 1 + int(np.argmax(scores))
