"""Checks specific to the full- and low-rank-covariance mixtures and :func:`reparameterized`."""

from __future__ import annotations

import pyro.distributions as pdist
import pytest
import torch
import torch.distributions as td

from pyro_mixflow import (
    DiagNormalMixture,
    LowRankMultivariateNormalMixture,
    MultivariateNormalMixture,
    reparameterized,
)
from pyro_mixflow.distributions._implicit import implicit_mixture_rsample
from pyro_mixflow.distributions._mvn_mixture import implicit_mvn_mixture_rsample
from tests.conftest import Z_THRESHOLD, standard_error_z

F64 = torch.float64


def _random_tril(*shape, dtype=F64, off=0.5):
    dim = shape[-1]
    tril = off * torch.randn(*shape, dim, dtype=dtype).tril(-1)
    return tril + torch.diag_embed(torch.rand(*shape, dtype=dtype) + 0.5)


def _mvn_reference(locs, tril, logits):
    return td.MixtureSameFamily(
        td.Categorical(logits=logits), td.MultivariateNormal(locs, scale_tril=tril)
    )


# --- log_prob ----------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_shape", [(), (3,), (2, 3)])
@pytest.mark.parametrize("num_components,dim", [(1, 1), (5, 1), (4, 3), (8, 16)])
@pytest.mark.parametrize("matrix", ["scale_tril", "covariance_matrix", "precision_matrix"])
def test_log_prob_matches_mixture_same_family(batch_shape, num_components, dim, matrix):
    locs = torch.randn(*batch_shape, num_components, dim, dtype=F64)
    tril = _random_tril(*batch_shape, num_components, dim)
    logits = torch.randn(*batch_shape, num_components, dtype=F64)
    cov = tril @ tril.mT
    given = {"scale_tril": tril, "covariance_matrix": cov, "precision_matrix": cov.inverse()}
    d = MultivariateNormalMixture(locs, logits=logits, **{matrix: given[matrix]})
    x = 2 * torch.randn(7, *batch_shape, dim, dtype=F64)
    torch.testing.assert_close(d.log_prob(x), _mvn_reference(locs, tril, logits).log_prob(x))
    torch.testing.assert_close(d.scale_tril, tril)


@pytest.mark.parametrize("batch_shape", [(), (3,), (2, 3)])
@pytest.mark.parametrize("num_components,dim,rank", [(1, 1, 1), (4, 3, 2), (6, 16, 3)])
def test_low_rank_log_prob_matches_mixture_same_family(batch_shape, num_components, dim, rank):
    locs = torch.randn(*batch_shape, num_components, dim, dtype=F64)
    factor = torch.randn(*batch_shape, num_components, dim, rank, dtype=F64)
    diag = torch.rand(*batch_shape, num_components, dim, dtype=F64) + 0.2
    logits = torch.randn(*batch_shape, num_components, dtype=F64)
    ref = td.MixtureSameFamily(
        td.Categorical(logits=logits), td.LowRankMultivariateNormal(locs, factor, diag)
    )
    d = LowRankMultivariateNormalMixture(locs, factor, diag, logits)
    x = 2 * torch.randn(7, *batch_shape, dim, dtype=F64)
    torch.testing.assert_close(d.log_prob(x), ref.log_prob(x))
    torch.testing.assert_close(
        d.component_covariance_matrix, ref.component_distribution.covariance_matrix
    )


