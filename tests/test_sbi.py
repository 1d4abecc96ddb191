"""pyro_mixflow.sbi: our conditional models as density estimators in sbi's own NPE/NLE loops."""

from __future__ import annotations

import math
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.distributions import Independent, Normal

pytest.importorskip("sbi")

from sbi.inference import NLE, NPE
from sbi.inference.posteriors import MCMCPosteriorParameters
from sbi.neural_nets.estimators import ConditionalDensityEstimator

from pyro_mixflow.sbi import (
    NUM_COMPONENTS,
    ConditionalModelEstimator,
    density_estimator,
    likelihood_estimator,
)

# The conjugate task: theta ~ N(0, I_2), x | theta ~ N(theta, 0.5^2 I_2); the posterior is
# N(0.8 x, 0.2 I_2) and the marginal of x is N(0, 1.25 I_2).
NOISE = 0.5
POSTERIOR_VAR = 1 / (1 + NOISE**-2)  # 0.2
X_VAR = 1 + NOISE**2  # 1.25

SMALL = {
    "gmm": {"num_components": 2, "hidden_dims": (8,)},
    "mixtureflow": {"num_components": 2, "num_transforms": 1, "hidden_dims": (8, 8)},
    "cwm": {"num_components": 2, "hidden_dims": (8,)},
    "rad": {"num_layers": 1, "hidden_dims": (8, 8)},
}
QUIET = pytest.mark.filterwarnings("ignore:Maximum number of epochs")


def _prior() -> Independent:
    return Independent(Normal(torch.zeros(2), torch.ones(2)), 1)


