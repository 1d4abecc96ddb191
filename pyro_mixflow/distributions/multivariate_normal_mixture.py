r"""Exact mixture of full-covariance Gaussians with a whitened density and exact samples."""

from __future__ import annotations

import torch
from pyro.distributions import TorchDistribution
from torch.distributions import constraints
from torch.distributions.utils import lazy_property, logits_to_probs, probs_to_logits

from pyro_mixflow.distributions._common import (
    HALF_LOG_2PI,
    NoClosedFormMixin,
    check_float_tensor,
    expected_branch_log_prob,
    logsumexp,
)
from pyro_mixflow.distributions._mvn_mixture import (
    check_mixture_weights,
    component_matvec,
    implicit_mvn_mixture_rsample,
    mixture_covariance,
    mvn_mixture_sample,
    promoted,
    whitened_half_square,
)

__all__ = ["MultivariateNormalMixture"]

_MATRICES = ("scale_tril", "covariance_matrix", "precision_matrix")
_COMPONENT_MATRICES = ("component_covariance_matrix", "component_precision_matrix")


class MultivariateNormalMixture(NoClosedFormMixin, TorchDistribution):
    r"""Mixture of :math:`K` Gaussians with full covariance in :math:`D` dimensions.

    .. math::

        p(x) = \sum_{k=1}^K \pi_k \mathcal{N}(x; \mu_k, \Sigma_k), \qquad
        \Sigma_k = L_k L_k^\top, \qquad \pi = \operatorname{softmax}(\text{logits}).

    Each component is given, as in :class:`torch.distributions.MultivariateNormal`, by exactly
    one of ``scale_tril`` (:math:`L_k`), ``covariance_matrix`` (:math:`\Sigma_k`) or
    ``precision_matrix`` (:math:`\Sigma_k^{-1}`); the attributes ``scale_tril``,
    ``component_covariance_matrix`` and ``component_precision_matrix`` hold the components'
    matrices (the two not given are computed on first use), while :attr:`covariance_matrix` is
    the mixture's own covariance, as for any distribution.

    ``log_prob`` whitens every point against every component, :math:`\varepsilon_k =
    L_k^{-1}(x - \mu_k)`, by matrix products :math:`(K D, D) \times (D, n)` over blocks of
    :math:`n` points with the :math:`K` inverse factors computed once; each block's residuals
    are squared and dropped, and recomputed by the backward pass: memory :math:`O(N(K + D))`
    plus one block, never an :math:`N \times K \times D` tensor. The components are combined
    with ``logsumexp``: points far from all of them keep finite log-densities.

    ``sample`` draws a component, then :math:`\mu_k + L_k \varepsilon`. ``rsample`` returns the
    same exact draws with an exact (unbiased) pathwise gradient: responsibilities carry it to
    ``locs`` and the factors, implicit reparameterization through the sequential conditional
    CDFs carries it to the weights (Graves, 2016; Figurnov et al., 2018). The backward pass
    costs :math:`O(NKD^2)` time and :math:`O(NKD)` memory. As for
    :class:`~pyro_mixflow.DiagNormalMixture`, the weights' gradient is unbiased but heavy-tailed
    when components are well separated.

    Args:
        locs: Component means, shape ``(*batch, K, D)``.
        scale_tril: Lower-triangular factors with positive diagonal, ``(*batch, K, D, D)``.
        logits: Unnormalized log weights, shape ``(*batch, K)``.
        covariance_matrix: Positive-definite covariances, ``(*batch, K, D, D)``.
        precision_matrix: Positive-definite precisions, ``(*batch, K, D, D)``. Give exactly one
            of ``scale_tril``, ``covariance_matrix`` and ``precision_matrix``; it may broadcast
            against ``locs``.
        probs: Weights, shape ``(*batch, K)``, normalized along the last axis. Give exactly one
            of ``logits`` and ``probs``.
        validate_args: Check parameters and values (torch's default when ``None``).

    Example:
        >>> locs = torch.tensor([[-2.0, 0.0], [2.0, 1.0]], requires_grad=True)
        >>> tril = torch.tensor([[[1.0, 0.0], [0.5, 1.0]], [[0.7, 0.0], [-0.3, 0.4]]])
        >>> logits = torch.zeros(2, requires_grad=True)
        >>> d = MultivariateNormalMixture(locs, tril, logits)
        >>> z = d.rsample((5,))  # exact draws, exact pathwise gradients
        >>> z.shape, d.log_prob(z).shape
        (torch.Size([5, 2]), torch.Size([5]))
        >>> z.square().sum().backward()
        >>> locs.grad.shape, logits.grad.shape
        (torch.Size([2, 2]), torch.Size([2]))

    References:
        Stochastic Backpropagation through Mixture Density Distributions. A. Graves, 2016.
        arXiv:1607.05690.

        Implicit Reparameterization Gradients. M. Figurnov, S. Mohamed, A. Mnih, 2018.
        arXiv:1805.08498.
    """

    arg_constraints = {
        "locs": constraints.independent(constraints.real, 2),
        "scale_tril": constraints.independent(constraints.lower_cholesky, 1),
        "component_covariance_matrix": constraints.independent(constraints.positive_definite, 1),
        "component_precision_matrix": constraints.independent(constraints.positive_definite, 1),
        "logits": constraints.independent(constraints.real, 1),
        "probs": constraints.simplex,
    }
    support = constraints.independent(constraints.real, 1)
    has_rsample = True

    def __init__(
        self,
        locs: torch.Tensor,
        scale_tril: torch.Tensor | None = None,
        logits: torch.Tensor | None = None,
        *,
        covariance_matrix: torch.Tensor | None = None,
        precision_matrix: torch.Tensor | None = None,
        probs: torch.Tensor | None = None,
        validate_args: bool | None = None,
    ) -> None:
        matrices = (scale_tril, covariance_matrix, precision_matrix)
        given = [(n, m) for n, m in zip(_MATRICES, matrices, strict=True) if m is not None]
        if len(given) != 1:
            raise ValueError(
                "Exactly one of covariance_matrix or precision_matrix or scale_tril may be "
                "specified."
            )
        ((name, matrix),) = given
        check_float_tensor("locs", locs, locs)
        check_float_tensor(name, matrix, locs)
        if locs.dim() < 2:
            raise ValueError(f"`locs` must have shape (*batch, K, D), got {tuple(locs.shape)}")
        dim = locs.shape[-1]
        if matrix.dim() < 3 or matrix.shape[-2:] != (dim, dim):
            raise ValueError(
                f"`{name}` must have shape (*batch, K, D, D) with D = `locs.shape[-1]` ({dim}), "
                f"got {tuple(matrix.shape)}"
            )
        try:
            param_shape = torch.broadcast_shapes(locs.shape[:-1], matrix.shape[:-2]) + (dim,)
        except RuntimeError:
            raise ValueError(
                f"`locs.shape` {tuple(locs.shape)} and `{name}.shape` {tuple(matrix.shape)} "
                "do not broadcast"
            ) from None
        shapes = f"locs {tuple(locs.shape)}, {name} {tuple(matrix.shape)}"
        batch_shape, weights = check_mixture_weights(logits, probs, locs, param_shape, shapes)
        self.locs = locs.expand(batch_shape + param_shape[-2:])
        attribute = name if name == "scale_tril" else f"component_{name}"
        setattr(self, attribute, matrix.expand(batch_shape + param_shape[-2:] + (dim,)))
        for key, value in weights.items():
            setattr(self, key, value)
        super().__init__(batch_shape, param_shape[-1:], validate_args=validate_args)

    def expand(  # noqa: D102
        self,
        batch_shape: torch.Size | tuple[int, ...],
        _instance: MultivariateNormalMixture | None = None,
    ) -> MultivariateNormalMixture:
        new = self._get_checked_instance(MultivariateNormalMixture, _instance)
        batch_shape = torch.Size(batch_shape)
        for name in ("locs", "logits", "probs", "scale_tril", *_COMPONENT_MATRICES):
            if name in self.__dict__:
                value = self.__dict__[name]
                event_dims = value.dim() - len(self.batch_shape)
                setattr(new, name, value.expand(batch_shape + value.shape[-event_dims:]))
        super(MultivariateNormalMixture, new).__init__(
            batch_shape, self.event_shape, validate_args=False
        )
        new._validate_args = self._validate_args
        return new

    @lazy_property
    def logits(self) -> torch.Tensor:
        r"""Normalized log weights :math:`\log \pi`, shape ``(*batch, K)``."""
        return probs_to_logits(self.probs)

    @lazy_property
    def probs(self) -> torch.Tensor:
        r"""Weights :math:`\pi`, shape ``(*batch, K)``."""
        return logits_to_probs(self.logits)

    @lazy_property
    def scale_tril(self) -> torch.Tensor:
        r"""Components' Cholesky factors :math:`L_k`, shape ``(*batch, K, D, D)``."""
        if "component_covariance_matrix" in self.__dict__:
            return torch.linalg.cholesky(self.component_covariance_matrix)
        return _precision_to_scale_tril(self.component_precision_matrix)

    @lazy_property
    def component_covariance_matrix(self) -> torch.Tensor:
        r"""Components' covariances :math:`\Sigma_k`, shape ``(*batch, K, D, D)``."""
        return self.scale_tril @ self.scale_tril.mT

    @lazy_property
    def component_precision_matrix(self) -> torch.Tensor:
        r"""Components' precisions :math:`\Sigma_k^{-1}`, shape ``(*batch, K, D, D)``."""
        inverse = _inverse_tril(self.scale_tril)
        return inverse.mT @ inverse

    @property
    def num_components(self) -> int:
        """The number of components :math:`K`."""
        return self.locs.shape[-2]

    def sample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        r"""Exact draws without a graph: a component :math:`k \sim \pi`, then its Gaussian.

        .. math:: k \sim \operatorname{Categorical}(\pi), \quad
                  x = \mu_k + L_k \varepsilon, \quad \varepsilon \sim \mathcal{N}(0, I).

        Args:
            sample_shape: Leading sample shape.

        Returns:
            Tensor of shape ``(*sample_shape, *batch, D)``, not attached to any graph.

        Example:
            >>> d = MultivariateNormalMixture(torch.zeros(3, 2), torch.eye(2).expand(3, 2, 2),
            ...                               logits=torch.zeros(3))
            >>> d.sample((4,)).shape
            torch.Size([4, 2])
        """
        return mvn_mixture_sample(self.locs, self.scale_tril, self.logits, torch.Size(sample_shape))

    def rsample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        r"""Exact mixture draws with exact (unbiased) pathwise gradients.

        The values are those of :meth:`sample`. The backward pass applies the velocity fields
        :math:`v_\theta` that solve :math:`\partial_\theta q + \nabla \cdot (q v_\theta) = 0`:
        responsibilities for ``locs`` and the factors, implicit reparameterization through the
        sequential conditional CDFs for the weights. Gradients reach ``covariance_matrix`` or
        ``precision_matrix`` through their Cholesky factor. Differentiable once.

        Args:
            sample_shape: Leading sample shape.

        Returns:
            Tensor of shape ``(*sample_shape, *batch, D)``.

        Example:
            >>> logits = torch.zeros(2, requires_grad=True)
            >>> d = MultivariateNormalMixture(torch.tensor([[-2.0], [2.0]]),
            ...                               torch.ones(2, 1, 1), logits=logits)
            >>> d.rsample((100,)).sum().backward()
            >>> logits.grad.shape
            torch.Size([2])
        """
        return implicit_mvn_mixture_rsample(
            self.locs, self.scale_tril, self.logits, self.sample(sample_shape)
        )

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        r"""Exact log-density.

        .. math:: \log p(x) = \operatorname{logsumexp}_k \Big[\log \pi_k
                  - \tfrac12 \|L_k^{-1}(x - \mu_k)\|^2 - \log |L_k|
                  - \tfrac{D}{2} \log 2\pi\Big].

        Args:
            value: Points, shape ``(*sample, *batch, D)`` or broadcastable to it.

        Returns:
            Tensor of shape ``(*sample, *batch)``.

        Example:
            >>> d = MultivariateNormalMixture(torch.zeros(1, 1), torch.ones(1, 1, 1),
            ...                               logits=torch.zeros(1))
            >>> d.log_prob(torch.zeros(1)).exp()  # 1 / sqrt(2 pi)
            tensor(0.3989)
        """
        if self._validate_args:
            self._validate_sample(value)
        dist, x = promoted(self, value)
        return logsumexp(dist._log_joint(x))  # [*S, *B]

    def log_responsibilities(self, value: torch.Tensor) -> torch.Tensor:
        r"""Log posterior over components, :math:`\log p(k \mid x)`.

        .. math:: \log p(k \mid x) = \log \pi_k + \log \mathcal{N}(x; \mu_k, \Sigma_k)
                  - \log p(x).

        Args:
            value: Points, shape ``(*sample, *batch, D)``.

        Returns:
            Tensor of shape ``(*sample, *batch, K)`` whose exponential sums to one.

        Example:
            >>> d = MultivariateNormalMixture(torch.tensor([[-3.0], [3.0]]),
            ...                               torch.ones(2, 1, 1), logits=torch.zeros(2))
            >>> d.log_responsibilities(torch.tensor([[3.0]])).exp().round(decimals=3)
            tensor([[0., 1.]])
        """
        if self._validate_args:
            self._validate_sample(value)
        dist, x = promoted(self, value)
        return torch.log_softmax(dist._log_joint(x), dim=-1)

    def rao_blackwell(
        self, sample_shape: torch.Size = torch.Size()
    ) -> tuple[torch.Tensor, torch.Tensor]:
        r"""One draw from every component, with the log-weights that sum the index out.

        .. math:: x_k = \mu_k + L_k \varepsilon_k, \quad
                  \varepsilon_k \sim \mathcal{N}(0, I) \text{ independent}, \qquad
                  E[h(X)] = E\Big[\sum_k \pi_k\, h(x_k)\Big],

        a stratified estimate with the component index summed out: the weights' gradient
        needs no estimator, and each :math:`x_k` is reparameterized in ``locs`` and the
        factors. This is what :class:`~pyro_mixflow.infer.RaoBlackwellELBO` uses.

        Args:
            sample_shape: Leading sample shape.

        Returns:
            ``(values, log_weights)`` of shapes ``(*sample_shape, *batch, K, D)`` and
            ``(*sample_shape, *batch, K)``; ``log_weights.exp()`` sums to one over ``K``.

        Example:
            >>> d = MultivariateNormalMixture(torch.tensor([[-2.0], [2.0]]),
            ...                               torch.ones(2, 1, 1), logits=torch.tensor([0.0, 1.0]))
            >>> values, log_weights = d.rao_blackwell((20000,))
            >>> mean = (log_weights.exp().unsqueeze(-1) * values).sum(-2).mean(0)
            >>> torch.allclose(mean, d.mean, atol=0.05)
            True
        """
        shape = torch.Size(sample_shape) + self.locs.shape
        noise = torch.randn(shape, dtype=self.locs.dtype, device=self.locs.device)
        values = self.locs + component_matvec(self.scale_tril, noise)  # [*S, *B, K, D]
        return values, self.logits.expand(shape[:-1])

    def rao_blackwell_log_prob(
        self, values: torch.Tensor, log_weights: torch.Tensor
    ) -> torch.Tensor:
        r"""The exact :math:`\sum_k w_k \log p(x_k)` for the output of :meth:`rao_blackwell`.

        .. math:: \sum_{k=1}^K e^{\ell_k} \log p(x_k), \qquad \ell = \text{log\_weights}.

        Args:
            values: Branch values, shape ``(*sample, *batch, K, D)``.
            log_weights: Their log-weights, shape ``(*sample, *batch, K)``.

        Returns:
            Tensor of shape ``(*sample, *batch)``.

        Example:
            >>> d = MultivariateNormalMixture(torch.zeros(2, 1), torch.ones(2, 1, 1),
            ...                               logits=torch.zeros(2))
            >>> d.rao_blackwell_log_prob(*d.rao_blackwell((3,))).shape
            torch.Size([3])
        """
        return expected_branch_log_prob(self, values, log_weights)

    @property
    def mean(self) -> torch.Tensor:
        r""":math:`\sum_k \pi_k \mu_k`, shape ``(*batch, D)``."""
        return (self.probs.unsqueeze(-1) * self.locs).sum(-2)

    @property
    def covariance_matrix(self) -> torch.Tensor:
        r"""The mixture's covariance, shape ``(*batch, D, D)``.

        .. math:: \sum_k \pi_k (\Sigma_k + \mu_k \mu_k^\top) - m m^\top, \qquad
                  m = \sum_k \pi_k \mu_k;

        :attr:`component_covariance_matrix` holds the :math:`\Sigma_k`.
        """
        return mixture_covariance(self.probs, self.locs, self.component_covariance_matrix)

    @property
    def variance(self) -> torch.Tensor:
        r"""The diagonal of :attr:`covariance_matrix`, shape ``(*batch, D)``."""
        w = self.probs.unsqueeze(-1)  # [*B, K, 1]
        centred = self.locs - self.mean.unsqueeze(-2)  # [*B, K, D]
        return (w * (self.scale_tril.square().sum(-1) + centred.square())).sum(-2)

    def _log_joint(self, x: torch.Tensor) -> torch.Tensor:
        """``log pi_k + log N(x; mu_k, Sigma_k)``, ``[*S, *B, K]``, by blocked whitening products.

        Points and means are taken relative to the means' average, which removes the
        cancellation between large whitened points and whitened means.
        """
        dim = self.event_shape[0]
        tril = self.scale_tril
        inverse = _inverse_tril(tril)  # [*B, K, D, D]
        # Any fixed point serves (the density does not depend on it): detached, so that the
        # points need no gradient unless `value` has one.
        centre = self.locs.mean(-2, keepdim=True).detach()  # [*B, 1, D]
        shift = (inverse @ (self.locs - centre).unsqueeze(-1)).squeeze(-1)  # [*B, K, D]
        half_square = whitened_half_square(x - centre.squeeze(-2), inverse, shift)  # [*S, *B, K]
        half_log_det = tril.diagonal(dim1=-2, dim2=-1).log().sum(-1)  # [*B, K]
        return (self.logits - half_log_det - dim * HALF_LOG_2PI) - half_square


def _inverse_tril(tril: torch.Tensor) -> torch.Tensor:
    """``L^{-1}`` of lower-triangular factors by one batched triangular solve."""
    eye = torch.eye(tril.shape[-1], dtype=tril.dtype, device=tril.device)
    return torch.linalg.solve_triangular(tril, eye, upper=False)


def _precision_to_scale_tril(precision: torch.Tensor) -> torch.Tensor:
    """The Cholesky factor of ``precision^{-1}``, without inverting ``precision`` (torch's way)."""
    flipped = torch.linalg.cholesky(precision.flip((-2, -1)))
    inverse_tril = flipped.flip((-2, -1)).mT
    return _inverse_tril(inverse_tril)
