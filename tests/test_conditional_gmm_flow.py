"""Conditional ``nn.GMM`` (a mixture density network) and ``nn.MixtureFlow``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from nflows.nn.nets import ResidualNet
from nflows.transforms import PiecewiseRationalQuadraticCouplingTransform

from pyro_mixflow.fitting import fit
from pyro_mixflow.io import load_model, save_model
from pyro_mixflow.nn import GMM, MixtureFlow
from pyro_mixflow.nn._context import ContextStandardizer, check_context, context_mlp
from pyro_mixflow.transforms import NflowsTransform

C = 3  # context dimension of the small models
MODELS = ["gmm", "flow"]


def _model(kind: str, dim: int, context_dim: int = C, **kwargs: object) -> GMM | MixtureFlow:
    if kind == "gmm":
        return GMM(dim, 3, context_dim=context_dim, hidden_dims=(8,), **kwargs)
    return MixtureFlow(
        dim, 3, num_transforms=2, hidden_dims=(8, 8), num_bins=4, context_dim=context_dim, **kwargs
    )


def _data(dim: int, n: int = 300, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``x (n, dim)`` and context rows ``c (n, C)`` off the origin and unit scale."""
    g = torch.Generator().manual_seed(seed)
    c = 2.0 + 3.0 * torch.randn(n, C, generator=g, dtype=torch.float64)
    x = torch.randn(n, dim, generator=g, dtype=torch.float64)
    x[: n // 2] += 2.5  # two clusters
    return x, c


@torch.no_grad()
def _perturb(model: torch.nn.Module, scale: float = 0.15, seed: int = 1) -> torch.nn.Module:
    """Moves every parameter (the zero output layers too), so the density depends on context."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def _ready(kind: str, dim: int, seed: int = 0) -> tuple[torch.nn.Module, torch.Tensor]:
    """A float64 model started at EM on ``_data`` and perturbed; returns it and the contexts."""
    torch.manual_seed(seed)
    model = _model(kind, dim).double()
    x, c = _data(dim, seed=seed)
    return _perturb(model.init_from_data(x, c)), c


# ---------------------------------------------------------------- shapes and gradients


@pytest.mark.parametrize("batch_shape", [(), (3,), (2, 3)])
@pytest.mark.parametrize("dim", [1, 2])
@pytest.mark.parametrize("kind", MODELS)
def test_batch_shapes_follow_the_context(kind, dim, batch_shape):
    torch.manual_seed(0)
    model = _model(kind, dim)
    context = torch.randn(*batch_shape, C)
    d = model(context)
    assert d.batch_shape == batch_shape and d.event_shape == (dim,)
    x = d.rsample((4,))
    assert x.shape == (4, *batch_shape, dim) and x.requires_grad
    assert not d.sample((2,)).requires_grad
    assert d.log_prob(x).shape == (4, *batch_shape)
    # A value with no batch shape broadcasts against the contexts.
    assert d.log_prob(torch.zeros(dim)).shape == batch_shape


@pytest.mark.parametrize("dim", [1, 2])
@pytest.mark.parametrize("kind", MODELS)
def test_gradients_reach_every_parameter(kind, dim):
    model, c = _ready(kind, dim)
    d = model(c[:16])
    loss = -d.log_prob(_data(dim)[0][:16]).mean() + d.rsample((2,)).square().mean()
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_unconditional_models_keep_their_parameters():
    assert set(GMM(2, 3).state_dict()) == {"locs", "log_scales", "logits"}
    flow = MixtureFlow(2, 3, num_transforms=1, hidden_dims=(8,))
    assert not any("context" in name for name in flow.state_dict())
    assert flow.base.context_dim is None and flow.context_dim is None


# ---------------------------------------------------------------- EM start


@pytest.mark.parametrize("dim", [1, 2])
@pytest.mark.parametrize("kind", MODELS)
def test_untrained_model_is_the_em_mixture_for_every_context(kind, dim):
    torch.manual_seed(0)
    x, c = _data(dim)
    model = _model(kind, dim).double().init_from_data(x, c)
    if kind == "gmm":
        em = GMM(dim, 3).double().init_from_data(x)
        expected = em().log_prob(x)
    else:  # the EM mixture of the standardized data, carried back by the standardization
        z = (x - model.shift) / model.scale
        em = GMM(dim, 3).double().init_from_data(z)
        expected = em().log_prob(z) - model.scale.log().sum()
    # Contexts near and far from the training rows, one per row of x.
    contexts = torch.cat([c[:100], 50 * torch.randn(200, C, dtype=torch.float64)])
    with torch.no_grad():
        actual = model(contexts).log_prob(x)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("kind", MODELS)
def test_init_from_data_resets_a_trained_model_to_em(kind):
    torch.manual_seed(0)
    x, c = _data(2)
    model = _model(kind, 2).double()
    expected = model.init_from_data(x, c)(c).log_prob(x).detach()
    _perturb(model)
    actual = model.init_from_data(x, c)(c).log_prob(x).detach()
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("kind", MODELS)
def test_context_is_standardized_inside_the_model(kind):
    # Two identical models, one trained on contexts c, the other on 10 c + 3: after the same
    # perturbation, each sees the same standardized context.
    x, c = _data(2)
    models = []
    for context in (c, 10 * c + 3):
        torch.manual_seed(0)
        models.append(_perturb(_model(kind, 2).double().init_from_data(x, context)))
    standardizer = models[1].context_standardizer if kind == "gmm" else None
    standardizer = standardizer or models[1].base.context_standardizer
    torch.testing.assert_close(standardizer.loc, 10 * c.mean(0) + 3)
    torch.testing.assert_close(standardizer.scale, 10 * c.std(0))
    with torch.no_grad():
        torch.testing.assert_close(
            models[0](c).log_prob(x), models[1](10 * c + 3).log_prob(x), rtol=1e-9, atol=1e-9
        )


def test_standardizer_keeps_constant_columns_unscaled():
    context = torch.tensor([[1.0, 5.0], [3.0, 5.0]])
    s = ContextStandardizer(2).fit(context)
    torch.testing.assert_close(s.scale, torch.tensor([math.sqrt(2.0), 1.0]))
    torch.testing.assert_close(s(context)[:, 1], torch.zeros(2))
    torch.testing.assert_close(ContextStandardizer(2).fit(context[:1]).scale, torch.ones(2))


def test_context_mlp_starts_constant():
    bias = torch.tensor([1.0, -2.0, 0.5])
    net = context_mlp(4, (8, 8), bias)
    torch.testing.assert_close(net(100 * torch.randn(7, 4)), bias.expand(7, 3))


# ---------------------------------------------------------------- a proper density


def _grid(half_width: float, n: int) -> tuple[torch.Tensor, float]:
    t = torch.linspace(-half_width, half_width, n, dtype=torch.float64)
    xx, yy = torch.meshgrid(t, t, indexing="ij")
    return torch.stack([xx, yy], -1), float(t[1] - t[0])  # [n, n, 2]


def _trapezoid_2d(values: torch.Tensor, step: float) -> torch.Tensor:
    """Trapezoid rule over the first two dimensions of ``values`` ``[n, n, ...]``."""
    return torch.trapezoid(torch.trapezoid(values, dx=step, dim=0), dx=step, dim=0)


@pytest.mark.parametrize("kind", MODELS)
@torch.no_grad()
def test_density_integrates_to_one_for_random_contexts(kind):
    model, c = _ready(kind, 2)
    contexts = torch.cat([c[:2], 2 + 3 * torch.randn(2, C, dtype=torch.float64)])  # [4, C]
    d = model(contexts)
    # The grid's box holds the mass to within its tail: the fraction of draws outside it
    # (plus 4 standard errors) bounds that tail.
    draws = d.sample((4000,))  # [S, 4, 2]
    half_width = 12.0
    outside = (draws.abs() > half_width).any(-1).double().mean(0)  # [4]
    tail = outside + 4 * torch.sqrt((outside + 1 / 4000) / 4000)
    assert bool((tail < 0.01).all()), tail
    fine, step = _grid(half_width, 301)
    density = d.log_prob(fine[:, :, None, :]).exp()  # [n, n, 4]
    integral = _trapezoid_2d(density, step)
    coarse = _trapezoid_2d(density[::2, ::2], 2 * step)
    # Richardson: the error of the fine rule is about |fine - coarse| / 3; allow 3x that.
    bound = (integral - coarse).abs() + tail + 1e-6
    assert bool((bound < 0.02).all()), bound  # the check has teeth
    assert bool(((integral - 1).abs() <= bound).all()), (integral, bound)


@pytest.mark.parametrize("kind", MODELS)
@torch.no_grad()
def test_samples_agree_with_log_prob_in_2d(kind):
    # Means and covariances of draws against those of the density on a grid, per context.
    model, c = _ready(kind, 2)
    contexts = torch.cat([c[:2], 2 + 3 * torch.randn(2, C, dtype=torch.float64)])  # [4, C]
    d = model(contexts)
    num_draws = 20000
    torch.manual_seed(2)
    draws = d.sample((num_draws,))  # [S, 4, 2]
    grid, step = _grid(12.0, 301)
    density = d.log_prob(grid[:, :, None, :]).exp()  # [n, n, 4]
    mass = _trapezoid_2d(density, step)
    mean = _trapezoid_2d(density[..., None] * grid[:, :, None, :], step) / mass[:, None]
    centred = grid[:, :, None, :] - mean  # [n, n, 4, 2]
    second = centred[..., :, None] * centred[..., None, :]  # [n, n, 4, 2, 2]
    cov = _trapezoid_2d(density[..., None, None] * second, step) / mass[:, None, None]
    sample_mean = draws.mean(0)
    sd = cov.diagonal(dim1=-2, dim2=-1).sqrt()  # [4, 2]
    assert bool(((sample_mean - mean).abs() <= 4.5 * sd / math.sqrt(num_draws)).all())
    sample_cov = torch.einsum("sbi,sbj->bij", draws - mean, draws - mean) / num_draws
    # Standard error of a (co)variance estimate: sd(X_i X_j) / sqrt(S), bounded by the
    # fourth moments of the draws themselves.
    products = (draws - mean)[..., :, None] * (draws - mean)[..., None, :]
    se = products.std(0) / math.sqrt(num_draws)
    assert bool(((sample_cov - cov).abs() <= 4.5 * se + 1e-3).all())


@pytest.mark.parametrize("kind", MODELS)
@torch.no_grad()
def test_samples_agree_with_log_prob_in_1d(kind):
    # Kolmogorov-Smirnov distance of draws to the CDF integrated from log_prob, per context.
    model, c = _ready(kind, 1)
    contexts = torch.cat([c[:2], 2 + 3 * torch.randn(2, C, dtype=torch.float64)])  # [4, C]
    d = model(contexts)
    num_draws = 5000
    torch.manual_seed(3)
    draws = d.sample((num_draws,))[..., 0].sort(0).values  # [S, 4]
    t = torch.linspace(-15, 15, 30001, dtype=torch.float64)
    density = d.log_prob(t[:, None, None]).exp()  # [T, 4]
    cdf = torch.cat(
        [torch.zeros(1, 4, dtype=t.dtype), torch.cumulative_trapezoid(density, t, dim=0)]
    )
    assert bool(((cdf[-1] - 1).abs() < 1e-3).all()), cdf[-1]
    cdf_at_draws = torch.stack(
        [torch.from_numpy(np.interp(draws[:, j], t, cdf[:, j])) for j in range(4)],
        -1,
    )
    ranks = torch.arange(1, num_draws + 1, dtype=t.dtype)[:, None] / num_draws
    ks = torch.maximum(ranks - cdf_at_draws, cdf_at_draws - (ranks - 1 / num_draws)).amax(0)
    # The KS statistic exceeds 1.95 / sqrt(S) with probability 0.001 (per context).
    assert bool((ks < 1.95 / math.sqrt(num_draws)).all()), ks


# ---------------------------------------------------------------- adapter


def test_nflows_transform_broadcasts_the_context_against_sample_dims():
    torch.manual_seed(0)

    def net(i: int, o: int) -> ResidualNet:
        return ResidualNet(i, o, 8, context_features=C, num_blocks=1)

    spline = PiecewiseRationalQuadraticCouplingTransform(
        torch.tensor([0, 1]), net, num_bins=4, tails="linear", tail_bound=4.0
    )
    context = torch.randn(3, C)
    x = torch.randn(5, 3, 2)  # (sample, batch, D)
    t = NflowsTransform(spline, context=context)
    y = t(x)
    log_det = t.log_abs_det_jacobian(x, y)
    for i in range(3):  # row by row, the context of batch element i
        yi, log_det_i = spline.inverse(x[:, i], context=context[i].expand(5, C))
        torch.testing.assert_close(y[:, i], yi)
        torch.testing.assert_close(log_det[:, i], log_det_i)
    with pytest.raises(ValueError, match=r"`context` of shape \(3, 3\) does not broadcast"):
        NflowsTransform(spline, context=context)(torch.randn(4, 2))


# ---------------------------------------------------------------- files


@pytest.mark.parametrize("kind", MODELS)
def test_save_load_round_trip(kind, tmp_path):
    torch.manual_seed(0)
    x, c = _data(2)
    model = _perturb(_model(kind, 2).init_from_data(x.float(), c.float()))
    save_model(model, tmp_path / "model.pt")
    loaded = load_model(tmp_path / "model.pt")
    assert loaded.init_arguments["context_dim"] == C
    contexts = 5 * torch.randn(7, C)
    with torch.no_grad():
        assert torch.equal(
            loaded(contexts).log_prob(x[:7].float()), model(contexts).log_prob(x[:7].float())
        )


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(("kind", "name"), [("gmm", "GMM"), ("flow", "MixtureFlow")])
def test_errors_name_the_context(kind, name):
    model = _model(kind, 2)
    with pytest.raises(
        ValueError,
        match=rf"^`{name}` is conditional \(context_dim=3\): call it with a context of shape "
        r"\(\*batch, 3\)$",
    ):
        model()
    with pytest.raises(
        ValueError,
        match=r"^`context.shape\[-1\]` must equal `context_dim` \(3\): `context` has shape "
        r"\(5, 4\), expected \(\*batch, 3\)$",
    ):
        model(torch.zeros(5, 4))
    with pytest.raises(ValueError, match=r"`context` has shape \(\), expected"):
        model(torch.tensor(1.0))
    with pytest.raises(TypeError, match=r"^`context` must be a floating-point tensor, got dtype"):
        model(torch.zeros(5, 3, dtype=torch.long))
    with pytest.raises(TypeError, match=r"^`context` must be a floating-point torch.Tensor, got"):
        model([[0.0, 0.0, 0.0]])
    x, c = _data(2)
    with pytest.raises(ValueError, match=r"`context` has 299 rows but `data` has 300"):
        model.init_from_data(x, c[:-1])
    with pytest.raises(ValueError, match=r"`context` must have shape \(N, 3\), got \(300, 2\)"):
        model.init_from_data(x, c[:, :2])


def test_unconditional_models_keep_their_errors():
    x, c = _data(2)
    for model, name in [(GMM(2, 3), "GMM"), (MixtureFlow(2, 3, hidden_dims=(8,)), "MixtureFlow")]:
        message = rf"^`{name}` is unconditional: `context` must be None$"
        with pytest.raises(ValueError, match=message):
            model(torch.zeros(3))
        with pytest.raises(ValueError, match=message):
            model.init_from_data(x, c)


def test_constructor_errors():
    with pytest.raises(ValueError, match=r"`hidden_dims` applies only to a conditional `GMM`"):
        GMM(2, 3, hidden_dims=(8,))
    with pytest.raises(ValueError, match=r"`context_dim` must be a positive integer, got 0"):
        GMM(2, 3, context_dim=0)
    with pytest.raises(ValueError, match=r"`context_dim` must be a positive integer, got 2.0"):
        MixtureFlow(2, 3, context_dim=2.0)
    with pytest.raises(ValueError, match=r"`hidden_dims\[1\]` must be a positive integer"):
        GMM(2, 3, context_dim=2, hidden_dims=(8, 0))
    with pytest.raises(ValueError, match=r"^`GMM` is unconditional: `context` must be None$"):
        check_context("GMM", torch.zeros(2), None)


# ---------------------------------------------------------------- learning


def _kl_per_context(truth, model, contexts, num_draws=4000):
    """Monte Carlo KL(truth || model) per context, and its standard error."""
    with torch.no_grad():
        p = truth(contexts)
        x = p.sample((num_draws,))
        diff = p.log_prob(x) - model(contexts.float()).log_prob(x.float()).double()  # [S, B]
    return diff.mean(0), diff.std(0) / math.sqrt(num_draws)


def _train(model, x, c, steps):
    model.init_from_data(x, c)
    fit(
        model,
        x,
        context=c,
        steps=steps,
        batch_size=256,
        lr=3e-3,
        validation=None,
        seed=0,
        progress=False,
    )
    return model


@pytest.mark.slow
def test_mixture_density_network_learns_heteroscedastic_bimodal_noise():
    # x | c: N(sin 2c, s(c)^2) or N(-sin 2c, s(c)^2) with equal weights, s(c) = 0.1 + 0.1 c^2.
    def truth(c):
        c = c.double()[..., 0]
        loc = torch.stack([torch.sin(2 * c), -torch.sin(2 * c)], -1)[..., None]  # [B, 2, 1]
        scale = (0.1 + 0.1 * c**2)[..., None, None].expand_as(loc)
        from pyro_mixflow import DiagNormalMixture

        return DiagNormalMixture(loc, scale, torch.zeros(loc.shape[:-1], dtype=loc.dtype))

    torch.manual_seed(0)
    c = torch.rand(6000, 1) * 3 - 1.5
    x = truth(c).sample().float()
    model = _train(GMM(1, 4, context_dim=1, hidden_dims=(32, 32)), x, c, steps=800)
    em = GMM(1, 4, context_dim=1).init_from_data(x, c)
    test_contexts = torch.tensor([[-1.2], [-0.6], [0.3], [0.9], [1.4]], dtype=torch.float64)
    kl, se = _kl_per_context(truth, model, test_contexts)
    kl_em, _ = _kl_per_context(truth, em, test_contexts)
    assert bool((kl < 0.05 + 4 * se).all()), (kl, se)
    assert bool((kl < 0.2 * kl_em).all()), (kl, kl_em)


@pytest.mark.slow
def test_mixture_flow_learns_a_rotated_gaussian():
    # x | c = R(c) diag(1, 0.2) z, z ~ N(0, I): a thin Gaussian rotated by the angle c.
    def truth(c):
        c = c.double()[..., 0]
        rot = torch.stack(
            [torch.stack([c.cos(), -c.sin()], -1), torch.stack([c.sin(), c.cos()], -1)], -2
        )
        tril = torch.linalg.cholesky(rot @ torch.diag(torch.tensor([1.0, 0.04]).double()) @ rot.mT)
        return torch.distributions.MultivariateNormal(torch.zeros(2).double(), scale_tril=tril)

    torch.manual_seed(0)
    c = torch.rand(6000, 1) * math.pi / 2
    x = truth(c).sample().float()
    model = MixtureFlow(2, 4, num_transforms=3, hidden_dims=(32, 32), context_dim=1)
    model = _train(model, x, c, steps=800)
    em = MixtureFlow(2, 4, num_transforms=1, hidden_dims=(8,), context_dim=1).init_from_data(x, c)
    test_contexts = torch.tensor([[0.1], [0.5], [0.8], [1.2], [1.5]], dtype=torch.float64)
    kl, se = _kl_per_context(truth, model, test_contexts)
    kl_em, _ = _kl_per_context(truth, em, test_contexts)
    assert bool((kl < 0.1 + 4 * se).all()), (kl, se)
    assert bool((kl < 0.2 * kl_em).all()), (kl, kl_em)
