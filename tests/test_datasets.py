"""Checks of the 2-D benchmark densities: normalization, sampler against density, exactness.

Grid spacings and tolerances:

* A density that is a probability measure blurred by N(0, sigma^2 I) (8gaussians,
  25gaussians, rings, moons, 2spirals) has a Fourier transform bounded by
  exp(-sigma^2 |w|^2 / 2). By Poisson summation the trapezoid rule with spacing h, on a box
  where the density is negligible at the edges, errs by at most about
  4 exp(-2 pi^2 sigma^2 / h^2): 2e-19 at h = sigma / 1.5. The integral over ``bounds`` is then
  1 minus the mass outside (below 4e-9 for every density, see each ``bounds``), so the tests
  ask for |integral - 1| < 1e-8.
* Piecewise-constant densities (checkerboard, images) are integrated by the midpoint rule on
  grids aligned with their pieces, which is exact: tolerance 1e-12.
* The pinwheel density is not a Gaussian blur (and has fold caustics of negligible mass); the
  trapezoid rule converges more slowly there: at h = 0.08, 0.06, 0.04, 0.03, 0.02 the
  integral minus 1 is -8e-7, 3e-8, -8e-9, -4e-9, -1.6e-9 (measured), so h = 0.03 with the same
  1e-8 tolerance.
* The sampler is checked against the density by (a) Pearson's test of a histogram against cell
  masses integrated by Gauss–Legendre, (b) a z-test of the samples' mean log-density against
  the grid integral of p log p (sensitive to scale errors: 5 % too wide a blur moves it by
  about 0.1 nat), and (c) Pyro's nearest-neighbour ``auto_goodness_of_fit``, which is
  miscalibrated in 2-D (the exact 8gaussians sampler gives p < 1e-4 for one seed in four) and
  has little power, so it only guards against gross errors (threshold 1e-6).
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
import pytest
import scipy.integrate
import scipy.optimize
import scipy.special
import scipy.stats
import torch
import torch.distributions as td
from PIL import Image
from pyro.distributions.testing.gof import auto_goodness_of_fit

from pyro_mixflow import datasets
from pyro_mixflow.datasets import (
    NAMES,
    Checkerboard,
    Density2D,
    EightGaussians,
    ImageDensity,
    Pinwheel,
    Rings,
    TwentyFiveGaussians,
    TwoMoons,
    TwoSpirals,
    euler,
    kl_divergence,
    load,
)
from pyro_mixflow.datasets import spirals as spirals_module
from tests.conftest import Z_THRESHOLD

TOY_NAMES = [n for n in NAMES if n != "euler"]
# Standard deviation of the Gaussian blur of each blurred density: sets its trapezoid spacing.
BLUR = {
    "8gaussians": 0.5 / 1.414,
    "25gaussians": 0.05 / 2.828,
    "rings": 0.08,
    "moons": 0.2,
    "2spirals": 0.1,
}
GOF_THRESHOLD = 1e-3  # Pearson's test: a correct sampler fails with probability 1e-3


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _axis(lo: float, hi: float, spacing: float) -> torch.Tensor:
    return torch.linspace(lo, hi, math.ceil((hi - lo) / spacing) + 1, dtype=torch.float64)


def _trapezoid(values: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor) -> float:
    return torch.trapezoid(torch.trapezoid(values, ys, dim=1), xs).item()


@functools.cache
def _grid_log_prob(name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(xs, ys, log p)`` on the trapezoid grid of each toy density (cached: two tests)."""
    density = load(name)
    (x0, x1), (y0, y1) = density.bounds
    if name == "checkerboard":  # cell midpoints of a 1/8 grid: exact for the 2 x 2 squares
        xs = torch.linspace(-4 + 1 / 16, 4 - 1 / 16, 64, dtype=torch.float64)
        ys = xs
    else:
        spacing = 0.03 if name == "pinwheel" else BLUR[name] / 1.5
        xs, ys = _axis(x0, x1, spacing), _axis(y0, y1, spacing)
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="ij"), dim=-1)
    return xs, ys, density.log_prob(grid)


# ---------------------------------------------------------------------------------------------
# Catalog, API, reproducibility


