"""Generic checks that every distribution in the registry (``tests/conftest.py``) must pass."""

from __future__ import annotations

import io
import math

import pytest
import scipy.stats
import torch
from pyro.distributions.testing.gof import auto_goodness_of_fit

from tests.conftest import Z_THRESHOLD, standard_error_z


def test_shapes(example, batch_shape, sample_shape):
    _, d = example(batch_shape)
    event_shape = d.event_shape
    assert d.batch_shape == batch_shape
    assert len(event_shape) == 1
    x = d.sample(sample_shape)
    assert x.shape == sample_shape + batch_shape + event_shape
    if example.has_rsample:
        assert d.rsample(sample_shape).shape == sample_shape + batch_shape + event_shape
    assert d.log_prob(x).shape == sample_shape + batch_shape
    if _has_moments(d):
        assert d.mean.shape == batch_shape + event_shape
        assert d.variance.shape == batch_shape + event_shape
    if hasattr(d, "log_responsibilities"):
        assert d.log_responsibilities(x).shape == sample_shape + batch_shape + (d.num_components,)


def _has_moments(d) -> bool:
    try:
        d.mean  # noqa: B018
    except NotImplementedError:
        return False
    return True


def test_log_prob_broadcasts_value(example, batch_shape):
    _, d = example(batch_shape)
    x = d.sample((3,))  # [3, *B, D]
    # A point without batch dims is scored under every batch element.
    point = x.reshape(-1, d.event_shape[0])[0]  # [D]
    expanded = point.expand(batch_shape + d.event_shape)
    assert d.log_prob(point).shape == batch_shape
    torch.testing.assert_close(d.log_prob(point), d.log_prob(expanded))
    # Size-one batch dims in the value broadcast too.
    ones = x[(slice(None),) + (slice(0, 1),) * len(batch_shape)]  # [3, 1, ..., D]
    assert d.log_prob(ones).shape == (3, *batch_shape)
    torch.testing.assert_close(d.log_prob(ones), d.log_prob(ones.expand_as(x)))


def test_expand(example, batch_shape):
    _, d = example(batch_shape)
    new_shape = (4, *batch_shape)
    e = d.expand(new_shape)
    assert type(e) is type(d)
    assert e.batch_shape == new_shape
    assert e.sample().shape == new_shape + d.event_shape
    x = d.sample((2,))
    torch.testing.assert_close(
        e.log_prob(x.unsqueeze(1)), d.log_prob(x).unsqueeze(1).expand(2, *new_shape)
    )
    for name in ("temperature", "straight_through"):
        assert getattr(e, name, None) == getattr(d, name, None)


def test_sample_is_detached_and_rsample_is_not(example, sample_shape):
    _, d = example((2,))
    assert not d.sample(sample_shape).requires_grad
    assert d.has_rsample == example.has_rsample
    if example.has_rsample:
        assert d.rsample(sample_shape).requires_grad


def test_rsample_gradients_reach_every_parameter(example, batch_shape):
    if not example.has_rsample:
        pytest.skip("no rsample")
    params, d = example(batch_shape)
    z = d.rsample((64,))
    torch.sin(z).sum().backward()
    for name, p in params.items():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().amax() > 0, name


