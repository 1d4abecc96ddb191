"""Tests of the conditional nn.CWM and nn.RAD (``context_dim``)."""

from __future__ import annotations

import math

import pytest
import torch

from pyro_mixflow.distributions import DiagNormalMixture, RADFlow
from pyro_mixflow.fitting.em import em_parameters
from pyro_mixflow.io import load_model, save_model
from pyro_mixflow.nn import CWM, RAD
from pyro_mixflow.transforms import RADCoupling
from tests.conftest import Z_THRESHOLD, standard_error_z
from tests.test_generic import _chi_square_2d

MODELS = ["cwm", "rad"]
CONTEXT_DIM = 2


def _model(name, *, context_dim=CONTEXT_DIM, seed=0):
    """A small float64 conditional model whose parameters are perturbed off their start (the
    output layers start at zero: the context and the classifier/gating would not matter),
    with its context standardization set."""
    torch.manual_seed(seed)
    if name == "cwm":
        model = CWM(2, num_components=3, hidden_dims=(8,), context_dim=context_dim)
    else:
        model = RAD(2, num_layers=2, hidden_dims=(8,), context_dim=context_dim)
    model = model.double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_((0.3 if name == "cwm" else 0.1) * torch.randn_like(p))
        model.context_standardizer.fit(
            1.0 + 2.0 * torch.randn(64, context_dim, dtype=torch.float64)
        )
    return model


def _contexts(*batch_shape, seed=1):
    torch.manual_seed(seed)
    return 1.0 + 2.0 * torch.randn(*batch_shape, CONTEXT_DIM, dtype=torch.float64)


def _grid_integral(name, d, num):
    """2-D trapezoid integrals of ``d``'s densities ``[*batch]``, and their error bounds.

    The grid holds all but a negligible mass (the ``tail`` term of the bound). CWM: a box of 7
    scales around every component (component k's term has at most ``2 D Phi(-7)`` outside
    its box). RAD: ``[-6, 6]^2``, as ``{|x_d| > R}`` maps onto ``{|z_d| > R}`` (every layer is
    the identity outside its bound 3), which has mass ``2 Phi(-R)`` per coordinate.

    The discretization bounds follow from the grid spacing and each density's regularity.
    CWM's density is smooth: the trapezoid rule errs by ``c h^2 + O(h^4)``, so the integral
    ``T_2h`` on every other point differs by about ``3 c h^2``, and ``|T_h - T_2h|`` (plus
    1e-10 for rounding) bounds ``|T_h - I|`` with a margin of 3. RAD's density is only of
    bounded variation (it jumps where a spline's end slope meets the identity at the bound):
    a cell's trapezoid errs by at most ``h / 2`` times the variation over the cell (for a
    monotone piece), so the bound is ``(h_y * integral of TV_y + h_x * TV_x(inner integrals))
    / 2``, with the variations read on the grid, doubled for margin.
    """
    if name == "cwm":
        reach = 7.0
        lo = (d.locs - reach * d.scales).detach().flatten(0, -2).amin(0)
        hi = (d.locs + reach * d.scales).detach().flatten(0, -2).amax(0)
        tail = 2 * 2 * 0.5 * math.erfc(reach / math.sqrt(2))
    else:
        reach = 6.0
        lo, hi = torch.full((2,), -reach), torch.full((2,), reach)
        tail = 2 * math.erfc(reach / math.sqrt(2))
    x, y = (torch.linspace(a, b, num, dtype=torch.float64) for a, b in zip(lo, hi, strict=True))
    grid = torch.stack(torch.meshgrid(x, y, indexing="ij"), -1)  # [G, G, 2]
    with torch.no_grad():
        density = d.log_prob(grid.reshape(-1, *[1] * len(d.batch_shape), 2)).exp()
    density = density.reshape(num, num, *d.batch_shape)

    def trapezoid(values, x, y):
        return torch.trapezoid(torch.trapezoid(values, y, dim=1), x, dim=0)

    total = trapezoid(density, x, y)
    if name == "cwm":
        coarse = trapezoid(density[::2, ::2], x[::2], y[::2])
        return total, (total - coarse).abs() + 1e-10 + tail
    inner = torch.trapezoid(density, y, dim=1)  # [G, *B]
    tv_y = torch.trapezoid(density.diff(dim=1).abs().sum(1), x, dim=0)
    tv_x = inner.diff(dim=0).abs().sum(0)
    return total, (y[1] - y[0]) * tv_y + (x[1] - x[0]) * tv_x + tail