def test_names_and_load():
    assert NAMES == (
        "8gaussians",
        "25gaussians",
        "checkerboard",
        "rings",
        "2spirals",
        "pinwheel",
        "moons",
        "euler",
    )
    for name in NAMES:
        density = load(name)
        assert isinstance(density, Density2D)
        assert density.name == name
        assert density.has_exact_log_prob
        (x0, x1), (y0, y1) = density.bounds
        assert x0 < x1 and y0 < y1
        assert name in repr(density)


@pytest.mark.parametrize("name", ["spirals", "8-gaussians", "", "Moons"])
def test_unknown_name_lists_valid_names(name):
    with pytest.raises(ValueError, match=r"unknown density .*; valid names: '8gaussians', "):
        load(name)


def test_non_string_name_raises_value_error():
    with pytest.raises(ValueError, match="valid names"):
        load(["moons"])


@pytest.mark.parametrize("name", NAMES)
def test_sampling_is_reproducible_and_typed(name):
    density = load(name)
    a = density.sample(500, generator=_generator(7))
    b = density.sample(500, generator=_generator(7))
    c = density.sample(500, generator=_generator(8))
    assert a.shape == (500, 2) and a.dtype == torch.float32
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)
    d = density.sample(500, generator=_generator(7), dtype=torch.float64)
    assert d.dtype == torch.float64
    torch.testing.assert_close(d.float(), a, rtol=0, atol=0)
    torch.manual_seed(3)
    e = density.sample(10)
    torch.manual_seed(3)
    torch.testing.assert_close(density.sample(10), e, rtol=0, atol=0)
    assert density.sample(0).shape == (0, 2)


@pytest.mark.parametrize("name", NAMES)
def test_log_prob_shapes_and_dtypes(name):
    density = load(name)
    x = density.sample(12, generator=_generator(1))
    assert density.log_prob(x).shape == (12,) and density.log_prob(x).dtype == torch.float32
    x64 = x.double().reshape(3, 4, 2)
    out = density.log_prob(x64)
    assert out.shape == (3, 4) and out.dtype == torch.float64
    torch.testing.assert_close(out.reshape(-1).float(), density.log_prob(x))
    assert density.log_prob(x[0]).shape == ()
    assert density.log_prob(torch.zeros(0, 2)).shape == (0,)
    assert torch.isfinite(density.log_prob(x64)).all()


def test_invalid_arguments_raise():
    density = EightGaussians()
    with pytest.raises(ValueError, match=r"`value` must have shape \(\*batch, 2\), got \(3,\)"):
        density.log_prob(torch.zeros(3))
    with pytest.raises(TypeError, match="`value` must have a floating dtype"):
        density.log_prob(torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(TypeError, match=r"`value` must be a torch\.Tensor"):
        density.log_prob([[0.0, 0.0]])
    with pytest.raises(ValueError, match="`num_samples` must be non-negative, got -1"):
        density.sample(-1)
    with pytest.raises(TypeError, match="`num_samples` must be an int"):
        density.sample(2.0)
    with pytest.raises(TypeError, match="`dtype` must be a floating dtype"):
        density.sample(2, dtype=torch.long)


# ---------------------------------------------------------------------------------------------
# Normalization


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n == "pinwheel" else n for n in TOY_NAMES]
)
def test_density_integrates_to_one(name):
    xs, ys, log_p = _grid_log_prob(name)
    if name == "checkerboard":
        integral = log_p.exp().sum().item() / 64  # midpoint rule, cells of area 1/64
        assert abs(integral - 1) < 1e-12, integral
    else:
        integral = _trapezoid(log_p.exp(), xs, ys)
        assert abs(integral - 1) < 1e-8, integral


def test_checkerboard_is_piecewise_constant():
    density = Checkerboard()
    values = _grid_log_prob("checkerboard")[2].exp()
    assert (values == 0).sum() == 2048
    torch.testing.assert_close(values[values > 0], torch.full((2048,), 1 / 32).double())
    corners = torch.tensor(
        [[-4.0, -4.0], [-2.0, -4.0], [4.0, 0.0], [0.0, 4.0], [-4.1, -3.0]], dtype=torch.float64
    )
    assert density.log_prob(corners).tolist() == [
        -math.log(32),
        -math.inf,
        -math.inf,
        -math.inf,
        -math.inf,
    ]


# ---------------------------------------------------------------------------------------------
# Sampler against density


