r"""Mixture-based distributions for Pyro and ``torch.distributions``."""

from pyro_mixflow.distributions.classifier_weighted_mixture import ClassifierWeightedMixture
from pyro_mixflow.distributions.diag_normal_mixture import DiagNormalMixture
from pyro_mixflow.distributions.gumbel_softmax_mixture import GumbelSoftmaxMixture
from pyro_mixflow.distributions.low_rank_multivariate_normal_mixture import (
    LowRankMultivariateNormalMixture,
)
from pyro_mixflow.distributions.mixture_base_flow import MixtureBaseFlow
from pyro_mixflow.distributions.multivariate_normal_mixture import MultivariateNormalMixture
from pyro_mixflow.distributions.noisy_mixture import (
    AdditiveNormal,
    IntegerShift,
    NoisyMixture,
    ScaleJitter,
)
from pyro_mixflow.distributions.rad_flow import RADFlow
from pyro_mixflow.distributions.reparameterized import reparameterized

__all__ = [
    "AdditiveNormal",
    "ClassifierWeightedMixture",
    "DiagNormalMixture",
    "GumbelSoftmaxMixture",
    "IntegerShift",
    "LowRankMultivariateNormalMixture",
    "MixtureBaseFlow",
    "MultivariateNormalMixture",
    "NoisyMixture",
    "RADFlow",
    "ScaleJitter",
    "reparameterized",
]