def test_log_prob_integrates_to_one(example):
    """Trapezoid rule on a box around 10^5 draws, widened by 12 standard deviations.

    The trapezoid rule converges faster than any power of the step for smooth functions that
    vanish at the ends, so the error is far below the 1e-6 tolerance.
    """
    _, d = example((2,))
    dim = d.event_shape[0]
    if dim > 2:
        pytest.skip("grid integration only in 1-D and 2-D")
    with torch.no_grad():
        # A box around 10^5 draws, widened by 12 of their standard deviations.
        x = d.sample((100000,)).reshape(-1, dim)
        reach = 12 * x.std(0)
        lo = (x.amin(0) - reach).tolist()
        hi = (x.amax(0) + reach).tolist()
        axes = [
            torch.linspace(a, b, 801 if dim == 2 else 20001, dtype=torch.float64)
            for a, b in zip(lo, hi, strict=True)
        ]
        grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)  # [*G, D]
        density = d.log_prob(grid.unsqueeze(-2)).exp()  # [*G, 2]
        for axis in reversed(axes):
            density = torch.trapezoid(density, axis, dim=0)
    torch.testing.assert_close(density, torch.ones(2, dtype=torch.float64), atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", ["sample", "rsample"])
def test_samples_match_log_prob(example, method):
    """Goodness of fit of draws against ``log_prob`` for each element of a batch.

    1-D and 3-D: Pyro's ``auto_goodness_of_fit``. 2-D: a chi-square test of the draws' counts in
    a grid of cells against the cells' masses integrated from ``log_prob`` (Pyro's 2-D
    nearest-neighbour test is poorly calibrated: p < 1e-3 for 7 of 60 seeds of an exact sampler).
    """
    _, d = example((2,))
    if method == "rsample" and not (example.has_rsample and example.exact_rsample):
        pytest.skip("no rsample, or relaxed draws that do not follow the density")
    num_samples = 4000
    with torch.no_grad():
        x = getattr(d, method)((num_samples,))
        for b in range(2):
            if d.event_shape[0] == 2:
                p_value = _chi_square_2d(
                    x[:, b], lambda v, b=b: d.log_prob(v.unsqueeze(-2))[..., b]
                )
            else:
                p_value = auto_goodness_of_fit(x[:, b], d.log_prob(x).exp()[:, b])
            assert p_value > 1e-3, f"batch element {b}: p = {p_value}"


def _chi_square_2d(x, log_prob, cells=8, sub=12):
    """p-value of Pearson's chi-square: draws in ``cells`` x ``cells`` boxes between their 1% and
    99% quantiles (plus one cell for the rest) against masses from a ``sub`` x ``sub`` midpoint
    rule in each box; boxes expecting fewer than 5 draws join the rest."""
    lo, hi = torch.quantile(x, 0.01, dim=0), torch.quantile(x, 0.99, dim=0)
    edges = [torch.linspace(lo[i], hi[i], cells + 1, dtype=x.dtype) for i in range(2)]
    steps = [(e[1] - e[0]) / sub for e in edges]
    mids = [
        e[0] + steps[i] * (torch.arange(cells * sub, dtype=x.dtype) + 0.5)
        for i, e in enumerate(edges)
    ]
    grid = torch.stack(torch.meshgrid(*mids, indexing="ij"), -1)  # [C*s, C*s, 2]
    mass = log_prob(grid).exp() * steps[0] * steps[1]
    mass = mass.reshape(cells, sub, cells, sub).sum((1, 3)).flatten()  # [C*C]
    index = [torch.bucketize(x[:, i].contiguous(), edges[i][1:-1]) for i in range(2)]
    inside = (x >= lo).all(-1) & (x <= hi).all(-1)
    counts = torch.bincount((index[0] * cells + index[1])[inside], minlength=cells * cells)
    expected = mass * len(x)
    keep = expected >= 5
    observed = torch.cat([counts[keep].double(), (len(x) - counts[keep].sum()).double().reshape(1)])
    expected = torch.cat([expected[keep], (len(x) - expected[keep].sum()).reshape(1)])
    statistic = ((observed - expected).square() / expected).sum().item()
    return float(scipy.stats.chi2.sf(statistic, len(observed) - 1))


def _cos_objective(d, a, b):
    r"""Closed form of :math:`E[\cos(a \cdot z + b)]` for a Gaussian mixture (diagonal or not)."""
    if hasattr(d, "scales"):
        spread = (a.square() * d.scales.square()).sum(-1)  # a^T Sigma_k a, [*B, K]
    else:
        spread = torch.einsum("...kij,i,j->...k", d.component_covariance_matrix, a, a)
    comp = torch.exp(-0.5 * spread) * torch.cos((d.locs * a).sum(-1) + b)
    return (d.probs * comp).sum(-1)


def test_rsample_gradient_is_unbiased(example):
    """Mean of independent pathwise gradient estimates against the analytic gradient."""
    if not example.unbiased_gradient:
        pytest.skip("biased by design (relaxed, straight-through) or checked in its own file")
    params, d = example((2,))
    dim = d.event_shape[0]
    a = torch.linspace(-0.9, 0.7, dim, dtype=torch.float64)
    b = 0.3
    leaves = list(params.values())
    truth = torch.autograd.grad(_cos_objective(d, a, b).sum(), leaves)
    truth = torch.cat([t.flatten() for t in truth])
    estimates = []
    for _ in range(64):
        z = example.build(params).rsample((2000,))
        f = torch.cos((z * a).sum(-1) + b).mean(0).sum()
        estimates.append(torch.cat([g.flatten() for g in torch.autograd.grad(f, leaves)]))
    z_scores = standard_error_z(torch.stack(estimates), truth)
    assert z_scores.abs().max() < Z_THRESHOLD, z_scores


def test_mean_and_variance(example):
    _, d = example((2,))
    if not _has_moments(d):
        pytest.skip("no closed-form moments")
    x = d.sample((200000,))
    se_mean = (d.variance / x.shape[0]).sqrt()
    assert ((x.mean(0) - d.mean).abs() < Z_THRESHOLD * se_mean).all()
    # The sample variance's standard error, from the fourth central moment of the draws.
    centred = x - d.mean
    se_var = ((centred**4).mean(0) - d.variance**2).sqrt() / math.sqrt(x.shape[0])
    assert ((centred.square().mean(0) - d.variance).abs() < Z_THRESHOLD * se_var).all()


def test_log_responsibilities_are_bayes_rule(example, batch_shape):
    _, d = example(batch_shape)
    if not hasattr(d, "log_responsibilities"):
        pytest.skip("not a mixture")
    x = d.sample((5,))
    log_r = d.log_responsibilities(x)
    torch.testing.assert_close(log_r.logsumexp(-1), torch.zeros_like(log_r[..., 0]))
    if hasattr(d, "scales"):
        normal = torch.distributions.Normal(d.locs, d.scales)
        component = torch.distributions.Independent(normal, 1)
    else:
        component = torch.distributions.MultivariateNormal(d.locs, d.component_covariance_matrix)
    log_joint = d.logits + component.log_prob(x.unsqueeze(-2))
    torch.testing.assert_close(log_r, log_joint.log_softmax(-1))


def test_save_and_load(example, batch_shape):
    _, d = example(batch_shape)
    buffer = io.BytesIO()
    torch.save(d, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    x = d.sample((3,))
    torch.testing.assert_close(loaded.log_prob(x), d.log_prob(x))
    assert type(loaded) is type(d)


def test_repr(example):
    _, d = example((2,))
    assert repr(d).startswith(type(d).__name__)


def test_float32(example):
    params, d = example((2,), dtype=torch.float32)
    z = d.rsample((10,)) if example.has_rsample else d.sample((10,))
    assert z.dtype == torch.float32
    assert d.log_prob(z).dtype == torch.float32
    (torch.sin(z).sum() if example.has_rsample else d.log_prob(z).sum()).backward()
    assert all(p.grad is not None for p in params.values())
