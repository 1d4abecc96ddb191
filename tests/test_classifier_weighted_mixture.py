"""Tests of ClassifierWeightedMixture and the trainable nn.CWM."""

from __future__ import annotations

import io
import math

import pytest
import torch
from pyro.distributions.testing.gof import auto_goodness_of_fit
from sklearn.mixture import GaussianMixture
from torch import nn

from pyro_mixflow import fit
from pyro_mixflow.distributions.classifier_weighted_mixture import ClassifierWeightedMixture
from pyro_mixflow.nn.cwm import CWM
from tests.conftest import Z_THRESHOLD, standard_error_z


def _classifier(dim: int, num_components: int, seed: int = 1) -> nn.Module:
    """A random tanh MLP in float64, far from constant, so the weights vary with ``z``."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(dim, 16), nn.Tanh(), nn.Linear(16, num_components)).double()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, 1.0)
    return net


def _cwm(batch_shape=(2,), num_components=3, dim=2, seed=0):
    torch.manual_seed(seed)
    locs = (
        2.0 * torch.randn(*batch_shape, num_components, dim, dtype=torch.float64)
    ).requires_grad_()
    log_scales = (
        0.3 * torch.randn(*batch_shape, num_components, dim, dtype=torch.float64) - 0.2
    ).requires_grad_()
    classifier = _classifier(dim, num_components)
    d = ClassifierWeightedMixture(locs, log_scales.exp(), classifier)
    return d, locs, log_scales, classifier


def _grid(d, num=801, reach=7.0):
    """A square grid covering every component to ``reach`` scales: ``(grid [G, G, D], axes)``."""
    lo = (d.locs - reach * d.scales).detach().amin(dim=tuple(range(d.locs.dim() - 1)))
    hi = (d.locs + reach * d.scales).detach().amax(dim=tuple(range(d.locs.dim() - 1)))
    axes = [torch.linspace(a, b, num, dtype=torch.float64) for a, b in zip(lo, hi, strict=True)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1), axes


def _integrate(values, axes):
    for axis in reversed(axes):
        values = torch.trapezoid(values, axis, dim=0)
    return values


def test_integrates_to_one():
    d, *_ = _cwm()
    grid, axes = _grid(d)
    with torch.no_grad():
        density = d.log_prob(grid.unsqueeze(-2)).exp()  # [G, G, 2]
    total = _integrate(density, axes)
    torch.testing.assert_close(total, torch.ones(2, dtype=torch.float64), atol=1e-6, rtol=0)


def test_classifier_changes_the_density():
    """A non-constant classifier gives a density different from every constant-weight one."""
    d, *_ = _cwm()
    x = d.sample((200,))
    z = (x.unsqueeze(-2) - d.locs) / d.scales
    weights = d.classifier(z).softmax(-1)  # [S, B, K, K]
    assert weights.std(0).amax() > 0.1


def test_samples_match_log_prob():
    d, *_ = _cwm()
    with torch.no_grad():
        x = d.sample((4000,))
        probs = d.log_prob(x).exp()
    for b in range(2):
        gof = auto_goodness_of_fit(x[:, b], probs[:, b])
        assert gof > 1e-3, f"batch element {b}: gof {gof}"


def test_sample_moments_match_grid_integrals():
    """Means of 16 random Fourier features over draws against their grid integrals under p.

    Smooth test functions keep the trapezoid rule exact to far below the sampling error
    (indicator cells would not: their edges cost O(step) each).
    """
    d, *_ = _cwm()
    freqs = torch.randn(16, 2, dtype=torch.float64)
    phases = 2 * math.pi * torch.rand(16, dtype=torch.float64)

    def features(x):
        return torch.cos(x @ freqs.T + phases)  # [..., 16]

    grid, axes = _grid(d)
    with torch.no_grad():
        density = d.log_prob(grid.unsqueeze(-2)).exp()  # [G, G, 2]
        truth = _integrate(density.unsqueeze(-1) * features(grid).unsqueeze(-2), axes)  # [2, 16]
        x = d.sample((100000,))  # [S, 2, D]
    z = standard_error_z(features(x), truth)
    assert z.abs().max() < Z_THRESHOLD, z


def _h(x):
    return torch.cos(x @ torch.tensor([0.7, -0.4], dtype=x.dtype) + 0.3)


def test_rao_blackwell_matches_constant_weights_closed_form():
    """With a constant classifier (logits log pi) the estimate is unbiased for the closed form."""
    torch.manual_seed(0)
    locs = torch.tensor([[-1.0, 0.5], [1.5, -0.5], [0.0, 2.0]], dtype=torch.float64)
    scales = torch.tensor([[0.5, 1.0], [0.8, 0.4], [1.2, 0.7]], dtype=torch.float64)
    probs = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    constant = nn.Linear(2, 3).double()
    with torch.no_grad():
        constant.weight.zero_()
        constant.bias.copy_(probs.log())
    d = ClassifierWeightedMixture(locs, scales, constant)
    a = torch.tensor([0.7, -0.4], dtype=torch.float64)
    truth = (
        probs * torch.exp(-0.5 * (a.square() * scales.square()).sum(-1)) * torch.cos(locs @ a + 0.3)
    ).sum()
    values, log_weights = d.rao_blackwell((64, 2000))
    estimates = (log_weights.exp() * _h(values)).sum(-1).mean(-1)  # [64]
    z = standard_error_z(estimates.unsqueeze(-1), truth.unsqueeze(-1))
    assert z.abs().max() < Z_THRESHOLD, z


def test_rao_blackwell_is_unbiased_against_sample():
    """Rao-Blackwellized and plain Monte Carlo estimates of E[h(X)] agree per batch element."""
    d, *_ = _cwm()
    with torch.no_grad():
        values, log_weights = d.rao_blackwell((100000,))
        rb = (log_weights.exp() * _h(values)).sum(-1)  # [S, 2]
        mc = _h(d.sample((100000,)))  # [S, 2]
    diff = rb.mean(0) - mc.mean(0)
    se = (rb.var(0) / len(rb) + mc.var(0) / len(mc)).sqrt()
    assert (diff.abs() < Z_THRESHOLD * se).all(), (diff, se)
    # Rao-Blackwellization does not increase the variance.
    assert (rb.var(0) <= mc.var(0)).all()


def test_rao_blackwell_gradient_is_unbiased():
    """Mean of Rao-Blackwellized gradients against the gradient of the grid integral."""
    d, locs, log_scales, classifier = _cwm(batch_shape=())
    leaves = [locs, log_scales, *classifier.parameters()]
    grid, axes = _grid(d, num=401)
    truth = _integrate(d.log_prob(grid).exp() * _h(grid), axes)
    truth = torch.cat([g.flatten() for g in torch.autograd.grad(truth, leaves)])
    estimates = []
    for _ in range(64):
        d = ClassifierWeightedMixture(locs, log_scales.exp(), classifier)
        values, log_weights = d.rao_blackwell((2000,))
        f = (log_weights.exp() * _h(values)).sum(-1).mean()
        estimates.append(torch.cat([g.flatten() for g in torch.autograd.grad(f, leaves)]))
    z = standard_error_z(torch.stack(estimates), truth)
    assert z.abs().max() < Z_THRESHOLD, z


@pytest.mark.parametrize("batch_shape", [(), (2,)], ids=str)
@pytest.mark.parametrize("sample_shape", [(), (4,), (2, 5)], ids=str)
def test_shapes(batch_shape, sample_shape):
    d, *_ = _cwm(batch_shape)
    assert d.batch_shape == batch_shape and d.event_shape == (2,)
    assert d.num_components == 3
    x = d.sample(sample_shape)
    assert x.shape == sample_shape + batch_shape + (2,)
    assert not x.requires_grad
    assert d.log_prob(x).shape == sample_shape + batch_shape
    values, log_weights = d.rao_blackwell(sample_shape)
    assert values.shape == sample_shape + batch_shape + (3, 2)
    assert log_weights.shape == sample_shape + batch_shape + (3,)
    assert values.requires_grad and log_weights.requires_grad
    torch.testing.assert_close(
        log_weights.logsumexp(-1), torch.zeros(sample_shape + batch_shape, dtype=torch.float64)
    )


def test_no_rsample():
    d, *_ = _cwm()
    assert not d.has_rsample
    with pytest.raises(NotImplementedError):
        d.rsample()


def test_batch_elements_are_independent_mixtures():
    d, locs, log_scales, classifier = _cwm()
    x = d.sample((5,))
    for b in range(2):
        single = ClassifierWeightedMixture(locs[b], log_scales[b].exp(), classifier)
        torch.testing.assert_close(d.log_prob(x)[:, b], single.log_prob(x[:, b]))


def test_log_prob_broadcasts_and_expand():
    d, *_ = _cwm()
    point = torch.tensor([0.3, -0.2], dtype=torch.float64)
    assert d.log_prob(point).shape == (2,)
    torch.testing.assert_close(d.log_prob(point), d.log_prob(point.expand(2, 2)))
    e = d.expand((4, 2))
    assert type(e) is ClassifierWeightedMixture and e.batch_shape == (4, 2)
    assert e.sample().shape == (4, 2, 2)
    x = d.sample((3,))
    torch.testing.assert_close(
        e.log_prob(x.unsqueeze(1)), d.log_prob(x).unsqueeze(1).expand(3, 4, 2)
    )


def test_save_and_load():
    d, *_ = _cwm()
    buffer = io.BytesIO()
    torch.save(d, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded) is ClassifierWeightedMixture
    x = d.sample((3,))
    torch.testing.assert_close(loaded.log_prob(x), d.log_prob(x))
    assert repr(d).startswith("ClassifierWeightedMixture")


def test_invalid_arguments():
    locs, scales = torch.zeros(3, 2), torch.ones(3, 2)
    with pytest.raises(ValueError, match=r"logits of shape \(1, 3\).*got \(1, 4\)"):
        ClassifierWeightedMixture(locs, scales, nn.Linear(2, 4))
    with pytest.raises(TypeError, match=r"`classifier` must be an nn\.Module or callable"):
        ClassifierWeightedMixture(locs, scales, "mlp")
    with pytest.raises(ValueError, match=r"`locs` must have shape \(\*batch, K, D\)"):
        ClassifierWeightedMixture(torch.zeros(3), scales, nn.Linear(2, 3))
    with pytest.raises(ValueError, match="do not broadcast"):
        ClassifierWeightedMixture(locs, torch.ones(4, 2), nn.Linear(2, 3))
    with pytest.raises(TypeError, match=r"`scales.dtype`"):
        ClassifierWeightedMixture(locs, scales.double(), nn.Linear(2, 3))
    with pytest.raises(TypeError, match=r"`locs` must be a torch\.Tensor"):
        ClassifierWeightedMixture([[0.0, 0.0]], scales, nn.Linear(2, 3))
    with pytest.raises(ValueError, match="scales"):
        ClassifierWeightedMixture(locs, -scales, nn.Linear(2, 3), validate_args=True)
    d = ClassifierWeightedMixture(locs, scales, nn.Linear(2, 3), validate_args=True)
    with pytest.raises(ValueError):
        d.log_prob(torch.full((2,), math.nan))
    # Without validation the wrong output size is reported at the first call.
    d = ClassifierWeightedMixture(locs, scales, nn.Linear(2, 4), validate_args=False)
    with pytest.raises(ValueError, match="`num_components` = 3"):
        d.sample()


def test_cwm_starts_equal_to_em_mixture():
    torch.manual_seed(0)
    x = torch.cat([torch.randn(300, 2) * 0.5 + 2.0, torch.randn(300, 2) - 1.0]).double()
    model = CWM(2, num_components=3, hidden_dims=(16, 16)).double().init_from_data(x, seed=1)
    em = GaussianMixture(3, covariance_type="diag", max_iter=200, random_state=1).fit(x.numpy())
    points = torch.randn(50, 2, dtype=torch.float64) * 3
    with torch.no_grad():
        ours = model().log_prob(points)
    expected = torch.from_numpy(em.score_samples(points.numpy()))
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-10)


def test_cwm_fit_improves_on_em():
    torch.manual_seed(0)
    angle = 2 * math.pi * torch.rand(2000)
    radius = 2.0 + 0.1 * torch.randn(2000)
    x = torch.stack([radius * angle.cos(), radius * angle.sin()], dim=-1)
    model = CWM(2, num_components=4, hidden_dims=(32, 32)).init_from_data(x)
    history = fit(model, x, steps=150, batch_size=500, lr=5e-3, seed=0, progress=False)
    assert history.val_loss[-1] < history.val_loss[0] - 0.05, history.val_loss


def test_cwm_module():
    model = CWM(3, num_components=2, hidden_dims=(8,))
    d = model()
    assert isinstance(d, ClassifierWeightedMixture)
    assert d.event_shape == (3,) and d.num_components == 2
    values, log_weights = d.rao_blackwell((7,))
    (log_weights.exp() * values.sum(-1)).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
    with pytest.raises(ValueError, match="`num_components` must be a positive integer"):
        CWM(2, num_components=0)
    with pytest.raises(ValueError, match=r"`data.shape\[-1\]` \(2\) does not match"):
        model.init_from_data(torch.randn(10, 2))
    with pytest.raises(ValueError, match="unconditional"):
        model(torch.zeros(1))


def _exact_entropy_part(d, values, log_weights):
    """The K^3 reference: sum_k w_k log p(x_k), log p evaluated at every branch value."""
    log_p = d.log_prob(values.movedim(-2, 0)).movedim(0, -1)  # [*S, *B, K]
    return (log_weights.exp() * log_p).sum(-1)


@pytest.mark.slow
@pytest.mark.parametrize(
    "num_branches, stick_the_landing", [(1, False), (2, False), (3, True)], ids=str
)
def test_rao_blackwell_log_prob_is_unbiased(num_branches, stick_the_landing):
    """Value and gradient against the exact K^3 estimate at the same base draws (paired).

    Given z the value and (without sticking the landing) the gradient are unbiased; with it the
    gradient is unbiased over z only: the paired difference has mean zero either way. The
    classifier is tempered (logits halved) so that every branch is drawn often enough for
    the sample variance to see it: a branch of weight 1e-5 would contribute a rare, large term
    that a z-test over 20,000 draws cannot calibrate.
    """
    d, locs, log_scales, classifier = _cwm(num_components=4)
    with torch.no_grad():
        for p in classifier.parameters():
            p.mul_(0.5)
    leaves = [locs, log_scales, *classifier.parameters()]
    values, log_weights = d.rao_blackwell((4000,))
    assert log_weights.exp().mean(0).min() > 0.05  # no branch is rare
    assert log_weights.exp().std(0).min() > 0.05  # the weights vary with z
    with torch.no_grad():
        ours = d.rao_blackwell_log_prob(values, log_weights, num_branches=num_branches)
        diff = ours - _exact_entropy_part(d, values, log_weights)  # [S, 2]
    z = standard_error_z(diff, torch.zeros(2, dtype=torch.float64))
    assert z.abs().max() < Z_THRESHOLD, z
    assert diff.std(0).min() > 1e-3  # the estimate is random, so the test has power
    differences = []
    for _ in range(150):
        d = ClassifierWeightedMixture(locs, log_scales.exp(), classifier)
        values, log_weights = d.rao_blackwell((150,))
        ours = d.rao_blackwell_log_prob(
            values, log_weights, num_branches=num_branches, stick_the_landing=stick_the_landing
        )
        exact = _exact_entropy_part(d, values, log_weights)
        grads = torch.autograd.grad((ours - exact).mean(0).sum(), leaves)
        differences.append(torch.cat([g.flatten() for g in grads]))
    differences = torch.stack(differences)
    assert (differences.std(0) > 0).all()
    z = standard_error_z(differences, torch.zeros_like(differences[0]))
    assert z.abs().max() < Z_THRESHOLD, z


class _CountingClassifier(nn.Module):
    """Counts the points the wrapped classifier is evaluated at."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net, self.points = net, 0

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        self.points += z[..., 0].numel()
        return self.net(z)


