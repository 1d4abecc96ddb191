r"""A trainable mixture of diagonal Gaussians (lazy distribution) with EM initialization."""

from __future__ import annotations

import torch
from torch import nn

from pyro_mixflow._checks import check_positive_int
from pyro_mixflow._deprecated import moved
from pyro_mixflow._estimators import check_estimator, estimator_mixture
from pyro_mixflow.distributions import DiagNormalMixture
from pyro_mixflow.fitting import em
from pyro_mixflow.nn._base import DensityModel

__all__ = ["GMM"]


class GMM(DensityModel):
    r"""A trainable mixture of diagonal Gaussians; calling it returns a fresh distribution.

    .. math:: p(x) = \sum_k \pi_k \mathcal{N}(x; \mu_k, \operatorname{diag} \sigma_k^2).

    Parameters are unconstrained: ``locs``, ``log_scales`` (:math:`\sigma = e^{s}`) and
    ``logits``. The initial means are spread (standard normal draws) so that components do
    not start on top of each other; :meth:`init_from_data` replaces them with an EM fit.

    Args:
        input_dim: Dimension :math:`D` of the data.
        num_components: Number of components :math:`K`. 50 by default, as for every density
            model of :mod:`pyro_mixflow.nn`: the number the density benchmark
            (``benchmarks/density.py``: 20,000 draws, 3,000 Adam steps) measured, where a
            component costs only a column of a vectorized ``log_prob``.
        estimator: Which ``rsample`` the returned distribution has: ``"exact"``
            (:class:`~pyro_mixflow.DiagNormalMixture`, unbiased implicit gradients),
            ``"gumbel_softmax"`` or ``"straight_through"``
            (:class:`~pyro_mixflow.GumbelSoftmaxMixture`); ``log_prob`` is the exact mixture
            density in every case. ``"gumbel"``, the old spelling of ``"gumbel_softmax"``, is
            accepted for one more release with a ``DeprecationWarning``.
        temperature: Gumbel-softmax temperature, for the relaxed estimators.

    Example:
        >>> model = GMM(2, num_components=3)
        >>> data = torch.randn(500, 2)
        >>> model.init_from_data(data).forward().log_prob(data).shape
        torch.Size([500])
    """

    def __init__(
        self,
        input_dim: int,
        num_components: int = 50,
        *,
        estimator: str = "exact",
        temperature: float = 0.5,
    ) -> None:
        super().__init__()
        check_positive_int("input_dim", input_dim)
        check_positive_int("num_components", num_components)
        self.input_dim, self.num_components = input_dim, num_components
        self.estimator, self.temperature = check_estimator(estimator, temperature)
        self.locs = nn.Parameter(torch.randn(num_components, input_dim))
        self.log_scales = nn.Parameter(torch.zeros(num_components, input_dim))
        self.logits = nn.Parameter(torch.zeros(num_components))

    def forward(self, context: torch.Tensor | None = None) -> DiagNormalMixture:
        """Returns the mixture at the current parameters (``context`` is not used yet)."""
        if context is not None:
            raise ValueError("`GMM` is unconditional: `context` must be None")
        scales = self.log_scales.exp()
        return estimator_mixture(self.locs, scales, self.logits, self.estimator, self.temperature)

    @torch.no_grad()
    def init_from_data(self, data: torch.Tensor, *, max_iter: int = 200, seed: int = 0) -> GMM:
        r"""Sets the parameters to a maximum-likelihood EM fit (scikit-learn's
        ``GaussianMixture`` with diagonal covariances).

        Args:
            data: Array or tensor of shape ``(N, D)`` with ``N >= num_components``.
            max_iter: EM iterations.
            seed: Seed of the k-means initialization of EM.

        Returns:
            ``self``, for chaining.
        """  # noqa: D205
        locs, log_scales, log_weights = em.em_parameters(
            data, self.locs, max_iter=max_iter, seed=seed
        )
        self.locs.copy_(locs)
        self.log_scales.copy_(log_scales)
        self.logits.copy_(log_weights)
        return self


__getattr__ = moved("pyro_mixflow.nn.gmm", "pyro_mixflow.fitting", ("em_diagonal", "em_parameters"))
