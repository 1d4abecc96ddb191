r"""The gradient estimators of a Gaussian mixture's ``rsample``, named and validated once.

Every class that offers a choice (:class:`~pyro_mixflow.nn.GMM`,
:class:`~pyro_mixflow.nn.MixtureFlow`, :class:`~pyro_mixflow.infer.AutoGaussianMixture`,
:class:`~pyro_mixflow.infer.AutoMixtureBaseFlow`) takes ``estimator`` and ``temperature``,
checks them with :func:`check_estimator` when it is built and makes its mixture with
:func:`estimator_mixture`:

* ``"exact"``: :class:`~pyro_mixflow.DiagNormalMixture`, exact draws with unbiased implicit
  reparameterization gradients;
* ``"gumbel_softmax"``: :class:`~pyro_mixflow.GumbelSoftmaxMixture`, relaxed draws at
  ``temperature`` (biased);
* ``"straight_through"``: :class:`~pyro_mixflow.GumbelSoftmaxMixture` with
  ``straight_through=True``, exact draws with the relaxed gradient (biased).

``log_prob`` is the exact mixture density in every case.
"""

from __future__ import annotations

import math
import os
import sys
import warnings

import torch

from pyro_mixflow.distributions.diag_normal_mixture import DiagNormalMixture
from pyro_mixflow.distributions.gumbel_softmax_mixture import GumbelSoftmaxMixture

__all__ = ["ESTIMATORS", "check_estimator", "estimator_mixture"]

ESTIMATORS = ("exact", "gumbel_softmax", "straight_through")
# Old spellings, accepted with a DeprecationWarning for one release (model files saved by the
# command line hold ``estimator="gumbel"`` as a constructor argument).
_DEPRECATED = {"gumbel": "gumbel_softmax"}


def check_estimator(estimator: str, temperature: float) -> tuple[str, float]:
    """Validates a choice of estimator and its temperature.

    Args:
        estimator: One of :data:`ESTIMATORS` (``"gumbel"``, the old spelling of
            ``"gumbel_softmax"``, is accepted with a ``DeprecationWarning``).
        temperature: Temperature of the relaxed estimators, a positive number (checked for
            ``"exact"`` too, so that switching the estimator cannot expose a bad value).

    Returns:
        ``(estimator, temperature)`` with the estimator's current spelling and the temperature
        as a ``float``.

    Raises:
        ValueError: Naming ``estimator`` and the choices, or ``temperature``.

    Example:
        >>> check_estimator("straight_through", 1)
        ('straight_through', 1.0)
    """
    if isinstance(estimator, str) and estimator in _DEPRECATED:
        new = _DEPRECATED[estimator]
        warnings.warn(
            f"`estimator={estimator!r}` is deprecated and will be removed in the next release; "
            f"use {new!r}",
            DeprecationWarning,
            stacklevel=_user_stacklevel(),
        )
        estimator = new
    if not isinstance(estimator, str) or estimator not in ESTIMATORS:
        choices = ", ".join(repr(name) for name in ESTIMATORS)
        raise ValueError(f"`estimator` must be one of {choices}, got {estimator!r}")
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, int | float)
        or not 0 < temperature < math.inf
    ):
        raise ValueError(f"`temperature` must be a positive number, got {temperature!r}")
    return estimator, float(temperature)


def estimator_mixture(
    locs: torch.Tensor,
    scales: torch.Tensor,
    logits: torch.Tensor,
    estimator: str,
    temperature: float,
) -> DiagNormalMixture:
    r"""The mixture of diagonal Gaussians whose ``rsample`` is ``estimator``'s.

    .. math:: p(x) = \sum_k \operatorname{softmax}(\ell)_k\,
              \mathcal{N}(x; \mu_k, \operatorname{diag} \sigma_k^2).

    Args:
        locs: Means :math:`\mu`, shape ``(*batch, K, D)``.
        scales: Standard deviations :math:`\sigma`, shape ``(*batch, K, D)``.
        logits: Unnormalized log-weights :math:`\ell`, shape ``(*batch, K)``.
        estimator: A name checked by :func:`check_estimator`.
        temperature: Temperature of the relaxed estimators (unused by ``"exact"``).

    Returns:
        A :class:`~pyro_mixflow.DiagNormalMixture` for ``"exact"``, a
        :class:`~pyro_mixflow.GumbelSoftmaxMixture` otherwise.

    Example:
        >>> d = estimator_mixture(torch.zeros(3, 2), torch.ones(3, 2), torch.zeros(3),
        ...                       "gumbel_softmax", 0.5)
        >>> type(d).__name__, d.rsample((4,)).shape
        ('GumbelSoftmaxMixture', torch.Size([4, 2]))
    """
    if estimator == "exact":
        return DiagNormalMixture(locs, scales, logits)
    if estimator not in ESTIMATORS:  # a name that skipped check_estimator
        check_estimator(estimator, temperature)
    return GumbelSoftmaxMixture(
        locs,
        scales,
        logits,
        temperature=temperature,
        straight_through=estimator == "straight_through",
    )


def _user_stacklevel() -> int:
    """The ``stacklevel`` that points a warning at the first caller outside this package.

    The classes' constructors run through wrappers and each other (``MixtureFlow`` builds a
    ``GMM``), so no fixed level names the user's line; Python shows a ``DeprecationWarning``
    by default only when it is attributed to the user's code.
    """
    package = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(2), 2  # level 1: the function that warns
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame, level = frame.f_back, level + 1
    return level
