"""The ``covariance`` option: diagonal, full and low-rank components in nn.GMM and the guides."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from sklearn.mixture import GaussianMixture
from torch.distributions import (
    Categorical,
    LowRankMultivariateNormal,
    MixtureSameFamily,
    MultivariateNormal,
)

from pyro_mixflow import (
    DiagNormalMixture,
    LowRankMultivariateNormalMixture,
    MultivariateNormalMixture,
)
from pyro_mixflow.fitting import em_factor_parameters, em_full, fit
from pyro_mixflow.infer import AutoGaussianMixture, AutoMixtureBaseFlow, RaoBlackwellELBO
from pyro_mixflow.io import load_model_file, save_model
from pyro_mixflow.nn import GMM

COVARIANCES = ["diag", "full", "lowrank"]
CLASSES = {
    "diag": DiagNormalMixture,
    "full": MultivariateNormalMixture,
    "lowrank": LowRankMultivariateNormalMixture,
}
C = 2  # context dimension
TILT = torch.tensor([[1.0, 0.0, 0.0], [0.8, 0.6, 0.0], [-0.3, 0.4, 0.5]], dtype=torch.float64)


def _data(dim: int = 3, n: int = 400, seed: int = 0) -> torch.Tensor:
    """Two tilted (correlated) clusters in ``dim`` dimensions, float64."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g, dtype=torch.float64) @ TILT[:dim, :dim].T
    x[: n // 2] += 3.0
    return x


def _context(n: int = 400, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 5.0 + 2.0 * torch.randn(n, C, generator=g, dtype=torch.float64)


def _gmm(covariance: str, dim: int = 3, conditional: bool = False, **kwargs: object) -> GMM:
    if conditional:
        kwargs = {"context_dim": C, "hidden_dims": (8,), **kwargs}
    return GMM(dim, 2, covariance=covariance, **kwargs).double()


def _by_hand(model: GMM) -> torch.distributions.Distribution:
    """The unconditional model's mixture, built with torch's own classes from its parameters."""
    locs, scales = model.locs.detach(), model.log_scales.detach().exp()
    weights = Categorical(logits=model.logits.detach())
    dim = model.input_dim
    if model.covariance == "diag":
        return MixtureSameFamily(weights, dist.Normal(locs, scales).to_event(1))
    factor = model.factor.detach()
    if model.covariance == "full":
        unit = torch.eye(dim, dtype=locs.dtype).repeat(len(locs), 1, 1)
        rows, cols = torch.tril_indices(dim, dim, -1)
        unit[:, rows, cols] = factor
        return MixtureSameFamily(
            weights, MultivariateNormal(locs, scale_tril=scales[..., None] * unit)
        )
    cov_factor = factor.unflatten(-1, (dim, model.rank)) * scales[..., None]
    return MixtureSameFamily(weights, LowRankMultivariateNormal(locs, cov_factor, scales.square()))


# ---------------------------------------------------------------- nn.GMM


@pytest.mark.parametrize("covariance", COVARIANCES)
def test_gmm_builds_the_chosen_class_and_matches_torch(covariance):
    torch.manual_seed(0)
    model = _gmm(covariance)
    with torch.no_grad():  # move every parameter off its start
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    d, x = model(), _data()
    assert type(d) is CLASSES[covariance]
    torch.testing.assert_close(d.log_prob(x), _by_hand(model).log_prob(x))
    torch.sin(d.rsample((8,))).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_gmm_full_starts_at_the_scikit_learn_fit():
    x = _data()
    model = _gmm("full").init_from_data(x, seed=1)
    em = GaussianMixture(2, covariance_type="full", max_iter=200, random_state=1).fit(x.numpy())
    with torch.no_grad():
        torch.testing.assert_close(model().log_prob(x), torch.from_numpy(em.score_samples(x)))


def test_gmm_lowrank_starts_at_the_probabilistic_pca_of_the_em_fit():
    """Rank D - 1 reproduces EM's full covariances exactly (the remaining eigenvalue is the
    noise); rank 1 keeps EM's means, weights and marginal variances."""
    x = _data()
    means, covariances, weights = (torch.as_tensor(a) for a in em_full(x, 2, seed=1))
    exact = _gmm("lowrank", rank=2).init_from_data(x, seed=1)
    with torch.no_grad():
        d = exact()
        torch.testing.assert_close(d.component_covariance_matrix, covariances)
        one = _gmm("lowrank", rank=1).init_from_data(x, seed=1)()
    torch.testing.assert_close(one.locs, means)
    torch.testing.assert_close(one.probs, weights)
    torch.testing.assert_close(
        one.component_covariance_matrix.diagonal(dim1=-2, dim2=-1),
        covariances.diagonal(dim1=-2, dim2=-1),
    )


def test_em_factor_parameters_default_rank_and_floor():
    """Rank D keeps the full covariance up to the floored diagonal."""
    x = _data()
    like = torch.zeros(2, 3, dtype=torch.float64)
    _, log_scales, factor, _ = em_factor_parameters(x, like, covariance="lowrank", rank=3)
    _, covariances, _ = em_full(x, 2)
    variances = (2 * log_scales).exp()
    torch.testing.assert_close(variances, 1e-3 * torch.as_tensor(covariances).diagonal(0, -2, -1))
    assert factor.shape == (2, 9)
    assert em_factor_parameters(x, like)[2].shape == (2, 0)


@pytest.mark.parametrize("covariance", COVARIANCES)
def test_conditional_gmm_starts_at_the_em_fit_for_every_context(covariance):
    x, c = _data(), _context()
    unconditional = _gmm(covariance).init_from_data(x, seed=1)
    model = _gmm(covariance, conditional=True).init_from_data(x, c, seed=1)
    with torch.no_grad():
        d = model(c[:7])
        assert type(d) is CLASSES[covariance] and d.batch_shape == (7,)
        expected = unconditional().log_prob(x[:7])
        torch.testing.assert_close(d.log_prob(x[:7]), expected)
        torch.testing.assert_close(model(-c[:7]).log_prob(x[:7]), expected)  # any context
    entries = {"diag": 0, "full": 3, "lowrank": 3 * (model.rank or 0)}[covariance]
    assert model.network[-1].out_features == 2 + 2 * 2 * 3 + 2 * entries


@pytest.mark.parametrize("conditional", [False, True], ids=["unconditional", "conditional"])
@pytest.mark.parametrize("covariance", ["full", "lowrank"])
def test_fit_reduces_the_loss(covariance, conditional):
    x, c = _data(), _context()
    torch.manual_seed(0)
    model = _gmm(covariance, conditional=conditional)
    args = (c,) if conditional else ()

    def loss() -> float:
        with torch.no_grad():
            return float(-model(*args).log_prob(x).mean())

    before = loss()
    fit(
        model,
        x,
        context=c if conditional else None,
        steps=30,
        lr=0.05,
        batch_size=len(x),
        validation=None,
        progress=False,
        seed=0,
    )
    assert loss() < before - 0.1, (before, loss())


@pytest.mark.parametrize("conditional", [False, True], ids=["unconditional", "conditional"])
@pytest.mark.parametrize("covariance", ["full", "lowrank"])
def test_save_and_load_round_trip(covariance, conditional, tmp_path):
    """A model file holds float32 parameters: the float32 model reloads exactly."""
    x, c = _data().float(), _context().float()
    torch.manual_seed(0)
    model = _gmm(
        covariance, conditional=conditional, **({"rank": 2} if covariance == "lowrank" else {})
    ).float()
    model.init_from_data(x, c if conditional else None)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    save_model(model, tmp_path / "m.pt")
    loaded = load_model_file(tmp_path / "m.pt")
    assert loaded.kwargs["covariance"] == covariance
    assert loaded.kwargs["rank"] == (2 if covariance == "lowrank" else None)
    args = (c[:5],) if conditional else ()
    with torch.no_grad():
        assert torch.equal(loaded.model(*args).log_prob(x[:5]), model(*args).log_prob(x[:5]))


def test_gmm_default_rank_is_pyros():
    assert GMM(2, 2, covariance="lowrank").rank == 1
    assert GMM(9, 2, covariance="lowrank").factor.shape == (2, 27)  # round(sqrt(9)) = 3
    assert GMM(3, 2, covariance="full").factor.shape == (2, 3)
    assert not hasattr(GMM(3, 2), "factor")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"covariance": "spherical"}, r"`covariance` must be one of 'diag', 'full', 'lowrank'"),
        ({"covariance": "lowrank", "rank": 0}, "`rank` must be None or a positive integer"),
        (
            {"covariance": "lowrank", "rank": 4},
            r"`rank` \(4\) must be at most the dimension D \(3\)",
        ),
        ({"covariance": "full", "rank": 2}, "`rank` applies only to `covariance='lowrank'`"),
        ({"rank": 2}, "`rank` applies only to `covariance='lowrank'`"),
        (
            {"covariance": "full", "estimator": "gumbel_softmax"},
            "`covariance='full'` needs `estimator='exact'`",
        ),
    ],
)
def test_gmm_rejects_bad_covariance_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GMM(3, 2, **kwargs)
    with pytest.raises(ValueError, match=match):
        GMM(3, 2, context_dim=2, **kwargs)


