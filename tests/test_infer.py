"""Mixture autoguides and the Rao-Blackwellized ELBO (pyro_mixflow.infer)."""

from __future__ import annotations

import inspect
import math
from functools import partial

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions import constraints
from pyro.infer import SVI, Predictive, Trace_ELBO
from pyro.infer.autoguide import AutoDiagonalNormal, AutoNormal
from pyro.infer.autoguide.initialization import init_to_mean
from pyro.infer.importance import vectorized_importance_weights

from pyro_mixflow import DiagNormalMixture
from pyro_mixflow.infer import (
    AutoClassifierWeightedMixture,
    AutoGaussianMixture,
    AutoMixtureBaseFlow,
    AutoRADFlow,
    RaoBlackwellELBO,
)
from pyro_mixflow.infer._auto_mixture import (
    InitOptions,
    _fit_without_stragglers,
    _tempered_start,
    _tempering_power,
    init_to_median_or_origin,
)
from tests.conftest import Z_THRESHOLD

DATA = torch.tensor([0.3, -1.2, 2.1, 0.8, -0.4], dtype=torch.float64)

GUIDES = {
    "gaussian_mixture": lambda model: AutoGaussianMixture(model, num_components=3),
    "mixture_base_flow": lambda model: AutoMixtureBaseFlow(model, num_components=3),
    "cwm": lambda model: AutoClassifierWeightedMixture(model, num_components=3, hidden_dims=(8,)),
}


def plated_model(data=DATA):
    """A global real latent, a positive latent (biject_to) and a plate of observations."""
    loc = pyro.sample("loc", dist.Normal(torch.tensor(0.0, dtype=torch.float64), 2.0))
    scale = pyro.sample("scale", dist.LogNormal(torch.tensor(0.0, dtype=torch.float64), 0.5))
    with pyro.plate("data", len(data)):
        pyro.sample("obs", dist.Normal(loc, scale), obs=data)


def _perturbed(guide, seed=0):
    """Sets up ``guide`` in float64 and moves every parameter off its symmetric start."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        guide(DATA)
        guide.double()
        with torch.no_grad():
            for p in guide.parameters():
                p.add_(0.3 * torch.randn_like(p))
    return guide


@pytest.mark.parametrize("name", list(GUIDES))
def test_rao_blackwell_elbo_matches_brute_force_monte_carlo(name):
    """The RB estimate and plain importance weights (log p - log q of guide draws) agree."""
    guide = _perturbed(GUIDES[name](plated_model))
    torch.manual_seed(1)
    with torch.no_grad():
        terms = RaoBlackwellELBO(num_particles=20000).elbo_terms(plated_model, guide, DATA)
        log_w, _, _ = vectorized_importance_weights(
            plated_model, guide, DATA, num_samples=100000, max_plate_nesting=1
        )
    z = (terms.mean() - log_w.mean()) / math.sqrt(
        terms.var() / len(terms) + log_w.var() / len(log_w)
    )
    assert abs(z) < Z_THRESHOLD, (terms.mean().item(), log_w.mean().item())


def _exact_elbo(guide, size=601, width=9.0):
    """The ELBO of ``plated_model`` by quadrature over the 2-D unconstrained latent."""
    posterior = guide.get_posterior()
    lower = (posterior.locs - width * posterior.scales).min(0).values.detach()
    upper = (posterior.locs + width * posterior.scales).max(0).values.detach()
    axes = [
        torch.linspace(a, b, size, dtype=torch.float64) for a, b in zip(lower, upper, strict=True)
    ]
    u = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 2)
    loc, log_scale = u[:, 0], u[:, 1]
    log_joint = (
        dist.Normal(0.0, 2.0).log_prob(loc)
        + dist.LogNormal(0.0, 0.5).log_prob(log_scale.exp())
        + dist.Normal(loc[:, None], log_scale.exp()[:, None]).log_prob(DATA).sum(-1)
        + log_scale  # log |d scale / d log_scale|
    )
    log_q = posterior.log_prob(u)
    cell = (axes[0][1] - axes[0][0]) * (axes[1][1] - axes[1][0])
    return (log_q.exp() * (log_joint - log_q)).sum() * cell


@pytest.mark.slow
@pytest.mark.parametrize("stick_the_landing", [False, True])
def test_rao_blackwell_gradient_is_unbiased(stick_the_landing):
    """The mean RB gradient equals the gradient of the ELBO computed by quadrature, with the
    entropy's score term or without it (sticking the landing)."""
    guide = _perturbed(AutoGaussianMixture(plated_model, num_components=3))
    params = list(guide.parameters())
    exact = torch.cat([g.reshape(-1) for g in torch.autograd.grad(_exact_elbo(guide), params)])
    loss = RaoBlackwellELBO(num_particles=64, stick_the_landing=stick_the_landing)
    torch.manual_seed(2)
    draws = []
    for _ in range(100):
        grads = torch.autograd.grad(-loss.differentiable_loss(plated_model, guide, DATA), params)
        draws.append(torch.cat([g.reshape(-1) for g in grads]))
    rb = torch.stack(draws)
    se = rb.std(0) / math.sqrt(len(rb))
    z = (rb.mean(0) - exact) / se
    assert z.abs().max() < Z_THRESHOLD, z
    # Power: a 10% error in the weights' gradient (the last K entries) would be caught.
    weights = slice(-guide.num_components, None)
    assert bool((0.1 * exact[weights].abs() > Z_THRESHOLD * se[weights]).any())


