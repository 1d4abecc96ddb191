r"""Exact mixture of low-rank-plus-diagonal Gaussians with a Woodbury density and exact samples."""

from __future__ import annotations

import torch
from pyro.distributions import TorchDistribution
from torch.distributions import Categorical, constraints
from torch.distributions.utils import lazy_property, logits_to_probs, probs_to_logits

from pyro_mixflow.distributions._common import (
    HALF_LOG_2PI,
    NoClosedFormMixin,
    check_float_tensor,
    expected_branch_log_prob,
    logsumexp,
    take_component,
)
from pyro_mixflow.distributions._mvn_mixture import (
    check_mixture_weights,
    component_matvec,
    diagonal_half_square,
    implicit_mvn_mixture_rsample,
    mixture_covariance,
    promoted,
    take_scaled_component,
    whitened_half_square,
)

__all__ = ["LowRankMultivariateNormalMixture"]


class LowRankMultivariateNormalMixture(NoClosedFormMixin, TorchDistribution):
    r"""Mixture of :math:`K` Gaussians with low-rank-plus-diagonal covariance in :math:`D` dims.

    .. math::

        p(x) = \sum_{k=1}^K \pi_k \mathcal{N}(x; \mu_k, W_k W_k^\top + \operatorname{diag} d_k),
        \qquad W_k \in \mathbb{R}^{D \times r}, \qquad
        \pi = \operatorname{softmax}(\text{logits}),

    the mixture of :class:`torch.distributions.LowRankMultivariateNormal` components.
    ``log_prob`` uses the Woodbury identity and the matrix determinant lemma through the
    :math:`r \times r` capacitance :math:`C_k = I + W_k^\top D_k^{-1} W_k = M_k M_k^\top`, as
    torch does:

    .. math:: (x - \mu_k)^\top \Sigma_k^{-1} (x - \mu_k) = \|D_k^{-1/2}(x - \mu_k)\|^2
              - \|M_k^{-1} W_k^\top D_k^{-1} (x - \mu_k)\|^2, \qquad
              \log|\Sigma_k| = 2 \log|M_k| + \textstyle\sum_d \log d_{kd},

    both terms computed directly (no expansion), block by block of points, and recomputed by the
    backward pass: memory :math:`O(N(K + D))` plus one block, never an
    :math:`N \times K \times D` tensor nor a :math:`D \times D` matrix. ``sample`` draws
    :math:`\mu_k + W_k \eta + d_k^{1/2} \odot \varepsilon`. ``rsample`` returns the same exact
    draws with the exact pathwise gradient of
    :class:`~pyro_mixflow.MultivariateNormalMixture`, through the Cholesky factors of the
    :math:`K` covariances (:math:`O(K D^3)` once per call, :math:`O(NKD^2)` per backward pass).

    Args:
        locs: Component means, shape ``(*batch, K, D)``.
        cov_factor: Factors :math:`W_k`, shape ``(*batch, K, D, r)``.
        cov_diag: Positive diagonals :math:`d_k`, shape ``(*batch, K, D)``.
        logits: Unnormalized log weights, shape ``(*batch, K)``.
        probs: Weights, shape ``(*batch, K)``, normalized along the last axis. Give exactly one
            of ``logits`` and ``probs``.
        validate_args: Check parameters and values (torch's default when ``None``).

    Example:
        >>> locs = torch.tensor([[-2.0, 0.0, 1.0], [2.0, 1.0, 0.0]], requires_grad=True)
        >>> cov_factor = torch.tensor([[[1.0], [0.5], [0.0]], [[0.0], [-0.3], [0.4]]])
        >>> logits = torch.zeros(2, requires_grad=True)
        >>> d = LowRankMultivariateNormalMixture(locs, cov_factor, torch.ones(2, 3), logits)
        >>> z = d.rsample((5,))  # exact draws, exact pathwise gradients
        >>> z.shape, d.log_prob(z).shape
        (torch.Size([5, 3]), torch.Size([5]))
        >>> z.square().sum().backward()
        >>> locs.grad.shape, logits.grad.shape
        (torch.Size([2, 3]), torch.Size([2]))

    References:
        Stochastic Backpropagation through Mixture Density Distributions. A. Graves, 2016.
        arXiv:1607.05690.

        Implicit Reparameterization Gradients. M. Figurnov, S. Mohamed, A. Mnih, 2018.
        arXiv:1805.08498.
    """

    arg_constraints = {
        "locs": constraints.independent(constraints.real, 2),
        "cov_factor": constraints.independent(constraints.real, 3),
        "cov_diag": constraints.independent(constraints.positive, 2),
        "logits": constraints.independent(constraints.real, 1),
        "probs": constraints.simplex,
    }
    support = constraints.independent(constraints.real, 1)
    has_rsample = True

    def __init__(
        self,
        locs: torch.Tensor,
        cov_factor: torch.Tensor,
        cov_diag: torch.Tensor,
        logits: torch.Tensor | None = None,
        *,
        probs: torch.Tensor | None = None,
        validate_args: bool | None = None,
    ) -> None:
        for name, value in (("locs", locs), ("cov_factor", cov_factor), ("cov_diag", cov_diag)):
            check_float_tensor(name, value, locs)
        shapes = (
            f"locs {tuple(locs.shape)}, cov_factor {tuple(cov_factor.shape)}, "
            f"cov_diag {tuple(cov_diag.shape)}"
        )
        if locs.dim() < 2 or cov_diag.dim() < 2 or cov_factor.dim() < 3:
            raise ValueError(
                "expected `locs` (*batch, K, D), `cov_factor` (*batch, K, D, r) and `cov_diag` "
                f"(*batch, K, D); got {shapes}"
            )
        dim = locs.shape[-1]
        if cov_factor.shape[-2] != dim or cov_diag.shape[-1] != dim:
            raise ValueError(
                f"`cov_factor.shape[-2]` ({cov_factor.shape[-2]}) and `cov_diag.shape[-1]` "
                f"({cov_diag.shape[-1]}) must equal D = `locs.shape[-1]` ({dim}); {shapes}"
            )
        try:
            param_shape = torch.broadcast_shapes(
                locs.shape[:-1], cov_factor.shape[:-2], cov_diag.shape[:-1]
            ) + (dim,)
        except RuntimeError:
            raise ValueError(f"parameter shapes do not broadcast: {shapes}") from None
        batch_shape, weights = check_mixture_weights(logits, probs, locs, param_shape, shapes)
        shape = batch_shape + param_shape[-2:]
        self.locs = locs.expand(shape)
        self.cov_factor = cov_factor.expand(shape + cov_factor.shape[-1:])
        self.cov_diag = cov_diag.expand(shape)
        for key, value in weights.items():
            setattr(self, key, value)
        super().__init__(batch_shape, param_shape[-1:], validate_args=validate_args)

    def expand(  # noqa: D102
        self,
        batch_shape: torch.Size | tuple[int, ...],
        _instance: LowRankMultivariateNormalMixture | None = None,
    ) -> LowRankMultivariateNormalMixture:
        new = self._get_checked_instance(LowRankMultivariateNormalMixture, _instance)
        batch_shape = torch.Size(batch_shape)
        for name in _TENSORS:
            if name in self.__dict__:
                value = self.__dict__[name]
                event_dims = value.dim() - len(self.batch_shape)
                setattr(new, name, value.expand(batch_shape + value.shape[-event_dims:]))
        super(LowRankMultivariateNormalMixture, new).__init__(
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
    def component_covariance_matrix(self) -> torch.Tensor:
        r"""Components' covariances :math:`W_k W_k^\top + \operatorname{diag} d_k`."""
        return self.cov_factor @ self.cov_factor.mT + torch.diag_embed(self.cov_diag)

    @lazy_property
    def scale_tril(self) -> torch.Tensor:
        r"""Components' Cholesky factors, shape ``(*batch, K, D, D)`` (what ``rsample`` uses)."""
        return torch.linalg.cholesky(self.component_covariance_matrix)

    @property
    def num_components(self) -> int:
        """The number of components :math:`K`."""
        return self.locs.shape[-2]

    def sample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        r"""Exact draws without a graph: a component :math:`k \sim \pi`, then its Gaussian.

        .. math:: k \sim \operatorname{Categorical}(\pi), \quad
                  x = \mu_k + W_k \eta + d_k^{1/2} \odot \varepsilon, \quad
                  \eta \sim \mathcal{N}(0, I_r), \ \varepsilon \sim \mathcal{N}(0, I_D).

        Args:
            sample_shape: Leading sample shape.

        Returns:
            Tensor of shape ``(*sample_shape, *batch, D)``, not attached to any graph.

        Example:
            >>> d = LowRankMultivariateNormalMixture(torch.zeros(3, 2), torch.ones(3, 2, 1),
            ...                                      torch.ones(3, 2), torch.zeros(3))
            >>> d.sample((4,)).shape
            torch.Size([4, 2])
        """
        with torch.no_grad():
            weights = Categorical(logits=self.logits, validate_args=False)
            index = weights.sample(sample_shape)  # [*S, *B]
            rank = self.cov_factor.shape[-1]
            noise = torch.randn(
                index.shape + (rank + self.event_shape[0],),
                dtype=self.locs.dtype,
                device=self.locs.device,
            )
            low, diag = noise[..., :rank], noise[..., rank:]
            scale = take_component(self.cov_diag, index).sqrt()
            return (
                take_component(self.locs, index)
                + take_scaled_component(self.cov_factor, index, low)
                + scale * diag
            )

    def rsample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        r"""Exact mixture draws with exact (unbiased) pathwise gradients.

        The values are those of :meth:`sample`; the gradient is that of
        :meth:`MultivariateNormalMixture.rsample
        <pyro_mixflow.MultivariateNormalMixture.rsample>` through :attr:`scale_tril`, which
        carries it on to ``cov_factor`` and ``cov_diag``. Differentiable once.

        Args:
            sample_shape: Leading sample shape.

        Returns:
            Tensor of shape ``(*sample_shape, *batch, D)``.

        Example:
            >>> cov_factor = torch.ones(2, 1, 1, requires_grad=True)
            >>> d = LowRankMultivariateNormalMixture(torch.tensor([[-2.0], [2.0]]), cov_factor,
            ...                                      torch.ones(2, 1), torch.zeros(2))
            >>> d.rsample((100,)).square().sum().backward()
            >>> cov_factor.grad.shape
            torch.Size([2, 1, 1])
        """
        return implicit_mvn_mixture_rsample(
            self.locs, self.scale_tril, self.logits, self.sample(sample_shape)
        )

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        r"""Exact log-density, by the Woodbury identity (see the class docstring).

        .. math:: \log p(x) = \operatorname{logsumexp}_k \big[\log \pi_k
                  + \log \mathcal{N}(x; \mu_k, W_k W_k^\top + \operatorname{diag} d_k)\big].

        Args:
            value: Points, shape ``(*sample, *batch, D)`` or broadcastable to it.

        Returns:
            Tensor of shape ``(*sample, *batch)``.

        Example:
            >>> d = LowRankMultivariateNormalMixture(torch.zeros(1, 1), torch.zeros(1, 1, 1),
            ...                                      torch.ones(1, 1), torch.zeros(1))
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
            >>> d = LowRankMultivariateNormalMixture(torch.tensor([[-3.0], [3.0]]),
            ...     torch.zeros(2, 1, 1), torch.ones(2, 1), torch.zeros(2))
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

        .. math:: x_k = \mu_k + W_k \eta_k + d_k^{1/2} \odot \varepsilon_k \text{ independent},
                  \qquad E[h(X)] = E\Big[\sum_k \pi_k\, h(x_k)\Big],

        each :math:`x_k` reparameterized in ``locs``, ``cov_factor`` and ``cov_diag``; this is
        what :class:`~pyro_mixflow.infer.RaoBlackwellELBO` uses.

        Args:
            sample_shape: Leading sample shape.

        Returns:
            ``(values, log_weights)`` of shapes ``(*sample_shape, *batch, K, D)`` and
            ``(*sample_shape, *batch, K)``; ``log_weights.exp()`` sums to one over ``K``.

        Example:
            >>> d = LowRankMultivariateNormalMixture(torch.tensor([[-2.0], [2.0]]),
            ...     torch.ones(2, 1, 1), torch.ones(2, 1), torch.tensor([0.0, 1.0]))
            >>> values, log_weights = d.rao_blackwell((20000,))
            >>> mean = (log_weights.exp().unsqueeze(-1) * values).sum(-2).mean(0)
            >>> torch.allclose(mean, d.mean, atol=0.05)
            True
        """
        shape = torch.Size(sample_shape) + self.locs.shape
        rank = self.cov_factor.shape[-1]
        low = torch.randn(shape[:-1] + (rank,), dtype=self.locs.dtype, device=self.locs.device)
        diag = torch.randn(shape, dtype=self.locs.dtype, device=self.locs.device)
        values = self.locs + component_matvec(self.cov_factor, low) + self.cov_diag.sqrt() * diag
        return values, self.logits.expand(shape[:-1])  # [*S, *B, K, D], [*S, *B, K]

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
            >>> d = LowRankMultivariateNormalMixture(torch.zeros(2, 1), torch.ones(2, 1, 1),
            ...                                      torch.ones(2, 1), torch.zeros(2))
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
                  m = \sum_k \pi_k \mu_k.
        """
        return mixture_covariance(self.probs, self.locs, self.component_covariance_matrix)

    @property
    def variance(self) -> torch.Tensor:
        r"""The diagonal of :attr:`covariance_matrix`, shape ``(*batch, D)``."""
        w = self.probs.unsqueeze(-1)  # [*B, K, 1]
        centred = self.locs - self.mean.unsqueeze(-2)  # [*B, K, D]
        component = self.cov_factor.square().sum(-1) + self.cov_diag  # [*B, K, D]
        return (w * (component + centred.square())).sum(-2)

    def _log_joint(self, x: torch.Tensor) -> torch.Tensor:
        """``log pi_k + log N(x; mu_k, Sigma_k)``, ``[*S, *B, K]``, by Woodbury."""
        factor, diag = self.cov_factor, self.cov_diag
        rank = factor.shape[-1]
        scaled_t = factor.mT / diag.unsqueeze(-2)  # W^T D^-1, [*B, K, r, D]
        eye = torch.eye(rank, dtype=factor.dtype, device=factor.device)
        capacitance_tril = torch.linalg.cholesky(eye + scaled_t @ factor)  # [*B, K, r, r]
        project = torch.linalg.solve_triangular(capacitance_tril, scaled_t, upper=False)
        # Any fixed point serves (the density does not depend on it): detached, so that the
        # points need no gradient unless `value` has one.
        centre = self.locs.mean(-2, keepdim=True).detach()  # [*B, 1, D]
        shift = (project @ (self.locs - centre).unsqueeze(-1)).squeeze(-1)  # [*B, K, r]
        low_rank = whitened_half_square(x - centre.squeeze(-2), project, shift)  # [*S, *B, K]
        diagonal = diagonal_half_square(x, self.locs, diag.reciprocal())  # [*S, *B, K]
        log_capacitance = capacitance_tril.diagonal(dim1=-2, dim2=-1).log().sum(-1)  # [*B, K]
        half_log_det = log_capacitance + 0.5 * diag.log().sum(-1)  # [*B, K]
        constant = self.logits - half_log_det - self.event_shape[0] * HALF_LOG_2PI
        return constant - diagonal + low_rank


_TENSORS = (
    "locs",
    "cov_factor",
    "cov_diag",
    "logits",
    "probs",
    "component_covariance_matrix",
    "scale_tril",
)
