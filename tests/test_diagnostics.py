"""Diagnostics of guides against models: PSIS, log-evidence, restarts and ArviZ data."""

from __future__ import annotations

import math
import sys
import types

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions import constraints
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoMultivariateNormal, AutoNormal
from pyro.infer.autoguide.initialization import init_to_value

from pyro_mixflow.diagnostics import (
    ImportanceDiagnostics,
    ModeShares,
    RestartComparison,
    _arviz,
    compare_restarts,
    importance_diagnostics,
    mode_shares,
    to_inference_data,
)
from pyro_mixflow.infer import init_to_median_or_origin

Z_MAX = 4.5  # z-score limit of every statistical check


@pytest.fixture(autouse=True)
def _fresh_state():
    pyro.clear_param_store()
    torch.manual_seed(0)
    yield
    pyro.clear_param_store()


# ---------------------------------------------------------------------------------------------
# Conjugate Normal model: z ~ N(0, 1), x_i ~ N(z, sigma); exact evidence and posterior.

SIGMA = 0.8
X = torch.tensor([0.3, 1.1, 0.7, 1.9, 0.2], dtype=torch.float64)


def normal_model(x):
    z = pyro.sample("z", dist.Normal(torch.tensor(0.0, dtype=x.dtype), 1.0))
    with pyro.plate("data", len(x)):
        pyro.sample("x", dist.Normal(z, SIGMA), obs=x)


def normal_posterior(x):
    precision = 1.0 + len(x) / SIGMA**2
    return (x.sum() / SIGMA**2 / precision).item(), precision**-0.5


def normal_log_evidence(x):
    n = len(x)
    cov = SIGMA**2 * torch.eye(n, dtype=x.dtype) + torch.ones(n, n, dtype=x.dtype)
    return dist.MultivariateNormal(torch.zeros(n, dtype=x.dtype), cov).log_prob(x).item()


def normal_guide(widen=1.0):
    loc, scale = normal_posterior(X)

    def guide(x):
        pyro.sample("z", dist.Normal(torch.tensor(loc, dtype=x.dtype), widen * scale))

    return guide


def test_exact_posterior_guide_is_exact():
    result = importance_diagnostics(normal_model, normal_guide(), X, num_samples=500)
    assert result.log_evidence == pytest.approx(normal_log_evidence(X), abs=1e-10)
    assert result.ess == pytest.approx(500.0, rel=1e-10)
    assert result.ess_fraction == pytest.approx(1.0, rel=1e-10)
    assert result.pareto_k == -math.inf and result.reliable
    assert result.log_evidence_se < 1e-10
    assert result.elbo == pytest.approx(result.log_evidence, abs=1e-10)


def test_log_evidence_within_standard_errors():
    result = importance_diagnostics(normal_model, normal_guide(1.5), X, num_samples=4000)
    exact = normal_log_evidence(X)
    assert abs(result.log_evidence - exact) < Z_MAX * result.log_evidence_se
    assert 0 < result.log_evidence_se < 0.02
    # a wider guide has bounded weights: small k-hat, most draws effective
    assert result.pareto_k < 0.5 and result.reliable
    assert result.ess_fraction > 0.6
    # ELBO = log Z - KL(q || p) < log Z, with KL of two Normals known in closed form
    loc, scale = normal_posterior(X)
    guide_dist = dist.Normal(loc, 1.5 * scale)
    kl = torch.distributions.kl_divergence(guide_dist, dist.Normal(loc, scale)).item()
    assert abs(result.elbo - (exact - kl)) < Z_MAX * result.elbo_se


def test_narrow_guide_has_large_pareto_k():
    result = importance_diagnostics(normal_model, normal_guide(0.3), X, num_samples=4000)
    assert result.pareto_k > 0.7 and not result.reliable
    assert result.ess_fraction < 0.5


