"""Checks specific to :class:`GumbelSoftmaxMixture`: the relaxed sampler and its densities.

With K = 2 the relaxed weights reduce to one number, :math:`x = \\log(c_1 / c_2)`, which is
logistic with location :math:`(l_1 - l_2)/\\tau` and scale :math:`1/\\tau`. Integrals over the
relaxation are then one-dimensional quadratures in :math:`u = F_{\\rm logistic}(x)`, which give
exact references for the relaxed density, its sampler and its gradient.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributions as td
from pyro.distributions.testing.gof import auto_goodness_of_fit

from pyro_mixflow import GumbelSoftmaxMixture
from tests.conftest import Z_THRESHOLD, standard_error_z

TAU = 0.5
_U = (torch.arange(20000, dtype=torch.float64) + 0.5) / 20000  # midpoint rule on (0, 1)


def _two_component_params():
    locs = torch.tensor([[-1.5], [2.0]], dtype=torch.float64, requires_grad=True)
    scales = torch.tensor([[0.6], [1.1]], dtype=torch.float64, requires_grad=True)
    logits = torch.tensor([0.3, -0.2], dtype=torch.float64, requires_grad=True)
    return locs, scales, logits


def _relaxed_loc_scale(locs, scales, logits, tau=TAU):
    """Conditional mean and scale at every quadrature node of the relaxed weights."""
    x = (logits[0] - logits[1]) / tau + torch.logit(_U) / tau
    c1 = torch.sigmoid(x)
    loc = c1 * locs[0, 0] + (1 - c1) * locs[1, 0]
    scale = c1 * scales[0, 0] + (1 - c1) * scales[1, 0]
    return loc, scale


def _relaxed_density(z, locs, scales, logits, tau=TAU):
    loc, scale = _relaxed_loc_scale(locs, scales, logits, tau)
    return td.Normal(loc, scale).log_prob(z.reshape(-1, 1)).exp().mean(-1)


def test_concrete_part_matches_torch():
    logits = torch.randn(4, dtype=torch.float64)
    d = GumbelSoftmaxMixture(
        torch.randn(4, 2, dtype=torch.float64),
        torch.ones(4, 2, dtype=torch.float64),
        logits,
        temperature=0.7,
    )
    z, log_c = d.rsample_with_weights((100,))
    c = log_c.exp()
    gauss = td.Normal(c @ d.locs, c @ d.scales).log_prob(z).sum(-1)
    expected = td.RelaxedOneHotCategorical(
        torch.tensor(0.7, dtype=torch.float64), logits=logits
    ).log_prob(c)
    torch.testing.assert_close(d.joint_log_prob(z, log_c) - gauss, expected)


def test_joint_density_integrates_to_one():
    locs, scales, logits = _two_component_params()
    d = GumbelSoftmaxMixture(locs, scales, logits, temperature=TAU)
    with torch.no_grad():
        centre = (logits[0] - logits[1]).item() / TAU
        x = torch.linspace(centre - 60 / TAU, centre + 60 / TAU, 3001, dtype=torch.float64)
        z = torch.linspace(-12, 14, 1501, dtype=torch.float64)
        log_c = torch.stack(
            [torch.nn.functional.logsigmoid(x), torch.nn.functional.logsigmoid(-x)], -1
        )
        # p(z, c_1) dc_1 = p(z, c_1) c_1 c_2 dx
        log_p = d.joint_log_prob(z.reshape(-1, 1, 1), log_c) + log_c.sum(-1)  # [Z, X]
        total = torch.trapezoid(torch.trapezoid(log_p.exp(), x, dim=-1), z)
    torch.testing.assert_close(total, torch.tensor(1.0, dtype=torch.float64), atol=1e-6, rtol=0)


@pytest.mark.slow
def test_relaxed_draws_match_the_relaxed_density():
    locs, scales, logits = _two_component_params()
    d = GumbelSoftmaxMixture(locs, scales, logits, temperature=TAU)
    with torch.no_grad():
        z = d.rsample((4000,))
        density = _relaxed_density(z, locs, scales, logits)
    assert auto_goodness_of_fit(z, density) > 1e-3


def test_relaxed_log_prob_exponential_is_unbiased():
    locs, scales, logits = _two_component_params()
    d = GumbelSoftmaxMixture(locs, scales, logits, temperature=TAU)
    z = torch.tensor([[-3.0], [-1.0], [0.2], [1.5], [4.0]], dtype=torch.float64)
    with torch.no_grad():
        truth = _relaxed_density(z, locs, scales, logits)
        estimates = torch.stack([d.relaxed_log_prob(z, num_samples=64).exp() for _ in range(200)])
    scores = standard_error_z(estimates, truth)
    assert scores.abs().max() < Z_THRESHOLD, scores


def test_relaxed_gradient_is_unbiased_for_the_relaxed_objective():
    r"""Pathwise gradients of :math:`E_{p_\tau}[\cos(az + b)]` against the quadrature value."""
    locs, scales, logits = _two_component_params()
    leaves = [locs, scales, logits]
    a, b = 0.9, 0.3
    loc, scale = _relaxed_loc_scale(locs, scales, logits)
    objective = (torch.exp(-0.5 * a**2 * scale.square()) * torch.cos(a * loc + b)).mean()
    truth = torch.cat([g.flatten() for g in torch.autograd.grad(objective, leaves)])
    estimates = []
    for _ in range(64):
        z = GumbelSoftmaxMixture(locs, scales, logits, temperature=TAU).rsample((4000,))
        f = torch.cos(a * z + b).mean()
        estimates.append(torch.cat([g.flatten() for g in torch.autograd.grad(f, leaves)]))
    scores = standard_error_z(torch.stack(estimates), truth)
    assert scores.abs().max() < Z_THRESHOLD, scores


def test_low_temperature_is_finite_in_float32():
    locs = torch.randn(10, 3, requires_grad=True)
    scales = (torch.rand(10, 3) + 0.5).requires_grad_()
    logits = torch.randn(10, requires_grad=True)
    d = GumbelSoftmaxMixture(locs, scales, logits, temperature=0.01)
    z, log_c = d.rsample_with_weights((1000,))
    joint = d.joint_log_prob(z, log_c)
    assert torch.isfinite(z).all() and torch.isfinite(log_c).all() and torch.isfinite(joint).all()
    (joint.mean() + torch.sin(z).sum()).backward()
    for p in (locs, scales, logits):
        assert torch.isfinite(p.grad).all()


def test_straight_through_draws_are_exact_and_differentiable():
    locs, scales, logits = _two_component_params()
    d = GumbelSoftmaxMixture(locs, scales, logits, temperature=TAU, straight_through=True)
    z, log_c = d.rsample_with_weights((5,))
    hard = torch.nn.functional.one_hot(log_c.argmax(-1), 2).double()
    # The forward value uses the one-hot weights exactly.
    eps = (z - hard @ locs) / (hard @ scales)
    torch.testing.assert_close(z, hard @ locs + eps * (hard @ scales))
    (grad,) = torch.autograd.grad(z.sum(), [logits])
    assert grad.abs().amax() > 0


def test_relaxed_draws_approach_exact_draws_at_low_temperature():
    locs, scales, logits = _two_component_params()
    d = GumbelSoftmaxMixture(locs, scales, logits, temperature=1e-3)
    with torch.no_grad():
        _, log_c = d.rsample_with_weights((2000,))
    assert (log_c.exp().amax(-1) > 1 - 1e-6).double().mean() > 0.99


@pytest.mark.parametrize(
    "temperature,error,match",
    [
        (0.0, ValueError, "`temperature` must be positive"),
        (-1.0, ValueError, "`temperature` must be positive"),
        (math.nan, ValueError, "`temperature` must be positive"),
        (math.inf, ValueError, "`temperature` must be positive"),
        (torch.ones(2), ValueError, "one-element tensor"),
        ("hot", TypeError, "`temperature` must be a number"),
    ],
)
def test_bad_temperature(temperature, error, match):
    with pytest.raises(error, match=match):
        GumbelSoftmaxMixture(
            torch.zeros(2, 1), torch.ones(2, 1), torch.zeros(2), temperature=temperature
        )


def test_bad_weights_and_num_samples():
    d = GumbelSoftmaxMixture(torch.zeros(2, 1), torch.ones(2, 1), torch.zeros(2))
    with pytest.raises(ValueError, match=r"`log_weights.shape\[-1\]` \(3\) does not match"):
        d.joint_log_prob(torch.zeros(1), torch.zeros(3))
    with pytest.raises(ValueError, match="`num_samples` must be a positive integer"):
        d.relaxed_log_prob(torch.zeros(1), num_samples=0)
