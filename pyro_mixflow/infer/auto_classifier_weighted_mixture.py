r"""A classifier weighted mixture as a Pyro autoguide (train it with RaoBlackwellELBO)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Unpack

import torch
from torch import nn

from pyro_mixflow._checks import check_positive_int
from pyro_mixflow._mlp import mlp
from pyro_mixflow.distributions.classifier_weighted_mixture import ClassifierWeightedMixture
from pyro_mixflow.infer._auto_mixture import AutoMixture, InitKwargs

__all__ = ["AutoClassifierWeightedMixture"]


class AutoClassifierWeightedMixture(AutoMixture):
    r"""A guide whose mixture weights depend on the point, through a neural classifier.

    .. math:: q(u) = \sum_k w_k(z_k)\, \mathcal{N}(z_k; 0, I) \prod_d \sigma_{kd}^{-1},
              \quad z_k = \frac{u - \mu_k}{\sigma_k}, \quad w = \operatorname{softmax}(f(z)),

    then :math:`x = T(u)` onto the model's supports (see
    :class:`~pyro_mixflow.ClassifierWeightedMixture`). The classifier :math:`f` is an MLP
    ``[D, *hidden_dims, K]`` whose last layer starts with zero weights, so the guide starts as
    a mixture of Gaussians with constant weights (started as in :class:`AutoGaussianMixture`).

    The component index is discrete and the draws are not reparameterizable: train with
    :class:`~pyro_mixflow.infer.RaoBlackwellELBO`, which sums the index out (``K`` model
    evaluations per particle, and an unbiased entropy estimate that needs ``O(K)`` classifier
    calls per particle). With Pyro's ``Trace_ELBO`` the guide would get a high-variance
    score-function gradient.

    Args:
        model: A Pyro model with continuous latent sites.
        num_components: Number of components :math:`K` (16 by default, as every mixture
            guide: see :class:`AutoGaussianMixture`; with 8, this guide found none of the six
            modes of ``benchmarks/svi.py``'s label-switching posterior on 3 of 3 seeds).
        hidden_dims: Widths of the classifier's hidden layers.
        activation: Activation module class between layers.
        **init_options: ``init_loc_fn``, ``init_scale``, ``init_spread``, ``init_ess``,
            ``init_method`` and ``quantile_samples`` (here the draws of the Monte Carlo
            :meth:`median` and :meth:`quantiles`), keyword-only, as in
            :class:`AutoGaussianMixture`.

    Example:
        >>> import pyro, pyro.distributions as dist
        >>> from pyro.infer import SVI
        >>> from pyro_mixflow.infer import RaoBlackwellELBO
        >>> def model():
        ...     pyro.sample("x", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        >>> guide = AutoClassifierWeightedMixture(model, num_components=3, hidden_dims=(8,))
        >>> svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), RaoBlackwellELBO())
        >>> isinstance(svi.step(), float)
        True
    """

    def __init__(
        self,
        model: Callable[..., Any],
        num_components: int = 16,
        hidden_dims: Sequence[int] = (32, 32),
        *,
        activation: Callable[[], nn.Module] = nn.Tanh,
        **init_options: Unpack[InitKwargs],
    ) -> None:
        hidden_dims = tuple(hidden_dims)
        for width in hidden_dims:
            check_positive_int("hidden_dims[i]", width)
        self._hidden_dims = hidden_dims
        self._activation = activation
        super().__init__(model, num_components, **init_options)

    def _setup_prototype(self, *args: Any, **kwargs: Any) -> None:
        super()._setup_prototype(*args, **kwargs)
        widths = (self.latent_dim, *self._hidden_dims, self.num_components)
        self.classifier = mlp(widths, self._activation, zero_last=True).to(self.locs)
        with torch.no_grad():  # a constant classifier: the initial fit's weights
            self.classifier[-1].bias.copy_(self._init_log_weights)

    def get_posterior(self, *args: Any, **kwargs: Any) -> ClassifierWeightedMixture:
        """The classifier weighted mixture over the unconstrained latent vector."""
        return ClassifierWeightedMixture(self.locs, self.scales, self.classifier)