# ---------------------------------------------------------------- guides

SIGMA = torch.tensor([[1.0, 0.9], [0.9, 1.0]], dtype=torch.float64)
TRUE_LOC = torch.tensor([1.0, -1.0], dtype=torch.float64)


def correlated_model():
    """A correlated 2-D Gaussian posterior N(TRUE_LOC, SIGMA), written with a plated factor."""
    x = pyro.sample("x", dist.Normal(torch.zeros(2, dtype=torch.float64), 10.0).to_event(1))
    with pyro.plate("data", 1):
        pyro.factor(
            "likelihood",
            MultivariateNormal(TRUE_LOC, SIGMA).log_prob(x)
            - dist.Normal(torch.zeros(2, dtype=torch.float64), 10.0).log_prob(x).sum(-1),
        )


def plated_model(data=torch.tensor([0.3, -1.2, 2.1, 0.8, -0.4], dtype=torch.float64)):
    loc = pyro.sample("loc", dist.Normal(torch.tensor(0.0, dtype=torch.float64), 2.0))
    scale = pyro.sample("scale", dist.LogNormal(torch.tensor(0.0, dtype=torch.float64), 0.5))
    with pyro.plate("data", len(data)):
        pyro.sample("obs", dist.Normal(loc, scale), obs=data)


