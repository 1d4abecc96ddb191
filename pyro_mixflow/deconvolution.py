r"""Deprecated: extreme deconvolution moved to :mod:`pyro_mixflow.fitting`."""

from pyro_mixflow._deprecated import moved

__getattr__ = moved(
    "pyro_mixflow.deconvolution", "pyro_mixflow.fitting", ("DeconvolutionResult", "deconvolve")
)
