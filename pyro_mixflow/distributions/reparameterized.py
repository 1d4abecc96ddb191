r"""Torch or Pyro ``MixtureSameFamily`` of Gaussians to a mixture with exact ``rsample``."""

from __future__ import annotations

import torch
from torch.distributions import (
    Independent,
    LowRankMultivariateNormal,
    MixtureSameFamily,
    MultivariateNormal,
    Normal,
)

from pyro_mixflow.distributions.diag_normal_mixture import DiagNormalMixture
from pyro_mixflow.distributions.low_rank_multivariate_normal_mixture import (
    LowRankMultivariateNormalMixture,
)
from pyro_mixflow.distributions.multivariate_normal_mixture import MultivariateNormalMixture

__all__ = ["reparameterized"]


def reparameterized(
    d: MixtureSameFamily,
) -> DiagNormalMixture | MultivariateNormalMixture | LowRankMultivariateNormalMixture:
    r"""The equivalent mixture of this package, with the same density and an exact ``rsample``.

    torch's :class:`~torch.distributions.MixtureSameFamily` has no ``rsample``. For the
    Gaussian component families it is replaced, parameter for parameter (differentiably: the
    new distribution shares the original's tensors), by

    ==============================  =======================================================
    component distribution          result
    ==============================  =======================================================
    ``Independent(Normal, 1)``      :class:`~pyro_mixflow.DiagNormalMixture`
    ``MultivariateNormal``          :class:`~pyro_mixflow.MultivariateNormalMixture`
    ``LowRankMultivariateNormal``   :class:`~pyro_mixflow.LowRankMultivariateNormalMixture`
    ==============================  =======================================================

    .. math:: p(x) = \sum_k \pi_k\, q_k(x) \quad \text{unchanged}; \qquad
              \text{rsample: exact draws, exact pathwise gradients.}

    Pyro's ``MixtureSameFamily``, ``Normal``, ``Independent`` (``.to_event(1)``),
    ``MultivariateNormal`` and ``LowRankMultivariateNormal`` subclass torch's and convert
    alike. The weights are taken as ``probs`` if the ``Categorical`` was built from them,
    otherwise as ``logits``; ``validate_args`` is carried over.

    Args:
        d: A ``MixtureSameFamily`` whose components are one of the families above, with
            ``event_shape`` ``(D,)``.

    Returns:
        The equivalent mixture, with the batch shape of ``d``.

    Raises:
        TypeError: ``d`` is not a ``MixtureSameFamily``, or its components are of another
            family.
        ValueError: The components' ``event_shape`` is not one-dimensional.

    Example:
        >>> import torch.distributions as td
        >>> mix = td.MixtureSameFamily(
        ...     td.Categorical(logits=torch.zeros(2)),
        ...     td.MultivariateNormal(torch.randn(2, 3), scale_tril=torch.eye(3).expand(2, 3, 3)),
        ... )
        >>> d = reparameterized(mix)
        >>> type(d).__name__, d.has_rsample
        ('MultivariateNormalMixture', True)
        >>> x = mix.sample((4,))
        >>> torch.allclose(d.log_prob(x), mix.log_prob(x))
        True

    References:
        Stochastic Backpropagation through Mixture Density Distributions. A. Graves, 2016.
        arXiv:1607.05690.
    """
    if not isinstance(d, MixtureSameFamily):
        raise TypeError(
            f"`reparameterized` converts a torch or Pyro MixtureSameFamily, got {type(d).__name__}"
        )
    component = d.component_distribution
    mixing = d.mixture_distribution
    weights = {"probs": mixing.probs} if "probs" in mixing.__dict__ else {}
    logits = None if weights else mixing.logits
    validate_args = d._validate_args
    if len(component.event_shape) != 1:
        hint = (
            "; for univariate components, mix Independent(Normal(loc.unsqueeze(-1), "
            "scale.unsqueeze(-1)), 1) instead (draws of shape (..., 1))"
            if not component.event_shape
            else ""
        )
        raise ValueError(
            "`reparameterized` needs components with a one-dimensional event_shape (D,), got "
            f"{_describe(component)} with event_shape {tuple(component.event_shape)}{hint}"
        )
    if isinstance(component, Independent):
        base = component.base_dist
        if isinstance(base, Normal) and component.reinterpreted_batch_ndims == 1:
            return DiagNormalMixture(
                base.loc, base.scale, logits, **weights, validate_args=validate_args
            )
    elif isinstance(component, LowRankMultivariateNormal):
        return LowRankMultivariateNormalMixture(
            component.loc,
            component.cov_factor,
            component.cov_diag,
            logits,
            **weights,
            validate_args=validate_args,
        )
    elif isinstance(component, MultivariateNormal):
        return MultivariateNormalMixture(
            component.loc,
            **_mvn_matrix(component),
            logits=logits,
            **weights,
            validate_args=validate_args,
        )
    raise TypeError(
        "`reparameterized` converts mixtures of Independent(Normal, 1), MultivariateNormal or "
        f"LowRankMultivariateNormal components, got {_describe(component)}"
    )


def _mvn_matrix(component: MultivariateNormal) -> dict[str, torch.Tensor]:
    """The matrix a ``MultivariateNormal`` was built from, under its own argument name."""
    for name in ("scale_tril", "covariance_matrix", "precision_matrix"):
        if name in component.__dict__:
            return {name: component.__dict__[name]}
    return {"scale_tril": component.scale_tril}


def _describe(component: torch.distributions.Distribution) -> str:
    """``Independent(Normal, 1)``-style name of a component distribution."""
    if isinstance(component, Independent):
        base = _describe(component.base_dist)
        return f"Independent({base}, {component.reinterpreted_batch_ndims})"
    return type(component).__name__