# ---------------------------------------------------------------------------------------------
# Densities integrate to one and samples follow them, for every context


@pytest.mark.parametrize(
    ("name", "num", "informative"),
    [("cwm", 301, 1e-6), pytest.param("rad", 801, 0.1, marks=pytest.mark.slow)],
)
def test_density_integrates_to_one_for_every_context(name, num, informative):
    model = _model(name)
    d = model(_contexts(2))
    total, bound = _grid_integral(name, d, num)
    assert (bound < informative).all(), bound  # the grid resolves the density
    assert ((total - 1).abs() <= bound).all(), (total - 1, bound)


def test_rad_integrates_to_one_for_every_context_by_importance_sampling():
    """The fast check of RAD's mass per context: E_r[p / r] for r = N(0, 2.5^2 I), unbiased."""
    model = _model("rad")
    d = model(_contexts(3))
    torch.manual_seed(2)
    proposal = torch.distributions.Normal(torch.zeros(2, dtype=torch.float64), 2.5)
    x = proposal.sample((40000,))  # [N, 2]
    with torch.no_grad():
        ratio = (d.log_prob(x.unsqueeze(-2)) - proposal.log_prob(x).sum(-1, keepdim=True)).exp()
    mass, se = ratio.mean(0), ratio.std(0) / math.sqrt(len(x))
    assert (se < 0.02).all(), se
    assert ((mass - 1).abs() < Z_THRESHOLD * se).all(), (mass, se)


@pytest.mark.parametrize("name", MODELS)
def test_samples_match_log_prob_per_context(name):
    """Pearson's chi-square of each context's draws against its own density (2-D cells)."""
    model = _model(name)
    context = _contexts(3)
    torch.manual_seed(2)
    with torch.no_grad():
        d = model(context)
        x = d.sample((4000,))  # [S, 3, 2]
        for b in range(3):
            p_value = _chi_square_2d(x[:, b], lambda g, b=b: d.log_prob(g.unsqueeze(-2))[..., b])
            assert p_value > 1e-3, f"context {b}: p-value {p_value}"


def test_cwm_sample_moments_match_grid_integrals_per_context():
    """Means of random Fourier features of the draws against their grid integrals, per context.

    Also catches draws made with another batch element's context.
    """
    model = _model("cwm")
    context = _contexts(2)
    torch.manual_seed(3)
    freqs = torch.randn(8, 2, dtype=torch.float64)
    phases = 2 * math.pi * torch.rand(8, dtype=torch.float64)

    def features(x):
        return torch.cos(x @ freqs.T + phases)  # [..., 8]

    with torch.no_grad():
        d = model(context)
        lo = (d.locs - 7 * d.scales).flatten(0, -2).amin(0)
        hi = (d.locs + 7 * d.scales).flatten(0, -2).amax(0)
        axes = [torch.linspace(a, b, 301, dtype=torch.float64) for a, b in zip(lo, hi, strict=True)]
        grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1)
        density = d.log_prob(grid.unsqueeze(-2)).exp()  # [G, G, 2]
        weighted = density.unsqueeze(-1) * features(grid).unsqueeze(-2)  # [G, G, 2, 8]
        truth = torch.trapezoid(torch.trapezoid(weighted, axes[1], dim=1), axes[0], dim=0)
        x = d.sample((20000,))  # [S, 2, D]
    z = standard_error_z(features(x), truth)
    assert z.abs().max() < Z_THRESHOLD, z