def test_sticking_the_landing_has_no_gradient_noise_at_the_posterior():
    """Where the guide is the posterior, log p - log q is constant: without the score term
    every draw's gradient is zero; with it (the default), each draw's is not."""

    def model():
        pyro.sample("x", dist.Normal(torch.tensor(0.0, dtype=torch.float64), 1.0))

    guide = AutoGaussianMixture(model, num_components=2)
    guide()
    guide.double()
    with torch.no_grad():
        guide.locs.zero_()  # both components N(0, 1): q is the posterior
        guide.scales = torch.ones(2, 1, dtype=torch.float64)
    params = list(guide.parameters())
    torch.manual_seed(0)
    for stick_the_landing, noisy in ((True, False), (False, True)):
        elbo = RaoBlackwellELBO(num_particles=4, stick_the_landing=stick_the_landing)
        loss = elbo.differentiable_loss(model, guide)
        largest = max(g.abs().max() for g in torch.autograd.grad(loss, params))
        assert (largest > 1e-3) == noisy, (stick_the_landing, largest)
    with pytest.raises(TypeError, match="`stick_the_landing` must be a bool"):
        RaoBlackwellELBO(stick_the_landing=1)


def test_enumerated_joint_density_would_be_wrong():
    """What the RB ELBO avoids: scoring a branch by log w_k + log q_k instead of log q."""
    guide = _perturbed(AutoGaussianMixture(plated_model, num_components=3))
    torch.manual_seed(3)
    with torch.no_grad():
        posterior = guide.get_posterior()
        values, log_weights = posterior.rao_blackwell((20000,))
        mixture = posterior.rao_blackwell_log_prob(values, log_weights)
        component = dist.Normal(posterior.locs, posterior.scales).log_prob(values).sum(-1)
        joint = (log_weights.exp() * (log_weights + component)).sum(-1)
    gap = (mixture - joint).mean()  # the mutual information between index and value
    assert 0 < gap <= -(log_weights[0].exp() * log_weights[0]).sum() + 1e-9


@pytest.mark.slow
def test_mixture_guide_finds_both_modes_with_the_right_shares():
    """A bimodal 1-D target (weights 0.3 / 0.7, log Z = 0): shares and ELBO after training."""
    target = DiagNormalMixture(
        torch.tensor([[-3.0], [3.0]]), torch.ones(2, 1), torch.tensor([0.3, 0.7]).log()
    )

    def model():
        x = pyro.sample("x", dist.Normal(0.0, 4.0).expand([1]).to_event(1))
        pyro.factor("target", target.log_prob(x) - dist.Normal(0.0, 4.0).log_prob(x).sum(-1))

    pyro.set_rng_seed(0)
    guide = AutoGaussianMixture(model, num_components=4)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), RaoBlackwellELBO(num_particles=4))
    for _ in range(600):
        svi.step()
    with torch.no_grad():
        draws = guide.get_posterior().sample((20000,))
        share = (draws[:, 0] > 0).double().mean()
        terms = RaoBlackwellELBO(num_particles=4000).elbo_terms(model, guide)
    assert abs(share - 0.7) < 0.03
    assert -0.05 < terms.mean() <= Z_THRESHOLD * terms.std() / math.sqrt(len(terms))


