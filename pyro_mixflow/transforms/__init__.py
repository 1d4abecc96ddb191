r"""Transforms: the nflows adapter (and, later, the RAD piecewise coupling layer)."""

from pyro_mixflow.transforms.nflows import NflowsBase, NflowsTransform, is_nflows_transform

__all__ = ["NflowsBase", "NflowsTransform", "is_nflows_transform"]