@pytest.mark.parametrize("guide_cls", [AutoNormal, AutoMultivariateNormal])
def test_autoguide_set_to_posterior_is_exact(guide_cls):
    loc, scale = normal_posterior(X)
    guide = guide_cls(normal_model)
    guide(X)  # creates the parameters
    _set_autoguide(guide, "z", torch.tensor([loc], dtype=X.dtype), scale)
    result = importance_diagnostics(normal_model, guide, X, num_samples=300)
    assert result.log_evidence == pytest.approx(normal_log_evidence(X), abs=1e-8)
    assert result.ess_fraction == pytest.approx(1.0, rel=1e-8)


def test_repr_is_readable():
    result = importance_diagnostics(normal_model, normal_guide(1.5), X, num_samples=100)
    text = repr(result)
    assert text.startswith("ImportanceDiagnostics(num_samples=100, pareto_k=")
    assert "log_evidence=" in text and "±" in text and "%" in text
    assert "tensor" not in text  # the raw log weights stay out of the repr
    with pytest.raises(AttributeError):
        result.ess = 1.0  # frozen


def test_chunks_give_every_draw():
    result = importance_diagnostics(
        normal_model, normal_guide(1.5), X, num_samples=1001, chunk_size=500
    )
    assert result.log_weights.shape == (1001,)
    assert torch.isfinite(result.log_weights).all()
    assert result.log_weights.unique().numel() == 1001  # chunks are fresh draws


# ---------------------------------------------------------------------------------------------
# An unnormalized 2-D target: four well-separated Gaussians with unequal weights, times Z.

LOG_Z = 1.7
PROBS = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
LOCS = torch.tensor([[-4.0, -4.0], [-4.0, 4.0], [4.0, -4.0], [4.0, 4.0]], dtype=torch.float64)
SCALE = 0.5


def four_modes():
    return dist.MixtureSameFamily(
        dist.Categorical(probs=PROBS), dist.Normal(LOCS, SCALE).to_event(1)
    )


def four_mode_model():
    z = pyro.sample("z", dist.ImproperUniform(constraints.real_vector, (), (2,)))
    pyro.factor("target", LOG_Z + four_modes().log_prob(z))


def exact_four_mode_guide():
    pyro.sample("z", four_modes())


def one_mode_guide(mode, widen=1.1):
    def guide():
        pyro.sample("z", dist.Normal(LOCS[mode], widen * SCALE).to_event(1))

    return guide


def test_four_modes_exact_guide():
    result = importance_diagnostics(four_mode_model, exact_four_mode_guide, num_samples=500)
    assert result.log_evidence == pytest.approx(LOG_Z, abs=1e-6)  # round-off of logsumexp
    assert result.ess_fraction == pytest.approx(1.0, rel=1e-6)


@pytest.mark.parametrize("mode", [3, 0])
def test_one_mode_guide_looks_healthy_but_misses_mass(mode):
    result = importance_diagnostics(four_mode_model, one_mode_guide(mode), num_samples=2000)
    # k-hat and ESS see nothing wrong ...
    assert result.pareto_k < 0.3 and result.reliable
    assert result.ess_fraction > 0.95
    # ... but the evidence estimate is log Z + log P(mode), as the docs say
    expected = LOG_Z + PROBS[mode].log().item()
    assert abs(result.log_evidence - expected) < Z_MAX * result.log_evidence_se


def test_compare_restarts_flags_one_mode_guide():
    guides = [exact_four_mode_guide, one_mode_guide(3)]
    result = compare_restarts(four_mode_model, guides, num_samples=2000)
    assert result.best == 0
    assert result.flagged == (False, True)
    assert not result.ok
    assert not result.unreliable[1]  # flagged by the evidence gap, not by k-hat
    gap, se = result.gaps[1], result.gap_ses[1]
    assert abs(gap - (-PROBS[3].log().item())) < Z_MAX * se
    assert result.missed_mass[1] == pytest.approx(0.6, abs=Z_MAX * se)
    assert "misses at least about 60%" in result.message
    assert "MISSES MASS" in repr(result)