@pytest.mark.parametrize("name", list(GUIDES))
def test_guides_train_under_plates_with_constrained_latents(name):
    pyro.set_rng_seed(0)
    guide = GUIDES[name](plated_model)
    svi = SVI(plated_model, guide, pyro.optim.Adam({"lr": 0.01}), RaoBlackwellELBO(4))
    losses = [svi.step(DATA) for _ in range(3)]
    assert all(math.isfinite(v) for v in losses)
    before = {k: v.detach().clone() for k, v in guide.named_parameters()}
    svi.step(DATA)
    changed = {k for k, v in guide.named_parameters() if not torch.equal(v.detach(), before[k])}
    assert changed == set(before), set(before) - changed  # every parameter gets a gradient
    samples = Predictive(plated_model, guide=guide, num_samples=7)(DATA)
    assert samples["scale"].shape == (7, 1) and bool((samples["scale"] > 0).all())
    assert samples["obs"].shape == (7, len(DATA))


@pytest.mark.parametrize(
    "make_guide",
    [
        *(
            partial(AutoGaussianMixture, num_components=3, estimator=estimator)
            for estimator in ("exact", "gumbel_softmax", "straight_through")
        ),
        partial(AutoMixtureBaseFlow, num_components=3),
    ],
    ids=["exact", "gumbel_softmax", "straight_through", "mixture_base_flow"],
)
def test_guides_with_vectorized_trace_elbo(make_guide):
    pyro.set_rng_seed(0)
    guide = make_guide(plated_model)
    elbo = Trace_ELBO(num_particles=8, vectorize_particles=True)
    svi = SVI(plated_model, guide, pyro.optim.Adam({"lr": 0.01}), elbo)
    assert math.isfinite(svi.step(DATA))


def test_components_do_not_start_on_top_of_each_other():
    pyro.set_rng_seed(0)
    guide = AutoGaussianMixture(plated_model, num_components=5)
    guide(DATA)
    distances = torch.cdist(guide.locs.detach(), guide.locs.detach())
    assert distances[~torch.eye(5, dtype=torch.bool)].min() > 0.05


def test_tempering_power_reaches_the_requested_effective_sample_size():
    log_likelihood = -0.5 * torch.linspace(-30.0, 30.0, 1001, dtype=torch.float64).square()
    beta = _tempering_power(log_likelihood, 0.1)
    weights = (beta * log_likelihood).softmax(0)
    assert 0 < beta < 1 and abs(1 / weights.square().sum() / 1001 - 0.1) < 1e-6
    assert _tempering_power(torch.zeros(50, dtype=torch.float64), 0.1) == 1.0  # prior only


def test_tempered_start_matches_the_conjugate_posterior():
    """K = 1 on a conjugate model: the start is the tempered posterior's mean and its
    standard deviation times sqrt(beta), within the error of ~ESS = 100 effective draws."""
    data = 2.0 + torch.randn(40, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def model():
        mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=torch.float64), 10.0))
        with pyro.plate("data", len(data)):
            pyro.sample("obs", dist.Normal(mu, 1.0), obs=data)

    pyro.set_rng_seed(0)
    guide = AutoGaussianMixture(model, num_components=1)
    guide._setup_prototype()
    start = _tempered_start(guide, 1000, 0.1, (), {})
    precision = 0.01 + len(data) * start.beta  # the tempered posterior N(mean, 1 / precision)
    mean = start.beta * data.sum() / precision
    scale = math.sqrt(start.beta / precision)  # ~ the exact posterior's (1 / 40.01) ** 0.5
    assert abs(scale * math.sqrt(40.01) - 1) < 0.01
    num_effective = 100
    z_loc = (start.locs[0, 0] - mean) / math.sqrt(1 / precision / num_effective)
    z_scale = (start.scales[0, 0] / scale - 1) / math.sqrt(1 / (2 * num_effective))
    assert 0 < start.beta < 1
    assert abs(z_loc) < Z_THRESHOLD and abs(z_scale) < Z_THRESHOLD, (z_loc, z_scale)