def _simulations(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    theta = torch.randn(n, 2, generator=generator)
    return theta, theta + NOISE * torch.randn(n, 2, generator=generator)


def _true_posterior(x_o: torch.Tensor) -> Independent:
    return Independent(Normal(x_o / X_VAR, math.sqrt(POSTERIOR_VAR)), 1)


def test_npe_recovers_the_conjugate_posterior():
    # K = 1 with an affine context network is the family N(A x + b, diag exp(C x + d)), which
    # holds the true posterior: the trained estimator is then close to the maximum-likelihood
    # fit, whose errors at x_o are those of a regression on the N training rows.
    torch.manual_seed(0)
    num_simulations, num_draws = 2000, 10_000
    theta, x = _simulations(num_simulations)
    build = density_estimator("gmm", num_components=1, hidden_dims=())
    npe = NPE(_prior(), density_estimator=build, show_progress_bars=False)
    estimator = npe.append_simulations(theta, x).train(
        training_batch_size=256, learning_rate=1e-2, stop_after_epochs=10, max_num_epochs=200
    )
    assert isinstance(estimator, ConditionalModelEstimator)
    x_o = torch.tensor([1.0, -0.5])
    posterior = npe.build_posterior()
    draws = posterior.sample((num_draws,), x=x_o, show_progress_bars=False)
    assert draws.shape == (num_draws, 2)

    # Standard errors of the fitted mean and standard deviation at x_o (regression with the
    # 90% of rows sbi trains on, leverage 1 + x_o' Sigma_x^-1 x_o), plus those of the draws.
    num_train = int(0.9 * num_simulations)
    leverage = 1 + float(x_o @ x_o) / X_VAR
    std = math.sqrt(POSTERIOR_VAR)
    mean_se = math.sqrt(POSTERIOR_VAR * leverage / num_train + POSTERIOR_VAR / num_draws)
    std_se = std * math.sqrt(leverage / (2 * num_train) + 1 / (2 * num_draws))
    truth = _true_posterior(x_o)
    assert torch.allclose(draws.mean(0), truth.mean, atol=5 * mean_se), (draws.mean(0), mean_se)
    assert torch.allclose(draws.std(0), truth.stddev, atol=5 * std_se), (draws.std(0), std_se)

    # log_prob is a normalized density near the truth: KL(q || p) from the draws, below what
    # errors of 5 standard errors in each mean and scale would give (about 0.06).
    log_q = posterior.log_prob(draws, x=x_o)
    assert log_q.shape == (num_draws,)
    kl = (log_q - truth.log_prob(draws)).mean()
    assert -0.01 < float(kl) < 0.06


@QUIET
@pytest.mark.parametrize(
    "model",
    ["gmm", "mixtureflow", "cwm", "rad"],
)
def test_npe_loop_runs_for_every_model(model):
    torch.manual_seed(0)
    theta, x = _simulations(300)
    build = density_estimator(model, **SMALL[model])
    npe = NPE(_prior(), density_estimator=build, show_progress_bars=False)
    estimator = npe.append_simulations(theta, x).train(max_num_epochs=2)
    assert isinstance(estimator, ConditionalDensityEstimator)
    posterior = npe.build_posterior()
    draws = posterior.sample((50,), x=x[0], show_progress_bars=False)
    assert draws.shape == (50, 2)
    log_prob = posterior.log_prob(draws, x=x[0])
    assert log_prob.shape == (50,)
    assert bool(torch.isfinite(log_prob).all())


@pytest.mark.parametrize("model", ["gmm", "rad"])
def test_estimator_shapes_follow_sbi(model):
    theta, x = _simulations(200)
    estimator = density_estimator(model, **SMALL[model])(theta, x)
    assert estimator.input_shape == (2,)
    assert estimator.condition_shape == (2,)
    # (sample, batch, D) against (batch, C), and a condition batch of 1 broadcast.
    assert estimator.log_prob(theta[:12].reshape(3, 4, 2), x[:4]).shape == (3, 4)
    assert estimator.log_prob(theta[:12].reshape(3, 4, 2), x[:1]).shape == (3, 4)
    # (batch, D) is one draw per batch element; conditions with a sample dimension.
    assert estimator.log_prob(theta[:4], x[:4]).shape == (1, 4)
    assert estimator.log_prob(theta[:12].reshape(3, 4, 2), x[:12].reshape(3, 4, 2)).shape == (
        3,
        4,
    )
    assert estimator.loss(theta[:5], x[:5]).shape == (5,)
    assert estimator.sample((7,), x[:3]).shape == (7, 3, 2)
    draws, log_prob = estimator.sample_and_log_prob((7,), x[:3])
    assert draws.shape == (7, 3, 2)
    assert log_prob.shape == (7, 3)
    torch.testing.assert_close(log_prob, estimator.log_prob(draws, x[:3]))
    # sbi pickles posteriors (and deep-copies the best state while training).
    copy = pickle.loads(pickle.dumps(estimator))
    torch.testing.assert_close(copy.log_prob(draws, x[:3]), log_prob)


def test_the_untrained_estimator_is_the_em_fit_with_the_z_scoring_jacobian():
    # Before training, q(theta | x) is the EM mixture of the standardized theta for every x;
    # in the units of theta its log density subtracts sum(log scale).
    theta, x = _simulations(500)
    theta = 3.0 + 10.0 * theta
    estimator = density_estimator("gmm", num_components=1)(theta, x)
    torch.testing.assert_close(estimator.input_loc, theta.mean(0))
    torch.testing.assert_close(estimator.input_scale, theta.std(0))
    fitted = Independent(Normal(theta.mean(0), theta.std(0, unbiased=False)), 1)
    log_prob = estimator.log_prob(theta[:6], x[[0, 1, 2, 3, 4, 5]])[0]
    torch.testing.assert_close(log_prob, fitted.log_prob(theta[:6]), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(log_prob, estimator.log_prob(theta[:6], x[:1])[0])


def test_z_scoring_options_and_embedding_net():
    theta, x = _simulations(200)
    x = 100.0 + 50.0 * x
    # "independent" without an embedding net: the model's own context standardization.
    estimator = density_estimator("gmm", **SMALL["gmm"])(theta, x)
    torch.testing.assert_close(estimator.net.context_standardizer.loc, x.mean(0))
    assert isinstance(estimator.embedding_net, nn.Identity)
    # With an embedding net, x is standardized before it, as in sbi.
    embedding = nn.Linear(2, 3)
    estimator = density_estimator("gmm", embedding_net=embedding, **SMALL["gmm"])(theta, x)
    assert estimator.net.context_dim == 3
    assert estimator.embedding_net[1] is embedding
    assert float(estimator.embedding_net[0](x).mean(0).abs().max()) < 1e-4
    assert estimator.sample((4,), x[:2]).shape == (4, 2, 2)
    # "structured": one location and scale for all entries; "none": the identity.
    estimator = density_estimator("gmm", z_score_x="structured", **SMALL["gmm"])(theta, x)
    standardize = estimator.embedding_net[0]
    torch.testing.assert_close(standardize.loc, x.mean().expand(2))
    estimator = density_estimator("gmm", z_score_theta=None, z_score_x="none", **SMALL["gmm"])(
        theta, x
    )
    torch.testing.assert_close(estimator.input_scale, torch.ones(2))
    torch.testing.assert_close(estimator.net.context_standardizer.scale, torch.ones(2))
    # Conditions with more than one dimension need an embedding net that flattens them.
    images = x.reshape(200, 1, 2)
    estimator = density_estimator("gmm", embedding_net=nn.Flatten(), **SMALL["gmm"])(theta, images)
    assert estimator.condition_shape == (1, 2)
    assert estimator.log_prob(theta[:6].reshape(3, 2, 2), images[:2]).shape == (3, 2)
    with pytest.raises(ValueError, match=r"contexts must have shape \(N, C\)"):
        density_estimator("gmm")(theta, images)


@QUIET
def test_nle_loop_runs_with_our_estimator():
    torch.manual_seed(0)
    theta, x = _simulations(300)
    build = likelihood_estimator("gmm", **SMALL["gmm"])
    nle = NLE(_prior(), density_estimator=build, show_progress_bars=False)
    estimator = nle.append_simulations(theta, x).train(max_num_epochs=2)
    # The estimator is q(x | theta): input x, condition theta.
    assert estimator.input_shape == (2,) and estimator.condition_shape == (2,)
    torch.testing.assert_close(estimator.input_loc, x[nle.train_indices].mean(0))
    # NLE's potential scores i.i.d. trials (trials, 1, D) against a batch of thetas (B, C).
    trials = x[:3].unsqueeze(1)
    assert estimator.log_prob(trials, theta[:5]).shape == (3, 5)
    parameters = MCMCPosteriorParameters(
        method="slice_np_vectorized", num_chains=2, warmup_steps=5, thin=1
    )
    posterior = nle.build_posterior(posterior_parameters=parameters)
    potential = posterior.potential(theta[:4], x=x[0])
    assert potential.shape == (4,)
    assert bool(torch.isfinite(potential).all())
    draws = posterior.sample((10,), x=x[0], show_progress_bars=False)
    assert draws.shape == (10, 2)


@pytest.mark.parametrize("model", ["gmm", "mixtureflow", "cwm"])
def test_mixtures_take_the_estimator_default_of_components(model):
    # NUM_COMPONENTS unless the caller gives num_components; RAD takes no such argument.
    theta, x = _simulations(100)
    small = {k: v for k, v in SMALL[model].items() if k != "num_components"}
    estimator = density_estimator(model, **small)(theta, x)
    components = estimator.net.base if model == "mixtureflow" else estimator.net
    assert components.num_components == NUM_COMPONENTS == 10
    estimator = density_estimator(model, **SMALL[model])(theta, x)
    components = estimator.net.base if model == "mixtureflow" else estimator.net
    assert components.num_components == SMALL[model]["num_components"]
    assert density_estimator("rad", **SMALL["rad"])(theta, x).net.context_dim == 2


def test_arguments_are_checked():
    theta, x = _simulations(100)
    with pytest.raises(ValueError, match=r"`model` must be one of \['cwm', 'gmm'"):
        density_estimator("maf")
    with pytest.raises(ValueError, match="`z_score_theta` must be 'independent', 'structured'"):
        density_estimator("gmm", z_score_theta="transform_to_unconstrained")
    with pytest.raises(ValueError, match="`z_score_theta` must be"):
        likelihood_estimator("gmm", z_score_theta="yes")
    with pytest.raises(TypeError, match=r"density_estimator\(\) sets context_dim"):
        density_estimator("gmm", context_dim=3)
    with pytest.raises(TypeError, match=r"`embedding_net` must be an nn\.Module"):
        density_estimator("gmm", embedding_net=lambda x: x)
    with pytest.raises(ValueError, match=r"`theta` must have shape \(N, D\)"):
        density_estimator("gmm")(theta.reshape(100, 1, 2), x)
    with pytest.raises(ValueError, match="one row per simulation"):
        density_estimator("gmm")(theta, x[:50])


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=Path(__file__).resolve().parents[1],
    )


def test_importing_the_package_does_not_import_sbi():
    result = _run(
        "import sys, pyro_mixflow, pyro_mixflow.nn, pyro_mixflow.io, pyro_mixflow.cli; "
        "print(sorted(m for m in sys.modules if m == 'sbi' or m.startswith('sbi.')))"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_a_missing_sbi_says_how_to_install_it():
    result = _run("import sys; sys.modules['sbi'] = None; import pyro_mixflow.sbi")
    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line == (
        'ImportError: pyro_mixflow.sbi needs the sbi package: pip install "pyro-mixflow[sbi]"'
    )