GUIDE_CLASSES = [AutoGaussianMixture, AutoMixtureBaseFlow]


@pytest.mark.parametrize("loss", ["rao_blackwell", "trace"])
@pytest.mark.parametrize("covariance", ["full", "lowrank"])
@pytest.mark.parametrize("cls", GUIDE_CLASSES, ids=lambda c: c.__name__)
def test_guides_train_with_both_elbos(cls, covariance, loss):
    pyro.set_rng_seed(0)
    guide = cls(plated_model, num_components=2, covariance=covariance)
    elbo = (
        RaoBlackwellELBO(2) if loss == "rao_blackwell" else Trace_ELBO(4, vectorize_particles=True)
    )
    svi = SVI(plated_model, guide, pyro.optim.Adam({"lr": 0.01}), elbo)
    assert math.isfinite(svi.step())
    posterior = guide.get_posterior()
    base = getattr(posterior, "base_dist", posterior)
    assert type(base) is CLASSES[covariance]
    before = {k: v.detach().clone() for k, v in guide.named_parameters()}
    assert math.isfinite(svi.step())
    changed = {k for k, v in guide.named_parameters() if not torch.equal(v.detach(), before[k])}
    assert "factor_unconstrained" in before and changed == set(before), set(before) - changed


@pytest.mark.parametrize("covariance", ["full", "lowrank"])
def test_guide_starts_at_the_diagonal_start(covariance):
    """The same tempered start as the diagonal guide: same means, same marginal scales."""
    pyro.set_rng_seed(0)
    diagonal = AutoGaussianMixture(plated_model, num_components=3)
    diagonal()
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoGaussianMixture(plated_model, num_components=3, covariance=covariance)
    guide()
    with torch.no_grad():
        start = guide.get_posterior()
        torch.testing.assert_close(start.locs, diagonal.locs)
        torch.testing.assert_close(start.variance, diagonal.get_posterior().variance)
        if covariance == "lowrank":  # small but not zero: its gradient vanishes at zero
            assert 0 < guide.factor.abs().max() < 0.5