def test_compare_restarts_on_different_modes():
    guides = [one_mode_guide(0), one_mode_guide(3), one_mode_guide(2)]
    result = compare_restarts(four_mode_model, guides, num_samples=2000)
    assert result.best == 1
    assert result.flagged == (True, False, True)
    for r in (0, 2):
        expected = (PROBS[3] / PROBS[r]).log().item()
        assert abs(result.gaps[r] - expected) < Z_MAX * result.gap_ses[r]


def test_compare_restarts_does_not_flag_agreeing_restarts():
    guides = [one_mode_guide(3, 1.1), one_mode_guide(3, 1.3), one_mode_guide(3, 1.2)]
    result = compare_restarts(four_mode_model, guides, num_samples=2000)
    assert result.ok and not any(result.flagged)
    assert "agree" in result.message


def test_compare_restarts_of_trained_autonormal():
    """AutoNormal restarts started on different modes stay there; the check says so."""

    def train(mode):
        guide = AutoNormal(
            four_mode_model, init_loc_fn=init_to_value(values={"z": LOCS[mode]}), init_scale=0.3
        )
        svi = SVI(four_mode_model, guide, pyro.optim.Adam({"lr": 0.02}), Trace_ELBO())
        for _ in range(100):
            svi.step()
        return guide

    with pyro.settings.context(module_local_params=True):
        guides = [train(3), train(1)]
        result = compare_restarts(four_mode_model, guides, num_samples=1000)
    assert all(d.reliable for d in result.diagnostics)  # k-hat passes both
    assert result.flagged == (False, True)
    assert abs(result.gaps[1] - math.log(2.0)) < Z_MAX * result.gap_ses[1]


def test_reference_estimates_the_evidence_of_a_proper_model():
    """With a proper prior the reference is importance sampling from the prior: unbiased."""
    result = compare_restarts(normal_model, [normal_guide()], X, reference_samples=1000)
    reference = result.diagnostics[-1]
    assert result.reference and result.labels == ("0", "reference")
    assert abs(reference.log_evidence - normal_log_evidence(X)) < Z_MAX * reference.log_evidence_se
    assert result.ok, result.message


