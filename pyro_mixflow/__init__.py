r"""Mixture-based distributions for Pyro and ``torch.distributions``: density models and guides."""

from pyro_mixflow.distributions import (
    ClassifierWeightedMixture,
    DiagNormalMixture,
    GumbelSoftmaxMixture,
    LowRankMultivariateNormalMixture,
    MixtureBaseFlow,
    MultivariateNormalMixture,
    NoisyMixture,
    RADFlow,
    reparameterized,
)
from pyro_mixflow.fitting import History, deconvolve, fit

__version__ = "0.1.0.dev0"

__all__ = [
    "ClassifierWeightedMixture",
    "DiagNormalMixture",
    "GumbelSoftmaxMixture",
    "History",
    "LowRankMultivariateNormalMixture",
    "MixtureBaseFlow",
    "MultivariateNormalMixture",
    "NoisyMixture",
    "RADFlow",
    "__version__",
    "deconvolve",
    "fit",
    "reparameterized",
]