def test_parameters_broadcast_against_each_other():
    locs = torch.randn(4, 2, dtype=F64)  # shared by the batch
    tril = _random_tril(1, 2)  # shared by the components
    logits = torch.randn(3, 4, dtype=F64)  # batch of 3
    d = MultivariateNormalMixture(locs, tril, logits)
    assert d.batch_shape == (3,) and d.event_shape == (2,) and d.num_components == 4
    x = torch.randn(5, 3, 2, dtype=F64)
    ref = _mvn_reference(locs.expand(3, 4, 2), tril.expand(3, 4, 2, 2), logits)
    torch.testing.assert_close(d.log_prob(x), ref.log_prob(x))


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_log_prob_is_finite_far_from_every_component(dtype):
    locs = torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=F64)
    tril = torch.tensor([[[0.1, 0.0], [0.05, 0.1]], [[0.2, 0.0], [-0.1, 0.1]]], dtype=F64)
    factor = torch.tensor([[[0.1], [0.05]], [[0.2], [-0.1]]], dtype=F64)
    diag = torch.full((2, 2), 0.01, dtype=F64)
    logits = torch.zeros(2, dtype=F64)
    x = torch.tensor([[300.0, -300.0], [1e3, 1e3], [-5e3, 2e3]], dtype=F64)
    for ours, ref in [
        (MultivariateNormalMixture, _mvn_reference(locs, tril, logits)),
        (
            LowRankMultivariateNormalMixture,
            td.MixtureSameFamily(
                td.Categorical(logits=logits), td.LowRankMultivariateNormal(locs, factor, diag)
            ),
        ),
    ]:
        args = (tril,) if ours is MultivariateNormalMixture else (factor, diag)
        d = ours(locs.to(dtype), *(a.to(dtype) for a in args), logits.to(dtype))
        out = d.log_prob(x.to(dtype))
        assert torch.isfinite(out).all() and out.dtype == dtype
        torch.testing.assert_close(out.double(), ref.log_prob(x), rtol=1e-5, atol=0)


def test_log_prob_gradients_and_hessian_match_reference():
    locs = torch.randn(2, 5, 3, dtype=F64, requires_grad=True)
    tril = _random_tril(2, 5, 3).requires_grad_()
    logits = torch.randn(2, 5, dtype=F64, requires_grad=True)
    x = torch.randn(11, 2, 3, dtype=F64, requires_grad=True)
    leaves = [locs, tril, logits, x]
    ours = MultivariateNormalMixture(locs, tril, logits).log_prob(x).sum()
    ref = _mvn_reference(locs, tril, logits).log_prob(x).sum()
    for a, b in zip(
        torch.autograd.grad(ours, leaves), torch.autograd.grad(ref, leaves), strict=True
    ):
        torch.testing.assert_close(a, b)
    # Second derivatives in the means (Laplace approximations, Newton steps).
    tril0, logits0, x0 = tril[0].detach(), logits[0].detach(), x[:, 0].detach()
    hessian = torch.autograd.functional.hessian
    h_ours = hessian(
        lambda m: MultivariateNormalMixture(m, tril0, logits0).log_prob(x0).sum(), locs[0].detach()
    )
    h_ref = hessian(
        lambda m: _mvn_reference(m, tril0, logits0).log_prob(x0).sum(), locs[0].detach()
    )
    torch.testing.assert_close(h_ours, h_ref)


@pytest.mark.parametrize("cls", [MultivariateNormalMixture, LowRankMultivariateNormalMixture])
def test_log_prob_backward_twice_with_retained_graph(cls):
    """The backward pass recomputes its blocks: a second one must find what it needs."""
    locs = torch.randn(4, 3, dtype=F64, requires_grad=True)
    if cls is MultivariateNormalMixture:
        d = cls(locs, _random_tril(4, 3), torch.zeros(4, dtype=F64))
    else:
        d = cls(
            locs,
            torch.randn(4, 3, 2, dtype=F64),
            torch.rand(4, 3, dtype=F64) + 0.2,
            torch.zeros(4, dtype=F64),
        )
    out = d.log_prob(torch.randn(9, 3, dtype=F64)).sum()
    (first,) = torch.autograd.grad(out, locs, retain_graph=True)
    (second,) = torch.autograd.grad(out, locs)
    torch.testing.assert_close(first, second)


