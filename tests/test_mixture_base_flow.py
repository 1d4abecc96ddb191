"""Checks specific to :class:`MixtureBaseFlow` and the nflows adapters."""

from __future__ import annotations

import pyro.distributions.transforms as T
import pytest
import torch
from nflows import transforms as nt
from nflows.flows import Flow
from nflows.nn.nets import ResidualNet
from torch.distributions.transforms import AffineTransform, ExpTransform

from pyro_mixflow import DiagNormalMixture, GumbelSoftmaxMixture, MixtureBaseFlow
from pyro_mixflow.transforms import NflowsBase, NflowsTransform
from tests.conftest import Z_THRESHOLD, standard_error_z


def _base(dtype=torch.float64, requires_grad=False):
    locs = torch.tensor([[-2.0, 0.5], [1.0, -1.0], [2.5, 2.0]], dtype=dtype)
    scales = torch.tensor([[0.5, 0.8], [1.0, 0.4], [0.7, 0.7]], dtype=dtype)
    logits = torch.tensor([0.2, -0.3, 0.1], dtype=dtype)
    params = [p.requires_grad_(requires_grad) for p in (locs, scales, logits)]
    return params, DiagNormalMixture(*params)


def _nflows_transforms():
    torch.manual_seed(0)
    mask = torch.tensor([1, 0])
    return {
        "affine-coupling": nt.AffineCouplingTransform(mask, lambda i, o: ResidualNet(i, o, 16)),
        "rq-coupling": nt.PiecewiseRationalQuadraticCouplingTransform(
            mask, lambda i, o: ResidualNet(i, o, 16), num_bins=6, tails="linear", tail_bound=5.0
        ),
        "maf": nt.MaskedAffineAutoregressiveTransform(features=2, hidden_features=16),
        "rq-maf": nt.MaskedPiecewiseRationalQuadraticAutoregressiveTransform(
            features=2, hidden_features=16, num_bins=6, tails="linear", tail_bound=5.0
        ),
        "permutation": nt.ReversePermutation(features=2),
        "actnorm": nt.ActNorm(features=2),
        "svd-linear": nt.SVDLinear(features=2, num_householder=2),
    }


def test_affine_flow_equals_the_transformed_mixture():
    """An affine map of a diagonal Gaussian mixture is the mixture with mapped parameters."""
    (locs, scales, logits), base = _base()
    shift, scale = (
        torch.tensor([1.0, -2.0], dtype=torch.float64),
        torch.tensor([2.0, -0.5], dtype=torch.float64),
    )
    flow = MixtureBaseFlow(base, AffineTransform(shift, scale, event_dim=1))
    exact = DiagNormalMixture(shift + scale * locs, scale.abs() * scales, logits)
    x = exact.sample((50,))
    torch.testing.assert_close(flow.log_prob(x), exact.log_prob(x))
    _, log_q = flow.rsample_and_log_prob((50,))
    assert log_q.shape == (50,)


@pytest.mark.parametrize("name", list(_nflows_transforms()))
def test_nflows_transforms_are_wrapped_and_exact(name):
    transform = _nflows_transforms()[name].double()
    _, base = _base()
    flow = MixtureBaseFlow(base, [transform])
    assert isinstance(flow.transforms[0], NflowsTransform)
    flow.log_prob(base.sample((64,)))  # ActNorm initializes from the first data batch
    x, log_q = flow.rsample_and_log_prob((64,))
    # The one-pass log-density equals the inverse-pass one on the same points.
    torch.testing.assert_close(log_q, flow.log_prob(x.detach().clone()), atol=1e-8, rtol=1e-8)
    # The adapter inverts nflows' direction: nflows maps data to noise.
    noise, _ = transform(x.detach())
    torch.testing.assert_close(flow.transforms[0].inv(x.detach()), noise)


@pytest.mark.filterwarnings("ignore:.*triangular_solve.*:UserWarning")
def test_nflows_lu_linear_works_despite_torch_deprecation():
    torch.manual_seed(0)
    flow = MixtureBaseFlow(_base()[1], nt.LULinear(2).double())
    x, log_q = flow.rsample_and_log_prob((16,))
    torch.testing.assert_close(log_q, flow.log_prob(x.detach().clone()))


def test_pyro_transform_modules():
    # float32: Pyro's autoregressive inverse allocates in the default dtype.
    torch.manual_seed(0)
    transforms = [T.spline_coupling(2, count_bins=6), T.affine_autoregressive(2)]
    flow = MixtureBaseFlow(_base(torch.float32)[1], transforms)
    x, log_q = flow.rsample_and_log_prob((32,))
    torch.testing.assert_close(log_q, flow.log_prob(x.detach().clone()), atol=1e-4, rtol=1e-5)


