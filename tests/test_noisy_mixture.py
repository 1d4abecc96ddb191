"""NoisyMixture (mixtures observed through error processes) and extreme deconvolution."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pyro.distributions.testing.gof import auto_goodness_of_fit
from scipy import integrate, stats

from pyro_mixflow import DiagNormalMixture
from pyro_mixflow.distributions.noisy_mixture import (
    AdditiveNormal,
    IntegerShift,
    NoisyMixture,
    ScaleJitter,
)
from pyro_mixflow.fitting import deconvolve
from tests.conftest import Z_THRESHOLD, standard_error_z

F64 = torch.float64

# The how-to's parameters (1-D, three components).
MEANS = torch.tensor([1.0, 5.0, 10.0], dtype=F64)
STDS = torch.tensor([0.5, 1.0, 0.75], dtype=F64)
WEIGHTS = torch.tensor([0.3, 0.5, 0.2], dtype=F64)
JITTER = torch.tensor([0.1, 0.2, 0.15], dtype=F64)
ERROR_MEANS = torch.tensor([0.05, -0.1, 0.0], dtype=F64)
ERROR_STDS = torch.tensor([0.1, 0.2, 0.1], dtype=F64)


def _latent() -> DiagNormalMixture:
    return DiagNormalMixture(MEANS.unsqueeze(-1), STDS.unsqueeze(-1), probs=WEIGHTS)


NOISE_1D = {
    "jitter": lambda: ScaleJitter(JITTER.unsqueeze(-1)),
    "additive": lambda: AdditiveNormal(ERROR_MEANS.unsqueeze(-1), ERROR_STDS.unsqueeze(-1)),
    "shift": lambda: IntegerShift(-2, 3),
    "shift-per-component": lambda: IntegerShift(
        torch.tensor([[-1], [0], [-2]]), torch.tensor([[1], [3], [2]])
    ),
    "all": lambda: [
        ScaleJitter(JITTER.unsqueeze(-1)),
        AdditiveNormal(ERROR_MEANS.unsqueeze(-1), ERROR_STDS.unsqueeze(-1)),
        IntegerShift(-1, 2),
    ],
}


def _noisy_1d(name: str, **kwargs) -> NoisyMixture:
    return NoisyMixture(_latent(), NOISE_1D[name](), **kwargs)


def _noisy_2d() -> NoisyMixture:
    """Two dimensions, every error process, per-component and per-dimension parameters."""
    locs = torch.tensor([[-2.0, 0.0], [1.5, 1.0], [0.0, -2.5]], dtype=F64)
    scales = torch.tensor([[0.6, 0.4], [0.5, 0.8], [0.7, 0.5]], dtype=F64)
    latent = DiagNormalMixture(locs, scales, torch.tensor([0.2, -0.3, 0.1], dtype=F64))
    noise = [
        ScaleJitter(torch.tensor([[0.3], [0.1], [0.2]], dtype=F64)),
        AdditiveNormal(torch.tensor([0.1, -0.2], dtype=F64), 0.3),
        IntegerShift(torch.tensor([[0, -1]]), torch.tensor([[2, 1], [1, 1], [2, 0]])),
    ]
    return NoisyMixture(latent, noise, quadrature_order=24)


# --- the how-to's masked-loop samplers, written again for comparison ------------------------


def _loop_sampler(num, means, stds, weights, *, jitter=None, error=None, shift=None):
    """Component indices first, then one masked assignment per component, as the how-to does."""
    index = torch.distributions.Categorical(probs=weights).sample((num,))
    out = torch.zeros(num, dtype=means.dtype)
    for k in range(len(means)):
        mask = index == k
        count = int(mask.sum())
        if count == 0:
            continue
        std = stds[k]
        if jitter is not None:
            std = std + (jitter[k] * torch.randn(count, dtype=means.dtype)).abs()
        value = means[k] + std * torch.randn(count, dtype=means.dtype)
        if error is not None:
            value = value + error[0][k] + error[1][k] * torch.randn(count, dtype=means.dtype)
        if shift is not None:
            u = torch.distributions.Uniform(float(shift[0]), float(shift[1])).sample((count,))
            value = value + u.floor().to(means.dtype)
        out[mask] = value
    return out


@pytest.mark.parametrize(
    ("name", "loop_kwargs"),
    [
        ("jitter", {"jitter": JITTER}),
        ("additive", {"error": (ERROR_MEANS, ERROR_STDS)}),
        ("shift", {"shift": (-2, 3)}),
    ],
)
def test_vectorized_sampler_matches_the_loop(name, loop_kwargs):
    """Two-sample Kolmogorov-Smirnov test between the two samplers, 20000 draws each."""
    torch.manual_seed(1)
    ours = _noisy_1d(name).sample((20000,)).squeeze(-1)
    loop = _loop_sampler(20000, MEANS, STDS, WEIGHTS, **loop_kwargs)
    assert stats.ks_2samp(ours.numpy(), loop.numpy()).pvalue > 1e-3


# --- density --------------------------------------------------------------------------------


def _normal_pdf(x: float, mean: float, std: float) -> float:
    return math.exp(-0.5 * ((x - mean) / std) ** 2) / (std * math.sqrt(2 * math.pi))


def _jitter_reference(x: float, components) -> float:
    """log p(x) by adaptive quadrature (QUADPACK) of the half-normal jitter, to 1e-13 relative."""
    total = 0.0
    for mean, std, e, w in components:

        def integrand(z, mean=mean, std=std, e=e):
            return _normal_pdf(x, mean, std + e * z) * 2 * _normal_pdf(z, 0.0, 1.0)

        total += w * integrate.quad(integrand, 0, np.inf, epsabs=0, epsrel=1e-13)[0]
    return math.log(total)


@pytest.fixture(scope="module")
def jitter_reference():
    x = torch.linspace(-4, 16, 81, dtype=F64)
    components = list(zip(*(t.tolist() for t in (MEANS, STDS, JITTER, WEIGHTS)), strict=True))
    return x, torch.tensor([_jitter_reference(v, components) for v in x.tolist()], dtype=F64)


@pytest.mark.slow
@pytest.mark.parametrize(("order", "tolerance"), [(8, 1e-4), (16, 1e-9), (48, 1e-10)])
def test_jitter_quadrature_error_against_a_high_order_reference(order, tolerance, jitter_reference):
    """Absolute log-density error over the bulk and the tails (-4 .. 16, 81 points).

    Measured (max |error| in log p): 1.8e-6 at 8 nodes, 1.2e-12 at 16, 1.1e-12 at 48.
    """
    x, reference = jitter_reference
    d = _noisy_1d("jitter", quadrature_order=order)
    error = (d.log_prob(x.unsqueeze(-1)) - reference).abs().max().item()
    assert error < tolerance, error


def test_jitter_quadrature_with_large_jitter():
    """Jitter 4x the latent scale: a singularity nearer the nodes (measured 3e-10 at 48 nodes)."""
    latent = DiagNormalMixture(
        torch.zeros(1, 1, dtype=F64), torch.full((1, 1), 0.5, dtype=F64), torch.zeros(1, dtype=F64)
    )
    d = NoisyMixture(latent, ScaleJitter(2.0))
    x = torch.linspace(-10, 10, 41, dtype=F64)
    components = [(0.0, 0.5, 2.0, 1.0)]
    expected = torch.tensor([_jitter_reference(v, components) for v in x.tolist()], dtype=F64)
    error = (d.log_prob(x.unsqueeze(-1)) - expected).abs().max().item()
    assert error < 1e-8, error


def test_additive_and_observation_errors_are_exact():
    d = _noisy_1d("additive").with_errors(torch.tensor([[0.0], [0.5], [2.0]], dtype=F64))
    x = torch.tensor([[0.3], [4.0], [12.0]], dtype=F64)
    total_var = (
        STDS.square() + ERROR_STDS.square() + torch.tensor([[0.0], [0.25], [4.0]], dtype=F64)
    )
    normal = torch.distributions.Normal(MEANS + ERROR_MEANS, total_var.sqrt())  # [3 points, K]
    expected = (WEIGHTS.log() + normal.log_prob(x)).logsumexp(-1)
    torch.testing.assert_close(d.log_prob(x), expected)


def test_shift_is_a_finite_sum():
    d = _noisy_1d("shift-per-component")
    x = torch.linspace(-3, 13, 33, dtype=F64).unsqueeze(-1)
    low, high = [-1, 0, -2], [1, 3, 2]
    expected = torch.zeros(33, dtype=F64)
    for k in range(3):
        for c in range(low[k], high[k]):
            normal = torch.distributions.Normal(MEANS[k] + c, STDS[k])
            expected += WEIGHTS[k] / (high[k] - low[k]) * normal.log_prob(x.squeeze(-1)).exp()
    torch.testing.assert_close(d.log_prob(x), expected.log())


@pytest.mark.parametrize("name", list(NOISE_1D))
def test_density_integrates_to_one_1d(name):
    d = _noisy_1d(name, quadrature_order=24)
    grid = torch.linspace(-12, 24, 40001, dtype=F64)
    mass = torch.trapezoid(d.log_prob(grid.unsqueeze(-1)).exp(), grid)
    assert abs(mass.item() - 1) < 1e-8


def test_density_integrates_to_one_2d():
    d = _noisy_2d()
    axes = [torch.linspace(-9, 9, 361, dtype=F64)] * 2
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)
    density = d.log_prob(grid).exp()
    for axis in reversed(axes):
        density = torch.trapezoid(density, axis, dim=0)
    assert abs(density.item() - 1) < 1e-6


# --- samples against the density -------------------------------------------------------------


@pytest.mark.parametrize("name", list(NOISE_1D))
def test_samples_match_log_prob_1d(name):
    """Kolmogorov-Smirnov test of 20000 draws against the CDF integrated from ``log_prob``.

    The CDF is the cumulative trapezoid rule on a 0.001 grid (error below 1e-7, far under the
    KS statistic's resolution of about 1e-2).
    """
    torch.manual_seed(2)
    d = _noisy_1d(name, quadrature_order=24)
    x = d.sample((20000,)).squeeze(-1)
    grid = torch.linspace(-12, 24, 36001, dtype=F64)
    pdf = d.log_prob(grid.unsqueeze(-1)).exp()
    cdf = torch.cat([torch.zeros(1, dtype=F64), torch.cumulative_trapezoid(pdf, grid)])
    pvalue = stats.kstest(x.numpy(), lambda v: np.interp(v, grid.numpy(), cdf.numpy())).pvalue
    assert pvalue > 1e-3, pvalue


def test_samples_match_log_prob_goodness_of_fit():
    """Pyro's density-based goodness of fit, on the combined error model."""
    torch.manual_seed(2)
    d = _noisy_1d("all", quadrature_order=24)
    x = d.sample((4000,))
    assert auto_goodness_of_fit(x.squeeze(-1), d.log_prob(x).exp()) > 1e-3


def test_samples_match_log_prob_2d_chi_square():
    """Chi-square of a 2-D histogram of 40000 draws against cell masses integrated from log_prob.

    Cell masses: 8 x 8 midpoint rule inside each of the 0.5 x 0.5 cells (relative error below
    1e-3, far under the Poisson noise of the counts); cells expected below 5 draws are pooled.
    """
    torch.manual_seed(3)
    d = _noisy_2d()
    x = d.sample((40000,))
    edges = torch.arange(-6.0, 6.01, 0.5, dtype=F64)
    sub = 8
    fine = edges[0] + (torch.arange(len(edges[:-1]) * sub, dtype=F64) + 0.5) * (0.5 / sub)
    grid = torch.stack(torch.meshgrid(fine, fine, indexing="ij"), dim=-1)
    density = d.log_prob(grid).exp() * (0.5 / sub) ** 2
    n_cells = len(edges) - 1
    mass = density.reshape(n_cells, sub, n_cells, sub).sum((1, 3)).flatten()
    counts, _, _ = np.histogram2d(x[:, 0].numpy(), x[:, 1].numpy(), bins=[edges.numpy()] * 2)
    counts = torch.as_tensor(counts).flatten()
    expected = mass * len(x)
    big = expected >= 5
    observed = torch.cat([counts[big], (len(x) - counts[big].sum()).unsqueeze(0)])
    expected = torch.cat([expected[big], (len(x) - expected[big].sum()).unsqueeze(0)])
    pvalue = stats.chisquare(observed.numpy(), expected.numpy()).pvalue
    assert pvalue > 1e-3, pvalue


@pytest.mark.parametrize("name", list(NOISE_1D))
def test_mean_and_variance_match_samples(name):
    d = _noisy_1d(name)
    x = d.sample((200000,))
    se_mean = (d.variance / len(x)).sqrt()
    assert ((x.mean(0) - d.mean).abs() < Z_THRESHOLD * se_mean).all()
    centred = x - d.mean
    se_var = ((centred**4).mean(0) - d.variance**2).sqrt() / math.sqrt(len(x))
    assert ((centred.square().mean(0) - d.variance).abs() < Z_THRESHOLD * se_var).all()


# --- rsample ---------------------------------------------------------------------------------


def test_has_rsample_is_honest():
    assert _noisy_1d("additive").has_rsample
    assert _noisy_1d("shift").has_rsample
    assert not _noisy_1d("jitter").has_rsample
    assert not _noisy_1d("shift-per-component").has_rsample
    with pytest.raises(NotImplementedError, match="ScaleJitter"):
        _noisy_1d("jitter").rsample()


@pytest.mark.slow
def test_rsample_gradient_is_unbiased():
    """Pathwise gradients of E[cos(a x + b)] against the closed form (additive, shift, errors)."""
    a, b = 0.7, 0.3
    leaves = {
        "locs": MEANS.unsqueeze(-1).clone().requires_grad_(),
        "log_scales": STDS.log().unsqueeze(-1).clone().requires_grad_(),
        "logits": WEIGHTS.log().clone().requires_grad_(),
        "noise_loc": ERROR_MEANS.unsqueeze(-1).clone().requires_grad_(),
        "log_noise_scale": ERROR_STDS.log().unsqueeze(-1).clone().requires_grad_(),
    }
    obs = torch.tensor([[0.3]], dtype=F64)

    def build():
        latent = DiagNormalMixture(leaves["locs"], leaves["log_scales"].exp(), leaves["logits"])
        noise = [
            AdditiveNormal(leaves["noise_loc"], leaves["log_noise_scale"].exp()),
            IntegerShift(-1, 2),
        ]
        return NoisyMixture(latent, noise, observation_scales=obs)

    d = build()
    var = (d.mixture.scales.square() + d.noise_scale.square() + obs.square()).squeeze(-1)
    loc = (d.mixture.locs + d.noise_loc).squeeze(-1)  # [1, K]
    shifts = torch.tensor([-1.0, 0.0, 1.0], dtype=F64).unsqueeze(-1)  # [C, 1]
    component = (torch.exp(-0.5 * a**2 * var) * torch.cos(a * (loc + shifts) + b)).mean(0)
    truth = torch.autograd.grad((d.mixture.probs * component).sum(), list(leaves.values()))
    truth = torch.cat([t.flatten() for t in truth])
    estimates = []
    for _ in range(64):
        x = build().rsample((2000,))
        f = torch.cos(a * x + b).mean()
        grads = torch.autograd.grad(f, list(leaves.values()))
        estimates.append(torch.cat([g.flatten() for g in grads]))
    z = standard_error_z(torch.stack(estimates), truth)
    assert z.abs().max() < Z_THRESHOLD, z


# --- shapes, errors, per-observation errors ---------------------------------------------------


@pytest.mark.parametrize("batch_shape", [(), (2,), (2, 3)], ids=str)
def test_shapes_and_expand(batch_shape):
    locs = torch.randn(*batch_shape, 3, 2, dtype=F64)
    latent = DiagNormalMixture(locs, torch.ones_like(locs), torch.zeros(*batch_shape, 3, dtype=F64))
    d = NoisyMixture(latent, [ScaleJitter(0.1), AdditiveNormal(0.0, 0.2), IntegerShift(0, 2)])
    assert d.batch_shape == batch_shape and d.event_shape == (2,)
    x = d.sample((4,))
    assert x.shape == (4, *batch_shape, 2)
    assert d.log_prob(x).shape == (4, *batch_shape)
    e = d.expand((5, *batch_shape))
    assert e.batch_shape == (5, *batch_shape)
    torch.testing.assert_close(
        e.log_prob(x.unsqueeze(1)), d.log_prob(x).unsqueeze(1).expand(4, 5, *batch_shape)
    )
    assert repr(d).startswith("NoisyMixture")


def test_with_errors_scores_each_point_with_its_error():
    d = _noisy_1d("all", quadrature_order=16)
    errors = torch.rand(7, 1, dtype=F64)
    x = d.sample((7,))
    batched = d.with_errors(errors)
    assert batched.batch_shape == (7,)
    for n in range(7):
        one = d.with_errors(errors[n])
        torch.testing.assert_close(batched.log_prob(x)[n], one.log_prob(x[n]))
    assert batched.sample().shape == (7, 1)
    with pytest.raises(ValueError, match="observation_scales"):
        batched.log_prob(x[:5])


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: ScaleJitter(-0.1), "scale"),
        (lambda: AdditiveNormal(0.0, torch.tensor([0.1, -0.2])), "scale"),
        (lambda: IntegerShift(2, 2), "low"),
        (lambda: IntegerShift(torch.tensor([0, 3]), torch.tensor([1, 2])), "low"),
        (lambda: IntegerShift(torch.tensor(0.5), 2), "low"),
        (lambda: _latent_with_errors(torch.tensor([[-1.0]], dtype=F64)), "observation_scales"),
        (lambda: _latent_with_errors(torch.ones(4, 2, dtype=F64)), "observation_scales"),
        (lambda: deconvolve(torch.randn(10, 2), torch.ones(9, 2), 2), "errors"),
        (lambda: deconvolve(torch.randn(10, 2), -torch.ones(10, 2), 2), "errors"),
        (lambda: NoisyMixture(_latent(), ScaleJitter(torch.ones(4, 1))), "noise"),
        (lambda: NoisyMixture(_latent(), [ScaleJitter(0.1), ScaleJitter(0.2)]), "noise"),
    ],
)
def test_bad_input_raises_value_error_naming_the_argument(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def _latent_with_errors(scales):
    return NoisyMixture(_latent()).with_errors(scales)


# --- deconvolution ----------------------------------------------------------------------------


@pytest.mark.slow
def test_deconvolution_recovers_the_latent_components():
    """Extreme deconvolution recovers the components; plain EM on the same data is too wide.

    Tolerances are 5 standard errors from the Fisher information of each parameter for
    well-separated components: per component, ``se(mu) = (sum_n 1/T_n)^(-1/2)``,
    ``se(sigma^2) = (sum_n 1/(2 T_n^2))^(-1/2)``, ``se(sigma) = se(sigma^2) / (2 sigma)``,
    ``se(pi) = sqrt(pi (1 - pi) / N)``, with ``T_n = sigma^2 + s_n^2`` per dimension.
    """
    gen = torch.Generator().manual_seed(5)
    locs = torch.tensor([[-4.0, 0.0], [0.0, 4.0], [4.0, -1.0]], dtype=F64)
    scales = torch.tensor([[0.5, 0.8], [0.7, 0.4], [0.6, 0.6]], dtype=F64)
    probs = torch.tensor([0.5, 0.3, 0.2], dtype=F64)
    n = 6000
    index = torch.multinomial(probs, n, replacement=True, generator=gen)
    latent = locs[index] + scales[index] * torch.randn(n, 2, dtype=F64, generator=gen)
    errors = 0.3 + 0.9 * torch.rand(n, 2, dtype=F64, generator=gen)
    data = latent + errors * torch.randn(n, 2, dtype=F64, generator=gen)

    fit = deconvolve(data, errors, 3, seed=0)
    naive = deconvolve(data, 0.0, 3, seed=0)
    assert fit.converged
    trace = torch.tensor(fit.log_likelihood)
    assert (trace.diff() > -1e-12).all()  # EM never decreases the likelihood

    order = fit.mixture.locs[:, 0].argsort()
    naive_order = naive.mixture.locs[:, 0].argsort()
    member = [errors[index == k] for k in range(3)]
    se_mu = torch.stack(
        [(1 / (scales[k] ** 2 + m**2)).sum(0).rsqrt() for k, m in enumerate(member)]
    )
    se_var = torch.stack(
        [(0.5 / (scales[k] ** 2 + m**2).square()).sum(0).rsqrt() for k, m in enumerate(member)]
    )
    se_sigma = se_var / (2 * scales)
    se_pi = (probs * (1 - probs) / n).sqrt()
    assert ((fit.mixture.locs[order] - locs).abs() < 5 * se_mu).all()
    assert ((fit.mixture.scales[order] - scales).abs() < 5 * se_sigma).all()
    assert ((fit.mixture.probs[order] - probs).abs() < 5 * se_pi).all()
    # Ignoring the errors inflates every scale by far more than the tolerance.
    naive_excess = naive.mixture.scales[naive_order] - scales
    assert (naive_excess > 10 * se_sigma).all(), naive_excess

    # The EM objective is the NoisyMixture likelihood with the per-point errors, and the EM
    # fixed point is a stationary point of it (what gradient-based maximum likelihood finds).
    locs = fit.mixture.locs.clone().requires_grad_()
    log_scales = fit.mixture.scales.log().requires_grad_()
    logits = fit.mixture.logits.clone().requires_grad_()
    latent = DiagNormalMixture(locs, log_scales.exp(), logits)
    mean_log_lik = NoisyMixture(latent).with_errors(errors).log_prob(data).mean()
    assert abs(mean_log_lik.item() - fit.log_likelihood[-1]) < 1e-6
    grads = torch.autograd.grad(mean_log_lik, [locs, log_scales, logits])
    assert max(g.abs().max().item() for g in grads) < 1e-4


def test_jitter_log_prob_in_float32_with_flush_denormal():
    """The smallest quadrature weights are subnormal in float32; their logs come from float64."""
    mixture = DiagNormalMixture(torch.zeros(2, 1), torch.ones(2, 1), torch.zeros(2))
    noisy = NoisyMixture(mixture, ScaleJitter(0.5))
    reference = noisy.log_prob(torch.zeros(3, 1))
    torch.set_flush_denormal(True)
    try:
        flushed = noisy.log_prob(torch.zeros(3, 1))
    finally:
        torch.set_flush_denormal(False)
    assert torch.allclose(flushed, reference)