def _low_rank_leaves(batch_shape, num_components, dim, rank, dtype=F64):
    locs = torch.randn(*batch_shape, num_components, dim, dtype=dtype)
    factor = torch.randn(*batch_shape, num_components, dim, rank, dtype=dtype)
    diag = torch.rand(*batch_shape, num_components, dim, dtype=dtype) + 0.2
    logits = torch.randn(*batch_shape, num_components, dtype=dtype)
    return [t.requires_grad_() for t in (locs, factor, diag, logits)]


def _log_prob_and_grads(cls, leaves, x):
    out = cls(*leaves).log_prob(x)
    return [out, *torch.autograd.grad(out.sum(), [*leaves, x])]


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("cls", [MultivariateNormalMixture, LowRankMultivariateNormalMixture])
def test_log_prob_in_blocks_equals_log_prob_at_once(monkeypatch, cls, dtype):
    """Blocks of a few points (a last, partial one too) give the values and gradients of one."""
    from pyro_mixflow.distributions import _mvn_mixture

    batch_shape = (2, 3)
    if cls is MultivariateNormalMixture:
        locs, tril, logits = _full_leaves(4, 5, batch_shape)
        leaves = [t.detach().to(dtype).requires_grad_() for t in (locs, tril, logits)]
    else:
        leaves = _low_rank_leaves(batch_shape, 4, 5, 2, dtype)
    x = torch.randn(7, 2, *batch_shape, 5, dtype=dtype, requires_grad=True)
    whole = _log_prob_and_grads(cls, leaves, x)
    monkeypatch.setattr(_mvn_mixture, "_LOG_PROB_BLOCK_ELEMENTS", 3 * 6 * 4 * 5)  # 3 of 14
    for a, b in zip(_log_prob_and_grads(cls, leaves, x), whole, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("cls", [MultivariateNormalMixture, LowRankMultivariateNormalMixture])
def test_log_prob_never_holds_a_points_by_components_by_dimensions_tensor(monkeypatch, cls):
    """Forward and backward: no tensor larger than a block or an ``N x K`` / ``N x D`` one."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from pyro_mixflow.distributions import _mvn_mixture

    class LargestTensor(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, tuple | list) else (out,):
                if isinstance(t, torch.Tensor):
                    self.largest = max(self.largest, t.numel())
            return out

    budget, num_points, num_components, dim = 1024, 512, 8, 16
    monkeypatch.setattr(_mvn_mixture, "_LOG_PROB_BLOCK_ELEMENTS", budget)
    if cls is MultivariateNormalMixture:
        leaves = list(_full_leaves(num_components, dim))
    else:
        leaves = _low_rank_leaves((), num_components, dim, 3)
    x = torch.randn(num_points, dim, dtype=F64, requires_grad=True)
    with LargestTensor() as mode:
        cls(*leaves).log_prob(x).sum().backward()
    limit = max(budget, num_points * (dim + 1), num_points * num_components)
    assert mode.largest <= limit < num_points * num_components * dim


def test_blocked_half_squares_are_twice_differentiable(monkeypatch):
    from pyro_mixflow.distributions import _mvn_mixture

    monkeypatch.setattr(_mvn_mixture, "_LOG_PROB_BLOCK_ELEMENTS", 2 * 3 * 2 * 2)
    x = torch.randn(5, 2, 3, dtype=F64, requires_grad=True)
    weight = torch.randn(2, 3, 2, 3, dtype=F64, requires_grad=True)
    shift = torch.randn(2, 3, 2, dtype=F64, requires_grad=True)
    locs = torch.randn(2, 3, 3, dtype=F64, requires_grad=True)
    precision = (torch.rand(2, 3, 3, dtype=F64) + 0.5).requires_grad_()
    for fn, args in [
        (_mvn_mixture.whitened_half_square, (x, weight, shift)),
        (_mvn_mixture.diagonal_half_square, (x, locs, precision)),
    ]:
        assert torch.autograd.gradcheck(fn, args)
        assert torch.autograd.gradgradcheck(fn, args)


def test_log_responsibilities_match_bayes_rule():
    locs = torch.randn(3, 4, 2, dtype=F64)
    tril = _random_tril(3, 4, 2)
    logits = torch.randn(3, 4, dtype=F64)
    d = MultivariateNormalMixture(locs, tril, logits)
    x = torch.randn(6, 3, 2, dtype=F64)
    component = td.MultivariateNormal(locs, scale_tril=tril).log_prob(x.unsqueeze(-2))
    expected = (logits.log_softmax(-1) + component).log_softmax(-1)
    torch.testing.assert_close(d.log_responsibilities(x), expected)


def test_covariance_matrix_is_the_mixtures():
    locs = torch.randn(2, 3, 2, dtype=F64)
    tril = _random_tril(2, 3, 2)
    probs = torch.rand(2, 3, dtype=F64)
    probs = probs / probs.sum(-1, keepdim=True)
    d = MultivariateNormalMixture(locs, tril, probs=probs)
    w = probs[..., None, None]
    second = (w * (tril @ tril.mT + locs.unsqueeze(-1) * locs.unsqueeze(-2))).sum(-3)
    expected = second - d.mean.unsqueeze(-1) * d.mean.unsqueeze(-2)
    torch.testing.assert_close(d.covariance_matrix, expected)
    torch.testing.assert_close(d.variance, expected.diagonal(dim1=-2, dim2=-1))
    low = LowRankMultivariateNormalMixture(
        locs, tril, torch.full((2, 3, 2), 1e-3, dtype=F64), probs=probs
    )
    torch.testing.assert_close(low.covariance_matrix, expected + 1e-3 * torch.eye(2, dtype=F64))
    torch.testing.assert_close(low.variance, low.covariance_matrix.diagonal(dim1=-2, dim2=-1))


# --- sampling ----------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [MultivariateNormalMixture, LowRankMultivariateNormalMixture])
def test_rsample_value_equals_sample_under_the_same_seed(cls):
    args = (
        (_random_tril(2, 4, 3),)
        if cls is MultivariateNormalMixture
        else (
            torch.randn(2, 4, 3, 2, dtype=F64),
            torch.rand(2, 4, 3, dtype=F64) + 0.1,
        )
    )
    d = cls(torch.randn(2, 4, 3, dtype=F64), *args, torch.randn(2, 4, dtype=F64))
    torch.manual_seed(5)
    x = d.sample((6,))
    torch.manual_seed(5)
    torch.testing.assert_close(d.rsample((6,)), x)


def test_sampling_with_more_components_than_dimensions():
    """The gathered-factor path (K > D) draws the same distribution as the stacked one."""
    locs = 3 * torch.randn(6, 2, dtype=F64)
    d = MultivariateNormalMixture(locs, _random_tril(6, 2), torch.randn(6, dtype=F64))
    x = d.sample((40000,))
    se = (d.variance / x.shape[0]).sqrt()
    assert ((x.mean(0) - d.mean).abs() < Z_THRESHOLD * se).all()
    centred = x - d.mean
    torch.testing.assert_close(
        centred.mT @ centred / x.shape[0], d.covariance_matrix, rtol=0.05, atol=0.05
    )


@pytest.mark.parametrize("cls", [MultivariateNormalMixture, LowRankMultivariateNormalMixture])
def test_rao_blackwell_draws_each_component(cls):
    locs = torch.tensor([[-3.0, 0.0], [2.0, 1.0]], dtype=F64)
    tril = _random_tril(2, 2)
    args = (tril,) if cls is MultivariateNormalMixture else (tril, torch.ones(2, 2, dtype=F64))
    d = cls(locs, *args, torch.tensor([0.3, -0.2], dtype=F64))
    values, log_weights = d.rao_blackwell((20000, 1))
    assert values.shape == (20000, 1, 2, 2) and log_weights.shape == (20000, 1, 2)
    torch.testing.assert_close(log_weights[0, 0], d.logits)
    values = values[:, 0]
    se = (d.component_covariance_matrix.diagonal(dim1=-2, dim2=-1) / 20000).sqrt()
    assert ((values.mean(0) - locs).abs() < Z_THRESHOLD * se).all()
    branch = d.rao_blackwell_log_prob(values[:5], log_weights[:5, 0])
    expected = (log_weights[:5, 0].exp() * d.log_prob(values[:5].movedim(-2, 0)).T).sum(-1)
    torch.testing.assert_close(branch, expected)


# --- unbiased pathwise gradients ---------------------------------------------------------------


def _moment_objectives(locs, cov, probs, a, m):
    """Closed forms of E[a . z] and E[z^T M z] under the mixture, per batch element."""
    linear = (probs * (locs @ a)).sum(-1)
    quad_k = (cov * m).sum((-2, -1)) + torch.einsum("...ki,ij,...kj->...k", locs, m, locs)
    return torch.stack([linear, (probs * quad_k).sum(-1)])


def _z_scores(leaves, build, a, m, rsample=None, num_estimates=64, num_samples=2000):
    d = build()
    cov = d.component_covariance_matrix
    truth = _moment_objectives(d.locs, cov, d.probs, a, m).reshape(2, -1).sum(-1)  # [2]
    truth = torch.cat(
        [
            torch.cat([g.flatten() for g in torch.autograd.grad(t, leaves, retain_graph=True)])
            for t in truth
        ]
    )
    estimates = []
    for _ in range(num_estimates):
        d = build()
        z = (rsample or (lambda d: d.rsample((num_samples,))))(d)
        objectives = [
            (z @ a).mean(0).sum(),
            torch.einsum("...i,ij,...j->...", z, m, z).mean(0).sum(),
        ]
        grads = [
            torch.cat([g.flatten() for g in torch.autograd.grad(f, leaves, retain_graph=True)])
            for f in objectives
        ]
        estimates.append(torch.cat(grads))
    return standard_error_z(torch.stack(estimates), truth)


def _full_leaves(num_components, dim, batch_shape=()):
    locs = (1.5 * torch.randn(*batch_shape, num_components, dim, dtype=F64)).requires_grad_()
    tril = _random_tril(*batch_shape, num_components, dim).requires_grad_()
    logits = torch.randn(*batch_shape, num_components, dtype=F64).requires_grad_()
    return locs, tril, logits


def _objective_weights(dim):
    a = torch.linspace(-0.8, 0.9, dim, dtype=F64)
    m = torch.randn(dim, dim, dtype=F64)
    return a, 0.3 * (m + m.T)


@pytest.mark.parametrize("num_components,dim,batch_shape", [(3, 3, (2,)), (4, 1, ())])
def test_rsample_gradient_is_unbiased_for_the_first_two_moments(num_components, dim, batch_shape):
    locs, tril, logits = _full_leaves(num_components, dim, batch_shape)
    a, m = _objective_weights(dim)
    z = _z_scores([locs, tril, logits], lambda: MultivariateNormalMixture(locs, tril, logits), a, m)
    z = z[z.isfinite()]  # the upper triangle of `tril` has no gradient, exactly
    assert z.abs().max() < Z_THRESHOLD, z


def test_rsample_gradient_is_unbiased_with_coincident_components():
    loc = torch.randn(1, 2, dtype=F64)
    locs = torch.cat([loc, loc, loc + 1.5]).requires_grad_()
    tril = _random_tril(1, 2)
    tril = torch.cat([tril, tril, _random_tril(1, 2)]).requires_grad_()
    logits = torch.tensor([0.2, -0.4, 0.1], dtype=F64, requires_grad=True)
    a, m = _objective_weights(2)
    cov = tril @ tril.mT
    z = _z_scores(
        [locs, tril, logits],
        lambda: MultivariateNormalMixture(locs, covariance_matrix=cov, logits=logits),
        a,
        m,
    )
    z = z[z.isfinite()]
    assert z.abs().max() < Z_THRESHOLD, z


def test_low_rank_rsample_gradient_is_unbiased():
    locs = torch.randn(3, 3, dtype=F64).requires_grad_()
    factor = (0.7 * torch.randn(3, 3, 2, dtype=F64)).requires_grad_()
    diag = (torch.rand(3, 3, dtype=F64) + 0.3).requires_grad_()
    logits = torch.randn(3, dtype=F64, requires_grad=True)
    a, m = _objective_weights(3)
    z = _z_scores(
        [locs, factor, diag, logits],
        lambda: LowRankMultivariateNormalMixture(locs, factor, diag, logits),
        a,
        m,
    )
    assert z.abs().max() < Z_THRESHOLD, z


def test_the_gradient_check_catches_a_wrong_gradient():
    """The diagonal sampler's gradient, applied to correlated components, is biased: caught."""
    locs, _, logits = _full_leaves(3, 2)
    tril = torch.tensor([[1.0, 0.0], [0.9, 0.4]], dtype=F64).expand(3, 2, 2).clone()
    tril.requires_grad_()
    a, m = _objective_weights(2)

    def diagonal_gradient(d):
        scales = d.component_covariance_matrix.diagonal(dim1=-2, dim2=-1).sqrt()
        return implicit_mixture_rsample(d.locs, scales, d.logits, d.sample((2000,)))

    build = lambda: MultivariateNormalMixture(locs, tril, logits)  # noqa: E731
    z = _z_scores([locs, tril, logits], build, a, m, rsample=diagonal_gradient)
    assert z[z.isfinite()].abs().max() > 2 * Z_THRESHOLD, z


def test_rsample_backward_is_exact_in_float32_at_128_dimensions():
    """Float32 gradients at D = 128 are finite and agree with float64 ones for the same draws."""
    torch.manual_seed(1)
    num_components, dim = 4, 128
    params64 = [
        torch.randn(num_components, dim, dtype=F64),
        _random_tril(num_components, dim, off=0.3 / dim**0.5),
        torch.randn(num_components, dtype=F64),
    ]
    z64 = MultivariateNormalMixture(*params64).sample((64,))
    grads = {}
    for dtype in (torch.float32, F64):
        locs, tril, logits = (p.to(dtype).requires_grad_() for p in params64)
        d = MultivariateNormalMixture(locs, tril, logits)
        z = implicit_mvn_mixture_rsample(d.locs, d.scale_tril, d.logits, z64.to(dtype))
        torch.sin(z).sum().backward()
        grads[dtype] = [p.grad.double() for p in (locs, tril, logits)]
    for g32, g64 in zip(grads[torch.float32], grads[F64], strict=True):
        assert torch.isfinite(g32).all()
        torch.testing.assert_close(g32, g64, rtol=1e-3, atol=1e-3 * g64.abs().max().item())
    d = MultivariateNormalMixture(*(p.float().requires_grad_() for p in params64))
    assert torch.isfinite(d.log_prob(d.rsample((8,)))).all()


def test_implicit_backward_uses_blocks_of_samples(monkeypatch):
    from pyro_mixflow.distributions import _mvn_mixture

    locs, tril, logits = _full_leaves(4, 3, (2,))
    z = MultivariateNormalMixture(locs, tril, logits).sample((50,))

    def grads():
        out = _mvn_mixture.implicit_mvn_mixture_rsample(locs, tril, logits, z)
        return torch.autograd.grad(torch.sin(out).sum(), [locs, tril, logits])

    whole = grads()
    monkeypatch.setattr(_mvn_mixture, "_BLOCK_ELEMENTS", 2 * 4 * 3 * 7)
    for a, b in zip(grads(), whole, strict=True):
        torch.testing.assert_close(a, b)


# --- validation --------------------------------------------------------------------------------


def test_exactly_one_matrix_and_one_weighting():
    locs, eye = torch.zeros(2, 3), torch.eye(3).expand(2, 3, 3)
    with pytest.raises(ValueError, match="Exactly one of covariance_matrix or precision_matrix"):
        MultivariateNormalMixture(locs, eye, covariance_matrix=eye, logits=torch.zeros(2))
    with pytest.raises(ValueError, match="Exactly one of covariance_matrix or precision_matrix"):
        MultivariateNormalMixture(locs, logits=torch.zeros(2))
    with pytest.raises(ValueError, match="Either `probs` or `logits` must be specified"):
        MultivariateNormalMixture(locs, eye)
    with pytest.raises(ValueError, match="Either `probs` or `logits` must be specified"):
        LowRankMultivariateNormalMixture(
            locs, torch.ones(2, 3, 1), torch.ones(2, 3), torch.zeros(2), probs=torch.ones(2) / 2
        )


def test_bad_shapes_are_named_with_their_shapes():
    with pytest.raises(ValueError, match=r"`locs` must have shape \(\*batch, K, D\), got \(3,\)"):
        MultivariateNormalMixture(torch.zeros(3), torch.eye(3), torch.zeros(1))
    with pytest.raises(
        ValueError,
        match=r"`scale_tril` must have shape \(\*batch, K, D, D\) with D = `locs.shape\[-1\]` "
        r"\(3\), got \(2, 2, 2\)",
    ):
        MultivariateNormalMixture(torch.zeros(2, 3), torch.eye(2).expand(2, 2, 2), torch.zeros(2))
    with pytest.raises(ValueError, match=r"`logits.shape\[-1\]` \(3\) does not match .* \(4\)"):
        MultivariateNormalMixture(torch.zeros(4, 2), torch.eye(2).expand(4, 2, 2), torch.zeros(3))
    with pytest.raises(ValueError, match=r"`locs.shape` \(4, 2\) and `covariance_matrix.shape`"):
        MultivariateNormalMixture(
            torch.zeros(4, 2), covariance_matrix=torch.eye(2).expand(3, 2, 2), logits=torch.zeros(4)
        )
    with pytest.raises(
        ValueError, match=r"batch shapes do not broadcast: .* \(2,\), logits \(5,\)"
    ):
        MultivariateNormalMixture(torch.zeros(2, 3, 1), torch.ones(2, 3, 1, 1), torch.zeros(5, 3))
    with pytest.raises(ValueError, match=r"`cov_factor.shape\[-2\]` \(2\) and `cov_diag.shape"):
        LowRankMultivariateNormalMixture(
            torch.zeros(4, 3), torch.ones(4, 2, 1), torch.ones(4, 3), torch.zeros(4)
        )
    with pytest.raises(
        ValueError, match=r"expected `locs` .* got locs \(4, 3\), cov_factor \(4, 3\)"
    ):
        LowRankMultivariateNormalMixture(
            torch.zeros(4, 3), torch.ones(4, 3), torch.ones(4, 3), torch.zeros(4)
        )


def test_bad_types():
    with pytest.raises(TypeError, match=r"`scale_tril` must be a torch\.Tensor, got list"):
        MultivariateNormalMixture(torch.zeros(1, 1), [[[1.0]]], torch.zeros(1))
    with pytest.raises(TypeError, match=r"`precision_matrix.dtype` \(torch.float64\) differs"):
        MultivariateNormalMixture(
            torch.zeros(1, 1),
            precision_matrix=torch.ones(1, 1, 1, dtype=F64),
            logits=torch.zeros(1),
        )
    with pytest.raises(TypeError, match=r"`cov_diag` must have a floating-point dtype"):
        LowRankMultivariateNormalMixture(
            torch.zeros(1, 1),
            torch.ones(1, 1, 1),
            torch.ones(1, 1, dtype=torch.long),
            torch.zeros(1),
        )


def test_constraint_validation_names_the_parameter():
    bad = torch.tensor([[[1.0, 0.5], [0.0, 1.0]]])  # upper triangular
    with pytest.raises(ValueError, match=r"parameter scale_tril \(Tensor of shape \(1, 2, 2\)\)"):
        MultivariateNormalMixture(torch.zeros(1, 2), bad, torch.zeros(1), validate_args=True)
    not_pd = torch.tensor([[[1.0, 2.0], [2.0, 1.0]]])
    with pytest.raises(ValueError, match=r"parameter component_covariance_matrix"):
        MultivariateNormalMixture(
            torch.zeros(1, 2), covariance_matrix=not_pd, logits=torch.zeros(1), validate_args=True
        )
    with pytest.raises(ValueError, match=r"parameter cov_diag \(Tensor of shape \(1, 2\)\)"):
        LowRankMultivariateNormalMixture(
            torch.zeros(1, 2),
            torch.ones(1, 2, 1),
            -torch.ones(1, 2),
            torch.zeros(1),
            validate_args=True,
        )
    d = MultivariateNormalMixture(
        torch.zeros(3, 2), torch.eye(2).expand(3, 2, 2), torch.zeros(3), validate_args=True
    )
    with pytest.raises(ValueError, match="event_shape"):
        d.log_prob(torch.zeros(5, 3))


# --- reparameterized ---------------------------------------------------------------------------


def _weights(logits, kind):
    return {"logits": logits} if kind == "logits" else {"probs": logits.softmax(-1)}


@pytest.mark.parametrize("kind", ["logits", "probs"])
@pytest.mark.parametrize("module", [td, pdist], ids=["torch", "pyro"])
def test_reparameterized_converts_every_gaussian_family(module, kind):
    locs = torch.randn(2, 3, 4, dtype=F64, requires_grad=True)
    tril = _random_tril(2, 3, 4)
    logits = torch.randn(2, 3, dtype=F64)
    factor, diag = torch.randn(2, 3, 4, 2, dtype=F64), torch.rand(2, 3, 4, dtype=F64) + 0.1
    cov = tril @ tril.mT
    components = [
        (module.Independent(module.Normal(locs, diag), 1), DiagNormalMixture),
        (module.MultivariateNormal(locs, scale_tril=tril), MultivariateNormalMixture),
        (module.MultivariateNormal(locs, covariance_matrix=cov), MultivariateNormalMixture),
        (
            module.MultivariateNormal(locs, precision_matrix=cov.inverse()),
            MultivariateNormalMixture,
        ),
        (module.LowRankMultivariateNormal(locs, factor, diag), LowRankMultivariateNormalMixture),
    ]
    x = torch.randn(5, 2, 4, dtype=F64)
    for component, cls in components:
        mix = module.MixtureSameFamily(module.Categorical(**_weights(logits, kind)), component)
        d = reparameterized(mix)
        assert type(d) is cls and d.batch_shape == mix.batch_shape
        torch.testing.assert_close(d.log_prob(x), mix.log_prob(x))
        (grad,) = torch.autograd.grad(d.rsample((3,)).sum(), locs)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_reparameterized_refuses_what_it_cannot_convert():
    cat = td.Categorical(logits=torch.zeros(3))
    with pytest.raises(TypeError, match="converts a torch or Pyro MixtureSameFamily, got Normal"):
        reparameterized(td.Normal(0.0, 1.0))
    with pytest.raises(TypeError, match="got MixtureOfDiagNormals"):
        reparameterized(
            pdist.MixtureOfDiagNormals(torch.zeros(3, 2), torch.ones(3, 2), torch.zeros(3))
        )
    laplace = td.Independent(td.Laplace(torch.zeros(3, 2), torch.ones(3, 2)), 1)
    with pytest.raises(TypeError, match=r"got Independent\(Laplace, 1\)"):
        reparameterized(td.MixtureSameFamily(cat, laplace))
    matrix = td.Independent(td.Normal(torch.zeros(3, 2, 2), torch.ones(3, 2, 2)), 2)
    with pytest.raises(ValueError, match=r"one-dimensional event_shape \(D,\), got .* \(2, 2\)"):
        reparameterized(td.MixtureSameFamily(cat, matrix))
    with pytest.raises(ValueError, match=r"event_shape \(\); for univariate components"):
        reparameterized(td.MixtureSameFamily(cat, td.Normal(torch.zeros(3), torch.ones(3))))
