"""Checks specific to :class:`DiagNormalMixture`: reference values, numerics, batching."""

from __future__ import annotations

import pyro.distributions as pdist
import pytest
import torch
import torch.distributions as td

from pyro_mixflow import DiagNormalMixture
from pyro_mixflow.distributions._implicit import implicit_mixture_rsample
from tests.conftest import Z_THRESHOLD, standard_error_z


def _reference(locs, scales, logits):
    return td.MixtureSameFamily(
        td.Categorical(logits=logits), td.Independent(td.Normal(locs, scales), 1)
    )


@pytest.mark.parametrize("batch_shape", [(), (3,), (2, 3)])
@pytest.mark.parametrize("num_components,dim", [(1, 1), (5, 1), (4, 3), (16, 40)])
def test_log_prob_matches_mixture_same_family(batch_shape, num_components, dim):
    locs = torch.randn(*batch_shape, num_components, dim, dtype=torch.float64)
    scales = torch.rand(*batch_shape, num_components, dim, dtype=torch.float64) + 0.2
    logits = torch.randn(*batch_shape, num_components, dtype=torch.float64)
    x = 2 * torch.randn(7, *batch_shape, dim, dtype=torch.float64)
    ours = DiagNormalMixture(locs, scales, logits).log_prob(x)
    torch.testing.assert_close(ours, _reference(locs, scales, logits).log_prob(x))


def test_parameters_broadcast_against_each_other():
    locs = torch.randn(4, 2, dtype=torch.float64)  # shared by the batch
    scales = torch.ones(1, 2, dtype=torch.float64)  # shared by the components
    logits = torch.randn(3, 4, dtype=torch.float64)  # batch of 3
    d = DiagNormalMixture(locs, scales, logits)
    assert d.batch_shape == (3,) and d.event_shape == (2,) and d.num_components == 4
    x = torch.randn(5, 3, 2, dtype=torch.float64)
    ref = _reference(locs.expand(3, 4, 2), scales.expand(3, 4, 2), logits)
    torch.testing.assert_close(d.log_prob(x), ref.log_prob(x))


def test_log_prob_is_stable_far_from_every_component():
    locs = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    d = DiagNormalMixture(locs, torch.full((2, 2), 0.1), logits=torch.zeros(2))
    x = torch.tensor([[300.0, -300.0], [1e3, 1e3]])
    ours = d.log_prob(x)
    ref = _reference(locs.double(), torch.full((2, 2), 0.1).double(), torch.zeros(2).double())
    expected = ref.log_prob(x.double()).float()
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=0)


def test_log_prob_avoids_cancellation_near_a_distant_component():
    """Large means and small scales: the expanded quadratic form alone loses ~10 nats here."""
    locs = torch.tensor([[1e3, -1e3], [-1e3, 1e3], [1e3, 1e3]])
    scales = torch.full((3, 2), 0.05)
    logits = torch.tensor([0.1, -0.2, 0.3])
    d = DiagNormalMixture(locs, scales, logits)
    x = d.sample((1000,))
    expected = _reference(locs.double(), scales.double(), logits.double()).log_prob(x.double())
    torch.testing.assert_close(d.log_prob(x).double(), expected, atol=1e-4, rtol=1e-5)


def test_log_prob_gradients_match_reference():
    locs = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    scales = (torch.rand(2, 5, 3, dtype=torch.float64) + 0.3).requires_grad_()
    logits = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    x = torch.randn(11, 2, 3, dtype=torch.float64)
    ours = torch.autograd.grad(
        DiagNormalMixture(locs, scales, logits).log_prob(x).sum(), [locs, scales, logits]
    )
    ref = torch.autograd.grad(
        _reference(locs, scales, logits).log_prob(x).sum(), [locs, scales, logits]
    )
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b)


def test_log_prob_hessians_match_reference():
    """Second derivatives (Laplace approximations, Newton steps) in parameters and value."""
    locs = torch.randn(3, 2, dtype=torch.float64)
    scales = torch.rand(3, 2, dtype=torch.float64) + 0.5
    logits = torch.randn(3, dtype=torch.float64)
    x = torch.randn(5, 2, dtype=torch.float64)
    hessian = torch.autograd.functional.hessian
    for ours, ref, at in [
        (
            lambda m: DiagNormalMixture(m, scales, logits).log_prob(x).sum(),
            lambda m: _reference(m, scales, logits).log_prob(x).sum(),
            locs,
        ),
        (
            lambda v: DiagNormalMixture(locs, scales, logits).log_prob(v).sum(),
            lambda v: _reference(locs, scales, logits).log_prob(v).sum(),
            x,
        ),
    ]:
        torch.testing.assert_close(hessian(ours, at), hessian(ref, at))


def test_rsample_value_equals_sample_under_the_same_seed():
    d = DiagNormalMixture(torch.randn(2, 4, 3), torch.rand(2, 4, 3) + 0.5, torch.randn(2, 4))
    torch.manual_seed(5)
    x = d.sample((6,))
    torch.manual_seed(5)
    torch.testing.assert_close(d.rsample((6,)), x)


