r"""Fitting: EM starts, extreme deconvolution and maximum-likelihood training.

:func:`em_diagonal` fits a diagonal Gaussian mixture by expectation-maximization (the start of
every mixture model and guide), :func:`deconvolve` fits a latent mixture to data observed with
known Gaussian errors, and :func:`fit` trains any module whose call returns a distribution.
"""

from pyro_mixflow.fitting.deconvolution import DeconvolutionResult, deconvolve
from pyro_mixflow.fitting.em import em_diagonal, em_parameters
from pyro_mixflow.fitting.training import History, Pairs, cpu_training, fit, split_validation

__all__ = [
    "DeconvolutionResult",
    "History",
    "Pairs",
    "cpu_training",
    "deconvolve",
    "em_diagonal",
    "em_parameters",
    "fit",
    "split_validation",
]
