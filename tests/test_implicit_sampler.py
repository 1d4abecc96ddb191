"""The exact sampler's backward pass against a brute-force float64 solve, and its skipping bound."""

from __future__ import annotations

import math

import pytest
import torch

from pyro_mixflow import DiagNormalMixture
from pyro_mixflow.distributions import _implicit
from pyro_mixflow.distributions._implicit import implicit_mixture_rsample

F64 = torch.float64
HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def _brute_force(locs, scales, log_pi, z, g):
    """Per-draw gradients by an explicit D x D Jacobian and a triangular solve (float64).

    ``locs``, ``scales`` ``[K, D]``, normalized ``log_pi`` ``[K]``, draws ``z`` and cotangents
    ``g`` ``[N, D]``. Returns the per-draw gradients ``[N, K, D]``, ``[N, K, D]``, ``[N, K]``
    and the largest logits velocity ``max_{d,k} |dz_d / dlog pi_k|`` of each draw, ``[N]``.
    """
    std = (z.unsqueeze(1) - locs) / scales  # [N, K, D]
    log_density = -scales.log() - HALF_LOG_2PI - 0.5 * std.square()
    before = torch.cat([torch.zeros_like(std[..., :1]), log_density.cumsum(-1)[..., :-1]], -1)
    w = torch.softmax(log_pi.unsqueeze(-1) + before, dim=1)  # w^(d), [N, K, D]
    cdf = torch.special.ndtr(std)
    u = w * (cdf - (w * cdf).sum(1, keepdim=True))  # dF_d / dlog pi_k
    score = -(z.unsqueeze(1) - locs) / scales.square()  # [N, K, D]
    jacobian = torch.einsum("nkd,nkj->ndj", u, score).tril(-1)
    jacobian = jacobian + torch.diag_embed((w * log_density.exp()).sum(1))  # q(z_d | z_<d)
    velocity = torch.linalg.solve_triangular(jacobian, u.transpose(1, 2), upper=False)
    grad_logits = -(g.unsqueeze(-1) * velocity).sum(1)  # [N, K]
    resp = torch.softmax(log_pi + log_density.sum(-1), dim=-1).unsqueeze(-1)  # [N, K, 1]
    grad_locs = resp * g.unsqueeze(1)
    grad_scales = resp * std * g.unsqueeze(1)
    return grad_locs, grad_scales, grad_logits, velocity.abs().amax((1, 2))


def _per_draw(locs, scales, log_pi, z, g):
    """Our per-draw gradients: one batch element per draw."""
    n = z.shape[0]
    leaves = [t.expand(n, *t.shape).clone().requires_grad_() for t in (locs, scales, log_pi)]
    out = implicit_mixture_rsample(*leaves, z)
    return torch.autograd.grad(out, leaves, g)


def _separated(num_components, dim, num_draws, seed=0):
    gen = torch.Generator().manual_seed(seed)
    locs = 2 * torch.randn(num_components, dim, generator=gen, dtype=F64)
    scales = 0.5 + torch.rand(num_components, dim, generator=gen, dtype=F64)
    log_pi = torch.randn(num_components, generator=gen, dtype=F64).log_softmax(-1)
    torch.manual_seed(seed)
    z = DiagNormalMixture(locs, scales, log_pi).sample((num_draws,))
    g = torch.randn(num_draws, dim, generator=gen, dtype=F64)
    return locs, scales, log_pi, z, g


def _errors_and_bounds(case, eta):
    """Per-draw largest gradient error against the brute force, and the docstring's bound."""
    *theirs, velocity = _brute_force(*case)
    ours = _per_draw(*case)
    pairs = zip(ours, theirs, strict=True)
    error = torch.stack([(a - b).flatten(1).abs().amax(1) for a, b in pairs]).amax(0)
    scale = torch.stack([t.flatten(1).abs().amax(1) for t in theirs]).amax(0)
    g = case[-1]
    bound = 2 * eta * velocity.clamp(min=1) * g.abs().sum(-1)
    return error, bound + 1e-12 * (1 + scale)  # float64 rounding of either side


def _collapse(case):
    locs, scales, log_pi, z, _ = case
    params = _implicit._Params.of(locs[None], scales[None], log_pi[None])
    eta = _implicit._TOLERANCE * torch.finfo(z.dtype).eps
    return _implicit._collapse_dims(z, torch.zeros(len(z), dtype=torch.long), params, eta)[0]