# ---------------------------------------------------------------------------------------------
# Shapes: each batch element sees its own context


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("batch_shape", [(), (3,), (2, 3)])
@pytest.mark.parametrize("sample_shape", [(), (4,)])
def test_batch_shapes_of_contexts(name, batch_shape, sample_shape):
    model = _model(name)
    context = _contexts(*batch_shape)
    d = model(context)
    assert d.batch_shape == batch_shape and d.event_shape == (2,)
    x = d.sample(sample_shape)
    assert x.shape == (*sample_shape, *batch_shape, 2)
    log_prob = d.log_prob(x)
    assert log_prob.shape == (*sample_shape, *batch_shape)
    # Each batch element is the model at its own context.
    flat_x = x.reshape(*sample_shape, -1, 2)
    for i, c in enumerate(context.reshape(-1, CONTEXT_DIM)):
        alone = model(c).log_prob(flat_x[..., i, :])
        torch.testing.assert_close(log_prob.reshape(*sample_shape, -1)[..., i], alone)
    if name == "cwm":
        values, log_weights = d.rao_blackwell(sample_shape)
        assert values.shape == (*sample_shape, *batch_shape, 3, 2)
        assert log_weights.shape == (*sample_shape, *batch_shape, 3)
        estimate = d.rao_blackwell_log_prob(values, log_weights)
        assert estimate.shape == (*sample_shape, *batch_shape)
        stl = d.rao_blackwell_log_prob(values, log_weights, stick_the_landing=True)
        assert stl.shape == (*sample_shape, *batch_shape)
    else:
        draw = d.rsample(sample_shape)
        assert draw.shape == (*sample_shape, *batch_shape, 2)
        fresh = draw.detach().clone()
        torch.testing.assert_close(d.log_prob(draw), d.log_prob(fresh))


def test_cwm_classifier_sees_each_batch_elements_context():
    """The bound classifier at points (..., *batch, D) equals the network of (z, c_b)."""
    model = _model("cwm")
    context = _contexts(2, 3)
    d = model(context)
    z = torch.randn(5, 2, 3, 2, dtype=torch.float64)
    standardized = model.context_standardizer(context)
    expected = model.classifier(torch.cat([z, standardized.expand(5, 2, 3, CONTEXT_DIM)], -1))
    torch.testing.assert_close(d.classifier(z), expected)
    # rao_blackwell's weights are the classifier of the base draw at each element's context.
    torch.manual_seed(4)
    values, log_weights = d.rao_blackwell((5,))
    base = (values[..., 0, :] - d.locs[..., 0, :]) / d.scales[..., 0, :]
    torch.testing.assert_close(log_weights, d.classifier(base).log_softmax(-1))


def test_cwm_rao_blackwell_is_unbiased_per_context():
    """E[h(X) | c] by Rao-Blackwellized draws against plain draws, per batch element."""
    model = _model("cwm")
    context = _contexts(3)
    torch.manual_seed(5)
    with torch.no_grad():
        d = model(context)
        values, log_weights = d.rao_blackwell((20000,))
        rb = (log_weights.exp() * torch.cos(values).sum(-1)).sum(-1)  # [S, 3]
        plain = torch.cos(d.sample((20000,))).sum(-1)  # [S, 3]
    diff = rb.mean(0) - plain.mean(0)
    se = (rb.var(0) / len(rb) + plain.var(0) / len(plain)).sqrt()
    assert (diff / se).abs().max() < Z_THRESHOLD, (diff, se)


# ---------------------------------------------------------------------------------------------
# Gradients, EM start, save/load


@pytest.mark.parametrize("name", MODELS)
def test_gradients_reach_every_parameter(name):
    model = _model(name)
    context = _contexts(6)
    d = model(context)
    x = torch.randn(6, 2, dtype=torch.float64)
    loss = -d.log_prob(x).mean()
    if name == "cwm":
        values, log_weights = d.rao_blackwell((2,))
        loss = loss + d.rao_blackwell_log_prob(values, log_weights).mean()
    loss.backward()
    for param_name, p in model.named_parameters():
        if name == "rad" and param_name.endswith("gate.net.3.bias"):
            # A bias added to every piece's gating logit cancels in the softmax: no gradient,
            # by design (as in the unconditional layer).
            continue
        assert p.grad is not None and (p.grad != 0).any(), param_name