def test_batched_samples_follow_their_own_parameters():
    """Pyro's MixtureOfDiagNormals draws from the wrong batch element's weights; we must not."""
    locs = torch.tensor([[[-5.0], [5.0]], [[-5.0], [5.0]]], dtype=torch.float64)
    logits = torch.tensor([[4.0, -4.0], [-4.0, 4.0]], dtype=torch.float64)
    d = DiagNormalMixture(locs, torch.ones(2, 2, 1, dtype=torch.float64), logits)
    x = d.rsample((20000,))
    share_right = (x[..., 0] > 0).double().mean(0)
    expected = torch.sigmoid(torch.tensor([-8.0, 8.0], dtype=torch.float64))
    se = (expected * (1 - expected) / 20000).sqrt()
    assert ((share_right - expected).abs() < Z_THRESHOLD * se + 1e-12).all(), share_right


def _cos_objective(locs, scales, logits, a, b):
    comp = torch.exp(-0.5 * (a.square() * scales.square()).sum(-1)) * torch.cos(
        (locs * a).sum(-1) + b
    )
    return (logits.softmax(-1) * comp).sum(-1)


def _gradient_z_scores(locs, scales, logits, a, b, num_estimates=64, num_samples=2000):
    leaves = [locs, scales, logits]
    truth = torch.autograd.grad(_cos_objective(locs, scales, logits, a, b).sum(), leaves)
    truth = torch.cat([t.flatten() for t in truth])
    estimates = []
    for _ in range(num_estimates):
        z = DiagNormalMixture(locs, scales, logits).rsample((num_samples,))
        f = torch.cos((z * a).sum(-1) + b).mean(0).sum()
        estimates.append(torch.cat([g.flatten() for g in torch.autograd.grad(f, leaves)]))
    return standard_error_z(torch.stack(estimates), truth)


def test_rsample_gradient_is_unbiased_with_coincident_components():
    loc = torch.randn(1, 2, dtype=torch.float64)
    locs = torch.cat([loc, loc, loc + 1.5]).requires_grad_()
    scales = torch.tensor(
        [[0.7, 1.1], [0.7, 1.1], [0.5, 0.5]], dtype=torch.float64
    ).requires_grad_()
    logits = torch.tensor([0.2, -0.4, 0.1], dtype=torch.float64, requires_grad=True)
    a = torch.tensor([0.8, -0.6], dtype=torch.float64)
    z = _gradient_z_scores(locs, scales, logits, a, 0.4)
    assert z.abs().max() < Z_THRESHOLD, z


@pytest.mark.slow
def test_rsample_gradient_is_unbiased_in_eight_dimensions():
    locs = (1.5 * torch.randn(5, 8, dtype=torch.float64)).requires_grad_()
    scales = (torch.rand(5, 8, dtype=torch.float64) + 0.4).requires_grad_()
    logits = torch.randn(5, dtype=torch.float64, requires_grad=True)
    a = 0.4 * torch.randn(8, dtype=torch.float64)
    z = _gradient_z_scores(locs, scales, logits, a, -0.2)
    assert z.abs().max() < Z_THRESHOLD, z


def test_rsample_backward_is_exact_in_float32_at_256_dimensions():
    """Float32 gradients at D = 256 agree with float64 ones for the same draws.

    Pyro's MixtureOfDiagNormals returns NaN gradients here.
    """
    torch.manual_seed(1)
    num_components, dim = 8, 256
    params64 = [
        torch.randn(num_components, dim, dtype=torch.float64),
        torch.rand(num_components, dim, dtype=torch.float64) + 0.5,
        torch.randn(num_components, dtype=torch.float64),
    ]
    z64 = DiagNormalMixture(*params64).sample((64,))
    grads = {}
    for dtype in (torch.float32, torch.float64):
        locs, scales, logits = (p.to(dtype).requires_grad_() for p in params64)
        d = DiagNormalMixture(locs, scales, logits)
        z = implicit_mixture_rsample(d.locs, d.scales, d.logits, z64.to(dtype))
        torch.sin(z).sum().backward()
        grads[dtype] = [p.grad.double() for p in (locs, scales, logits)]
    for g32, g64 in zip(grads[torch.float32], grads[torch.float64], strict=True):
        assert torch.isfinite(g32).all()
        torch.testing.assert_close(g32, g64, rtol=1e-3, atol=1e-3 * g64.abs().max().item())


def test_implicit_backward_uses_blocks_of_samples(monkeypatch):
    """The blocked backward pass gives the same gradient as one block."""
    from pyro_mixflow.distributions import _implicit

    locs = torch.randn(3, 4, 2, dtype=torch.float64, requires_grad=True)
    scales = (torch.rand(3, 4, 2, dtype=torch.float64) + 0.5).requires_grad_()
    logits = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    z = DiagNormalMixture(locs, scales, logits).sample((50,))

    def grads():
        out = _implicit.implicit_mixture_rsample(
            locs, scales, logits - logits.logsumexp(-1, True), z
        )
        return torch.autograd.grad(torch.sin(out).sum(), [locs, scales, logits])

    whole = grads()
    monkeypatch.setattr(_implicit, "_BLOCK_ELEMENTS", 3 * 4 * 2 * 7)
    for a, b in zip(grads(), whole, strict=True):
        torch.testing.assert_close(a, b)


def test_pyro_sample_and_plate():
    import pyro

    d = DiagNormalMixture(torch.randn(3, 2), torch.ones(3, 2), torch.zeros(3))

    def model():
        with pyro.plate("data", 5):
            return pyro.sample("x", d.expand([5]))

    trace = pyro.poutine.trace(model).get_trace()
    assert trace.nodes["x"]["value"].shape == (5, 2)
    assert trace.log_prob_sum().isfinite()
    assert isinstance(d, pdist.TorchDistribution)