def _cell_probabilities(density: Density2D, bins: int, nodes: int) -> torch.Tensor:
    """Mass of each of ``bins x bins`` cells of ``bounds``, by Gauss–Legendre per cell."""
    (x0, x1), (y0, y1) = density.bounds
    unit, unit_weights = (torch.from_numpy(a) for a in np.polynomial.legendre.leggauss(nodes))
    axes, weights = [], []
    for lo, hi in ((x0, x1), (y0, y1)):
        width = (hi - lo) / bins
        left = lo + width * torch.arange(bins, dtype=torch.float64)
        axes.append((left[:, None] + width / 2 * (1 + unit)).reshape(-1))
        weights.append((width / 2 * unit_weights).repeat(bins))
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)
    mass = density.prob(grid) * weights[0][:, None] * weights[1]
    return mass.reshape(bins, nodes, bins, nodes).sum((1, 3))


def _chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's test of ``counts`` against ``probs``, pooling cells expecting fewer than 5."""
    counts, probs = counts.reshape(-1).double(), probs.reshape(-1).double()
    expected = counts.sum() * probs / probs.sum()
    small = expected < 5
    observed = torch.cat([counts[~small], counts[small].sum().reshape(1)])
    expected = torch.cat([expected[~small], expected[small].sum().reshape(1)])
    if expected[-1] == 0:
        assert observed[-1] == 0
        observed, expected = observed[:-1], expected[:-1]
    return scipy.stats.chisquare(observed.numpy(), expected.numpy()).pvalue


def _histogram(samples: torch.Tensor, density: Density2D, bins: int) -> torch.Tensor:
    (x0, x1), (y0, y1) = density.bounds
    counts, _, _ = np.histogram2d(
        samples[:, 0].numpy(), samples[:, 1].numpy(), bins=bins, range=[[x0, x1], [y0, y1]]
    )
    return torch.from_numpy(counts)


# (histogram bins per axis, Gauss–Legendre nodes per cell and axis): cells are integrated to
# a relative accuracy far below the 1/sqrt(count) sampling noise (checked for each density by
# doubling the nodes while writing this test).
CHI_SQUARE_GRID = {
    "8gaussians": (10, 16),
    "25gaussians": (10, 48),
    "checkerboard": (8, 1),
    "rings": (12, 24),
    "moons": (12, 12),
    "2spirals": (8, 20),
    "pinwheel": (10, 24),
}


@pytest.mark.parametrize("name", TOY_NAMES)
def test_sampler_matches_density(name):
    density = load(name)
    samples = density.sample(20_000, generator=_generator(11), dtype=torch.float64)
    log_p = density.log_prob(samples)
    assert torch.isfinite(log_p).all()
    # (a) Histogram against exact cell masses.
    bins, nodes = CHI_SQUARE_GRID[name]
    cell_probs = _cell_probabilities(density, bins, nodes)
    assert abs(cell_probs.sum().item() - 1) < 1e-6
    assert _chi_square_p_value(_histogram(samples, density, bins), cell_probs) > GOF_THRESHOLD
    # (b) Mean log-density against the grid integral of p log p (exact for the checkerboard).
    xs, ys, grid_log_p = _grid_log_prob(name)
    if name == "checkerboard":
        expected = -math.log(32)
    else:
        expected = _trapezoid(grid_log_p.exp() * grid_log_p.nan_to_num(neginf=0.0), xs, ys)
    se = log_p.std().item() / math.sqrt(len(log_p))  # 0 for the checkerboard (up to rounding)
    assert abs(log_p.mean().item() - expected) < Z_THRESHOLD * se + 1e-12
    # (c) Nearest-neighbour test (not for piecewise-constant densities: biased at the edges).
    if name != "checkerboard":
        assert auto_goodness_of_fit(samples, log_p.exp()) > 1e-6


@pytest.mark.parametrize("name", TOY_NAMES)
def test_bounds_hold_the_samples(name):
    density = load(name)
    samples = density.sample(20_000, generator=_generator(5), dtype=torch.float64)
    (x0, x1), (y0, y1) = density.bounds
    inside = (samples[:, 0] >= x0) & (samples[:, 0] <= x1)
    inside &= (samples[:, 1] >= y0) & (samples[:, 1] <= y1)
    assert inside.all()


# ---------------------------------------------------------------------------------------------
# Exactness of each log-density against an independent computation


