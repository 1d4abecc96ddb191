r"""A trainable classifier weighted mixture (lazy distribution) with EM initialization."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from pyro_mixflow._checks import check_positive_int
from pyro_mixflow._mlp import mlp
from pyro_mixflow.distributions.classifier_weighted_mixture import ClassifierWeightedMixture
from pyro_mixflow.fitting.em import em_parameters
from pyro_mixflow.nn._base import DensityModel
from pyro_mixflow.nn._context import (
    ContextStandardizer,
    check_context,
    check_context_dim,
    check_context_rows,
    context_mlp,
    start_output_at,
)

__all__ = ["CWM"]


class CWM(DensityModel):
    r"""A trainable classifier weighted mixture; calling it returns a fresh distribution.

    .. math:: p(x) = \sum_k w_k(z_k)\, \mathcal{N}(z_k; 0, I) \prod_d \sigma_{kd}^{-1},
              \qquad z_k = (x - \mu_k) / \sigma_k, \quad w = \operatorname{softmax}(f(z)),

    with :math:`f` an MLP ``[D, *hidden_dims, K]``. Parameters are ``locs``, ``log_scales``
    (:math:`\sigma = e^{s}`) and the MLP ``classifier``. :meth:`init_from_data` sets the
    components to an EM fit and the MLP's last layer to weight 0 and bias :math:`\log \pi`,
    so that the model starts *equal* to the EM mixture of diagonal Gaussians; training then
    only adds position-dependent weights.

    **Conditional** (``context_dim=C``): ``model(context)`` for a context of shape
    ``(*batch, C)`` returns the mixture of batch shape ``*batch`` with

    .. math:: p(x \mid c) = \sum_k w_k(z_k, \tilde c)\, \mathcal{N}(z_k; 0, I)
              \prod_d \sigma_{kd}(\tilde c)^{-1}, \qquad
              z_k = (x - \mu_k(\tilde c)) / \sigma_k(\tilde c),

    where :math:`\tilde c` is the standardized context (buffers of ``context_standardizer``, set by
    :meth:`init_from_data`), the ``classifier`` is an MLP ``[D + C, *hidden_dims, K]`` of
    :math:`(z, \tilde c)`, and ``component_net``, an MLP ``[C, *hidden_dims, 2KD]``, gives
    the :math:`K D` locations and :math:`K D` log-scales (``locs`` and ``log_scales`` are then
    not parameters). It integrates to one for every :math:`c`: for fixed :math:`c`, the
    change of variables :math:`z = (x - \mu_k(\tilde c)) / \sigma_k(\tilde c)` turns the
    integral of component :math:`k`'s term into :math:`E_{z \sim \mathcal{N}(0, I)}[w_k(z,
    \tilde c)]`, and :math:`\sum_k w_k(z, \tilde c) = 1` for every :math:`z` and :math:`c`, so
    the terms add up to :math:`E_z[1] = 1` (the latent-variable model of
    :class:`~pyro_mixflow.ClassifierWeightedMixture`, one per context). Both networks' last
    layers start at weight 0, with biases at :math:`\log \pi` and at the (EM) locations and
    log-scales, so the untrained conditional model is the same mixture for every context.

    The defaults (50 components, a classifier of two Tanh layers 64 wide: 7,802 parameters in
    2-D) are the settings that beat the EM mixture at the 2-D density benchmark's budget
    (``benchmarks/density.py``: 20,000 draws, 3,000 Adam steps, batch 512, lr :math:`10^{-3}`
    with cosine decay, seed 0). ``CWM(2)`` ends at KL 0.097 ± 0.002 on the checkerboard and
    0.068 ± 0.002 on the Euler image, against 0.161 ± 0.003 and 0.079 ± 0.003 for a
    50-component diagonal mixture (:class:`GMM`, EM + Adam) and 0.165 and 0.086 for its own EM
    start. The earlier defaults (8 components, three layers 128 wide) ended at 0.27 on the
    checkerboard.

    Args:
        input_dim: Dimension :math:`D` of the data.
        num_components: Number of components :math:`K` (50, as for every density model of
            :mod:`pyro_mixflow.nn`: see :class:`GMM`).
        hidden_dims: Widths of the classifier's hidden layers (and of ``component_net``'s).
        activation: Activation module class between layers.
        context_dim: Dimension :math:`C` of the context (``None``: unconditional).

    Example:
        >>> model = CWM(2, num_components=3, hidden_dims=(16,))
        >>> data = torch.randn(500, 2)
        >>> model.init_from_data(data)().log_prob(data).shape
        torch.Size([500])
        >>> conditional = CWM(2, num_components=3, hidden_dims=(16,), context_dim=1)
        >>> context = torch.randn(500, 1)
        >>> d = conditional.init_from_data(data, context)(context)
        >>> d.batch_shape, d.log_prob(data).shape
        (torch.Size([500]), torch.Size([500]))

    References:
        Classifier Weighted Mixture Models. E. Argouarc'h, F. Desbouvries, E. Barat,
        E. Kawasaki, T. Dautremer, 2023.
    """

    def __init__(
        self,
        input_dim: int,
        num_components: int = 50,
        hidden_dims: Sequence[int] = (64, 64),
        activation: Callable[[], nn.Module] = nn.Tanh,
        *,
        context_dim: int | None = None,
    ) -> None:
        super().__init__()
        check_positive_int("input_dim", input_dim)
        check_positive_int("num_components", num_components)
        hidden_dims = tuple(hidden_dims)
        for width in hidden_dims:
            check_positive_int("hidden_dims[i]", width)
        self.input_dim, self.num_components = input_dim, num_components
        self.context_dim = check_context_dim(context_dim)
        locs = torch.randn(num_components, input_dim)
        log_scales = torch.zeros(num_components, input_dim)
        if context_dim is None:
            self.locs = nn.Parameter(locs)
            self.log_scales = nn.Parameter(log_scales)
            self.classifier = mlp((input_dim, *hidden_dims, num_components), activation)
        else:
            self.context_standardizer = ContextStandardizer(context_dim)
            self.classifier = mlp(
                (input_dim + context_dim, *hidden_dims, num_components), activation
            )
            bias = torch.cat([locs.flatten(), log_scales.flatten()])
            self.component_net = context_mlp(context_dim, hidden_dims, bias, activation=activation)

    def forward(self, context: torch.Tensor | None = None) -> ClassifierWeightedMixture:
        """Returns the distribution at the current parameters (at ``context`` if conditional).

        Args:
            context: ``None`` for an unconditional model; else a floating-point tensor of
                shape ``(*batch, C)``, and the distribution has batch shape ``*batch``.

        Returns:
            A :class:`~pyro_mixflow.ClassifierWeightedMixture`.
        """
        context = check_context("CWM", context, self.context_dim)
        if context is None:
            return ClassifierWeightedMixture(self.locs, self.log_scales.exp(), self.classifier)
        dtype = self.classifier[0].weight.dtype
        context = self.context_standardizer(context.to(dtype))  # [*B, C]
        components = self.component_net(context).unflatten(
            -1, (2, self.num_components, self.input_dim)
        )  # [*B, 2, K, D]
        locs, log_scales = components.unbind(-3)  # [*B, K, D] each
        classifier = _ContextClassifier(self.classifier, context, self.input_dim)
        return ClassifierWeightedMixture(locs, log_scales.exp(), classifier)

    @torch.no_grad()
    def init_from_data(
        self,
        data: torch.Tensor,
        context: torch.Tensor | None = None,
        *,
        max_iter: int = 200,
        seed: int = 0,
    ) -> CWM:
        r"""Starts the model at a maximum-likelihood EM fit of a diagonal Gaussian mixture.

        Means and scales come from scikit-learn's ``GaussianMixture(covariance_type="diag")``
        (see :func:`~pyro_mixflow.fitting.em_diagonal`); the classifier's last layer gets weight
        0 and bias :math:`\log \pi`, so :math:`w(z) = \pi` for every :math:`z` and the model's
        density equals the EM mixture's. A conditional model fits the EM mixture to ``data``
        alone (the marginal of the pairs), sets ``component_net``'s last layer to weight 0 and
        bias the EM locations and log-scales, and, given ``context``, its standardization to
        the context rows' mean and standard deviation: it is then the EM mixture for every
        context.

        Args:
            data: Array or tensor of shape ``(N, D)`` with ``N >= num_components``.
            context: The context rows ``(N, C)`` of a conditional model (optional; without
                it the standardization is left as it is).
            max_iter: EM iterations.
            seed: Seed of the k-means initialization of EM.

        Returns:
            ``self``, for chaining.
        """
        if context is not None:
            context = check_context_rows("CWM", data, context, self.context_dim)
            self.context_standardizer.fit(context)
        like = self.classifier[-1].weight.new_empty(self.num_components, self.input_dim)
        locs, log_scales, log_weights = em_parameters(data, like, max_iter=max_iter, seed=seed)
        start_output_at(self.classifier, log_weights)
        if self.context_dim is None:
            self.locs.copy_(locs)
            self.log_scales.copy_(log_scales)
        else:
            start_output_at(self.component_net, torch.cat([locs.flatten(), log_scales.flatten()]))
        return self


class _ContextClassifier(nn.Module):
    r"""The classifier :math:`f(z, \tilde c)` with the context bound: ``(..., *batch, D)`` in.

    ``net`` reads the concatenation :math:`(z, \tilde c)`; its first layer is applied as
    :math:`W_z z + (W_c \tilde c + b)`, the same map, with the context's part computed once per
    context ``(*batch, H)`` and broadcast against the points (the distribution calls the
    classifier on points whose dimensions left of :math:`D` end with the batch shape).
    """

    def __init__(self, net: nn.Sequential, context: torch.Tensor, input_dim: int) -> None:
        super().__init__()
        self.net, self.context, self.input_dim = net, context, input_dim

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        first = self.net[0]
        weight_z, weight_c = first.weight.split(
            [self.input_dim, first.in_features - self.input_dim], dim=1
        )
        h = F.linear(z, weight_z) + F.linear(self.context, weight_c, first.bias)  # [..., *B, H]
        for layer in list(self.net)[1:]:
            h = layer(h)
        return h
