r"""A trainable mixture of diagonal Gaussians, or a mixture density network, with EM start."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from pyro_mixflow._checks import check_positive_int
from pyro_mixflow._deprecated import moved
from pyro_mixflow._estimators import check_estimator, estimator_mixture
from pyro_mixflow.distributions import DiagNormalMixture
from pyro_mixflow.fitting import em
from pyro_mixflow.nn._base import DensityModel
from pyro_mixflow.nn._context import (
    ContextStandardizer,
    check_context,
    check_context_dim,
    check_hidden_dims,
    context_mlp,
    start_output_at,
)

__all__ = ["GMM"]


class GMM(DensityModel):
    r"""A trainable mixture of diagonal Gaussians; calling it returns a fresh distribution.

    .. math:: p(x) = \sum_k \pi_k \mathcal{N}(x; \mu_k, \operatorname{diag} \sigma_k^2).

    Parameters are unconstrained: ``locs``, ``log_scales`` (:math:`\sigma = e^{s}`) and
    ``logits``. The initial means are spread (standard normal draws) so that components do
    not start on top of each other; :meth:`init_from_data` replaces them with an EM fit.

    With ``context_dim`` the model is a mixture density network (Bishop 1994): an MLP
    ``[C, *hidden_dims, K + 2 K D]`` (``network``) maps the standardized context
    :math:`\tilde c = (c - \text{loc}) / \text{scale}` to the logits, means and log-scales,

    .. math:: p(x \mid c) = \sum_k \operatorname{softmax}(\ell(\tilde c))_k\,
              \mathcal{N}\big(x; \mu_k(\tilde c), \operatorname{diag} e^{2 s_k(\tilde c)}\big),

    and ``model(context)`` for a context of shape ``(*batch, C)`` returns the mixture with
    ``batch_shape == context.shape[:-1]`` (one network call for all contexts), exact
    ``log_prob`` and the estimator's ``rsample``. Each :math:`p(\cdot \mid c)` is a mixture of
    normalized densities with weights on the simplex, so it integrates to 1 for every
    :math:`c`. The standardization (``context_standardizer``: buffers ``loc`` and ``scale``,
    0 and 1 until :meth:`init_from_data` sets them from the context rows) is saved with the
    state dict. The network's last layer starts at weight 0, so the model starts at the same
    mixture for every context: the EM fit after :meth:`init_from_data`.

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
        context_dim: Dimension :math:`C` of the context; ``None`` (default) for the
            unconditional mixture, whose parameters and behaviour do not depend on the
            arguments below.
        hidden_dims: Hidden widths of the context network, ``(64, 64)`` when ``None``. Only a
            conditional model has one: passing it without ``context_dim`` is a ``ValueError``.

    Example:
        >>> model = GMM(2, num_components=3)
        >>> data = torch.randn(500, 2)
        >>> model.init_from_data(data).forward().log_prob(data).shape
        torch.Size([500])
        >>> mdn = GMM(2, num_components=3, context_dim=4, hidden_dims=(16,))
        >>> context = torch.randn(500, 4)
        >>> d = mdn.init_from_data(data, context)(context)
        >>> d.batch_shape, d.event_shape, d.log_prob(data).shape
        (torch.Size([500]), torch.Size([2]), torch.Size([500]))

    References:
        Mixture Density Networks. C. M. Bishop, 1994. Technical report NCRG/94/004, Aston
        University.
    """

    def __init__(
        self,
        input_dim: int,
        num_components: int = 50,
        *,
        estimator: str = "exact",
        temperature: float = 0.5,
        context_dim: int | None = None,
        hidden_dims: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        check_positive_int("input_dim", input_dim)
        check_positive_int("num_components", num_components)
        self.input_dim, self.num_components = input_dim, num_components
        self.estimator, self.temperature = check_estimator(estimator, temperature)
        self.context_dim = check_context_dim(context_dim)
        locs = torch.randn(num_components, input_dim)
        if context_dim is None:
            if hidden_dims is not None:
                raise ValueError(
                    "`hidden_dims` applies only to a conditional `GMM`: pass `context_dim` too"
                )
            self.hidden_dims = None
            self.locs = nn.Parameter(locs)
            self.log_scales = nn.Parameter(torch.zeros(num_components, input_dim))
            self.logits = nn.Parameter(torch.zeros(num_components))
            return
        self.hidden_dims = check_hidden_dims((64, 64) if hidden_dims is None else hidden_dims)
        self.context_standardizer = ContextStandardizer(context_dim)
        bias = _pack(torch.zeros(num_components), locs, torch.zeros_like(locs))
        self.network = context_mlp(context_dim, self.hidden_dims, bias)

    def forward(self, context: torch.Tensor | None = None) -> DiagNormalMixture:
        """Returns the mixture at the current parameters (given ``context`` if conditional).

        Args:
            context: ``None`` for an unconditional model; a floating-point tensor of shape
                ``(*batch, C)`` for a conditional one.

        Returns:
            A mixture with ``batch_shape == context.shape[:-1]`` (``()`` when unconditional)
            and ``event_shape == (D,)``.
        """
        context = check_context("GMM", context, self.context_dim)
        if context is None:
            scales = self.log_scales.exp()
            return estimator_mixture(
                self.locs, scales, self.logits, self.estimator, self.temperature
            )
        return self._conditional_mixture(self.standardized(context))

    def standardized(self, context: torch.Tensor) -> torch.Tensor:
        r"""Returns :math:`(c - \text{loc}) / \text{scale}`, the context the network reads.

        Args:
            context: Tensor of shape ``(*batch, C)`` (a conditional model's context).
        """
        context = check_context("GMM", context, self.context_dim)
        if context is None:
            raise ValueError("`GMM` is unconditional: it has no context to standardize")
        return self.context_standardizer(context)

    def _conditional_mixture(self, context: torch.Tensor) -> DiagNormalMixture:
        """The mixture for an already standardized context of shape ``(*batch, C)``."""
        K, D = self.num_components, self.input_dim
        out = self.network(context)  # [*B, K + 2 K D]
        logits, locs, log_scales = out.split((K, K * D, K * D), dim=-1)
        locs = locs.unflatten(-1, (K, D))  # [*B, K, D]
        scales = log_scales.unflatten(-1, (K, D)).exp()  # [*B, K, D]
        return estimator_mixture(locs, scales, logits, self.estimator, self.temperature)

    @torch.no_grad()
    def init_from_data(
        self,
        data: torch.Tensor,
        context: torch.Tensor | None = None,
        *,
        max_iter: int = 200,
        seed: int = 0,
    ) -> GMM:
        r"""Sets the parameters to a maximum-likelihood EM fit (scikit-learn's
        ``GaussianMixture`` with diagonal covariances).

        A conditional model gets the network's last layer at weight 0 and bias at the EM
        solution, so that its density equals the EM mixture's for every context; ``context``
        (the rows paired with ``data``), when given, also sets the context standardization.

        Args:
            data: Array or tensor of shape ``(N, D)`` with ``N >= num_components``.
            context: Tensor of shape ``(N, C)``, conditional models only; ``None`` leaves the
                standardization as it is.
            max_iter: EM iterations.
            seed: Seed of the k-means initialization of EM.

        Returns:
            ``self``, for chaining.
        """  # noqa: D205
        if self.context_dim is None:
            check_context("GMM", context, None)
            like = self.locs
        else:
            like = self.network[-1].bias.new_empty(self.num_components, self.input_dim)
            if context is not None:
                _check_pairs(data, context, self.context_dim)
        locs, log_scales, log_weights = em.em_parameters(data, like, max_iter=max_iter, seed=seed)
        if self.context_dim is None:
            self.locs.copy_(locs)
            self.log_scales.copy_(log_scales)
            self.logits.copy_(log_weights)
            return self
        if context is not None:
            self.context_standardizer.fit(context)
        start_output_at(self.network, _pack(log_weights, locs, log_scales))
        return self


def _pack(logits: torch.Tensor, locs: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """The network output ``[logits (K), locs (K D), log_scales (K D)]`` of one mixture."""
    return torch.cat([logits, locs.flatten(), log_scales.flatten()])


def _check_pairs(data: torch.Tensor, context: torch.Tensor, context_dim: int) -> None:
    """``ValueError`` unless ``context`` is ``(N, C)`` with the ``N`` of ``data``."""
    context_shape = tuple(torch.as_tensor(context).shape)
    if len(context_shape) != 2 or context_shape[-1] != context_dim:
        raise ValueError(f"`context` must have shape (N, {context_dim}), got {context_shape}")
    if context_shape[0] != len(data):
        raise ValueError(
            f"`context` has {context_shape[0]} rows but `data` has {len(data)}; "
            "they must be paired row by row"
        )


__getattr__ = moved("pyro_mixflow.nn.gmm", "pyro_mixflow.fitting", ("em_diagonal", "em_parameters"))