@pytest.mark.parametrize("cls", [EightGaussians, TwentyFiveGaussians])
def test_gaussian_mixtures_match_mixture_same_family(cls):
    density = cls()
    locs = torch.tensor(density.locs, dtype=torch.float64)
    reference = td.MixtureSameFamily(
        td.Categorical(logits=torch.zeros(len(locs), dtype=torch.float64)),
        td.Independent(td.Normal(locs, torch.full_like(locs, density.scale)), 1),
    )
    x = torch.cat([density.sample(200, dtype=torch.float64), 3 * torch.randn(50, 2).double()])
    torch.testing.assert_close(density.log_prob(x), reference.log_prob(x), rtol=1e-12, atol=1e-12)


def test_eight_gaussians_follows_ffjord_constants():
    centres = torch.tensor(EightGaussians.locs)
    torch.testing.assert_close(centres.norm(dim=-1), torch.full((8,), 4 / 1.414))
    assert TwentyFiveGaussians.locs[0] == (-4 / 2.828, -4 / 2.828)


def test_rings_bessel_formula_matches_angular_average():
    density = Rings()
    x = torch.cat(
        [density.sample(100, dtype=torch.float64), torch.tensor([[0.0, 0.0], [5.0, 1.0]])]
    ).double()
    theta = torch.arange(8192, dtype=torch.float64) * (2 * math.pi / 8192)
    circle = torch.stack([theta.cos(), theta.sin()], dim=-1)  # periodic trapezoid: spectral
    terms = []
    for radius in density.radii:
        sq = (x[:, None, :] - radius * circle).square().sum(-1)  # [N, T]
        log_normal = -0.5 * sq / density.scale**2 - math.log(2 * math.pi * density.scale**2)
        terms.append(torch.logsumexp(log_normal, -1) - math.log(8192))
    reference = torch.logsumexp(torch.stack(terms, -1), -1) - math.log(4)
    torch.testing.assert_close(density.log_prob(x), reference, rtol=0, atol=1e-10)


def _moons_reference(x: np.ndarray) -> float:
    """log p by adaptive quadrature of the Gaussian along both half circles (scipy)."""
    moons = TwoMoons()
    var = moons.scale**2
    total = 0.0
    for (cx, cy), start in zip(moons.centers, moons.start_angles, strict=True):

        def integrand(t, cx=cx, cy=cy, start=start):
            dx = x[0] - cx - moons.radius * math.cos(start + t)
            dy = x[1] - cy - moons.radius * math.sin(start + t)
            return math.exp(-(dx * dx + dy * dy) / (2 * var))

        breaks = np.linspace(0, math.pi, 41)[1:-1]
        value, _ = scipy.integrate.quad(
            integrand, 0, math.pi, points=breaks, limit=400, epsabs=0, epsrel=1e-13
        )
        total += value / math.pi / (2 * math.pi * var) / 2
    return math.log(total)


def test_moons_quadrature_is_accurate():
    density = TwoMoons()
    points = torch.cat(
        [
            density.sample(20, generator=_generator(2), dtype=torch.float64),
            torch.tensor(
                [[1.0, -0.2], [-3.0, -0.2], [-1.0, -0.2], [0.0, 0.3], [2.5, 2.5]]
            ).double(),
        ]
    )
    reference = torch.tensor([_moons_reference(p) for p in points.numpy()], dtype=torch.float64)
    torch.testing.assert_close(density.log_prob(points), reference, rtol=0, atol=1e-10)


def _spirals_reference(x: torch.Tensor, num_panels: int) -> torch.Tensor:
    rule = spirals_module._arm_rule(num_panels, 16, 1, 2, torch.float64, torch.device("cpu"))
    return spirals_module._log_both_arms(x, rule, fine=False)


def test_spirals_quadrature_error_is_as_documented():
    density = TwoSpirals()
    (x0, x1), (y0, y1) = density.bounds
    g = _generator(4)
    x = torch.cat(
        [
            density.sample(200, generator=g, dtype=torch.float64),
            torch.rand(300, 2, generator=g, dtype=torch.float64) * torch.tensor([x1 - x0, y1 - y0])
            + torch.tensor([x0, y0]),
            20 * torch.rand(100, 2, generator=g, dtype=torch.float64) - 10,
        ]
    )
    ours = density.log_prob(x)
    reference = _spirals_reference(x, 1200)  # 10 times as many panels, 16 nodes each
    error = (ours - reference).abs()
    assert error[reference > -40].max() < 1e-12
    assert error[reference > -3000].max() < 1e-11
    assert (error / reference.abs()).max() < 1e-11
    assert (reference < -3000).any() and (reference > -40).any()