def test_untrained_conditional_cwm_is_the_em_mixture_for_every_context():
    torch.manual_seed(0)
    data = torch.cat([torch.randn(300, 2) - 2, 0.5 * torch.randn(200, 2) + 1]).double()
    context = 5.0 + 3.0 * torch.randn(500, CONTEXT_DIM, dtype=torch.float64)
    model = CWM(2, num_components=3, hidden_dims=(8,), context_dim=CONTEXT_DIM).double()
    model.init_from_data(data, context)
    torch.testing.assert_close(model.context_standardizer.loc, context.mean(0))
    torch.testing.assert_close(model.context_standardizer.scale, context.std(0))
    locs, log_scales, log_weights = em_parameters(data, torch.zeros(3, 2, dtype=torch.float64))
    em = DiagNormalMixture(locs, log_scales.exp(), log_weights)
    queries = _contexts(4, 2)
    with torch.no_grad():
        got = model(queries).log_prob(data[:50].unsqueeze(-2).unsqueeze(-2))  # [50, 4, 2]
        unconditional = CWM(2, num_components=3, hidden_dims=(8,)).double().init_from_data(data)
        plain = unconditional().log_prob(data[:50])
    expected = em.log_prob(data[:50])
    torch.testing.assert_close(got, expected[:, None, None].expand(50, 4, 2))
    torch.testing.assert_close(plain, expected)


def test_untrained_conditional_rad_is_the_unconditional_rad_for_every_context():
    """The networks' last layers start at zero: the context changes nothing until trained."""
    torch.manual_seed(0)
    data = torch.randn(200, 2, dtype=torch.float64) * torch.tensor([2.0, 0.5]) + 1
    context = torch.randn(200, CONTEXT_DIM, dtype=torch.float64)
    conditional = RAD(2, num_layers=3, hidden_dims=(8,), context_dim=CONTEXT_DIM).double()
    conditional.init_from_data(data, context)
    plain = RAD(2, num_layers=3, hidden_dims=(8,)).double().init_from_data(data)
    with torch.no_grad():
        got = conditional(_contexts(4)).log_prob(data[:50].unsqueeze(-2))  # [50, 4]
        expected = plain().log_prob(data[:50])
    torch.testing.assert_close(got, expected[:, None].expand(50, 4))
    torch.testing.assert_close(conditional.context_standardizer.loc, context.mean(0))


@pytest.mark.parametrize("name", MODELS)
def test_save_and_load_round_trip(name, tmp_path):
    model = _model(name).float()
    path = tmp_path / f"{name}.pt"
    save_model(model, path)
    loaded = load_model(path)
    assert loaded.init_arguments["context_dim"] == CONTEXT_DIM
    context = _contexts(5).float()
    x = torch.randn(5, 2)
    with torch.no_grad():
        assert torch.equal(loaded(context).log_prob(x), model(context).log_prob(x))
    torch.testing.assert_close(loaded.context_standardizer.scale, model.context_standardizer.scale)