def _four_narrow_modes():
    """Four modes of scale 0.1 at (±6, ±6) under a N(0, 20²) prior."""
    modes = torch.tensor([[6.0, 6.0], [-6.0, 6.0], [-6.0, -6.0], [6.0, -6.0]])
    target = DiagNormalMixture(modes, torch.full((4, 2), 0.1), torch.zeros(4))

    def model():
        prior = dist.Normal(torch.zeros(2), 20.0).to_event(1)
        x = pyro.sample("x", prior)
        pyro.factor("target", target.log_prob(x) - prior.log_prob(x))

    return model, modes


@pytest.mark.parametrize(("init_ess", "covered"), [(0.1, True), (0.9, False)])
def test_components_start_near_every_narrow_mode(init_ess, covered):
    """Tempered to 10 % effective draws, every mode gets a component within 3 (15 % of the
    prior's scale); nearly untempered (90 %), the start stays spread over the prior."""
    model, modes = _four_narrow_modes()
    pyro.set_rng_seed(0)
    guide = AutoGaussianMixture(model, num_components=8, init_ess=init_ess)
    guide()
    nearest = torch.cdist(modes, guide.locs.detach()).min(1).values
    assert bool((nearest < 3.0).all()) == covered, nearest


def test_start_survives_impossible_likelihoods():
    def model():
        x = pyro.sample("x", dist.Normal(0.0, 1.0))
        pyro.factor("cut", torch.where(x > 0, 0.0, -math.inf))

    pyro.set_rng_seed(0)
    guide = AutoGaussianMixture(model, num_components=3)
    guide()  # draws with x <= 0 are dropped
    assert bool((guide.locs > 0).all())
    assert bool(torch.isfinite(guide.scales).all()) and bool((guide.scales > 0).all())

    def impossible():
        pyro.sample("x", dist.Normal(0.0, 1.0))
        pyro.factor("never", torch.tensor(-math.inf))

    pyro.clear_param_store()
    guide = AutoGaussianMixture(impossible, num_components=3)
    guide()  # falls back to the prior draws
    assert bool(torch.isfinite(guide.scales).all())


def test_initial_fit_spends_no_component_on_single_far_draws():
    """Three far outliers and a blob: EM puts components on the outliers; those are dropped
    and the heaviest components split, which keeps the mixture's mean and variance."""
    generator = torch.Generator().manual_seed(0)
    blob = torch.randn(500, 2, generator=generator, dtype=torch.float64)
    outliers = torch.tensor([[300.0, 0.0], [0.0, -500.0], [-400.0, 400.0]], dtype=torch.float64)
    draws = torch.cat([blob, outliers])
    means, variances, weights = _fit_without_stragglers(draws, draws, 6, 0)
    assert means.shape == variances.shape == (6, 2) and abs(float(weights.sum()) - 1) < 1e-12
    assert float(means.abs().max()) < 5.0  # nothing left on an outlier
    mixture = DiagNormalMixture(means, variances.sqrt(), weights.log())
    # EM matches the moments of the points it explains; splitting preserves them
    assert torch.allclose(mixture.mean, blob.mean(0), atol=0.02)
    assert torch.allclose(mixture.variance, blob.var(0), rtol=0.05)


def _funnel_model():
    v = pyro.sample("v", dist.Normal(0.0, 3.0))
    scale = (v / 2).exp()[..., None].expand(*v.shape, 9)
    pyro.sample("x", dist.Normal(torch.zeros(9), scale).to_event(1))


@pytest.mark.slow
def test_default_guide_fits_neals_funnel():
    """10-D funnel (log Z = 0): the default guide's ELBO after 1500 steps. With components
    started on single far prior draws it ended below -0.9 after 3000 (benchmarks/svi.py)."""
    pyro.set_rng_seed(0)
    guide = AutoGaussianMixture(_funnel_model)
    svi = SVI(_funnel_model, guide, pyro.optim.Adam({"lr": 5e-3}), RaoBlackwellELBO(1))
    for _ in range(1500):
        svi.step()
    with torch.no_grad():
        terms = RaoBlackwellELBO(num_particles=2000).elbo_terms(_funnel_model, guide)
    assert terms.mean() > -0.5, float(terms.mean())