def test_spirals_kernel_matches_scipy():
    # The box-plus-Gaussian kernel k(z) in log space against its scipy definition (lower tails
    # left of the box centre, upper tails right of it, so that scipy does not cancel).
    z = np.linspace(-3.0, 3.0, 601)
    box, scale = 0.5 / 3, 0.1
    left = scipy.special.ndtr(z / scale) - scipy.special.ndtr((z - box) / scale)
    right = scipy.special.ndtr((box - z) / scale) - scipy.special.ndtr(-z / scale)
    with np.errstate(divide="ignore"):
        reference = np.log(np.where(z < box / 2, left, right) / box)
    ours = spirals_module._log_kernel(torch.from_numpy(z)).numpy()
    finite = reference > -700  # where scipy's tails have not underflowed
    assert finite.sum() > 400
    np.testing.assert_allclose(ours[finite], reference[finite], rtol=1e-12, atol=1e-12)
    far = torch.tensor([-10.0, 10.0], dtype=torch.float64)  # erfcx keeps the far tails finite
    assert torch.isfinite(spirals_module._log_kernel(far)).all()


def _pinwheel_reference(x: np.ndarray) -> float:
    """Sum over preimages found by a dense scan of beta and Brent's method (scipy)."""
    rho, psi = math.hypot(*x) / 2, math.atan2(x[1], x[0])
    beta = np.linspace(-math.pi, math.pi, 20_001)
    total = 0.0
    for arm in range(5):
        offset = psi + 2 * math.pi * arm / 5

        def shifted(b, level, offset=offset):
            return b - 0.25 * math.exp(rho * math.cos(b)) - offset - level

        levels = np.floor((beta - 0.25 * np.exp(rho * np.cos(beta)) - offset) / (2 * math.pi))
        for i in np.nonzero(levels[1:] != levels[:-1])[0]:
            level = 2 * math.pi * max(levels[i], levels[i + 1])
            root = scipy.optimize.brentq(shifted, beta[i], beta[i + 1], args=(level,), xtol=1e-15)
            f1, f2 = rho * math.cos(root), rho * math.sin(root)
            normal = math.exp(-0.5 * ((f1 - 1) / 0.3) ** 2 - 0.5 * (f2 / 0.1) ** 2)
            total += normal / (2 * math.pi * 0.03) / abs(1 + 0.25 * math.exp(f1) * f2)
    return math.log(total / 20)


def test_pinwheel_preimages_match_brute_force():
    density = Pinwheel()
    g = _generator(6)
    x = torch.cat(
        [
            density.sample(15, generator=g, dtype=torch.float64),
            12 * torch.rand(15, 2, generator=g, dtype=torch.float64) - 6,  # folded region too
            torch.tensor([[0.0, 0.0], [5.5, 0.3]], dtype=torch.float64),
        ]
    )
    reference = torch.tensor([_pinwheel_reference(p) for p in x.numpy()], dtype=torch.float64)
    torch.testing.assert_close(density.log_prob(x), reference, rtol=0, atol=1e-10)


def test_pinwheel_is_neg_inf_beyond_enumeration_radius():
    out = Pinwheel().log_prob(torch.tensor([[11.9, 0.0], [12.1, 0.0]], dtype=torch.float64))
    assert torch.isfinite(out[0]) and out[1] == -math.inf


# ---------------------------------------------------------------------------------------------
# KL divergence


def test_kl_of_truth_against_itself_is_zero():
    for name in ("8gaussians", "checkerboard", "euler"):
        density = load(name)
        assert kl_divergence(density, density.log_prob, num_samples=2_000) == (0.0, 0.0)