# ---------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize(("name", "cls"), [("cwm", CWM), ("rad", RAD)])
def test_context_errors(name, cls):
    model = _model(name)
    title = cls.__name__
    with pytest.raises(
        ValueError,
        match=rf"^`{title}` is conditional \(context_dim=2\): call it with a context of shape "
        r"\(\*batch, 2\)$",
    ):
        model()
    with pytest.raises(
        ValueError,
        match=r"^`context.shape\[-1\]` must equal `context_dim` \(2\): `context` has shape "
        r"\(4, 3\), expected \(\*batch, 2\)$",
    ):
        model(torch.zeros(4, 3, dtype=torch.float64))
    with pytest.raises(
        TypeError, match=r"^`context` must be a floating-point tensor, got dtype torch.int64$"
    ):
        model(torch.zeros(4, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=rf"^`{title}` is unconditional: `context` must be None$"):
        cls(2)(torch.zeros(2))
    data = torch.randn(30, 2, dtype=torch.float64)
    with pytest.raises(
        ValueError,
        match=r"^`context` must have shape \(30, 2\), one row per row of `data`, got \(29, 2\)$",
    ):
        model.init_from_data(data, torch.zeros(29, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match=rf"^`{title}` is unconditional: `context` must be None$"):
        cls(2).init_from_data(data, torch.zeros(30, 2))
    with pytest.raises(ValueError, match=r"^`context_dim` must be a positive integer, got 0$"):
        cls(2, context_dim=0)


# ---------------------------------------------------------------------------------------------
# A conditional density with a known answer is learned


def _rotated(angle, seed):
    """Two blobs at (±2, 0), scale 0.3, rotated by ``angle`` ``(N, 1)``: draws ``(N, 2)``."""
    generator = torch.Generator().manual_seed(seed)
    num = len(angle)
    sign = 2.0 * torch.randint(0, 2, (num,), generator=generator) - 1
    base = torch.stack([2 * sign, torch.zeros(num)], -1)
    base = base + 0.3 * torch.randn(num, 2, generator=generator)
    cos, sin = angle.cos(), angle.sin()
    return torch.cat(
        [cos * base[:, :1] - sin * base[:, 1:], sin * base[:, :1] + cos * base[:, 1:]], -1
    )


def _true_log_prob(x, angle):
    centers = 2 * torch.cat([angle.cos(), angle.sin()], -1)  # [..., 2]
    components = torch.stack([centers, -centers], -2)  # [..., 2, 2]
    truth = DiagNormalMixture(components, torch.full_like(components, 0.3), torch.zeros(2))
    return truth.log_prob(x)


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_learns_a_rotated_density(name):
    """KL(truth || model) per context, by Monte Carlo over the truth, after a short Adam run.

    The data: two blobs rotated by an angle in (-pi/2, pi/2), the angle being the context.
    """
    torch.manual_seed(0)
    angle = (2 * torch.rand(8000, 1) - 1) * math.pi / 2
    x = _rotated(angle, seed=0)
    if name == "cwm":
        model = CWM(2, num_components=8, hidden_dims=(32, 32), context_dim=1)
    else:
        model = RAD(2, num_layers=4, hidden_dims=(32, 32), context_dim=1)
    model.init_from_data(x, angle)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    # Annealed, as fit trains: the last iterate at a constant rate is as noisy as the rate
    # (at a constant rate RAD's KL at one angle ended at 0.32 on this session's machine; the
    # same code and seed had passed, under 0.15, in earlier CI runs).
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 1500)
    for _ in range(1500):
        index = torch.randint(0, len(x), (256,))
        loss = -model(angle[index]).log_prob(x[index]).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    test_angles = torch.tensor([[-1.2], [-0.4], [0.3], [1.0]])
    draws = torch.stack(
        [_rotated(a.expand(4000, 1), seed=i) for i, a in enumerate(test_angles)], 1
    )  # [N, 4, 2]: the truth at each test angle
    with torch.no_grad():
        kl = (_true_log_prob(draws, test_angles) - model(test_angles).log_prob(draws)).mean(0)
    assert (kl < 0.15).all(), kl


def test_rad_coupling_and_flow_context_errors():
    layer = RADCoupling(2, num_pieces=3, hidden_dims=(8,), context_dim=2)
    plain = RADCoupling(2, num_pieces=3, hidden_dims=(8,))
    with pytest.raises(ValueError, match=r"^`transforms\[0\]` is conditional \(context_dim=2\): "):
        RADFlow([layer])
    with pytest.raises(ValueError, match="no transform in `transforms` is conditional"):
        RADFlow([plain], context=torch.zeros(2))
    with pytest.raises(ValueError, match=r"shape \(\*batch, 2\) for `transforms\[0\]`, got \(3,\)"):
        RADFlow([layer], context=torch.zeros(3))
    with pytest.raises(ValueError, match="`RADCoupling` is unconditional: `context` must be None"):
        plain(torch.zeros(4, 2), torch.zeros(4, 2))
    with pytest.raises(ValueError, match=r"`RADCoupling` is conditional \(context_dim=2\)"):
        layer(torch.zeros(4, 2))
    # The layer inverts per context (pieces read off, then given back).
    x, context = torch.randn(5, 3, 2), torch.randn(3, 2)
    z, _ = layer(x, context)
    back = layer.inverse(z, context, pieces=layer.piece_index(x, context))
    torch.testing.assert_close(back, x, atol=1e-5, rtol=0)
