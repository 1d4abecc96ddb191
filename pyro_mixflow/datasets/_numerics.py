r"""Quadrature rules and log-space reductions shared by the 2-D benchmark densities (private)."""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

__all__ = ["LOG_2PI", "gauss_legendre", "scatter_logsumexp"]

LOG_2PI = math.log(2 * math.pi)


def gauss_legendre(
    num_nodes: int, *, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Gauss–Legendre nodes and weights on :math:`[-1, 1]`.

    The rule is exact for polynomials of degree :math:`2n - 1`.

    Args:
        num_nodes: Number of nodes :math:`n`.
        dtype: Floating dtype of the result.
        device: Device of the result.

    Returns:
        ``(nodes, weights)``, each of shape ``(n,)``.
    """
    nodes, weights = _leggauss(num_nodes)
    return (
        torch.tensor(nodes, dtype=dtype, device=device),
        torch.tensor(weights, dtype=dtype, device=device),
    )


def scatter_logsumexp(values: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    r"""Per-group :math:`\log \sum \exp`: ``out[g] = logsumexp(values[index == g])``.

    Groups without any value get :math:`-\infty`.

    Args:
        values: Flat tensor of log terms.
        index: Group of each term, same shape as ``values``, in ``[0, size)``.
        size: Number of groups.

    Returns:
        Tensor of shape ``(size,)``.
    """
    top = torch.full((size,), -math.inf, dtype=values.dtype, device=values.device)
    top = top.scatter_reduce(0, index, values, reduce="amax", include_self=True)
    safe_top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    total = torch.zeros(size, dtype=values.dtype, device=values.device)
    total = total.index_add(0, index, torch.exp(values - safe_top[index]))
    return torch.log(total) + safe_top


@functools.lru_cache(maxsize=16)
def _leggauss(num_nodes: int) -> tuple[np.ndarray, np.ndarray]:
    return np.polynomial.legendre.leggauss(num_nodes)