def test_kl_against_wider_gaussian_matches_grid_integral():
    truth = EightGaussians()
    wide = td.MultivariateNormal(torch.zeros(2, dtype=torch.float64), 9 * torch.eye(2).double())
    estimate, se = kl_divergence(
        truth, wide.log_prob, num_samples=50_000, generator=_generator(9), dtype=torch.float64
    )
    assert estimate > 0 and estimate > 10 * se
    (x0, x1), (y0, y1) = truth.bounds
    xs, ys = _axis(x0, x1, 0.1), _axis(y0, y1, 0.1)
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="ij"), dim=-1)
    log_p = truth.log_prob(grid)
    integrand = log_p.exp() * (log_p - wide.log_prob(grid))
    exact = torch.trapezoid(torch.trapezoid(integrand, ys, dim=1), xs).item()
    assert abs(estimate - exact) < Z_THRESHOLD * se


def test_kl_is_reproducible_and_batched():
    truth = Rings()
    model = td.MultivariateNormal(torch.zeros(2), 4 * torch.eye(2))
    kwargs = {"num_samples": 2_500, "batch_size": 1_000}
    a = kl_divergence(truth, model.log_prob, generator=_generator(1), **kwargs)
    b = kl_divergence(truth, model.log_prob, generator=_generator(1), **kwargs)
    c = kl_divergence(truth, model.log_prob, generator=_generator(2), **kwargs)
    assert a == b and a != c
    assert abs(a[0] - c[0]) < Z_THRESHOLD * math.hypot(a[1], c[1])


def test_kl_rejects_bad_arguments():
    truth = Rings()
    with pytest.raises(ValueError, match="`num_samples` must be an int >= 2, got 1"):
        kl_divergence(truth, truth.log_prob, num_samples=1)
    with pytest.raises(ValueError, match="`batch_size` must be an int >= 1"):
        kl_divergence(truth, truth.log_prob, batch_size=0)
    with pytest.raises(ValueError, match=r"`model_log_prob` must map points of shape \(10, 2\)"):
        kl_divergence(truth, lambda x: x.sum(), num_samples=10)


# ---------------------------------------------------------------------------------------------
# Image densities


def _euler_grey() -> np.ndarray:
    with Image.open(Path(datasets.__file__).parent / "data" / "euler.jpg") as img:
        rgb = np.asarray(img.convert("RGB"), dtype=np.float64)
    return 0.2989 * rgb[..., 0] + 0.5870 * rgb[..., 1] + 0.1140 * rgb[..., 2]


def test_euler_is_the_packaged_image():
    density = euler()
    assert density.name == "euler" and density.shape == (256, 197)
    grey = _euler_grey()
    torch.testing.assert_close(density.probs, torch.from_numpy(grey / grey.sum()))
    probs = grey / grey.sum()
    direct = float(np.sum(probs * np.log(probs)) + np.log(probs.size))
    assert abs(density.optimal_mean_log_prob - direct) < 1e-12
    assert abs(density.optimal_mean_log_prob - 0.2245) < 1e-4  # the data README's value
    assert density.entropy() == -density.optimal_mean_log_prob


def test_image_density_integrates_to_one_and_samples_inside():
    density = euler()
    height, width = density.shape
    # Midpoint rule on a 2 x 2 grid per pixel: exact for a piecewise-constant density.
    xs = (torch.arange(2 * width, dtype=torch.float64) + 0.5) / (2 * width)
    ys = (torch.arange(2 * height, dtype=torch.float64) + 0.5) / (2 * height)
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="ij"), dim=-1)
    assert abs(density.prob(grid).sum().item() / (4 * height * width) - 1) < 1e-12
    samples = density.sample(20_000, generator=_generator(3), dtype=torch.float64)
    assert ((samples >= 0) & (samples <= 1)).all()
    log_p = density.log_prob(samples)
    assert torch.isfinite(log_p).all()
    # The mean log-density of its own samples estimates the best possible value.
    z = (log_p.mean() - density.optimal_mean_log_prob) / (log_p.std() / math.sqrt(len(log_p)))
    assert abs(z) < Z_THRESHOLD
    outside = torch.tensor([[-0.01, 0.5], [0.5, 1.01], [1.5, 1.5]], dtype=torch.float64)
    assert (density.log_prob(outside) == -math.inf).all()


