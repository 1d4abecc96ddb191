r"""A normalizing flow over a Gaussian-mixture base as a Pyro autoguide."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Unpack

import pyro.distributions.transforms as T
import torch
from pyro.distributions import constraints
from pyro.nn import PyroParam
from torch import nn
from torch.distributions import AffineTransform, Transform

from pyro_mixflow.distributions.mixture_base_flow import MixtureBaseFlow
from pyro_mixflow.infer._auto_mixture import InitKwargs
from pyro_mixflow.infer.auto_gaussian_mixture import AutoGaussianMixture

__all__ = ["AutoMixtureBaseFlow"]


class AutoMixtureBaseFlow(AutoGaussianMixture):
    r"""A guide that is a normalizing flow over a Gaussian mixture.

    .. math:: u = m + s \odot g(z), \quad z \sim \sum_k \pi_k \mathcal{N}(\mu_k,
              \Sigma_k), \qquad
              \log q(u) = \log q_0(z) - \log|\det J_g(z)| - \textstyle\sum_d \log s_d,

    then :math:`x = T(u)` onto the model's supports. The mixture base (set up and
    reparameterized as in :class:`AutoGaussianMixture`, same ``covariance`` and ``estimator``
    choices: :math:`\Sigma_k` diagonal, full or low-rank plus diagonal) places
    the modes; the flow bends each component, which a Gaussian mixture can only approximate
    with many components (funnels, curved ridges). Draws and their log-density come from one
    forward pass (:meth:`MixtureBaseFlow.rsample_and_log_prob`), so autoregressive flows are
    cheap in this direction. Works with :class:`~pyro_mixflow.infer.RaoBlackwellELBO`.

    The flow :math:`g` acts on standardized coordinates: :math:`m` and :math:`s` (buffers
    ``center`` and ``spread``) are the mean and standard deviation of the initial mixture,
    fixed, so that the flow's networks see inputs of order one whatever the model's units (on
    Neal's funnel, prior draws reach :math:`|u| \approx 10^3`, and an IAF fed such inputs
    diverged within 3 steps).

    Args:
        model: A Pyro model with continuous latent sites.
        init_transform_fn: Called with the latent dimension, returns the transform(s) applied
            to the (standardized) base (torch/Pyro transforms or nflows transforms). The
            default is one Pyro ``affine_autoregressive`` (IAF) with hidden width ``3 D + 3``,
            started at the identity (so the guide starts as its base mixture), for ``D > 1`` and an
            elementwise ``spline`` for ``D = 1``.
        num_components: Number of base components (16 by default, as every mixture guide:
            see :class:`AutoGaussianMixture`).
        covariance: The base components' covariance, ``"diag"`` (default), ``"full"`` or
            ``"lowrank"``, as in :class:`AutoGaussianMixture` (full and low-rank need
            ``estimator="exact"``).
        rank: The rank of ``covariance="lowrank"`` (``None``: :math:`\max(1,
            \operatorname{round}(\sqrt D))`), as in :class:`AutoGaussianMixture`.
        estimator: ``"exact"``, ``"gumbel_softmax"`` or ``"straight_through"``.
        temperature: Temperature of the relaxed estimators.
        **init_options: ``init_loc_fn``, ``init_scale``, ``init_spread``, ``init_ess``,
            ``init_method`` and ``quantile_samples`` (here the draws of the Monte Carlo
            :meth:`median` and :meth:`quantiles`), keyword-only, as in
            :class:`AutoGaussianMixture`.

    Example:
        >>> import pyro, pyro.distributions as dist
        >>> from pyro.infer import SVI, Trace_ELBO
        >>> def model():
        ...     pyro.sample("x", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        >>> guide = AutoMixtureBaseFlow(model, num_components=3)
        >>> svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO())
        >>> isinstance(svi.step(), float)
        True
        >>> pyro.clear_param_store()
        >>> guide = AutoMixtureBaseFlow(model, num_components=2, covariance="lowrank", rank=1)
        >>> svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO())
        >>> isinstance(svi.step(), float)
        True
    """

    def __init__(
        self,
        model: Callable[..., Any],
        init_transform_fn: Callable[[int], Transform | Sequence[Transform]] | None = None,
        num_components: int = 16,
        *,
        covariance: str = "diag",
        rank: int | None = None,
        estimator: str = "exact",
        temperature: float = 0.5,
        **init_options: Unpack[InitKwargs],
    ) -> None:
        if init_transform_fn is not None and not callable(init_transform_fn):
            raise TypeError(
                f"`init_transform_fn` must be callable, got {type(init_transform_fn).__name__}"
            )
        self._init_transform_fn = init_transform_fn or _default_transforms
        super().__init__(
            model,
            num_components,
            covariance=covariance,
            rank=rank,
            estimator=estimator,
            temperature=temperature,
            **init_options,
        )

    def _setup_prototype(self, *args: Any, **kwargs: Any) -> None:
        super()._setup_prototype(*args, **kwargs)
        # The flow acts on standardized coordinates: the initial mixture's mean and standard
        # deviation set a fixed affine map after it, and the base is expressed before it
        # (dividing the scales sigma_k by the spread rescales L_k = diag(sigma_k) U_k and
        # diag(sigma_k) W_k alike: the factor entries stay).
        with torch.no_grad():
            factor = None if self.covariance == "diag" else self.factor
            start = self._covariance.mixture(self.locs, self.scales, self.logits, factor)
            center, spread = start.mean, start.variance.clamp(min=1e-12).sqrt()
            locs, scales = (self.locs - center) / spread, self.scales / spread
        self.register_buffer("center", center)
        self.register_buffer("spread", spread)
        self.locs = PyroParam(locs, constraints.real)
        self.scales = PyroParam(scales, constraints.softplus_positive)
        transforms = self._init_transform_fn(self.latent_dim)
        if not isinstance(transforms, Sequence):
            transforms = [transforms]
        # Built once, to check the transforms and wrap nflows ones; kept as a module list so
        # that their parameters are registered with Pyro.
        self.transforms = nn.ModuleList(
            [t for t in MixtureBaseFlow(super().get_posterior(), list(transforms)).transforms]
        ).to(self.locs)

    def get_posterior(self, *args: Any, **kwargs: Any) -> MixtureBaseFlow:
        """The flow over the mixture base, on the unconstrained latent vector."""
        standardization = AffineTransform(self.center, self.spread, event_dim=1, cache_size=1)
        return MixtureBaseFlow(
            super().get_posterior(*args, **kwargs), [*self.transforms, standardization]
        )

    def _marginal_quantiles(self, probs: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Monte Carlo coordinate-wise quantiles (the flow has no closed form)."""
        return super(AutoGaussianMixture, self)._marginal_quantiles(probs, *args, **kwargs)


def _default_transforms(dim: int) -> Transform:
    """One IAF (a spline in 1-D) that starts at the identity, so the guide starts as its base.

    Pyro draws a spline's bin widths, heights and knot derivatives at random: a random
    monotone map, which can squeeze the mass of every component onto one side of the origin
    (on the two-mode posterior of ``y ~ N(|theta|, 1)`` it put all draws on one mode before the
    first step, for 3 seeds of 4). Equal bins and unit derivatives make it the identity on
    ``[-bound, bound]`` (within about 1e-3 in the log-Jacobian: Pyro's minimum derivative).
    """
    if dim == 1:
        spline = T.spline(1)
        with torch.no_grad():
            spline.unnormalized_widths.zero_()
            spline.unnormalized_heights.zero_()
            # derivative = min_derivative + softplus(u) with Pyro's min_derivative = 1e-3
            spline.unnormalized_derivatives.fill_(math.log(math.expm1(1.0 - 1e-3)))
        return spline
    iaf = T.affine_autoregressive(dim, hidden_dims=[3 * dim + 3])
    last = iaf.arn.layers[-1]
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)  # loc 0, log-scale 0
    return iaf
