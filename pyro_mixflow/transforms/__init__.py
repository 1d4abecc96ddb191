r"""Transforms: the nflows adapter and the RAD piecewise coupling layer."""

from pyro_mixflow.transforms.nflows import NflowsBase, NflowsTransform, is_nflows_transform
from pyro_mixflow.transforms.rad import RADCoupling

__all__ = ["NflowsBase", "NflowsTransform", "RADCoupling", "is_nflows_transform"]
