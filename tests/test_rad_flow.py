"""RADFlow and its RADCoupling layer: normalization, inversion, the gating mask, training."""

from __future__ import annotations

import functools
import io
import math

import pyro
import pytest
import torch
from pyro.distributions.testing.gof import auto_goodness_of_fit
from torch.distributions.transforms import AffineTransform

from pyro_mixflow import fit
from pyro_mixflow.distributions import RADFlow
from pyro_mixflow.nn import RAD
from pyro_mixflow.transforms import RADCoupling
from pyro_mixflow.transforms._spline import rational_quadratic
from tests.conftest import Z_THRESHOLD
from tests.test_generic import _chi_square_2d


def _randomize(module: torch.nn.Module, std: float = 0.5, seed: int = 0) -> torch.nn.Module:
    """Non-trivial random parameters (the last layers start at zero otherwise)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for p in module.parameters():
            torch.nn.init.normal_(p, std=std)
    return module


def _model(dim: int, elementwise: str = "spline", **kwargs) -> RAD:
    model = RAD(
        dim, num_layers=2, num_pieces=3, hidden_dims=(8,), elementwise=elementwise, **kwargs
    )
    return model.double()


@functools.cache
def _trained(dim: int, elementwise: str) -> RAD:
    """A few Adam steps at a large learning rate on sharp data (a 1-D or 2-D checkerboard)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(1000, dim, generator=gen, dtype=torch.float64) * 4 - 2
    keep = (x.floor().sum(-1) % 2) == 0
    model = _model(dim, elementwise).init_from_data(x[keep])
    fit(model, x[keep], steps=25, batch_size=256, lr=2e-2, progress=False, seed=0)
    return model


def _integral_1d(flow, lo=-40.0, hi=40.0, n=800001):
    """Trapezoid integral and its error bound h * TV (trapezoid error <= h * TV / 2 per cell
    sum, for a function of bounded variation; TV estimated on the grid, twice for margin)."""
    grid = torch.linspace(lo, hi, n, dtype=torch.float64)
    with torch.no_grad():
        density = flow.log_prob(grid.unsqueeze(-1)).exp()
    h = (hi - lo) / (n - 1)
    total_variation = density.diff().abs().sum()
    return torch.trapezoid(density, grid).item(), (h * total_variation).item()


def _importance_mass(flow, num_samples=200_000, scale=2.5):
    """Importance-sampling estimate of the total mass, E_r[p / r] for r = N(0, scale^2 I),
    with its standard error (an unbiased estimate: no discretization error)."""
    proposal = pyro.distributions.Normal(
        torch.zeros(2, dtype=torch.float64), torch.full((2,), scale, dtype=torch.float64)
    ).to_event(1)
    x = proposal.sample((num_samples,))
    with torch.no_grad():
        ratio = (flow.log_prob(x) - proposal.log_prob(x)).exp()
    return ratio.mean().item(), (ratio.std() / math.sqrt(num_samples)).item()


@pytest.mark.parametrize(
    ("elementwise", "state"),
    [
        pytest.param("spline", "random", marks=pytest.mark.slow),
        ("affine", "random"),
        ("none", "random"),
        pytest.param("spline", "trained", marks=pytest.mark.slow),
    ],
)
def test_density_integrates_to_one_1d(elementwise, state):
    model = (
        _randomize(_model(1, elementwise), std=0.3)
        if state == "random"
        else _trained(1, elementwise)
    )
    mass, bound = _integral_1d(model())
    assert bound < 0.02  # the check is informative
    assert abs(mass - 1) < bound + 1e-9, (mass, bound)


@pytest.mark.parametrize(
    ("elementwise", "state", "network"),
    [
        pytest.param("spline", "init", "residual", marks=pytest.mark.slow),
        ("spline", "random", "residual"),
        ("spline", "random", "mlp"),
        ("affine", "random", "residual"),
        pytest.param("spline", "trained", "residual", marks=pytest.mark.slow),
    ],
)
def test_density_integrates_to_one_2d(elementwise, state, network):
    if state == "trained":
        model = _trained(2, elementwise)
    else:
        model = _model(2, elementwise, network=network)
        if state == "random":
            _randomize(model, std=0.15)
    torch.manual_seed(0)
    mass, se = _importance_mass(model())
    assert se < 0.01  # the check is informative
    assert abs(mass - 1) < Z_THRESHOLD * se, (mass, se)