def test_quantiles_of_gaussian_mixture_are_exact():
    guide = _perturbed(AutoGaussianMixture(plated_model, num_components=3))
    probs = [0.05, 0.5, 0.95]
    result = guide.quantiles(probs)
    posterior = guide.get_posterior()
    for i, p in enumerate(probs):
        u = torch.stack([result["loc"][i], result["scale"][i].log()])  # unconstrained
        cdf = (
            posterior.probs.unsqueeze(-1) * dist.Normal(posterior.locs, posterior.scales).cdf(u)
        ).sum(0)
        assert torch.allclose(cdf, torch.tensor(p, dtype=cdf.dtype), atol=1e-9)
    median = guide.median()
    assert torch.equal(median["loc"], result["loc"][1])


def test_monte_carlo_quantiles_of_flow_guide():
    guide = _perturbed(AutoMixtureBaseFlow(plated_model, num_components=3))
    torch.manual_seed(0)
    q = guide.quantiles([0.1, 0.9])
    assert q["loc"].shape == (2,) and bool(q["loc"][0] < q["loc"][1])
    draws = guide.get_posterior().sample((20000,))[:, 0]
    share = ((draws > q["loc"][0]) & (draws < q["loc"][1])).double().mean()
    assert abs(share - 0.8) < Z_THRESHOLD * math.sqrt(0.16 / 20000) + 0.01  # 10k-draw quantiles


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_components": 0}, "`num_components` must be a positive integer"),
        ({"estimator": "score"}, "`estimator` must be one of"),
        ({"temperature": 0.0}, "`temperature` must be a positive number"),
        ({"init_scale": -1.0}, "`init_scale` must be None or a positive number"),
        ({"init_ess": 0.0}, r"`init_ess` must be a number in \(0, 1\)"),
        ({"init_ess": 1.0}, r"`init_ess` must be a number in \(0, 1\)"),
        ({"init_spread": -1.0}, "`init_spread` must be a non-negative number"),
    ],
)
def test_invalid_guide_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AutoGaussianMixture(plated_model, **kwargs)


def test_rao_blackwell_elbo_rejects_guides_it_cannot_use():
    with pytest.raises(TypeError, match="found no index to sum out in <lambda>"):
        RaoBlackwellELBO().loss(plated_model, lambda data: None, DATA)
    with pytest.raises(TypeError, match="has no `rao_blackwell`"):
        RaoBlackwellELBO().loss(plated_model, AutoDiagonalNormal(plated_model), DATA)
    with pytest.raises(ValueError, match="`num_particles` must be positive"):
        RaoBlackwellELBO(0)
    with pytest.raises(TypeError, match="found no index to sum out in AutoNormal"):
        RaoBlackwellELBO().loss(plated_model, AutoNormal(plated_model), DATA)


def test_rao_blackwell_elbo_rejects_uncovered_latents():
    def model():
        pyro.sample("x", dist.Normal(0.0, 1.0))
        pyro.sample("k", dist.Bernoulli(0.5), infer={"enumerate": "parallel"})

    guide = AutoGaussianMixture(pyro.poutine.block(model, hide=["k"]), num_components=2)
    with pytest.raises(ValueError, match="'k' is neither observed nor a latent of the guide"):
        RaoBlackwellELBO().loss(model, guide)


def test_rad_flow_guide_trains_with_trace_elbo_under_plates():
    pyro.set_rng_seed(0)
    guide = AutoRADFlow(plated_model, num_pieces=3, num_layers=2, hidden_dims=(8,))
    elbo = Trace_ELBO(num_particles=4, vectorize_particles=True)
    svi = SVI(plated_model, guide, pyro.optim.Adam({"lr": 0.01}), elbo)
    svi.step(DATA)
    before = {k: v.detach().clone() for k, v in guide.named_parameters()}
    assert math.isfinite(svi.step(DATA))
    changed = {k for k, v in guide.named_parameters() if not torch.equal(v.detach(), before[k])}
    assert {"shift_unconstrained", "scale_unconstrained"} <= changed
    assert any(k.startswith("layers.") for k in changed)
    samples = Predictive(plated_model, guide=guide, num_samples=5)(DATA)
    assert bool((samples["scale"] > 0).all())
    q = guide.quantiles([0.25, 0.75])
    assert bool(q["loc"][0] < q["loc"][1])


