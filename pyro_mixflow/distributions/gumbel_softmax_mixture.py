r"""Mixture of diagonal Gaussians reparameterized with the Gumbel-softmax relaxation."""

from __future__ import annotations

import math
from typing import Any

import torch

from pyro_mixflow.distributions._common import HALF_LOG_2PI, batched_rowwise_matmul
from pyro_mixflow.distributions.diag_normal_mixture import DiagNormalMixture

__all__ = ["GumbelSoftmaxMixture"]


class GumbelSoftmaxMixture(DiagNormalMixture):
    r"""A :class:`DiagNormalMixture` whose ``rsample`` is the Gumbel-softmax relaxation.

    The distribution (``log_prob``, ``sample``, ``mean``, ``variance``) is the exact mixture.
    ``rsample`` relaxes the component index (Jang et al. 2017; Maddison et al. 2017) and
    mixes the components' parameters with the relaxed one-hot weights

    .. math::

        \log c = \operatorname{log\,softmax}\big((\log \pi + g) / \tau\big), \quad
        g_k \sim \operatorname{Gumbel}(0, 1), \qquad
        z = c^\top \mu + \omega \odot c^\top \sigma, \quad \omega \sim \mathcal{N}(0, I),

    computed in log space, so that it stays finite at :math:`\tau = 0.01` in float32, where
    torch's ``RelaxedOneHotCategorical`` underflows.

    Which density goes with which sampler:

    * ``sample`` and ``straight_through=True`` draws are exact mixture draws: ``log_prob`` is
      their density. The straight-through gradient (through the relaxed weights) is biased.
    * ``rsample`` draws (``straight_through=False``) follow the *relaxed* marginal
      :math:`p_\tau(z) = \int \mathcal{N}(z; c^\top\mu, \operatorname{diag}(c^\top\sigma)^2)
      \, p_\tau(c)\, dc`, not the mixture; its gradient is the unbiased gradient of the relaxed
      objective :math:`E_{p_\tau}[f]`, which differs from that of :math:`E_p[f]` by a bias that
      vanishes as :math:`\tau \to 0` while the variance grows. ``log_prob`` is the exact
      mixture density, so pairing it with ``rsample`` mixes the two.
    * ``joint_log_prob(value, log_weights)`` is the exact density of the pair returned by
      ``rsample_with_weights`` (note's eq. 2 plus the conditional Gaussian).
    * ``relaxed_log_prob(value)`` estimates :math:`\log p_\tau(z)` by nested Monte Carlo; the
      estimate of :math:`p_\tau` is unbiased, its logarithm is biased low (Jensen) by about
      :math:`\operatorname{Var}/(2 M p_\tau^2)` for ``num_samples`` :math:`= M`.

    Args:
        locs: Component means, shape ``(*batch, K, D)``.
        scales: Component standard deviations, positive, broadcastable with ``locs``.
        logits: Unnormalized log weights, shape ``(*batch, K)``.
        probs: Weights, shape ``(*batch, K)``. Give exactly one of ``logits`` and ``probs``.
        temperature: Relaxation temperature :math:`\tau > 0`, a number or a 0-d tensor.
        straight_through: If ``True``, ``rsample`` returns exact mixture draws whose gradient
            flows through the relaxed weights.
        validate_args: Check parameters and values (torch's default when ``None``).

    Example:
        >>> d = GumbelSoftmaxMixture(torch.randn(3, 2), torch.ones(3, 2),
        ...                          logits=torch.zeros(3), temperature=0.1)
        >>> z, log_c = d.rsample_with_weights((4,))
        >>> d.joint_log_prob(z, log_c).shape
        torch.Size([4])

    References:
        Categorical Reparameterization with Gumbel-Softmax. E. Jang, S. Gu, B. Poole, 2017.
        arXiv:1611.01144.

        The Concrete Distribution. C. Maddison, A. Mnih, Y. W. Teh, 2017. arXiv:1611.00712.
    """

    def __init__(
        self,
        locs: torch.Tensor,
        scales: torch.Tensor,
        logits: torch.Tensor | None = None,
        *,
        probs: torch.Tensor | None = None,
        temperature: float | torch.Tensor = 1.0,
        straight_through: bool = False,
        validate_args: bool | None = None,
    ) -> None:
        if isinstance(temperature, torch.Tensor) and temperature.numel() != 1:
            raise ValueError(
                f"`temperature` must be a number or a one-element tensor, got shape "
                f"{tuple(temperature.shape)}"
            )
        if not isinstance(temperature, torch.Tensor | float | int) or isinstance(temperature, bool):
            raise TypeError(f"`temperature` must be a number, got {type(temperature).__name__}")
        t = float(temperature)
        if not (t > 0 and math.isfinite(t)):
            raise ValueError(f"`temperature` must be positive and finite, got {t}")
        self.temperature = t
        self.straight_through = bool(straight_through)
        super().__init__(locs, scales, logits, probs=probs, validate_args=validate_args)

    def expand(  # noqa: D102
        self,
        batch_shape: torch.Size | tuple[int, ...],
        _instance: GumbelSoftmaxMixture | None = None,
    ) -> GumbelSoftmaxMixture:
        new = self._get_checked_instance(GumbelSoftmaxMixture, _instance)
        new.temperature = self.temperature
        new.straight_through = self.straight_through
        return super().expand(batch_shape, _instance=new)

    def rsample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        r"""Relaxed (or straight-through) reparameterized draws, :math:`z` of
        :meth:`rsample_with_weights`.

        Args:
            sample_shape: Leading sample shape.

        Returns:
            Tensor of shape ``(*sample_shape, *batch, D)``.

        Example:
            >>> d = GumbelSoftmaxMixture(torch.zeros(3, 2), torch.ones(3, 2), torch.zeros(3),
            ...                          temperature=0.2)
            >>> d.rsample((5,)).shape
            torch.Size([5, 2])
        """  # noqa: D205
        return self.rsample_with_weights(sample_shape)[0]

    def rsample_with_weights(
        self, sample_shape: torch.Size = torch.Size()
    ) -> tuple[torch.Tensor, torch.Tensor]:
        r"""Draws :math:`(z, \log c)` by the Gumbel-softmax construction.

        .. math:: z = c^\top \mu + \omega \odot c^\top \sigma.

        With ``straight_through=True`` the forward value uses the one-hot
        :math:`\operatorname{onehot}(\arg\max_k \log c_k)` (an exact mixture draw, by the
        Gumbel-max trick) and the gradient flows through :math:`c`; the returned log weights are
        the relaxed ones.

        Args:
            sample_shape: Leading sample shape.

        Returns:
            ``value`` of shape ``(*sample, *batch, D)`` and ``log_weights`` of shape
            ``(*sample, *batch, K)``.

        Example:
            >>> d = GumbelSoftmaxMixture(torch.zeros(2, 3), torch.ones(2, 3),
            ...                          probs=torch.tensor([0.3, 0.7]), temperature=0.5)
            >>> z, log_c = d.rsample_with_weights((10,))
            >>> z.shape, log_c.logsumexp(-1).abs().max() < 1e-5
            (torch.Size([10, 3]), tensor(True))
        """
        log_weights = self._sample_log_weights(sample_shape)
        weights = log_weights.exp()
        if self.straight_through:
            hard = torch.nn.functional.one_hot(log_weights.argmax(-1), self.num_components).to(
                weights
            )
            weights = _StraightThrough.apply(hard, weights)
        loc, scale = self._relaxed_loc_scale(weights)
        noise = torch.randn_like(loc)
        return loc + scale * noise, log_weights

    def joint_log_prob(self, value: torch.Tensor, log_weights: torch.Tensor) -> torch.Tensor:
        r"""Log-density of the pair :math:`(z, c)` drawn by :meth:`rsample_with_weights`.

        The Concrete density of the weights (Maddison et al. 2017, with respect to Lebesgue
        measure on the first :math:`K-1` coordinates of the simplex) plus the conditional
        Gaussian:

        .. math::

            \log p(c) = \log \Gamma(K) + (K-1) \log \tau
                - K \log \sum_k \pi_k c_k^{-\tau}
                + \sum_k \big(\log \pi_k - (\tau + 1) \log c_k\big), \qquad
            \log p(z \mid c) = \log \mathcal{N}(z; c^\top\mu, \operatorname{diag}(c^\top\sigma)^2).

        Args:
            value: Points :math:`z`, shape ``(*sample, *batch, D)``.
            log_weights: :math:`\log c`, shape ``(*sample, *batch, K)``, each row a log-simplex
                point.

        Returns:
            Tensor of shape ``(*sample, *batch)``.

        Example:
            >>> d = GumbelSoftmaxMixture(torch.randn(4, 2), torch.ones(4, 2),
            ...                          logits=torch.zeros(4), temperature=0.3)
            >>> z, log_c = d.rsample_with_weights((3,))
            >>> torch.isfinite(d.joint_log_prob(z, log_c)).all()
            tensor(True)
        """
        if self._validate_args:
            self._validate_sample(value)
        if log_weights.shape[-1] != self.num_components:
            raise ValueError(
                f"`log_weights.shape[-1]` ({log_weights.shape[-1]}) does not match the number "
                f"of components ({self.num_components})"
            )
        tau, num = self.temperature, self.num_components
        log_pi = self.logits
        log_concrete = (
            math.lgamma(num)
            + (num - 1) * math.log(tau)
            - num * torch.logsumexp(log_pi - tau * log_weights, dim=-1)
            + (log_pi - (tau + 1) * log_weights).sum(-1)
        )
        loc, scale = self._relaxed_loc_scale(log_weights.exp())
        std = (value - loc) / scale
        log_normal = (
            -0.5 * std.square().sum(-1) - scale.log().sum(-1) - HALF_LOG_2PI * std.shape[-1]
        )
        return log_concrete + log_normal

    def relaxed_log_prob(self, value: torch.Tensor, num_samples: int = 256) -> torch.Tensor:
        r"""Nested Monte-Carlo estimate of the log-density of relaxed ``rsample`` draws.

        .. math::

            \log p_\tau(z) \approx \log \frac{1}{M} \sum_{j=1}^M
            \mathcal{N}(z; c_j^\top\mu, \operatorname{diag}(c_j^\top\sigma)^2),
            \qquad c_j \sim p_\tau(c),

        with ``M = num_samples`` fresh weight draws per call, shared by all points of the call.
        The mean inside the logarithm is unbiased for :math:`p_\tau(z)`; the logarithm is biased
        low by about :math:`\operatorname{Var}/(2 M p_\tau(z)^2)`. Differentiable in the
        parameters (through the relaxed weights).

        Args:
            value: Points, shape ``(*sample, *batch, D)``.
            num_samples: Number :math:`M` of relaxed weight draws.

        Returns:
            Tensor of shape ``(*sample, *batch)``.

        Example:
            >>> d = GumbelSoftmaxMixture(torch.randn(3, 1), torch.ones(3, 1),
            ...                          logits=torch.zeros(3), temperature=0.05)
            >>> x = torch.linspace(-2, 2, 5).unsqueeze(-1)
            >>> bool((d.relaxed_log_prob(x) - d.log_prob(x)).abs().max() < 0.5)
            True
        """
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"`num_samples` must be a positive integer, got {num_samples!r}")
        if self._validate_args:
            self._validate_sample(value)
        weights = self._sample_log_weights(torch.Size([num_samples])).exp()  # [M, *B, K]
        loc, scale = self._relaxed_loc_scale(weights)  # [M, *B, D]
        inner = DiagNormalMixture(
            loc.movedim(0, -2),
            scale.movedim(0, -2),
            logits=weights.new_zeros(self.batch_shape + (num_samples,)),
            validate_args=False,
        )
        return inner.log_prob(value)

    def _sample_log_weights(self, sample_shape: torch.Size) -> torch.Tensor:
        shape = torch.Size(sample_shape) + self.logits.shape
        exponential = torch.empty(shape, dtype=self.logits.dtype, device=self.logits.device)
        exponential.exponential_().clamp_(min=torch.finfo(self.logits.dtype).tiny)
        gumbel = -exponential.log()
        return torch.log_softmax((self.logits + gumbel) / self.temperature, dim=-1)

    def _relaxed_loc_scale(self, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r"""Returns :math:`(c^\top\mu, c^\top\sigma)` for weights ``(*S, *B, K)``."""
        both = torch.cat([self.locs, self.scales], dim=-1).transpose(-1, -2)  # [*B, 2D, K]
        out = batched_rowwise_matmul(weights, both)
        return out.chunk(2, dim=-1)


class _StraightThrough(torch.autograd.Function):
    """Forward: the hard value exactly; backward: the gradient goes to the soft value."""

    @staticmethod
    def forward(ctx: Any, hard: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
        return hard.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, torch.Tensor]:
        return None, grad