def test_broken_gating_fails_the_integral():
    """The integral test can fail: gating probabilities that sum to 1.1 instead of 1."""
    model = _randomize(_model(1, "none"), std=0.3)
    layer = model.layers[0]
    original = layer._log_gating

    def broken(u, x_a, edges, log_widths, candidates=None):
        out = original(u, x_a, edges, log_widths, candidates)
        return torch.cat([out[..., :-1] + math.log(1.1), out[..., -1:]], -1)

    layer._log_gating = broken
    mass, bound = _integral_1d(model())
    assert abs(mass - 1) > 10 * bound


@pytest.mark.parametrize("dim", [1, 2])
def test_samples_match_density(dim):
    torch.manual_seed(0)
    flow = _trained(dim, "spline")()
    with torch.no_grad():
        x = flow.sample((4000,))
        if dim == 1:
            p_value = auto_goodness_of_fit(x, flow.log_prob(x).exp())
        else:
            p_value = _chi_square_2d(x, flow.log_prob)
    assert p_value > 1e-3


def test_rsample_values_follow_the_density():
    torch.manual_seed(0)
    flow = _trained(2, "spline")()
    x = flow.rsample((4000,))
    assert x.requires_grad
    with torch.no_grad():
        assert _chi_square_2d(x.detach(), flow.log_prob) > 1e-3


def test_log_prob_of_a_draw_is_read_along_its_path():
    """``log_prob`` of the latest draw is the path's (the same as a fresh pass, and carrying a
    graph after ``rsample``); other values, or a graph needed after ``sample``, take a pass."""
    layers = [
        _randomize(RADCoupling(2, num_pieces=3, hidden_dims=(8,), parity=p), seed=p).double()
        for p in (0, 1)
    ]
    loc, scale = torch.tensor([1.0, -2.0]).double(), torch.tensor([0.5, 3.0]).double()
    flow = RADFlow([layers[0], AffineTransform(loc, scale, event_dim=1), layers[1]])
    torch.manual_seed(0)
    x = flow.rsample((300,))
    path = flow.log_prob(x)
    assert path is flow._last_draw[1] and path.requires_grad
    torch.testing.assert_close(path, flow.log_prob(x.clone()))
    path.sum().backward()  # the path value carries the pathwise gradient
    assert all(p.grad is not None for m in layers for p in m.parameters())
    x = flow.sample((300,))
    with torch.no_grad():
        assert flow.log_prob(x) is flow._last_draw[1]
    recomputed = flow.log_prob(x)  # a graph is needed: a fresh pass
    assert recomputed.requires_grad
    torch.testing.assert_close(recomputed.detach(), flow._last_draw[1])


@pytest.mark.parametrize("elementwise", ["spline", "affine", "none"])
def test_each_piece_inverts(elementwise):
    layer = _randomize(RADCoupling(3, num_pieces=4, hidden_dims=(8,), elementwise=elementwise))
    layer = layer.double()
    torch.manual_seed(1)
    x = 2.5 * torch.randn(500, 3, dtype=torch.float64)
    z, _ = layer(x)
    torch.testing.assert_close(layer.inverse(z, pieces=layer.piece_index(x)), x)
    # Every possible piece: the point it gives folds back to z and lies in that piece.
    u_inside = layer.piece_index(x) < 4
    for k in range(4):
        pieces = torch.where(u_inside, k, 4)
        x_k = layer.inverse(z, pieces=pieces)
        torch.testing.assert_close(layer.piece_index(x_k), pieces)
        z_k, log_weight = layer(x_k)
        torch.testing.assert_close(z_k, z)
        # The sampling path's log-weight is the forward pass's.
        torch.testing.assert_close(layer.inverse_and_log_weight(z, pieces=pieces)[1], log_weight)


def test_mask_excludes_exactly_the_impossible_pieces():
    layer = _randomize(RADCoupling(2, num_pieces=5, hidden_dims=(8,), bound=2.0)).double()
    u = torch.linspace(-4, 4, 801, dtype=torch.float64).unsqueeze(-1)  # [N, 1]
    x_a = torch.full_like(u, 0.3)
    log_p = layer.gating_log_probs(x_a, u)  # [N, 1, 6]
    torch.testing.assert_close(log_p.logsumexp(-1), torch.zeros_like(log_p[..., 0]))
    inside = (u.abs() <= 2).unsqueeze(-1)
    possible = torch.cat([inside.expand(-1, -1, 5), ~inside], -1)
    assert torch.isfinite(log_p[possible]).all()
    assert (log_p[~possible] == -math.inf).all()
    # Possible means "some point of that piece folds to u": inner pieces reach every u in
    # [-B, B] and never beyond; the outside piece is the identity beyond B.
    pre = layer._elementwise(u, layer._conditioning(x_a)[2], inverse=True)[0]  # u at z
    assert pre.shape == u.shape