def test_rad_flow_guide_scores_its_draws_along_their_path():
    """Pyro passes the guide's draw back to ``log_prob`` unchanged: the ELBO reads the
    log-density of the path that drew it (a fresh pass can read another piece)."""
    pyro.set_rng_seed(0)
    guide = AutoRADFlow(plated_model, num_pieces=3, num_layers=2, hidden_dims=(8,))
    guide(DATA)
    trace = pyro.poutine.trace(guide).get_trace(DATA)
    site = trace.nodes["_AutoRADFlow_latent"]
    assert site["fn"].log_prob(site["value"]) is site["fn"]._last_draw[1]


def test_rad_flow_guide_needs_two_coordinates():
    def model():
        pyro.sample("x", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="at least 2 unconstrained latent coordinates"):
        AutoRADFlow(model)()
    with pytest.raises(ValueError, match="`network` must be one of"):
        AutoRADFlow(model, network="resnet")


MIXTURE_GUIDES = [AutoGaussianMixture, AutoMixtureBaseFlow, AutoClassifierWeightedMixture]
INVALID_INIT_OPTIONS = [
    ({"init_scale": -1.0}, ValueError, "`init_scale` must be None or a positive number"),
    ({"init_scale": True}, ValueError, "`init_scale` must be None or a positive number"),
    ({"init_ess": 0.0}, ValueError, r"`init_ess` must be a number in \(0, 1\)"),
    ({"init_ess": 1.0}, ValueError, r"`init_ess` must be a number in \(0, 1\)"),
    ({"init_spread": -1.0}, ValueError, "`init_spread` must be a non-negative number"),
    ({"quantile_samples": 0}, ValueError, "`quantile_samples` must be a positive integer"),
    ({"init_loc_fn": 3}, TypeError, "`init_loc_fn` must be callable, got int"),
]


@pytest.mark.parametrize("cls", MIXTURE_GUIDES)
@pytest.mark.parametrize(("kwargs", "error", "match"), INVALID_INIT_OPTIONS)
def test_every_mixture_guide_checks_its_init_options(cls, kwargs, error, match):
    with pytest.raises(error, match=match):
        cls(plated_model, **kwargs)


@pytest.mark.parametrize("cls", MIXTURE_GUIDES)
def test_every_mixture_guide_validates_its_init_options_once(cls, monkeypatch):
    checks = []
    check = InitOptions.__post_init__
    monkeypatch.setattr(InitOptions, "__post_init__", lambda self: checks.append(check(self)))
    guide = cls(plated_model, init_loc_fn=init_to_mean, init_scale=2, init_ess=0.2)
    assert len(checks) == 1
    assert guide._init_options == InitOptions(init_to_mean, 2.0, 1.0, 0.2, "tempered", 10000)


@pytest.mark.parametrize("cls", MIXTURE_GUIDES)
def test_mixture_guide_defaults_are_the_documented_ones(cls):
    """16 components for every mixture guide; the init options' defaults as documented."""
    assert inspect.signature(cls).parameters["num_components"].default == 16
    guide = cls(plated_model)
    assert guide._init_options == InitOptions()
    assert InitOptions() == InitOptions(init_to_median_or_origin, None, 1.0, 0.1, "tempered", 10000)
    documented = inspect.getdoc(AutoGaussianMixture)
    for field, default in [
        ("init_loc_fn", "init_to_median_or_origin"),
        ("init_scale", "None"),
        ("init_spread", "1.0"),
        ("init_ess", "0.1"),
        ("init_method", '"tempered"'),
        ("quantile_samples", "10000"),
    ]:
        assert f"``{field}`` (``{default}``)" in documented


