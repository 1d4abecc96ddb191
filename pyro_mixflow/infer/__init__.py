r"""Pyro inference with mixture guides: autoguides and a Rao-Blackwellized ELBO."""

from pyro_mixflow.infer._auto_mixture import init_to_median_or_origin
from pyro_mixflow.infer.auto_classifier_weighted_mixture import AutoClassifierWeightedMixture
from pyro_mixflow.infer.auto_gaussian_mixture import AutoGaussianMixture
from pyro_mixflow.infer.auto_mixture_base_flow import AutoMixtureBaseFlow
from pyro_mixflow.infer.auto_normal_mixture import AutoNormalMixture
from pyro_mixflow.infer.auto_rad_flow import AutoRADFlow
from pyro_mixflow.infer.rao_blackwell_elbo import RaoBlackwellELBO

__all__ = [
    "AutoClassifierWeightedMixture",
    "AutoGaussianMixture",
    "AutoMixtureBaseFlow",
    "AutoNormalMixture",
    "AutoRADFlow",
    "RaoBlackwellELBO",
    "init_to_median_or_origin",
]