def test_image_sampler_matches_pixel_probabilities():
    density = euler()
    samples = density.sample(40_000, generator=_generator(12), dtype=torch.float64)
    height, width = density.shape
    col = (samples[:, 0] * width).floor().long().clamp(max=width - 1)
    row = ((1 - samples[:, 1]) * height).floor().long().clamp(max=height - 1)
    # 16 x 16-pixel blocks (the last ones smaller): exact block probabilities.
    block = (row // 16) * math.ceil(width / 16) + col // 16
    counts = torch.bincount(block, minlength=16 * math.ceil(width / 16))
    rows = torch.arange(height).repeat_interleave(width)
    cols = torch.arange(width).repeat(height)
    pixel_block = (rows // 16) * math.ceil(width / 16) + cols // 16
    block_probs = torch.zeros(counts.shape, dtype=torch.float64).index_add(
        0, pixel_block, density.probs.reshape(-1)
    )
    assert _chi_square_p_value(counts, block_probs) > GOF_THRESHOLD


def test_image_orientation_and_invert():
    grey = torch.tensor([[0.0, 1.0, 0.5], [0.25, 0.0, 0.0]], dtype=torch.float64)  # H=2, W=3
    bright, dark = ImageDensity(grey), ImageDensity(grey, invert=True)
    torch.testing.assert_close(bright.probs, grey / grey.sum())
    torch.testing.assert_close(dark.probs, (1 - grey) / (1 - grey).sum())
    # Pixel (row 0, col 1) is the top-middle cell [1/3, 2/3) x (1/2, 1].
    top_middle = torch.tensor([[0.5, 0.75]], dtype=torch.float64)
    expected = math.log(grey[0, 1].item() / grey.sum().item() * 6)
    assert bright.log_prob(top_middle).item() == pytest.approx(expected, abs=1e-12)
    assert dark.log_prob(top_middle).item() == -math.inf
    samples = bright.sample(2_000, generator=_generator(0), dtype=torch.float64)
    on_top_middle = (samples[:, 0] >= 1 / 3) & (samples[:, 0] < 2 / 3) & (samples[:, 1] > 0.5)
    assert abs(on_top_middle.double().mean().item() - 1 / 1.75) < 0.05
    assert dark.sample(500, generator=_generator(0))[:, 0].min() >= 0
    # Edges: x = 1 belongs to the last column, y = 0 to the bottom row.
    edges = torch.tensor([[1.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(
        bright.log_prob(edges).exp(),
        torch.tensor([0.5 / 1.75 * 6, 0.25 / 1.75 * 6], dtype=torch.float64),
    )


def test_image_from_rgb_and_files(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    grey = 0.2989 * rgb[..., 0] + 0.5870 * rgb[..., 1] + 0.1140 * rgb[..., 2]
    expected = torch.from_numpy(grey / grey.sum())
    torch.testing.assert_close(ImageDensity(rgb).probs, expected)
    torch.testing.assert_close(ImageDensity(torch.from_numpy(rgb)).probs, expected)
    rgba = np.concatenate([rgb, np.zeros((5, 7, 1), dtype=np.uint8)], axis=-1)
    torch.testing.assert_close(ImageDensity(rgba).probs, expected)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    torch.testing.assert_close(ImageDensity(tmp_path / "rgb.png").probs, expected)
    torch.testing.assert_close(ImageDensity(str(tmp_path / "rgb.png")).probs, expected)
    Image.fromarray(rgb[..., 0]).save(tmp_path / "grey.png")
    inverted = 255.0 - rgb[..., 0]
    torch.testing.assert_close(
        ImageDensity(tmp_path / "grey.png", invert=True).probs,
        torch.from_numpy(inverted / inverted.sum()),
    )


def test_image_rejects_bad_input():
    with pytest.raises(ValueError, match="the image has no mass"):
        ImageDensity(np.zeros((3, 3)))
    with pytest.raises(ValueError, match="the image has no mass"):
        ImageDensity(np.ones((3, 3)), invert=True)
    with pytest.raises(ValueError, match=r"must have shape \(H, W\), \(H, W, 3\)"):
        ImageDensity(np.ones((2, 2, 2)))
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        ImageDensity(np.full((2, 2), 2.0))
    with pytest.raises(TypeError, match="must have dtype uint8, uint16, bool"):
        ImageDensity(np.ones((2, 2), dtype=np.int64))
    with pytest.raises(TypeError, match="`image` must be a path"):
        ImageDensity([[0.5]])
    with pytest.raises(ValueError, match="`image` is empty"):
        ImageDensity(np.ones((0, 3)))
