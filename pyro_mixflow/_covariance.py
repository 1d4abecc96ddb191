r"""The components' covariance of a Gaussian mixture, chosen and validated once.

Every class that builds a Gaussian mixture with a choice of covariance
(:class:`~pyro_mixflow.nn.GMM`, :class:`~pyro_mixflow.infer.AutoGaussianMixture`,
:class:`~pyro_mixflow.infer.AutoMixtureBaseFlow`) takes ``covariance`` and ``rank``, checks them
with :meth:`Covariance.of` when it is built, and makes its mixture from unconstrained
``(locs, scales, logits, factor)`` with :meth:`Covariance.mixture`:

* ``"diag"``: :math:`\Sigma_k = \operatorname{diag}\sigma_k^2`, no factor; the mixture of
  :func:`~pyro_mixflow._estimators.estimator_mixture` (any estimator);
* ``"full"``: :math:`\Sigma_k = L_k L_k^\top`, :math:`L_k = \operatorname{diag}(\sigma_k)\,U_k`
  with :math:`U_k` unit lower-triangular (Pyro's ``AutoMultivariateNormal`` parameterization);
  the factor holds the :math:`D(D-1)/2` strictly lower entries of each :math:`U_k`;
  :class:`~pyro_mixflow.MultivariateNormalMixture`;
* ``"lowrank"``: :math:`\Sigma_k = \operatorname{diag}(\sigma_k)(W_k W_k^\top + I)
  \operatorname{diag}(\sigma_k)` with :math:`W_k \in \mathbb{R}^{D \times r}` (Pyro's
  ``AutoLowRankMultivariateNormal`` parameterization); the factor holds the :math:`D r`
  entries of each :math:`W_k`; :class:`~pyro_mixflow.LowRankMultivariateNormalMixture`.

The factor is always a flat tensor of shape ``(*batch, K, F)``, :math:`F` =
:meth:`Covariance.num_entries` (0 for ``"diag"``), so that a network can output it. Full and
low-rank components take only ``estimator="exact"`` (exact draws with exact pathwise
gradients): the relaxed estimators are defined for diagonal components.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pyro_mixflow._estimators import estimator_mixture
from pyro_mixflow.distributions.low_rank_multivariate_normal_mixture import (
    LowRankMultivariateNormalMixture,
)
from pyro_mixflow.distributions.multivariate_normal_mixture import MultivariateNormalMixture

__all__ = ["COVARIANCES", "Covariance", "default_rank"]

COVARIANCES = ("diag", "full", "lowrank")
# The standard deviation of a low-rank factor's entries at the start, relative to 1 / sqrt(r):
# small, so that the start is nearly the diagonal one, but not zero, where the factor's
# gradient vanishes (a saddle of the objective).
_FACTOR_START = 0.1


def default_rank(dim: int) -> int:
    r"""The rank of ``covariance="lowrank"`` when ``rank=None``: :math:`\max(1,
    \operatorname{round}(\sqrt D))`, the default of Pyro's ``AutoLowRankMultivariateNormal``.

    Example:
        >>> default_rank(2), default_rank(31)
        (1, 6)
    """  # noqa: D205
    return max(1, round(dim**0.5))


@dataclass(frozen=True)
class Covariance:
    """A validated choice of component covariance: ``"diag"``, ``"full"`` or ``"lowrank"``.

    Attributes:
        kind: One of :data:`COVARIANCES`.
        rank: The rank asked for (``"lowrank"`` only; ``None``: :func:`default_rank` of the
            dimension, resolved by :meth:`rank_for`).

    Example:
        >>> spec = Covariance.of("full", None, "exact")
        >>> spec.num_entries(3)
        3
        >>> d = spec.mixture(torch.zeros(2, 3), torch.ones(2, 3), torch.zeros(2),
        ...                  torch.zeros(2, 3))
        >>> type(d).__name__
        'MultivariateNormalMixture'
    """

    kind: str = "diag"
    rank: int | None = None

    @classmethod
    def of(
        cls, covariance: str, rank: int | None, estimator: str, dim: int | None = None
    ) -> Covariance:
        """Validates ``(covariance, rank)`` against the estimator (and the dimension if known).

        Args:
            covariance: One of :data:`COVARIANCES`.
            rank: ``None``, or a positive int for ``covariance="lowrank"`` only.
            estimator: The (already checked) estimator name; full and low-rank components
                take ``"exact"`` only.
            dim: The dimension :math:`D` when known at construction (``rank`` must be at most
                ``D``); ``None`` defers that check to :meth:`rank_for`.

        Returns:
            The choice.

        Raises:
            ValueError: An unknown ``covariance``, a ``rank`` that is not a positive int, a
                ``rank`` above ``dim``, a ``rank`` without ``covariance="lowrank"``, or a relaxed
                estimator with full or low-rank components.
        """
        if not isinstance(covariance, str) or covariance not in COVARIANCES:
            choices = ", ".join(repr(name) for name in COVARIANCES)
            raise ValueError(f"`covariance` must be one of {choices}, got {covariance!r}")
        if rank is not None:
            if covariance != "lowrank":
                raise ValueError(
                    f"`rank` applies only to `covariance='lowrank'`, got rank={rank!r} with "
                    f"covariance={covariance!r}"
                )
            if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
                raise ValueError(f"`rank` must be None or a positive integer, got {rank!r}")
        if covariance != "diag" and estimator != "exact":
            raise ValueError(
                f"`covariance={covariance!r}` needs `estimator='exact'` (the relaxed estimators "
                f"are defined for diagonal components), got estimator={estimator!r}"
            )
        spec = cls(covariance, rank)
        if dim is not None:
            spec.rank_for(dim)
        return spec

    def rank_for(self, dim: int) -> int:
        """The low rank :math:`r` in dimension ``dim`` (0 unless ``"lowrank"``).

        Raises:
            ValueError: ``rank`` above ``dim``.
        """
        if self.kind != "lowrank":
            return 0
        if self.rank is None:
            return default_rank(dim)
        if self.rank > dim:
            raise ValueError(f"`rank` ({self.rank}) must be at most the dimension D ({dim})")
        return self.rank

    def num_entries(self, dim: int) -> int:
        r"""Factor entries per component, :math:`F`: 0, :math:`D(D-1)/2` or :math:`D r`."""
        if self.kind == "full":
            return dim * (dim - 1) // 2
        return dim * self.rank_for(dim)

    def initial_factor(
        self, num_components: int, dim: int, *, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        r"""Starting factor entries ``(K, F)``: :math:`U_k = I`; small random :math:`W_k`.

        Low-rank factors start with entries :math:`\mathcal{N}(0, 0.1^2 / r)` (at
        :math:`W = 0` their gradient vanishes); use :meth:`marginal_scales` to keep the
        start's marginal standard deviations.
        """
        shape = (num_components, self.num_entries(dim))
        if self.kind != "lowrank":
            return torch.zeros(shape, dtype=dtype)
        rank = self.rank_for(dim)
        return torch.randn(shape, dtype=dtype) * (_FACTOR_START / math.sqrt(rank))

    def unit_tril(self, factor: torch.Tensor, dim: int) -> torch.Tensor:
        """The unit lower-triangular :math:`U_k` ``(*batch, K, D, D)`` of flat entries."""
        rows, cols = torch.tril_indices(dim, dim, -1, device=factor.device)
        eye = torch.eye(dim, dtype=factor.dtype, device=factor.device)
        tril = eye.expand(factor.shape[:-1] + (dim, dim)).clone()
        tril[..., rows, cols] = factor
        return tril

    def structured(self, factor: torch.Tensor, dim: int) -> torch.Tensor | None:
        """The factor as a matrix: :math:`U_k` ``(*, K, D, D)``, :math:`W_k` ``(*, K, D, r)``.

        ``None`` for ``"diag"``.
        """
        if self.kind == "diag":
            return None
        if self.kind == "full":
            return self.unit_tril(factor, dim)
        return factor.unflatten(-1, (dim, self.rank_for(dim)))

    def mixture(
        self,
        locs: torch.Tensor,
        scales: torch.Tensor,
        logits: torch.Tensor,
        factor: torch.Tensor | None,
        estimator: str = "exact",
        temperature: float = 0.5,
    ) -> torch.distributions.Distribution:
        r"""The Gaussian mixture of these parameters.

        .. math:: p(x) = \sum_k \operatorname{softmax}(\ell)_k\, \mathcal{N}(x; \mu_k, \Sigma_k)

        with :math:`\Sigma_k` as in the module docstring.

        Args:
            locs: Means, ``(*batch, K, D)``.
            scales: Positive scales :math:`\sigma_k`, ``(*batch, K, D)``.
            logits: Unnormalized log-weights, ``(*batch, K)``.
            factor: Flat factor entries ``(*batch, K, F)`` (ignored for ``"diag"``).
            estimator: The estimator of a diagonal mixture's ``rsample``.
            temperature: Temperature of the relaxed estimators.

        Returns:
            :func:`~pyro_mixflow._estimators.estimator_mixture`'s mixture for ``"diag"``,
            a :class:`~pyro_mixflow.MultivariateNormalMixture` for ``"full"``, a
            :class:`~pyro_mixflow.LowRankMultivariateNormalMixture` for ``"lowrank"``.
        """
        if self.kind == "diag":
            return estimator_mixture(locs, scales, logits, estimator, temperature)
        matrix = self.structured(factor, locs.shape[-1])
        if self.kind == "full":
            return MultivariateNormalMixture(locs, scales.unsqueeze(-1) * matrix, logits)
        return LowRankMultivariateNormalMixture(
            locs, matrix * scales.unsqueeze(-1), scales.square(), logits
        )

    def marginal_scales(self, scales: torch.Tensor, factor: torch.Tensor | None) -> torch.Tensor:
        r"""Each component's marginal standard deviations ``(*batch, K, D)``.

        .. math:: \sqrt{\Sigma_{k,dd}} = \sigma_{kd} \|U_{k,d}\| \ \text{(full)}, \qquad
                  \sigma_{kd} \sqrt{1 + \|W_{k,d}\|^2} \ \text{(low rank)}.
        """
        if self.kind == "diag":
            return scales
        matrix = self.structured(factor, scales.shape[-1])
        extra = 0.0 if self.kind == "full" else 1.0
        return scales * (matrix.square().sum(-1) + extra).sqrt()