def test_gradients_reach_the_mixture_through_rsample():
    """zuko's GMM-based flows return no gradient for the base mixture here; we must."""
    torch.manual_seed(0)
    (locs, scales, logits), base = _base(requires_grad=True)
    transform = _nflows_transforms()["rq-coupling"].double()
    flow = MixtureBaseFlow(base, [transform, T.spline_coupling(2, count_bins=4).double()])
    x = flow.rsample((256,))
    torch.sin(x).sum().backward()
    for name, p in [("locs", locs), ("scales", scales), ("logits", logits)]:
        assert p.grad is not None and p.grad.abs().amax() > 0, name
    assert all(p.grad is not None for p in transform.parameters())


@pytest.mark.slow
def test_flow_gradient_is_unbiased_through_a_monotone_map():
    r"""E[exp(-y)] for y = exp(z) has no closed form, but E[f(exp(z))] = E[g(z)] with g = f∘exp:
    the flow's pathwise gradient must equal the base mixture's for the composed function."""
    (locs, scales, logits), _ = _base(requires_grad=True)
    leaves = [locs, scales, logits]

    def estimates(make):
        out = []
        for _ in range(48):
            value = make().rsample((2000,))
            out.append(
                torch.cat([g.flatten() for g in torch.autograd.grad(value.mean(0).sum(), leaves)])
            )
        return torch.stack(out)

    flow_estimates = estimates(
        lambda: MixtureBaseFlow(
            DiagNormalMixture(locs, scales, logits), ExpTransform().with_cache()
        )
    )
    # Reference: the gradient of E[exp(z)] in closed form.
    mean_exp = (
        (logits.softmax(-1).unsqueeze(-1) * torch.exp(locs + scales.square() / 2)).sum(0).sum()
    )
    truth = torch.cat([g.flatten() for g in torch.autograd.grad(mean_exp, leaves)])
    scores = standard_error_z(flow_estimates, truth)
    assert scores.abs().max() < Z_THRESHOLD, scores


def test_gumbel_softmax_base_flows_too():
    torch.manual_seed(0)
    locs = torch.randn(3, 2, requires_grad=True)
    base = GumbelSoftmaxMixture(locs, torch.ones(3, 2), torch.zeros(3), temperature=0.3)
    flow = MixtureBaseFlow(base, [nt.MaskedAffineAutoregressiveTransform(2, 8)])
    x, log_q = flow.rsample_and_log_prob((10,))
    (x.sum() + log_q.sum()).backward()
    assert locs.grad.abs().amax() > 0


def test_our_mixture_as_an_nflows_base():
    torch.manual_seed(0)
    (locs, _, logits), base = _base(requires_grad=True)
    transform = _nflows_transforms()["maf"].double()
    flow = Flow(transform, NflowsBase(base))
    x = torch.randn(7, 2, dtype=torch.float64)
    noise, log_det = transform(x)
    torch.testing.assert_close(flow.log_prob(x), base.log_prob(noise) + log_det)
    samples = flow.sample(32)
    assert samples.shape == (32, 2)
    torch.sin(samples).sum().backward()
    assert locs.grad.abs().amax() > 0 and logits.grad.abs().amax() > 0


def test_nflows_base_with_a_module_trains_its_parameters():
    class Mixture(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.locs = torch.nn.Parameter(torch.randn(2, 2))

        def forward(self):
            return DiagNormalMixture(self.locs, torch.ones(2, 2), torch.zeros(2))

    base = Mixture()
    flow = Flow(nt.ReversePermutation(2), NflowsBase(base))
    assert any(p is base.locs for p in flow.parameters())
    flow.log_prob(torch.randn(3, 2)).sum().backward()
    assert base.locs.grad is not None


def test_bad_arguments():
    _, base = _base()
    with pytest.raises(TypeError, match="`base` must be a torch Distribution"):
        MixtureBaseFlow("normal", [])
    with pytest.raises(TypeError, match=r"`transforms\[1\]` must be a torch/Pyro Transform"):
        MixtureBaseFlow(base, [ExpTransform(), torch.nn.Linear(2, 2)])
    with pytest.raises(TypeError, match=r"`transform` must be an nflows\.transforms\.Transform"):
        NflowsTransform(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match=r"`base` must be a torch Distribution or an nn\.Module"):
        NflowsBase(3)