def test_gradients_are_finite_and_reach_every_parameter():
    torch.manual_seed(0)
    model = _model(2)
    _randomize(model, std=0.3)
    x = 1.5 * torch.randn(256, 2, dtype=torch.float64)
    model().log_prob(x).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().amax() > 0, name
    model.zero_grad()
    model().rsample((256,)).sin().sum().backward()
    gate = model.layers[0].gate.net[-1].weight.grad
    assert torch.isfinite(gate).all() and gate.abs().amax() > 0  # straight-through gating


def test_starts_close_to_a_standard_normal():
    model = RAD(2).double()
    x = torch.randn(20000, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        gap = torch.distributions.Normal(0.0, 1.0).log_prob(x).sum(-1) - model().log_prob(x)
    # KL(N(0, I) || untrained model) estimate, in nats: about 0.002 (s.e. 0.0006); with the
    # splines' end slopes pinned to 1 instead of the uniformizing map's, 0.07.
    assert gap.mean() < 0.01


def test_spline_end_slopes_are_free():
    """The elementwise splines' slopes at ±B are parameters (log-slopes), not pinned to 1."""
    layer = RADCoupling(1, num_pieces=2, hidden_dims=(4,), bound=2.0).double()
    size = 3 * layer.num_bins + 1
    bias = layer.conditioner.last_bias()
    with torch.no_grad():
        # [2 widths, spline before the fold, spline after it (widths, heights, slopes)]
        bias[2 + size + 2 * layer.num_bins] = math.log(5.0)  # after the fold, slope at -B
        bias[2 + 2 * size - 1] = math.log(0.2)  # after the fold, slope at +B
    params = layer._conditioning(torch.zeros(2, 0, dtype=torch.float64))[2]
    ends = torch.tensor([[-2.0], [2.0]], dtype=torch.float64)
    _, log_slope = layer._elementwise(ends, params, inverse=False)
    torch.testing.assert_close(log_slope.squeeze(-1).exp(), torch.tensor([5.0, 0.2]).double())


def _spline_parameters(shape, scale, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    widths, heights = (scale * torch.randn(*shape, 8, generator=gen, dtype=dtype) for _ in "wh")
    raw = scale * torch.randn(*shape, 9, generator=gen, dtype=dtype)
    return widths, heights, raw, 1e-3 + torch.nn.functional.softplus(raw)


def test_spline_matches_nflows():
    """Our rational-quadratic spline is nflows' (same bins, slopes and log-determinants)."""
    from nflows.transforms.splines.rational_quadratic import rational_quadratic_spline

    widths, heights, raw, slopes = _spline_parameters((500,), 2.0, torch.float64)
    x = 6 * torch.rand(500, generator=torch.Generator().manual_seed(1), dtype=torch.float64) - 3
    box = {"left": -3.0, "right": 3.0, "bottom": -3.0, "top": 3.0, "min_derivative": 1e-3}
    for inverse in (False, True):
        expected = rational_quadratic_spline(x, widths, heights, raw, inverse=inverse, **box)
        got = rational_quadratic(x, widths, heights, slopes, bound=3.0, inverse=inverse)
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


def test_spline_inverse_is_accurate_at_extreme_parameters():
    """At the steep, nearly flat splines that long fits reach, the inverse is solved in float64:
    a float32 input gives the float64 answer rounded once, which maps back onto the input
    (nflows' float32 inverse raises ``discriminant >= 0`` on these parameters)."""
    widths, heights, _, slopes = _spline_parameters((20000,), 8.0, torch.float64)
    x = 6 * torch.rand(20000, generator=torch.Generator().manual_seed(1), dtype=torch.float64) - 3
    y, _ = rational_quadratic(x, widths, heights, slopes, bound=3.0)
    x64, _ = rational_quadratic(y, widths, heights, slopes, bound=3.0, inverse=True)
    y_back, _ = rational_quadratic(x64, widths, heights, slopes, bound=3.0)
    assert (y_back - y).abs().max() < 1e-9
    single = [t.float() for t in (y, widths, heights, slopes)]
    x32, log_det32 = rational_quadratic(*single, bound=3.0, inverse=True)
    assert x32.dtype == log_det32.dtype == torch.float32
    exact, _ = rational_quadratic(*(t.double() for t in single), bound=3.0, inverse=True)
    torch.testing.assert_close(x32, exact.float(), rtol=0, atol=0)


@pytest.mark.parametrize("continuous", [True, False])
def test_density_is_continuous_across_fold_lines(continuous):
    """Where two pieces meet the density is continuous with the damped gating, and jumps
    without it (the check can fail)."""
    layer = _randomize(RADCoupling(1, num_pieces=4, hidden_dims=(8,), continuous=continuous))
    layer = layer.double()
    flow = RADFlow([layer])
    empty = torch.zeros(1, 0, dtype=torch.float64)
    edges, _, params = layer._conditioning(empty)
    inner = edges[..., 1:-1].reshape(-1, 1)  # fold lines after the first spline
    lines, _ = layer._elementwise(inner, params, inverse=True, pre=True)
    with torch.no_grad():
        left = flow.log_prob(lines - 1e-9)
        right = flow.log_prob(lines + 1e-9)
    jump = (left - right).abs().amax().item()
    assert jump < 1e-5 if continuous else jump > 1e-2, jump


@pytest.mark.slow
def test_fit_improves_and_state_dict_round_trip():
    gen = torch.Generator().manual_seed(0)
    data = torch.rand(1000, 2, generator=gen) * 4 - 2
    model = RAD(2, num_layers=2, num_pieces=4, hidden_dims=(16,)).init_from_data(data)
    history = fit(model, data, steps=20, batch_size=256, lr=5e-3, progress=False, seed=0)
    assert history.train_loss[-1] < history.train_loss[0]
    kwargs = {"num_layers": 2, "num_pieces": 4, "hidden_dims": (16,)}
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    loaded = RAD(2, **kwargs)
    loaded.load_state_dict(torch.load(buffer))
    torch.testing.assert_close(loaded().log_prob(data[:10]), model().log_prob(data[:10]))


def test_networks_are_residual_or_plain():
    """``(w,) * n`` is n residual blocks (two layers each) with ``"residual"``, n layers with
    ``"mlp"``; the residual branch is used (changing a block changes the density)."""
    residual = RAD(2, num_layers=1, num_pieces=2, hidden_dims=(8, 8))
    plain = RAD(2, num_layers=1, num_pieces=2, hidden_dims=(8, 8), network="mlp")
    linears = [
        sum(isinstance(m, torch.nn.Linear) for m in net.modules())
        for net in (residual.layers[0].conditioner, plain.layers[0].conditioner)
    ]
    assert linears == [2 + 2 * 2, 3]
    _randomize(residual, std=0.3)
    x = torch.randn(50, 2)
    before = residual().log_prob(x)
    with torch.no_grad():
        residual.layers[0].conditioner.net[1].branch[-1].weight.add_(0.5)
    assert (residual().log_prob(x) - before).abs().max() > 1e-3


def test_mixes_with_bijective_transforms_and_batched_base():
    layer = _randomize(RADCoupling(2, num_pieces=3, hidden_dims=(8,))).double()
    base = torch.distributions.Independent(
        torch.distributions.Normal(torch.zeros(3, 2, dtype=torch.float64), 1.0), 1
    )
    shift = AffineTransform(torch.tensor([1.0, -1.0], dtype=torch.float64), 2.0, event_dim=1)
    flow = RADFlow([layer, shift], base=base)
    assert flow.batch_shape == (3,)
    x = flow.sample((5,))
    assert x.shape == (5, 3, 2)
    z, log_weight = layer(shift.inv(x))
    expected = base.log_prob(z) + log_weight - 2 * math.log(2.0)
    torch.testing.assert_close(flow.log_prob(x), expected)
    assert len(flow.piece_indices(x)) == 1


def test_invalid_arguments():
    with pytest.raises(ValueError, match="`input_dim` must be a positive integer"):
        RADCoupling(0)
    with pytest.raises(ValueError, match="`num_pieces` must be a positive integer"):
        RADCoupling(2, num_pieces=0)
    with pytest.raises(ValueError, match="`bound` must be a positive number"):
        RADCoupling(2, bound=-1.0)
    with pytest.raises(ValueError, match="`parity` must be 0 or 1"):
        RADCoupling(2, parity=2)
    with pytest.raises(ValueError, match="`elementwise` must be one of"):
        RADCoupling(2, elementwise="cubic")
    with pytest.raises(ValueError, match=r"`min_width` must be in \[0, 1\)"):
        RADCoupling(2, min_width=1.0)
    with pytest.raises(ValueError, match="`network` must be one of"):
        RADCoupling(2, network="resnet")
    with pytest.raises(ValueError, match=r"must be equal sizes with network='residual'"):
        RAD(2, hidden_dims=(32, 16))
    RAD(2, hidden_dims=(32, 16), network="mlp")  # any widths for a plain MLP
    layer = RADCoupling(2, num_pieces=3, hidden_dims=(4,))
    with pytest.raises(ValueError, match=r"`x` must have shape \(\.\.\., 2\), got \(5, 3\)"):
        layer(torch.zeros(5, 3))
    with pytest.raises(ValueError, match=r"`pieces` must have shape \(5, 1\)"):
        layer.inverse(torch.zeros(5, 2), pieces=torch.zeros(5, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="`transforms` must be a layer or a list"):
        RADFlow(3)
    with pytest.raises(TypeError, match=r"`transforms\[1\]` must be a RADCoupling"):
        RADFlow([layer, "shift"])
    with pytest.raises(ValueError, match="`base` is required"):
        RADFlow([AffineTransform(0.0, 1.0)])
    with pytest.raises(ValueError, match=r"`transforms\[0\].input_dim` \(2\) does not match"):
        RADFlow([layer], base=torch.distributions.MultivariateNormal(torch.zeros(3), torch.eye(3)))
    with pytest.raises(ValueError, match=r"`data` must have shape \(N, 2\)"):
        RAD(2).init_from_data(torch.zeros(5, 3))
    with pytest.raises(ValueError, match="`RAD` is unconditional"):
        RAD(2)(context=torch.zeros(2))
    with pytest.raises(ValueError, match="`num_layers` must be a positive integer"):
        RAD(2, num_layers=0)
    with pytest.raises(ValueError, match=r"`num_pieces` must have one entry per layer \(4\)"):
        RAD(2, num_pieces=(2, 2))
    with pytest.raises(ValueError, match=r"`num_pieces\[i\]` must be a positive integer"):
        RAD(2, num_pieces=(1, 0, 2, 1))
    with pytest.raises(ValueError, match="`num_pieces` must be a positive integer, got 0"):
        RAD(2, num_pieces=0)


@pytest.mark.slow
def test_stack_folds_in_its_middle_layers_by_default():
    """The first and last of 3+ layers do not fold (one piece, no gating network); a
    one-piece layer is the two splines alone (the fold is the identity, the gating 1)."""
    assert RAD(2).num_pieces == (1, 2, 2, 1)
    assert RAD(2, num_layers=2).num_pieces == (2, 2)
    assert RAD(2, fold_ends=True).num_pieces == (2, 2, 2, 2)
    assert RAD(2, num_layers=3, num_pieces=(3, 1, 2)).num_pieces == (3, 1, 2)
    model = RAD(2)
    assert [layer.gate is None for layer in model.layers] == [True, False, False, True]
    layer = _randomize(RADCoupling(2, num_pieces=1, hidden_dims=(8,))).double()
    x = 2.5 * torch.randn(200, 2, generator=torch.Generator().manual_seed(0)).double()
    z, log_weight = layer(x)
    _, _, params = layer._conditioning(x[..., layer.kept])
    u, log_det_pre = layer._elementwise(x[..., layer.folded], params, inverse=False, pre=True)
    z_b, log_det = layer._elementwise(u, params, inverse=False)
    torch.testing.assert_close(z[..., layer.folded], z_b)
    torch.testing.assert_close(log_weight, (log_det_pre + log_det).sum(-1))
    mass, bound = _integral_1d(RADFlow([_randomize(RADCoupling(1, num_pieces=1)).double()]))
    assert abs(mass - 1) < bound + 1e-9, (mass, bound)


@pytest.mark.slow
def test_discontinuous_gating_integrates_to_one():
    layers = [
        _randomize(RADCoupling(1, num_pieces=3, hidden_dims=(8,), continuous=False), std=0.3)
        for _ in range(2)
    ]
    mass, bound = _integral_1d(RADFlow([layer.double() for layer in layers]))
    assert bound < 0.02
    assert abs(mass - 1) < bound + 1e-9, (mass, bound)
