r"""Trainable models: ``nn.Module``\ s whose call returns a fresh distribution."""

from pyro_mixflow.nn.cwm import CWM
from pyro_mixflow.nn.gmm import GMM
from pyro_mixflow.nn.mixture_flow import MixtureFlow
from pyro_mixflow.nn.rad import RAD

__all__ = ["CWM", "GMM", "RAD", "MixtureFlow"]
