"""The registry of example distributions that every generic test runs over.

A later distribution joins the generic tests by adding an :class:`Example` to ``EXAMPLES``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pyro
import pytest
import torch
from torch.distributions import Distribution
from torch.distributions.utils import vec_to_tril_matrix

from pyro_mixflow import (
    DiagNormalMixture,
    GumbelSoftmaxMixture,
    LowRankMultivariateNormalMixture,
    MixtureBaseFlow,
    MultivariateNormalMixture,
)
from pyro_mixflow.distributions import (
    AdditiveNormal,
    ClassifierWeightedMixture,
    IntegerShift,
    NoisyMixture,
    RADFlow,
)
from pyro_mixflow.transforms import RADCoupling

BATCH_SHAPES = [(), (2,), (2, 3)]
SAMPLE_SHAPES = [(), (4,), (2, 5)]


@dataclass(frozen=True)
class Example:
    """A distribution family with parameters built for any batch shape and dtype.

    Attributes:
        name: Test id.
        params: ``(batch_shape, dtype) -> {name: leaf tensor}``; unconstrained leaves with
            ``requires_grad=True`` (scales are built from them inside ``build``).
        build: ``params -> distribution``.
        exact_rsample: ``rsample`` draws follow ``log_prob`` (not true of relaxed samplers).
        unbiased_gradient: the ``rsample`` gradient is unbiased for ``grad E_p[f]``, checked
            against the closed form of a diagonal Gaussian mixture (mixtures only).
        has_rsample: the distribution reparameterizes; the ``rsample`` checks skip it if not.
    """

    name: str
    params: Callable[[tuple, torch.dtype], dict[str, torch.Tensor]]
    build: Callable[[dict[str, torch.Tensor]], Distribution]
    exact_rsample: bool = True
    unbiased_gradient: bool = True
    has_rsample: bool = True

    def __call__(self, batch_shape=(), dtype=torch.float64, seed=0):
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            params = self.params(tuple(batch_shape), dtype)
        return params, self.build(params)


def _mixture_params(num_components: int, dim: int, weights: str = "logits"):
    def make(batch_shape, dtype):
        locs = 2.0 * torch.randn(*batch_shape, num_components, dim, dtype=dtype)
        log_scales = 0.3 * torch.randn(*batch_shape, num_components, dim, dtype=dtype) - 0.2
        logits = torch.randn(*batch_shape, num_components, dtype=dtype)
        params = {"locs": locs, "log_scales": log_scales}
        params[weights] = logits.softmax(-1) if weights == "probs" else logits
        return {k: v.requires_grad_() for k, v in params.items()}

    return make


def _mixture(cls, **kwargs):
    def build(params):
        weights = {k: params[k] for k in ("logits", "probs") if k in params}
        logits = weights.pop("logits", None)
        return cls(params["locs"], params["log_scales"].exp(), logits, **weights, **kwargs)

    return build


def _mvn_params(num_components: int, dim: int, weights: str = "logits"):
    """Means and the lower triangle of each factor, its diagonal as logarithms."""

    def make(batch_shape, dtype):
        params = _mixture_params(num_components, dim, weights)(batch_shape, dtype)
        del params["log_scales"]
        size = dim * (dim + 1) // 2
        raw = 0.4 * torch.randn(*batch_shape, num_components, size, dtype=dtype) - 0.2
        return {**params, "raw_tril": raw.requires_grad_()}

    return make


def _scale_tril(raw):
    square = vec_to_tril_matrix(raw)
    return square.tril(-1) + torch.diag_embed(square.diagonal(dim1=-2, dim2=-1).exp())


def _mvn(matrix: str = "scale_tril"):
    """A full-covariance mixture given by its factors, or by the covariances they make."""

    def build(params):
        tril = _scale_tril(params["raw_tril"])
        given = {matrix: tril if matrix == "scale_tril" else tril @ tril.mT}
        weights = {k: params[k] for k in ("logits", "probs") if k in params}
        return MultivariateNormalMixture(params["locs"], **given, **weights)

    return build


def _low_rank_params(num_components: int, dim: int, rank: int):
    def make(batch_shape, dtype):
        params = _mixture_params(num_components, dim)(batch_shape, dtype)
        factor = 0.6 * torch.randn(*batch_shape, num_components, dim, rank, dtype=dtype)
        return {**params, "cov_factor": factor.requires_grad_()}

    return make


def _low_rank(params):
    return LowRankMultivariateNormalMixture(
        params["locs"],
        params["cov_factor"],
        (2 * params["log_scales"]).exp(),
        params["logits"],
    )


def _flow(params):
    """A smooth invertible flow (affine autoregressive, then affine) over a mixture base.

    The transforms are rebuilt with fixed weights at every call, so that every build of the
    example is the same distribution.
    """
    from nflows.transforms import MaskedAffineAutoregressiveTransform
    from torch.distributions.transforms import AffineTransform

    with torch.random.fork_rng():
        torch.manual_seed(123)
        made = MaskedAffineAutoregressiveTransform(features=2, hidden_features=8)
        for p in made.parameters():  # nflows starts near the identity; move away from it
            torch.nn.init.normal_(p, std=0.3)
    made = made.to(params["locs"].dtype)
    base = _mixture(DiagNormalMixture)(params)
    return MixtureBaseFlow(base, [made, AffineTransform(0.5, 1.5)])


def _noisy_params(batch_shape, dtype):
    params = _mixture_params(3, 2)(batch_shape, dtype)
    noise_loc = 0.3 * torch.randn(*batch_shape, 3, 2, dtype=dtype)
    log_noise_scale = 0.2 * torch.randn(*batch_shape, 3, 1, dtype=dtype) - 1.0
    return {
        **params,
        "noise_loc": noise_loc.requires_grad_(),
        "log_noise_scale": log_noise_scale.requires_grad_(),
    }


def _noisy(params):
    """Per-component additive error and a shift shared by the components (exact rsample)."""
    noise = [
        AdditiveNormal(params["noise_loc"], params["log_noise_scale"].exp()),
        IntegerShift(-1, 2),
    ]
    return NoisyMixture(_mixture(DiagNormalMixture)(params), noise)


def _cwm_params(batch_shape, dtype):
    params = _mixture_params(3, 2)(batch_shape, dtype)
    del params["logits"]
    return params


def _cwm(params):
    """A classifier weighted mixture whose classifier is a fixed random tanh MLP."""
    with torch.random.fork_rng():
        torch.manual_seed(2)
        net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    net = net.to(params["locs"].dtype)
    return ClassifierWeightedMixture(params["locs"], params["log_scales"].exp(), net)


def _rad_params(dim):
    def make(batch_shape, dtype):
        loc = 0.5 * torch.randn(*batch_shape, dim, dtype=dtype)
        log_scale = 0.2 * torch.randn(*batch_shape, dim, dtype=dtype)
        return {"loc": loc.requires_grad_(), "log_scale": log_scale.requires_grad_()}

    return make


def _rad(params):
    """Two fixed random RAD layers (3 pieces, affine maps) over a normal base with batch.

    The folds span [-10, 10], far out in the base's tails, so that the density's jumps where
    pieces meet (at u = ±10) are negligible and the generic trapezoid check (tolerance 1e-6)
    applies; tests/test_rad_flow.py integrates sharp RAD densities with derived error bounds.
    Plain MLPs: random residual networks (one more layer, skip connections) make a density
    too rough for that grid; tests/test_rad_flow.py covers them.
    """
    loc = params["loc"]
    dim = loc.shape[-1]
    with torch.random.fork_rng():
        torch.manual_seed(7)
        layers = [
            RADCoupling(
                dim,
                num_pieces=3,
                hidden_dims=(8,),
                network="mlp",
                bound=10.0,
                parity=i % 2,
                elementwise="affine",
            )
            for i in range(2)
        ]
        for layer in layers:  # a gating far from uniform, moderate widths and affine maps
            for p in layer.conditioner.parameters():
                torch.nn.init.normal_(p, std=0.2)
            for p in layer.gate.parameters():
                torch.nn.init.normal_(p, std=1.0)
    layers = [layer.to(loc.dtype) for layer in layers]
    base = pyro.distributions.Normal(loc, params["log_scale"].exp()).to_event(1)
    return RADFlow(layers, base=base)


EXAMPLES = [
    Example("DiagNormalMixture", _mixture_params(3, 2), _mixture(DiagNormalMixture)),
    Example("DiagNormalMixture-probs", _mixture_params(2, 3, "probs"), _mixture(DiagNormalMixture)),
    Example("DiagNormalMixture-1d", _mixture_params(4, 1), _mixture(DiagNormalMixture)),
    Example("MultivariateNormalMixture", _mvn_params(3, 2), _mvn()),
    Example(
        "MultivariateNormalMixture-1d-cov-probs",
        _mvn_params(4, 1, "probs"),
        _mvn("covariance_matrix"),
    ),
    Example("LowRankMultivariateNormalMixture", _low_rank_params(3, 2, 1), _low_rank),
    Example(
        "GumbelSoftmaxMixture",
        _mixture_params(3, 2),
        _mixture(GumbelSoftmaxMixture, temperature=0.5),
        exact_rsample=False,
        unbiased_gradient=False,
    ),
    Example(
        "GumbelSoftmaxMixture-st",
        _mixture_params(3, 1),
        _mixture(GumbelSoftmaxMixture, temperature=0.5, straight_through=True),
        unbiased_gradient=False,
    ),
    Example("MixtureBaseFlow", _mixture_params(3, 2), _flow, unbiased_gradient=False),
    Example("NoisyMixture", _noisy_params, _noisy, unbiased_gradient=False),
    Example(
        "ClassifierWeightedMixture",
        _cwm_params,
        _cwm,
        exact_rsample=False,
        unbiased_gradient=False,
        has_rsample=False,
    ),
    # Straight-through gating gradient: exact draws, biased gradient.
    Example("RADFlow", _rad_params(2), _rad, unbiased_gradient=False),
    Example("RADFlow-1d", _rad_params(1), _rad, unbiased_gradient=False),
]


@pytest.fixture(params=EXAMPLES, ids=lambda e: e.name)
def example(request) -> Example:
    return request.param


@pytest.fixture(params=BATCH_SHAPES, ids=str)
def batch_shape(request) -> tuple:
    return request.param


@pytest.fixture(params=SAMPLE_SHAPES, ids=str)
def sample_shape(request) -> tuple:
    return request.param


@pytest.fixture(autouse=True)
def _seed_and_clear():
    torch.manual_seed(0)
    pyro.clear_param_store()


def standard_error_z(estimates: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Per-coordinate z-scores of the mean of independent ``estimates`` (rows) against ``truth``."""
    num = estimates.shape[0]
    mean = estimates.mean(0)
    se = estimates.std(0) / math.sqrt(num)
    return (mean - truth) / se


# Two-sided tail of a z-score at which a correct estimator fails with probability below 1e-5
# per coordinate (about 1e-4 for the few dozen coordinates a test checks at once).
Z_THRESHOLD = 4.5