def test_reference_flags_a_single_mode_guide_under_a_flat_prior():
    """One AutoNormal, started at the origin as every restart would be, ends on one mode of the
    flat-prior target. Restarts from that start agree; the reference, which no training
    steered, finds the other modes' mass."""
    with pyro.settings.context(module_local_params=True):
        guide = AutoNormal(four_mode_model, init_loc_fn=init_to_median_or_origin)
        svi = SVI(four_mode_model, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
        for _ in range(300):
            svi.step()
        result = compare_restarts(
            four_mode_model, [guide], num_samples=1000, reference_samples=3000
        )
    guide_result, reference = result.diagnostics
    assert guide_result.reliable and guide_result.ess_fraction > 0.8  # PSIS sees nothing wrong
    assert result.best == 1 and result.flagged == (True, False)
    # the reference is unbiased for log Z (= log 1 here) up to its standard error
    assert abs(reference.log_evidence - LOG_Z) < Z_MAX * reference.log_evidence_se
    assert result.missed_mass[0] > 0.5
    assert "Broad draws that no training steered" in result.message
    assert "    ref " in repr(result)


def test_restarts_that_share_parameters_are_refused():
    guides = [AutoNormal(plated_model), AutoNormal(plated_model)]
    with pytest.raises(ValueError, match=r"`guides\[0\]` and `guides\[1\]` read the same"):
        compare_restarts(plated_model, guides, Y)
    with pytest.raises(ValueError, match=r"`guide\[0\]` and `guide\[1\]` read the same"):
        to_inference_data(plated_model, guides, Y)
    with pyro.settings.context(module_local_params=True):
        guides = [AutoNormal(plated_model), AutoNormal(plated_model)]
        data = to_inference_data(plated_model, guides, Y, num_samples=10)
    assert data.posterior["tau"].shape == (2, 10, 3)


def test_restart_thresholds():
    """A gap is flagged only when it is both significant and larger than ``min_gap``."""
    exact = ImportanceDiagnostics.from_log_weights(torch.zeros(100, dtype=torch.float64))
    close = ImportanceDiagnostics.from_log_weights(torch.full((100,), -0.02, dtype=torch.float64))
    assert RestartComparison.from_diagnostics([exact, close]).flagged == (False, False)
    assert RestartComparison.from_diagnostics([exact, close], min_gap=0.01).flagged[1]
    noisy = ImportanceDiagnostics.from_log_weights(
        torch.tensor([0.0, -10.0], dtype=torch.float64).repeat(50)
    )  # log Z = log((1 + e^-10) / 2), se = 0.1: the gap is 6.9 standard errors
    assert noisy.log_evidence_se == pytest.approx(0.1, rel=0.01)
    assert RestartComparison.from_diagnostics([exact, noisy]).flagged[1]
    assert not RestartComparison.from_diagnostics([exact, noisy], z_threshold=8.0).flagged[1]
    with pytest.raises(ValueError, match="`z_threshold` must be > 0"):
        RestartComparison.from_diagnostics([exact, noisy], z_threshold=0.0)


def test_compare_restarts_accepts_precomputed_diagnostics():
    a = importance_diagnostics(four_mode_model, one_mode_guide(3), num_samples=500)
    result = compare_restarts(four_mode_model, [a, exact_four_mode_guide], num_samples=500)
    assert result.diagnostics[0] is a
    assert result.flagged == (True, False)


def test_mode_shares_of_exact_guide_match_the_weights():
    result = mode_shares(four_mode_model, exact_four_mode_guide, modes=LOCS, num_samples=4000)
    se = (PROBS * (1 - PROBS) / 4000).sqrt()
    assert ((result.shares - PROBS).abs() < Z_MAX * se).all()
    assert torch.allclose(result.shares_se, (result.shares * (1 - result.shares) / 4000).sqrt())
    assert torch.allclose(result.weighted_shares, result.shares, atol=1e-8)  # equal weights


def test_mode_shares_show_what_one_mode_guide_misses():
    result = mode_shares(four_mode_model, one_mode_guide(2), modes=LOCS, num_samples=1000)
    assert result.shares.tolist() == [0.0, 0.0, 1.0, 0.0]
    expected = torch.tensor([0.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    assert torch.allclose(result.weighted_shares, expected)  # reweighting cannot help
    assert result.nearest.shape == (1000,)
    assert repr(result).startswith("ModeShares(num_samples=1000,")


def test_mode_shares_pick_sites_and_check_shapes():
    modes = torch.tensor([[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]], dtype=torch.float64)
    result = mode_shares(plated_model, plated_guide, Y, modes=modes, sites=["tau"], num_samples=50)
    assert result.shares.shape == (2,)
    with pytest.raises(ValueError, match=r"`modes` must have shape \(M, 3\)"):
        mode_shares(plated_model, plated_guide, Y, modes=modes[:, :2], num_samples=5)
    with pytest.raises(ValueError, match=r"`sites` \['nope'\] are not latent sites"):
        mode_shares(plated_model, plated_guide, Y, modes=modes, sites=["nope"], num_samples=5)
    with pytest.raises(ValueError, match="must be matrices with the same D"):
        ModeShares.from_draws(torch.zeros(4, 2), torch.zeros(3, 1))


# ---------------------------------------------------------------------------------------------
# A plated model with a constrained latent: log tau_g ~ N(0, 1), log y_gi ~ N(log tau_g, 1).

Y = torch.tensor(
    [[0.8, 1.9, 0.6], [1.2, 2.5, 0.4], [0.9, 1.4, 0.7], [1.6, 3.0, 0.5]], dtype=torch.float64
)  # [obs, groups]


def plated_model(y):
    with pyro.plate("groups", y.shape[-1]):
        tau = pyro.sample("tau", dist.LogNormal(torch.zeros((), dtype=y.dtype), 1.0))
        with pyro.plate("obs", y.shape[-2], dim=-2):
            pyro.sample("y", dist.LogNormal(tau.log(), 1.0), obs=y)
    pyro.deterministic("total", tau.sum(-1))


def plated_posterior(y):
    n = y.shape[-2]
    return y.log().sum(-2) / (1.0 + n), (1.0 + n) ** -0.5


def plated_log_evidence(y):
    n = y.shape[-2]
    cov = torch.eye(n, dtype=y.dtype) + torch.ones(n, n, dtype=y.dtype)
    log_y = y.log().T  # [groups, obs]
    mvn = dist.MultivariateNormal(torch.zeros(n, dtype=y.dtype), cov)
    return (mvn.log_prob(log_y).sum() - log_y.sum()).item()


def plated_guide(y):
    loc, scale = plated_posterior(Y)
    with pyro.plate("groups", y.shape[-1]):
        pyro.sample("tau", dist.LogNormal(loc, scale))


@pytest.mark.parametrize("guide_cls", [None, AutoNormal, AutoMultivariateNormal])
def test_plated_constrained_model_exact(guide_cls):
    loc, scale = plated_posterior(Y)
    if guide_cls is None:
        guide = plated_guide
    else:
        guide = guide_cls(plated_model)
        guide(Y)
        _set_autoguide(guide, "tau", loc, scale)
    result = importance_diagnostics(plated_model, guide, Y, num_samples=400)
    assert result.log_evidence == pytest.approx(plated_log_evidence(Y), abs=1e-8)
    assert result.ess_fraction == pytest.approx(1.0, rel=1e-8)


def test_inference_data_groups_shapes_and_values():
    num_samples = 2000
    data = to_inference_data(plated_model, [plated_guide, plated_guide], Y, num_samples=num_samples)
    assert set(data.groups()) == {"posterior", "sample_stats"}
    assert set(data.posterior.data_vars) == {"tau", "total"}
    assert data.posterior["tau"].dims == ("chain", "draw", "groups")
    assert data.posterior["tau"].shape == (2, num_samples, 3)
    assert data.posterior["total"].shape == (2, num_samples)
    assert set(data.sample_stats.data_vars) == {"lp", "log_weight"}
    assert data.sample_stats["lp"].shape == (2, num_samples)
    tau = torch.as_tensor(data.posterior["tau"].values)
    assert (tau > 0).all()  # constrained space
    assert torch.allclose(torch.as_tensor(data.posterior["total"].values), tau.sum(-1))
    # log_weight = lp - log q(tau) for the very draws stored
    loc, scale = plated_posterior(Y)
    log_q = dist.LogNormal(loc, scale).log_prob(tau).sum(-1)
    lp = torch.as_tensor(data.sample_stats["lp"].values)
    log_weight = torch.as_tensor(data.sample_stats["log_weight"].values)
    assert torch.allclose(lp - log_q, log_weight, atol=1e-10)
    assert torch.allclose(log_weight, torch.full_like(log_weight, plated_log_evidence(Y)))
    # draws follow the guide: the mean of tau against the LogNormal mean
    mean = torch.exp(loc + scale**2 / 2)
    sd = mean * math.sqrt(math.expm1(scale**2))
    z = (tau.reshape(-1, 3).mean(0) - mean) / (sd / math.sqrt(2 * num_samples))
    assert z.abs().max() < Z_MAX


def test_inference_data_works_with_arviz():
    az = _arviz.import_arviz()
    guides = [AutoNormal(plated_model), AutoMultivariateNormal(plated_model)]
    data = to_inference_data(plated_model, guides, Y, num_samples=200)
    summary = az.summary(data)
    assert list(summary.index) == ["tau[0]", "tau[1]", "tau[2]", "total"]
    assert np.isfinite(summary["mean"].to_numpy()).all()
    assert data.posterior.attrs["guides"] == "AutoNormal, AutoMultivariateNormal"
    pytest.importorskip("matplotlib").use("Agg")
    import matplotlib.pyplot as plt

    az.plot_pair(data, var_names=["tau"])
    plt.close("all")


def test_inference_data_of_a_single_guide():
    data = to_inference_data(four_mode_model, exact_four_mode_guide, num_samples=50)
    assert data.posterior["z"].shape == (1, 50, 2)
    assert data.posterior["z"].dims == ("chain", "draw", "z_dim_0")


# ---------------------------------------------------------------------------------------------
# Errors and the ArviZ shim.


def test_invalid_arguments():
    with pytest.raises(ValueError, match="`num_samples` must be an integer >= 2"):
        importance_diagnostics(normal_model, normal_guide(), X, num_samples=1)
    with pytest.raises(ValueError, match="`chunk_size` must be an integer >= 2"):
        importance_diagnostics(normal_model, normal_guide(), X, num_samples=10, chunk_size=1)
    with pytest.raises(ValueError, match=r"`log_weights` must be a 1-D tensor, got shape \(2, 3\)"):
        ImportanceDiagnostics.from_log_weights(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="`log_weights` contains nan"):
        ImportanceDiagnostics.from_log_weights(torch.tensor([0.0, math.nan]))
    with pytest.raises(ValueError, match="all -inf"):
        ImportanceDiagnostics.from_log_weights(torch.full((3,), -math.inf))
    with pytest.raises(ValueError, match=r"`guides` must hold at least 2 restart\(s\), got 1"):
        compare_restarts(normal_model, [normal_guide()], X)
    with pytest.raises(ValueError, match=r"`reference_samples` must be 0 .* got 1"):
        compare_restarts(normal_model, [normal_guide()], X, reference_samples=1)
    with pytest.raises(TypeError, match="`reference_samples` must be an integer"):
        compare_restarts(normal_model, [normal_guide()], X, reference_samples=10.0)
    with pytest.raises(TypeError, match="`ImportanceDiagnostics` instances"):
        RestartComparison.from_diagnostics([1.0, 2.0])
    with pytest.raises(ValueError, match="`guide` is an empty sequence"):
        to_inference_data(normal_model, [], X)
    with pytest.raises(ValueError, match=r"`guide\[1\]` gives latent sites"):
        with pyro.validation_enabled(False):  # lets a model take any shape its guide gives
            to_inference_data(_free_model, [_free_guide(2), _free_guide(3)], num_samples=5)


def test_unvectorizable_model_gets_a_hint():
    def model(x):
        z = pyro.sample("z", dist.Normal(torch.tensor(0.0, dtype=x.dtype), 1.0))
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(z.unsqueeze(-1), SIGMA), obs=x)  # breaks under a plate

    with pytest.raises(ValueError, match="must be vectorizable"):
        importance_diagnostics(model, normal_guide(), X, num_samples=10)


def _free_model():
    pyro.sample("z", dist.ImproperUniform(constraints.real_vector, (), (2,)))


def _free_guide(size):
    def guide():
        pyro.sample("z", dist.Normal(torch.zeros(size, dtype=torch.float64), 1.0).to_event(1))

    return guide


def test_guide_outside_model_support():
    def model():
        pyro.sample("s", dist.HalfNormal(torch.tensor(1.0, dtype=torch.float64)))

    def guide():  # half of the draws are negative: zero model density there
        pyro.sample("s", dist.Normal(torch.tensor(0.0, dtype=torch.float64), 1.0))

    with pyro.validation_enabled(False):
        result = importance_diagnostics(model, guide, num_samples=4000)
    assert torch.isinf(result.log_weights).any()
    # log Z = 0: the estimate stays unbiased, the ESS counts only the draws that matter
    assert abs(result.log_evidence) < Z_MAX * result.log_evidence_se
    assert result.ess_fraction < 0.6


def test_arviz_shim_on_installed_arviz():
    az = _arviz.import_arviz()
    assert _arviz.arviz_major_version() == int(az.__version__.split(".")[0])
    log_weights = np.random.default_rng(1).normal(size=2000)
    smoothed, k_hat = _arviz.psislw(log_weights)
    expected_smoothed, expected_k = az.psislw(log_weights.copy(), reff=1.0)
    assert k_hat == pytest.approx(float(expected_k))
    np.testing.assert_allclose(smoothed, expected_smoothed, atol=1e-12)
    assert isinstance(k_hat, float)


def test_pareto_k_of_known_tail():
    """Weights with a Pareto tail of shape k = 0.6 give k-hat near 0.6."""
    k = 0.6
    u = np.random.default_rng(2).uniform(size=8000)
    log_weights = -k * np.log(u)  # w = u^(-k) is Pareto with shape k
    _, k_hat = _arviz.psislw(log_weights)
    tail = int(min(0.2 * 8000, 3 * math.sqrt(8000)))
    assert abs(k_hat - k) < Z_MAX * (1 + k) / math.sqrt(tail)


def test_arviz_shim_one_x_path(monkeypatch):
    """The ArviZ 1.x calls (arviz_stats / arviz_base) are wired with their documented names."""
    calls = {}

    def psislw(ary, r_eff=1, axis=-1):
        calls["psislw"] = (r_eff, axis)
        return ary - np.logaddexp.reduce(ary), np.float64(0.25)

    def from_dict(data, *, dims=None, attrs=None, **kwargs):
        calls["from_dict"] = (sorted(data), dims, attrs)
        return "datatree"

    arviz_stats = types.ModuleType("arviz_stats")
    base = types.ModuleType("arviz_stats.base")
    base.array_stats = types.SimpleNamespace(psislw=psislw)
    arviz_stats.base = base
    arviz_base = types.ModuleType("arviz_base")
    arviz_base.from_dict = from_dict
    monkeypatch.setitem(sys.modules, "arviz_stats", arviz_stats)
    monkeypatch.setitem(sys.modules, "arviz_stats.base", base)
    monkeypatch.setitem(sys.modules, "arviz_base", arviz_base)
    monkeypatch.setattr(_arviz, "arviz_major_version", lambda: 1)

    smoothed, k_hat = _arviz.psislw(np.zeros(4))
    assert k_hat == 0.25 and calls["psislw"] == (1.0, -1)
    np.testing.assert_allclose(smoothed, np.full(4, -math.log(4)))
    out = _arviz.from_dict(
        {"z": np.zeros((1, 3))}, sample_stats={"lp": np.zeros((1, 3))}, attrs={"a": 1}
    )
    assert out == "datatree"
    assert calls["from_dict"] == (
        ["posterior", "sample_stats"],
        None,
        {
            "posterior": {"a": 1},
            "sample_stats": {"a": 1},
        },
    )


def _set_autoguide(guide, name, loc, scale):
    """Set an AutoNormal / AutoMultivariateNormal (one site) to ``N(loc, scale)`` per coordinate."""
    loc = torch.as_tensor(loc, dtype=torch.float64)
    with torch.no_grad():
        if isinstance(guide, AutoNormal):
            setattr(guide.locs, name, loc.reshape(getattr(guide.locs, name).shape))
            setattr(guide.scales, name, torch.full_like(loc, scale).reshape(loc.shape))
        else:
            guide.loc.copy_(loc.reshape(-1))
            guide.scale = torch.full_like(guide.loc, scale)
            guide.scale_tril = torch.eye(len(guide.loc), dtype=guide.loc.dtype)


def test_the_reference_row_is_never_flagged_and_its_k_hat_only_noted():
    """Below a guide, the reference is a noisy estimate, not a guide missing mass."""
    exact = ImportanceDiagnostics.from_log_weights(torch.zeros(100, dtype=torch.float64))
    uniform = torch.rand(2000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    heavy = -1.2 * uniform.log() - 8.0  # Pareto weights of tail index 1/1.2: k-hat near 1.2
    reference = ImportanceDiagnostics.from_log_weights(heavy)
    result = RestartComparison.from_diagnostics([exact, reference], reference=True)
    assert result.gaps[1] > 0 and result.flagged == (False, False)
    assert result.unreliable[1] and result.ok
    assert "The reference's importance weights are heavy-tailed" in result.message
    assert "agree" in result.message