@pytest.mark.parametrize("cls", MIXTURE_GUIDES)
def test_mixture_guides_reject_unknown_options_by_name(cls):
    with pytest.raises(TypeError, match=rf"^{cls.__name__}\(\) got an unexpected keyword argument"):
        cls(plated_model, init_spred=1.0)


def test_rad_flow_guide_checks_the_shared_options():
    with pytest.raises(ValueError, match="`quantile_samples` must be a positive integer"):
        AutoRADFlow(plated_model, quantile_samples=0)
    with pytest.raises(TypeError, match="`init_loc_fn` must be callable"):
        AutoRADFlow(plated_model, init_loc_fn=None)


@pytest.mark.parametrize("cls", [AutoGaussianMixture, AutoMixtureBaseFlow])
def test_guides_build_the_chosen_estimator(cls):
    guide = cls(plated_model, num_components=2, estimator="straight_through", temperature=0.3)
    guide(DATA)
    posterior = guide.get_posterior()
    base = getattr(posterior, "base_dist", posterior)
    assert type(base).__name__ == "GumbelSoftmaxMixture"
    assert base.straight_through and base.temperature == 0.3


def test_init_options_typed_dict_names_the_validated_options():
    """The type checkers' view of `**init_options` and the validated options cannot drift."""
    import dataclasses
    import typing

    from pyro_mixflow.infer._auto_mixture import InitKwargs, InitOptions

    assert typing.get_type_hints(InitKwargs) == typing.get_type_hints(InitOptions)
    assert list(InitKwargs.__annotations__) == [f.name for f in dataclasses.fields(InitOptions)]


def _absolute_value_model():
    """theta ~ N(0, 5^2), y_i ~ N(|theta|, 1): two mirror-image modes of equal mass."""
    y = 2.0 + torch.randn(20, generator=torch.Generator().manual_seed(0))
    theta = pyro.sample("theta", dist.Normal(0.0, 5.0))
    with pyro.plate("data", 20):
        pyro.sample("y", dist.Normal(theta.abs(), 1.0), obs=y)


@pytest.mark.parametrize("seed", range(4))
def test_mixture_base_flow_starts_as_its_base_in_one_dimension(seed):
    """The default 1-D spline starts at the identity: the guide's density is its base's (Pyro's
    random spline start put every draw on one mode for seeds 1 to 3)."""
    pyro.set_rng_seed(seed)
    guide = AutoMixtureBaseFlow(_absolute_value_model)
    guide()
    with torch.no_grad():
        posterior = guide.get_posterior()
        u = torch.linspace(-6.0, 6.0, 241).unsqueeze(-1)
        base = posterior.base_dist.log_prob((u - guide.center) / guide.spread)
        expected = base - guide.spread.log().sum()
        # within Pyro's minimum spline derivative (1e-3 in the log-Jacobian), and float32
        # rounding of the far tails' large log-densities
        torch.testing.assert_close(posterior.log_prob(u), expected, atol=2e-3, rtol=2e-4)


FOUR_MODES = torch.tensor([[4.0, 4.0], [-4.0, 4.0], [-4.0, -4.0], [4.0, -4.0]])


def _flat_prior_four_modes():
    """The four-mode target of benchmarks/svi.py with an improper flat prior."""
    target = DiagNormalMixture(
        FOUR_MODES, torch.full((4, 2), 0.7), probs=torch.tensor([0.4, 0.3, 0.2, 0.1])
    )
    x = pyro.sample("x", dist.ImproperUniform(constraints.real, (), (2,)))
    pyro.factor("target", target.log_prob(x))


def test_flat_prior_start_has_a_component_at_every_mode():
    """Without prior draws the start explores the unnormalized target from a broad reference:
    every mode of the flat-prior target gets a component (the old uniform draws on (-2, 2)
    never reached them, and Pyro's init functions raise on ImproperUniform)."""
    pyro.set_rng_seed(0)
    guide = AutoGaussianMixture(_flat_prior_four_modes, num_components=8)
    guide()
    locs = guide.locs.detach()
    nearest = torch.cdist(FOUR_MODES, locs).min(-1).values  # [4]
    # a quarter of the distance between modes (uniform draws on (-2, 2) put the nearest at 2.8)
    assert (nearest < 2.0).all(), nearest


