r"""A thin shim over the ArviZ calls whose names or return types changed in ArviZ 1.x."""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Mapping
from types import ModuleType
from typing import Any

import numpy as np

__all__ = ["arviz_major_version", "from_dict", "import_arviz", "psislw"]


def import_arviz() -> ModuleType:
    """Import ArviZ lazily, silencing the ``FutureWarning`` that ArviZ 0.23 emits on import.

    ArviZ is imported only when a diagnostic needs it, so ``import pyro_mixflow`` changes no
    global state and stays fast.

    Returns:
        The ``arviz`` module.

    Example:
        >>> import_arviz().__name__
        'arviz'
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"arviz")
        return importlib.import_module("arviz")


def arviz_major_version() -> int:
    """The major version of the installed ArviZ (``0`` for the 0.x series, ``1`` for 1.x).

    Returns:
        The major version number.

    Example:
        >>> arviz_major_version() in (0, 1)
        True
    """
    return int(import_arviz().__version__.split(".")[0])


def psislw(log_weights: np.ndarray) -> tuple[np.ndarray, float]:
    r"""Pareto-smoothed importance sampling of one vector of independent log weights.

    The largest :math:`M = \min(N/5, 3\sqrt{N})` weights are replaced by the quantiles of a
    generalized Pareto distribution fitted to them; the fitted shape :math:`\hat k` is the
    diagnostic. Draws are independent (guide draws, not MCMC), so the relative efficiency is 1.

    Args:
        log_weights: ``(N,)`` log importance weights (any additive constant).

    Returns:
        ``(smoothed, k_hat)``: the smoothed log weights, normalized so that
        ``logsumexp(smoothed) == 0``, and the Pareto shape :math:`\hat k` (``inf`` when the tail
        is too short to fit).

    References:
        Pareto Smoothed Importance Sampling. A. Vehtari, D. Simpson, A. Gelman, Y. Yao,
        J. Gabry, 2024 (JMLR 25(72)), arXiv:1507.02646.

    Example:
        >>> import numpy as np
        >>> smoothed, k_hat = psislw(np.random.default_rng(0).normal(size=1000))
        >>> bool(k_hat < 0.5), bool(abs(np.logaddexp.reduce(smoothed)) < 1e-12)
        (True, True)
    """
    log_weights = np.array(log_weights, dtype=np.float64)  # a copy: ArviZ 0.x works in place
    if arviz_major_version() >= 1:  # pragma: no cover - ArviZ 1.x needs Python >= 3.12
        from arviz_stats.base import array_stats

        smoothed, k_hat = array_stats.psislw(log_weights, r_eff=1.0, axis=-1)
    else:
        smoothed, k_hat = import_arviz().psislw(log_weights, reff=1.0)
    smoothed = np.asarray(smoothed, dtype=np.float64)
    smoothed = smoothed - np.logaddexp.reduce(smoothed)
    return smoothed, float(np.asarray(k_hat))


def from_dict(
    posterior: Mapping[str, np.ndarray],
    *,
    sample_stats: Mapping[str, np.ndarray] | None = None,
    dims: Mapping[str, list[str]] | None = None,
    attrs: Mapping[str, Any] | None = None,
) -> Any:
    """Build ArviZ's container of draws: ``InferenceData`` (0.x) or ``xarray.DataTree`` (1.x).

    Args:
        posterior: ``{name: (chain, draw, *shape) array}``.
        sample_stats: ``{name: (chain, draw) array}``, or ``None``.
        dims: ``{name: [dim names of *shape]}``, or ``None`` for ArviZ's default names.
        attrs: attributes stored on both groups, or ``None``.

    Returns:
        The container; both versions support ``az.summary`` and ``az.plot_pair``.

    Example:
        >>> import numpy as np
        >>> data = from_dict({"z": np.zeros((2, 10, 3))}, dims={"z": ["group"]})
        >>> dict(data.posterior["z"].sizes)
        {'chain': 2, 'draw': 10, 'group': 3}
        >>> data = from_dict({"z": np.zeros((1, 5))}, attrs={"guide": "AutoNormal"})
        >>> data.posterior.attrs["guide"]
        'AutoNormal'

    """
    groups = {"posterior": dict(posterior)}
    if sample_stats:
        groups["sample_stats"] = dict(sample_stats)
    dims = dict(dims) if dims else None
    attrs = dict(attrs) if attrs else None
    if arviz_major_version() >= 1:  # pragma: no cover - ArviZ 1.x needs Python >= 3.12
        from arviz_base import from_dict as _from_dict

        # 1.x: one attribute dictionary per group; returns an ``xarray.DataTree``.
        group_attrs = {group: dict(attrs) for group in groups} if attrs else None
        return _from_dict(groups, dims=dims, attrs=group_attrs)
    # 0.x: groups and per-group attributes (``posterior_attrs=...``) as keyword arguments.
    group_attrs = {f"{group}_attrs": dict(attrs) for group in groups} if attrs else {}
    return import_arviz().from_dict(**groups, dims=dims, **group_attrs)
