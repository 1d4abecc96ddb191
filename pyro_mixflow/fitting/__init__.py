r"""Fitting: EM starts, extreme deconvolution and maximum-likelihood training.

:func:`em_diagonal` and :func:`em_full` fit Gaussian mixtures by expectation-maximization (the
start of every mixture model and guide), :func:`deconvolve` fits a latent mixture to data
observed with known Gaussian errors, and :func:`fit` trains any module whose call returns a
distribution, on data in memory or on disk, in one process or data-parallel under ``torchrun``
(:mod:`pyro_mixflow.fitting.distributed`).
"""

from pyro_mixflow.fitting.deconvolution import DeconvolutionResult, deconvolve
from pyro_mixflow.fitting.em import em_diagonal, em_factor_parameters, em_full, em_parameters
from pyro_mixflow.fitting.training import History, Pairs, cpu_training, fit, split_validation

__all__ = [
    "DeconvolutionResult",
    "History",
    "Pairs",
    "cpu_training",
    "deconvolve",
    "em_diagonal",
    "em_factor_parameters",
    "em_full",
    "em_parameters",
    "fit",
    "split_validation",
]