@pytest.mark.parametrize("covariance", ["full", "lowrank"])
def test_guide_quantiles_use_the_marginal_scales(covariance):
    """On a hand-set correlated mixture, the quantiles are those of the exact marginals."""
    pyro.set_rng_seed(0)
    guide = AutoGaussianMixture(correlated_model, num_components=2, covariance=covariance)
    guide()
    with torch.no_grad():
        guide.factor.add_(torch.tensor([[1.5], [-0.7]], dtype=guide.factor.dtype))
    probs = [0.1, 0.5, 0.9]
    q = guide.quantiles(probs)["x"]  # [Q, 2]
    posterior = guide.get_posterior()
    sd = posterior.component_covariance_matrix.diagonal(dim1=-2, dim2=-1).sqrt()  # [K, D]
    cdf = (posterior.probs[:, None] * dist.Normal(posterior.locs, sd).cdf(q[:, None])).sum(-2)
    torch.testing.assert_close(cdf, torch.tensor(probs, dtype=cdf.dtype)[:, None].expand(3, 2))
    assert torch.equal(guide.median()["x"], q[1])


@pytest.mark.slow
def test_full_covariance_guide_recovers_a_correlated_posterior():
    """A one-component full-covariance guide on N(TRUE_LOC, SIGMA) (correlation 0.9), whose
    optimum is exact: covariance, median and a quantile after 1500 Rao-Blackwellized steps
    (learning rate decayed from 0.1 to 0.001). The diagonal guide cannot fit it."""
    pyro.set_rng_seed(0)
    guide = AutoGaussianMixture(correlated_model, num_components=1, covariance="full")
    optim = pyro.optim.ClippedAdam({"lr": 0.1, "lrd": 0.01 ** (1 / 1500)})
    svi = SVI(correlated_model, guide, optim, RaoBlackwellELBO(8))
    for _ in range(1500):
        svi.step()
    with torch.no_grad():
        covariance = guide.get_posterior().covariance_matrix
    torch.testing.assert_close(covariance, SIGMA, atol=0.1, rtol=0)
    torch.testing.assert_close(guide.median()["x"], TRUE_LOC, atol=0.1, rtol=0)
    q = guide.quantiles([0.1587])["x"][0]  # one marginal standard deviation below
    torch.testing.assert_close(q, TRUE_LOC - 1.0, atol=0.1, rtol=0)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"covariance": "dense"}, ValueError, "`covariance` must be one of"),
        ({"covariance": "lowrank", "rank": -1}, ValueError, "`rank` must be None or a positive"),
        ({"covariance": "full", "rank": 1}, ValueError, "`rank` applies only to"),
        (
            {"covariance": "lowrank", "estimator": "straight_through"},
            ValueError,
            "`covariance='lowrank'` needs `estimator='exact'`",
        ),
    ],
)
@pytest.mark.parametrize("cls", GUIDE_CLASSES, ids=lambda c: c.__name__)
def test_guides_reject_bad_covariance_arguments(cls, kwargs, error, match):
    with pytest.raises(error, match=match):
        cls(plated_model, **kwargs)


def test_guide_rank_above_the_latent_dimension_fails_at_the_first_call():
    guide = AutoGaussianMixture(plated_model, num_components=2, covariance="lowrank", rank=3)
    with pytest.raises(ValueError, match=r"`rank` \(3\) must be at most the dimension D \(2\)"):
        guide()
