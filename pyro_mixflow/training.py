r"""Deprecated: the training loop moved to :mod:`pyro_mixflow.fitting`."""

from pyro_mixflow._deprecated import moved

__getattr__ = moved("pyro_mixflow.training", "pyro_mixflow.fitting", ("History", "fit"))