def test_skipping_matches_brute_force_within_the_bound():
    case = _separated(num_components=5, dim=48, num_draws=80)
    collapse = _collapse(case)
    assert collapse.float().mean() < 0.75 * 48, collapse  # most of the recursion is skipped
    eta = _implicit._TOLERANCE * torch.finfo(F64).eps
    error, bound = _errors_and_bounds(case, eta)
    assert (error <= bound).all(), (error / bound).max()


def test_coincident_components_run_the_dense_recursion():
    locs, scales, log_pi, z, g = _separated(num_components=4, dim=40, num_draws=40, seed=1)
    locs, scales = locs[:1].expand(4, -1).clone(), scales[:1].expand(4, -1).clone()
    scales[1] *= 1.05
    z = DiagNormalMixture(locs, scales, log_pi).sample((40,))
    case = (locs, scales, log_pi, z, g)
    assert (_collapse(case) == 40).all()
    error, bound = _errors_and_bounds(case, 0.0)
    assert (error <= bound).all(), (error / bound).max()


def test_a_too_large_tolerance_is_caught_and_still_within_its_bound(monkeypatch):
    """With eta = 1/8 the skipped terms show above float64 rounding: the comparison at the
    default tolerance catches them, and the docstring's bound at 1/8 still holds."""
    case = _separated(num_components=5, dim=48, num_draws=80)
    default_collapse = _collapse(case)
    default_eta = _implicit._TOLERANCE * torch.finfo(F64).eps
    eta = 2.0**-3
    monkeypatch.setattr(_implicit, "_TOLERANCE", eta / torch.finfo(F64).eps)
    assert (_collapse(case) <= default_collapse).all()
    assert (_collapse(case) < default_collapse).any()
    error, bound = _errors_and_bounds(case, eta)
    assert (error <= bound).all(), (error / bound).max()
    _, default_bound = _errors_and_bounds(case, default_eta)
    assert (error > default_bound).any()


@pytest.mark.parametrize("batch_shape", [(), (3,)])
@pytest.mark.parametrize("dim", [1, 40])
def test_summed_gradients_match_brute_force_for_batches(batch_shape, dim):
    torch.manual_seed(2)
    k = 3
    locs = 2 * torch.randn(*batch_shape, k, dim, dtype=F64)
    scales = 0.5 + torch.rand(*batch_shape, k, dim, dtype=F64)
    log_pi = torch.randn(*batch_shape, k, dtype=F64).log_softmax(-1)
    z = DiagNormalMixture(locs, scales, log_pi).sample((7,))  # [7, *B, D]
    g = torch.randn_like(z)
    leaves = [t.clone().requires_grad_() for t in (locs, scales, log_pi)]
    ours = torch.autograd.grad(implicit_mixture_rsample(*leaves, z), leaves, g)
    flat = [t.reshape(-1, *t.shape[len(batch_shape) :]) for t in (locs, scales, log_pi)]
    zf, gf = z.reshape(7, -1, dim), g.reshape(7, -1, dim)
    for b in range(zf.shape[1]):
        theirs = _brute_force(flat[0][b], flat[1][b], flat[2][b], zf[:, b], gf[:, b])[:3]
        for a, t in zip(ours, theirs, strict=True):
            torch.testing.assert_close(a.reshape(-1, *t.shape[1:])[b], t.sum(0))


def test_float32_skipping_agrees_with_float64():
    case = _separated(num_components=6, dim=128, num_draws=64, seed=3)
    grads = [_per_draw(*(t.to(dtype) for t in case)) for dtype in (torch.float32, torch.float64)]
    for g32, g64 in zip(*grads, strict=True):
        assert torch.isfinite(g32).all()
        torch.testing.assert_close(g32.double(), g64, rtol=1e-3, atol=1e-4 * g64.abs().max())


@pytest.mark.parametrize("batch_shape", [(), (2,)])
def test_groups_of_rows_give_the_same_gradient(monkeypatch, batch_shape):
    torch.manual_seed(4)
    locs = 2 * torch.randn(*batch_shape, 4, 40, dtype=F64)
    scales = 0.5 + torch.rand(*batch_shape, 4, 40, dtype=F64)
    log_pi = torch.randn(*batch_shape, 4, dtype=F64).log_softmax(-1)
    z = DiagNormalMixture(locs, scales, log_pi).sample((30,))
    leaves = [t.clone().requires_grad_() for t in (locs, scales, log_pi)]

    def grads():
        return torch.autograd.grad(implicit_mixture_rsample(*leaves, z).sin().sum(), leaves)

    whole = grads()
    monkeypatch.setattr(_implicit, "_GROUP_ELEMENTS", 4 * 40 * 3)
    for a, b in zip(grads(), whole, strict=True):
        torch.testing.assert_close(a, b)
