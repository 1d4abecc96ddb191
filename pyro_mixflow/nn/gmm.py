r"""A trainable Gaussian mixture, or a mixture density network, with EM start."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.distributions import Distribution

from pyro_mixflow._checks import check_positive_int
from pyro_mixflow._covariance import Covariance
from pyro_mixflow._deprecated import moved
from pyro_mixflow._estimators import check_estimator
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
    r"""A trainable Gaussian mixture; calling it returns a fresh distribution.

    .. math:: p(x) = \sum_k \pi_k \mathcal{N}(x; \mu_k, \Sigma_k), \qquad \Sigma_k =
              \begin{cases}
              \operatorname{diag} \sigma_k^2 & \texttt{"diag"} \\
              L_k L_k^\top, \ L_k = \operatorname{diag}(\sigma_k)\, U_k & \texttt{"full"} \\
              \operatorname{diag}(\sigma_k) (W_k W_k^\top + I) \operatorname{diag}(\sigma_k)
              & \texttt{"lowrank"}
              \end{cases}

    with :math:`U_k` unit lower-triangular and :math:`W_k \in \mathbb{R}^{D \times r}` (the
    parameterizations of Pyro's ``AutoMultivariateNormal`` and
    ``AutoLowRankMultivariateNormal``). Parameters are unconstrained: ``locs``, ``log_scales``
    (:math:`\sigma = e^{s}`), ``logits`` and, for full or low-rank components, ``factor``
    (``(K, F)``: the :math:`F = D(D-1)/2` strictly lower entries of each :math:`U_k`, row by
    row, or the :math:`F = D r` entries of each :math:`W_k`). The initial means are spread
    (standard normal draws) so that components do not start on top of each other, :math:`U_k =
    I`, and :math:`W_k` small random (at :math:`W_k = 0` its gradient vanishes);
    :meth:`init_from_data` replaces them with an EM fit. Full components cost :math:`O(D^2)`
    per point and component in ``log_prob``, low-rank ones :math:`O(D r)`.

    With ``context_dim`` the model is a mixture density network (Bishop 1994): an MLP
    ``[C, *hidden_dims, K + 2 K D]`` (``network``) maps the standardized context
    :math:`\tilde c = (c - \text{loc}) / \text{scale}` to the logits, means and log-scales
    (and ``K F`` factor entries with full or low-rank components: ``[C, *hidden_dims,
    K + 2 K D + K F]``),

    .. math:: p(x \mid c) = \sum_k \operatorname{softmax}(\ell(\tilde c))_k\,
              \mathcal{N}\big(x; \mu_k(\tilde c), \Sigma_k(\tilde c)\big),

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
        covariance: The components' covariance: ``"diag"`` (default,
            :class:`~pyro_mixflow.DiagNormalMixture`), ``"full"``
            (:class:`~pyro_mixflow.MultivariateNormalMixture`, EM start from scikit-learn's
            ``covariance_type="full"``) or ``"lowrank"``
            (:class:`~pyro_mixflow.LowRankMultivariateNormalMixture`, EM start from the top
            ``rank`` eigenvectors of the full EM covariances: see
            :func:`~pyro_mixflow.fitting.em_factor_parameters`). Full and low-rank components
            need ``estimator="exact"`` (exact draws, exact pathwise gradients).
        rank: The rank :math:`r` of ``covariance="lowrank"``, ``1 <= rank <= D``; ``None``
            (default) takes :math:`\max(1, \operatorname{round}(\sqrt D))`, the default of
            Pyro's ``AutoLowRankMultivariateNormal``. Passing it with another covariance is
            a ``ValueError``.
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
        >>> full = GMM(2, num_components=3, covariance="full").init_from_data(data)
        >>> type(full()).__name__
        'MultivariateNormalMixture'

    References:
        Mixture Density Networks. C. M. Bishop, 1994. Technical report NCRG/94/004, Aston
        University.
    """

    def __init__(
        self,
        input_dim: int,
        num_components: int = 50,
        *,
        covariance: str = "diag",
        rank: int | None = None,
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
        self._covariance = Covariance.of(covariance, rank, self.estimator, input_dim)
        self.covariance = covariance
        self.rank = self._covariance.rank_for(input_dim) if covariance == "lowrank" else None
        self.context_dim = check_context_dim(context_dim)
        locs = torch.randn(num_components, input_dim)
        factor = self._covariance.initial_factor(num_components, input_dim)  # [K, F]
        if context_dim is None:
            if hidden_dims is not None:
                raise ValueError(
                    "`hidden_dims` applies only to a conditional `GMM`: pass `context_dim` too"
                )
            self.hidden_dims = None
            self.locs = nn.Parameter(locs)
            self.log_scales = nn.Parameter(torch.zeros(num_components, input_dim))
            self.logits = nn.Parameter(torch.zeros(num_components))
            if covariance != "diag":
                self.factor = nn.Parameter(factor)
            return
        self.hidden_dims = check_hidden_dims((64, 64) if hidden_dims is None else hidden_dims)
        self.context_standardizer = ContextStandardizer(context_dim)
        bias = _pack(torch.zeros(num_components), locs, torch.zeros_like(locs), factor)
        self.network = context_mlp(context_dim, self.hidden_dims, bias)

    def forward(self, context: torch.Tensor | None = None) -> Distribution:
        """Returns the mixture at the current parameters (given ``context`` if conditional).

        Args:
            context: ``None`` for an unconditional model; a floating-point tensor of shape
                ``(*batch, C)`` for a conditional one.

        Returns:
            A mixture with ``batch_shape == context.shape[:-1]`` (``()`` when unconditional)
            and ``event_shape == (D,)``: a :class:`~pyro_mixflow.DiagNormalMixture` (or
            :class:`~pyro_mixflow.GumbelSoftmaxMixture` for a relaxed estimator),
            :class:`~pyro_mixflow.MultivariateNormalMixture` or
            :class:`~pyro_mixflow.LowRankMultivariateNormalMixture`.
        """
        context = check_context("GMM", context, self.context_dim)
        if context is None:
            factor = self.factor if self.covariance != "diag" else None
            return self._mixture(self.locs, self.log_scales, self.logits, factor)
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

    def _conditional_mixture(self, context: torch.Tensor) -> Distribution:
        """The mixture for an already standardized context of shape ``(*batch, C)``."""
        K, D = self.num_components, self.input_dim
        F = self._covariance.num_entries(D)
        out = self.network(context)  # [*B, K + 2 K D + K F]
        logits, locs, log_scales, factor = out.split((K, K * D, K * D, K * F), dim=-1)
        locs = locs.unflatten(-1, (K, D))  # [*B, K, D]
        log_scales = log_scales.unflatten(-1, (K, D))  # [*B, K, D]
        return self._mixture(locs, log_scales, logits, factor.unflatten(-1, (K, F)))

    def _mixture(
        self,
        locs: torch.Tensor,
        log_scales: torch.Tensor,
        logits: torch.Tensor,
        factor: torch.Tensor | None,
    ) -> Distribution:
        """The mixture of these unconstrained parameters (``factor``: ``(*B, K, F)``)."""
        return self._covariance.mixture(
            locs, log_scales.exp(), logits, factor, self.estimator, self.temperature
        )

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
        ``GaussianMixture`` with diagonal covariances, or full ones for ``covariance="full"``
        and ``"lowrank"``; :func:`~pyro_mixflow.fitting.em_factor_parameters`).

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
        locs, log_scales, factor, log_weights = em.em_factor_parameters(
            data,
            like,
            covariance=self.covariance,
            rank=self.rank or 0,
            max_iter=max_iter,
            seed=seed,
        )
        if self.context_dim is None:
            self.locs.copy_(locs)
            self.log_scales.copy_(log_scales)
            self.logits.copy_(log_weights)
            if self.covariance != "diag":
                self.factor.copy_(factor)
            return self
        if context is not None:
            self.context_standardizer.fit(context)
        start_output_at(self.network, _pack(log_weights, locs, log_scales, factor))
        return self


def _pack(
    logits: torch.Tensor, locs: torch.Tensor, log_scales: torch.Tensor, factor: torch.Tensor
) -> torch.Tensor:
    """The network output ``[logits (K), locs (K D), log_scales (K D), factor (K F)]``."""
    return torch.cat([logits, locs.flatten(), log_scales.flatten(), factor.flatten()])


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
