r"""Transforms: the nflows and zuko adapters and the RAD piecewise coupling layer.

The zuko adapters do not import zuko (importing it switches torch's argument validation off for
the whole process): see :mod:`pyro_mixflow.transforms.zuko`.
"""

from pyro_mixflow.transforms.nflows import NflowsBase, NflowsTransform, is_nflows_transform
from pyro_mixflow.transforms.rad import RADCoupling
from pyro_mixflow.transforms.zuko import (
    ZukoBase,
    ZukoTransform,
    is_zuko_flow,
    is_zuko_lazy_transform,
)

__all__ = [
    "NflowsBase",
    "NflowsTransform",
    "RADCoupling",
    "ZukoBase",
    "ZukoTransform",
    "is_nflows_transform",
    "is_zuko_flow",
    "is_zuko_lazy_transform",
]