@pytest.mark.slow
def test_flat_prior_four_modes_end_at_the_right_shares():
    """Issue target: every mode's share within 0.05 and |log Z error| < 0.05 (3 seeds)."""
    from pyro_mixflow.diagnostics import importance_diagnostics, mode_shares

    for seed in range(3):
        pyro.set_rng_seed(seed)
        pyro.clear_param_store()
        guide = AutoGaussianMixture(_flat_prior_four_modes, num_components=8)
        svi = SVI(_flat_prior_four_modes, guide, pyro.optim.Adam({"lr": 5e-3}), RaoBlackwellELBO())
        for _ in range(3000):
            svi.step()
        shares = mode_shares(_flat_prior_four_modes, guide, modes=FOUR_MODES, num_samples=4000)
        assert (shares.shares - torch.tensor([0.4, 0.3, 0.2, 0.1])).abs().max() < 0.05, seed
        report = importance_diagnostics(_flat_prior_four_modes, guide, num_samples=3000)
        assert abs(report.log_evidence) < 0.05, seed


FAR_MODES = 60 * torch.rand(8, 12, generator=torch.Generator().manual_seed(1)) - 30


def _far_modes_model():
    """Eight unit Gaussians at random points of [-30, 30]^12 (equal weights), as a wide
    N(0, 30^2) prior plus a factor: no prior draw comes near a mode."""
    target = DiagNormalMixture(FAR_MODES, torch.ones(8, 12), torch.zeros(8))
    prior = dist.Normal(torch.zeros(12), 30.0).to_event(1)
    x = pyro.sample("x", prior)
    pyro.factor("target", target.log_prob(x) - prior.log_prob(x))


def _start_means(guide):
    """The starting components' means in the unconstrained space."""
    locs = guide.locs.detach()
    if isinstance(guide, AutoMixtureBaseFlow):  # stored standardized
        locs = guide.center + guide.spread * locs
    return locs


def test_annealed_start_puts_components_on_modes_no_prior_draw_reaches():
    """The tempered start leaves every component far from the modes (the reweighted prior
    draws are nowhere near one); the annealed start carries the draws there."""
    nearest = {}
    for method in ("tempered", "annealed"):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        guide = AutoGaussianMixture(_far_modes_model, num_components=16, init_method=method)
        guide()
        distance = torch.cdist(_start_means(guide), FAR_MODES)  # [K, modes]
        nearest[method] = distance.min(0).values  # each mode's nearest component
    assert (nearest["tempered"] > 10.0).all(), nearest["tempered"]
    # a unit Gaussian in 12-D puts its draws about 3.5 from its mean
    assert (nearest["annealed"] < 2.0).all(), nearest["annealed"]
    assert 1 <= guide._init_stages <= 100


@pytest.mark.parametrize("cls", [AutoGaussianMixture, AutoMixtureBaseFlow])
def test_annealed_start_on_a_flat_prior_and_a_plate(cls):
    """Improper sites take the broad reference's density on the ladder; plated models run
    under the particle plate."""
    pyro.set_rng_seed(0)
    guide = cls(_flat_prior_four_modes, num_components=8, init_method="annealed")
    guide()
    assert (torch.cdist(FOUR_MODES, _start_means(guide)).min(-1).values < 1.0).all()
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = cls(_absolute_value_model, num_components=4, init_method="annealed")
    guide()
    theta = _start_means(guide).flatten()
    assert (theta > 1.0).any() and (theta < -1.0).any(), theta  # both mirror modes (|theta| ~ 2)


def test_annealed_start_refuses_a_model_that_does_not_broadcast():
    def scalar_model():
        theta = pyro.sample("theta", dist.Normal(0.0, 1.0))
        pyro.factor("f", torch.tensor([theta.item()]).sum() * 0.0 - theta**2)

    with pytest.raises(ValueError, match="init_method='annealed' runs the model on a batch"):
        AutoGaussianMixture(scalar_model, num_components=2, init_method="annealed")()
    with pytest.raises(ValueError, match="`init_method` must be one of"):
        AutoGaussianMixture(scalar_model, num_components=2, init_method="smc")
