r"""A RAD flow (real-and-discrete, piecewise-invertible) as a Pyro autoguide."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from pyro.distributions import constraints
from pyro.infer.autoguide import AutoContinuous
from pyro.nn import PyroParam
from torch import nn
from torch.distributions import AffineTransform

from pyro_mixflow._checks import check_positive_int
from pyro_mixflow.distributions.rad_flow import RADFlow
from pyro_mixflow.infer._auto_mixture import (
    InitOptions,
    QuantilesFromDraws,
    init_to_median_or_origin,
    prior_draws,
)
from pyro_mixflow.transforms.rad import NETWORKS, RADCoupling

__all__ = ["AutoRADFlow"]


class AutoRADFlow(QuantilesFromDraws, AutoContinuous):
    r"""A guide that is a RAD flow over all unconstrained latents.

    .. math:: u = m + s \odot y, \quad y \sim \texttt{RADFlow}([R_1, \dots, R_L])
              \text{ over } \mathcal{N}(0, I), \qquad x = T(u),

    with :class:`~pyro_mixflow.transforms.RADCoupling` layers (this project's folding coupling
    design; the folded coordinates alternate) and a learned location :math:`m` and scale
    :math:`s`. Each layer folds ``[-bound, bound]`` onto itself ``num_pieces`` times, so one
    Gaussian base can become up to ``num_pieces ** L`` modes, with an exact single-pass
    density. ``rsample`` gives exact draws with a straight-through gradient for the piece
    choices (biased: see :class:`~pyro_mixflow.distributions.RADFlow`); train with Pyro's
    ``Trace_ELBO``. :math:`m` starts at the model's initial point (``init_loc_fn``) and
    :math:`s` at three prior standard deviations divided by ``bound`` (from 64 prior draws),
    so that the folded interval starts across the prior; the layers start at random (that
    breaks the symmetry between pieces).

    .. warning::
        Experimental: at the budget of ``benchmarks/svi.py`` it puts no mode at the right share
        on the four-mode, ring and label-switching targets (log Z errors -1.1, -0.8 and -1.9
        over 3 seeds) and fails on Neal's funnel, where :class:`AutoGaussianMixture`, the guide
        to use, meets every goal. Check :func:`~pyro_mixflow.diagnostics.importance_diagnostics`
        (k̂) before trusting it.

    Args:
        model: A Pyro model with continuous latent sites (two or more unconstrained
            coordinates: a coupling layer needs coordinates to condition on).
        num_pieces: Pieces of each fold.
        num_layers: Number of RAD layers :math:`L`.
        hidden_dims: Hidden widths of each layer's networks.
        network: ``"mlp"`` or ``"residual"`` (see :class:`~pyro_mixflow.transforms.RADCoupling`;
            the guide was measured with ``"mlp"``, its default here).
        bound: Half-width of the folded interval (in units of :math:`s`).
        init_loc_fn: Per-site initialization of :math:`m` (as in
            :class:`~pyro_mixflow.infer.AutoGaussianMixture`).
        quantile_samples: Draws of the Monte Carlo :meth:`median` and :meth:`quantiles`.

    Example:
        >>> import pyro, pyro.distributions as dist
        >>> from pyro.infer import SVI, Trace_ELBO
        >>> def model():
        ...     pyro.sample("x", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        >>> guide = AutoRADFlow(model, num_pieces=3, num_layers=2, hidden_dims=(8,))
        >>> svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO())
        >>> isinstance(svi.step(), float)
        True

    References:
        A RAD approach to deep mixture models. L. Dinh, J. Sohl-Dickstein, R. Pascanu,
        H. Larochelle, 2019. arXiv:1903.07714.
    """

    def __init__(
        self,
        model: Callable[..., Any],
        num_pieces: int = 4,
        num_layers: int = 2,
        hidden_dims: Sequence[int] = (32, 32),
        *,
        network: str = "mlp",
        bound: float = 3.0,
        init_loc_fn: Callable[[dict], torch.Tensor] = init_to_median_or_origin,
        quantile_samples: int = 10000,
    ) -> None:
        check_positive_int("num_pieces", num_pieces)
        check_positive_int("num_layers", num_layers)
        options = InitOptions(init_loc_fn=init_loc_fn, quantile_samples=quantile_samples)
        if network not in NETWORKS:
            raise ValueError(f"`network` must be one of {NETWORKS}, got {network!r}")
        self._layer_options = {
            "num_pieces": num_pieces,
            "hidden_dims": tuple(hidden_dims),
            "network": network,
            "bound": float(bound),
        }
        self.num_pieces, self.num_layers = num_pieces, num_layers
        self._quantile_samples = options.quantile_samples
        self._raw_model = (model,)
        super().__init__(model, init_loc_fn=options.init_loc_fn)

    def _setup_prototype(self, *args: Any, **kwargs: Any) -> None:
        super()._setup_prototype(*args, **kwargs)
        if self.latent_dim < 2:
            raise ValueError(
                f"AutoRADFlow needs at least 2 unconstrained latent coordinates, got "
                f"{self.latent_dim}; use AutoGaussianMixture in 1-D"
            )
        loc = self._init_loc()
        draws = prior_draws(self, 64, args, kwargs).to(loc)
        spread = draws.std(0).clamp(min=1e-3) * 3.0 / self._layer_options["bound"]
        self.shift = PyroParam(loc, constraints.real)
        self.scale = PyroParam(spread, constraints.softplus_positive)
        self.layers = nn.ModuleList(
            RADCoupling(self.latent_dim, parity=i % 2, **self._layer_options)
            for i in range(self.num_layers)
        ).to(loc)

    def get_posterior(self, *args: Any, **kwargs: Any) -> RADFlow:
        """The RAD flow over the unconstrained latent vector (a fresh distribution)."""
        shift = AffineTransform(self.shift, self.scale, event_dim=1)
        return RADFlow([*self.layers, shift])
