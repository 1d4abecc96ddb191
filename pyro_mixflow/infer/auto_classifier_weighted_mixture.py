r"""A classifier weighted mixture as a Pyro autoguide (train it with RaoBlackwellELBO)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from pyro.infer.autoguide.initialization import init_to_median
from torch import nn

from pyro_mixflow._checks import check_positive_int
from pyro_mixflow._mlp import mlp
from pyro_mixflow.distributions.classifier_weighted_mixture import ClassifierWeightedMixture
from pyro_mixflow.infer._auto_mixture import _AutoMixture

__all__ = ["AutoClassifierWeightedMixture"]


class AutoClassifierWeightedMixture(_AutoMixture):
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
        num_components: Number of components :math:`K`.
        hidden_dims: Widths of the classifier's hidden layers.
        activation: Activation module class between layers.
        init_loc_fn: Per-site initialization of the centre.
        init_scale: Initial scale of every component; ``None``: from the initial fit (see
            :class:`AutoGaussianMixture`).
        init_spread: Spread of the initial components (see :class:`AutoGaussianMixture`).
        init_ess: Tempering of the initial fit (see :class:`AutoGaussianMixture`).
        quantile_samples: Draws used for :meth:`median` and :meth:`quantiles` (Monte Carlo).

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
        num_components: int = 8,
        hidden_dims: Sequence[int] = (32, 32),
        *,
        activation: Callable[[], nn.Module] = nn.Tanh,
        init_loc_fn: Callable[[dict], torch.Tensor] = init_to_median,
        init_scale: float | None = None,
        init_spread: float = 1.0,
        init_ess: float = 0.1,
        quantile_samples: int = 10000,
    ) -> None:
        hidden_dims = tuple(hidden_dims)
        for width in hidden_dims:
            check_positive_int("hidden_dims[i]", width)
        self._hidden_dims = hidden_dims
        self._activation = activation
        super().__init__(
            model,
            num_components,
            init_loc_fn=init_loc_fn,
            init_scale=init_scale,
            init_spread=init_spread,
            init_ess=init_ess,
            quantile_samples=quantile_samples,
        )

    def _setup_prototype(self, *args: Any, **kwargs: Any) -> None:
        super()._setup_prototype(*args, **kwargs)
        widths = (self.latent_dim, *self._hidden_dims, self.num_components)
        self.classifier = mlp(widths, self._activation, zero_last=True).to(self.locs)
        with torch.no_grad():  # a constant classifier: the initial fit's weights
            self.classifier[-1].bias.copy_(self._init_log_weights)

    def get_posterior(self, *args: Any, **kwargs: Any) -> ClassifierWeightedMixture:
        """The classifier weighted mixture over the unconstrained latent vector."""
        return ClassifierWeightedMixture(self.locs, self.scales, self.classifier)