@pytest.mark.parametrize("num_components", [3, 7])
def test_rao_blackwell_log_prob_costs_m_k_evaluations_per_draw(num_components):
    counting = _CountingClassifier(_classifier(2, num_components))
    locs = torch.randn(num_components, 2, dtype=torch.float64)
    d = ClassifierWeightedMixture(locs, torch.ones_like(locs), counting, validate_args=False)
    values, log_weights = d.rao_blackwell((10,))
    assert counting.points == 10
    counting.points = 0
    d.rao_blackwell_log_prob(values, log_weights, num_branches=2).sum().backward()
    assert counting.points == 10 * 2 * num_components
    counting.points = 0
    _exact_entropy_part(d, values, log_weights)
    assert counting.points == 10 * num_components**2


def test_rao_blackwell_log_prob_stick_the_landing_detaches_parameters():
    """Same value; with fixed weights, no gradient reaches the classifier (only the values do).

    Without sticking the landing log p(x_j) depends on the classifier's parameters.
    """
    d, locs, log_scales, classifier = _cwm(batch_shape=(), num_components=4)
    leaves = [locs, log_scales, *classifier.parameters()]
    values, log_weights = d.rao_blackwell((3,))
    log_weights = log_weights.detach()

    def estimate(stick):
        torch.manual_seed(3)
        value = d.rao_blackwell_log_prob(values, log_weights, stick_the_landing=stick)
        grads = torch.autograd.grad(value.sum(), leaves, retain_graph=True, allow_unused=True)
        pairs = zip(leaves, grads, strict=True)
        return value, [torch.zeros_like(p) if g is None else g for p, g in pairs]

    plain, plain_grads = estimate(False)
    stl, stl_grads = estimate(True)
    torch.testing.assert_close(stl, plain)
    assert all((g == 0).all() for g in stl_grads[2:])
    assert all((g != 0).any() for g in plain_grads[2:])
    assert (stl_grads[0] != 0).all() and (stl_grads[1] != 0).all()
    assert not torch.allclose(stl_grads[0], plain_grads[0])


def test_rao_blackwell_log_prob_invalid_arguments():
    d, *_ = _cwm(batch_shape=())
    values, log_weights = d.rao_blackwell((5,))
    with pytest.raises(ValueError, match=r"`values` must have shape \(\*sample, \*batch, 3, 2\)"):
        d.rao_blackwell_log_prob(values[..., :2, :], log_weights)
    with pytest.raises(ValueError, match=r"got \(5, 3, 2\) and \(5, 2\)"):
        d.rao_blackwell_log_prob(values, log_weights[..., :2])
    with pytest.raises(ValueError, match="`num_branches` must be a positive integer, got 0"):
        d.rao_blackwell_log_prob(values, log_weights, num_branches=0)
    with pytest.raises(TypeError, match=r"`values` and `log_weights` must be torch\.Tensors"):
        d.rao_blackwell_log_prob(values.tolist(), log_weights)
    plain = ClassifierWeightedMixture(d.locs, d.scales, lambda z: z @ torch.ones(2, 3).double())
    with pytest.raises(TypeError, match=r"needs an nn\.Module `classifier`"):
        plain.rao_blackwell_log_prob(values, log_weights, stick_the_landing=True)
