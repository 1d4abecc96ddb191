r"""Shared set-up of the mixture autoguides: spread-out components, median and quantiles."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pyro.poutine as poutine
import torch
from pyro.distributions import constraints
from pyro.infer.autoguide import AutoContinuous
from pyro.infer.autoguide.initialization import InitMessenger, init_to_median, init_to_uniform
from pyro.nn import PyroParam
from sklearn.cluster import KMeans
from torch.distributions import biject_to

from pyro_mixflow._checks import check_positive_int

__all__: list[str] = []


class _QuantilesFromDraws:
    """``median`` and ``quantiles`` (Pyro's API) from coordinate-wise marginal quantiles."""

    def _marginal_quantiles(self, probs: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Coordinate-wise quantiles of the unconstrained latent, shape ``(Q, D)``.

        Monte Carlo from ``quantile_samples`` draws; subclasses with a closed form override.
        """
        draws = self.get_posterior(*args, **kwargs).sample((self._quantile_samples,))  # [N, D]
        return torch.quantile(draws, probs.to(draws), dim=0)

    @torch.no_grad()
    def quantiles(
        self, quantiles: Sequence[float] | torch.Tensor, *args: Any, **kwargs: Any
    ) -> dict[str, torch.Tensor]:
        """Coordinate-wise posterior quantiles of each latent site (Pyro's API).

        Quantiles of each unconstrained coordinate's marginal, mapped to the constrained
        space as Pyro's own ``AutoContinuous.quantiles`` does.

        Args:
            quantiles: Probabilities in ``(0, 1)``.
            *args: The model's arguments.
            **kwargs: The model's keyword arguments.

        Returns:
            A dict from site name to a tensor with a leading dimension of ``len(quantiles)``.
        """
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        probs = torch.as_tensor(quantiles, dtype=torch.float64)
        if probs.dim() != 1 or not bool(((probs > 0) & (probs < 1)).all()):
            raise ValueError(f"`quantiles` must be a list of numbers in (0, 1), got {quantiles!r}")
        latents = self._marginal_quantiles(probs, *args, **kwargs)  # [Q, D]
        result: dict[str, list[torch.Tensor]] = {}
        for latent in latents:
            for site, unconstrained in self._unpack_latent(latent):
                value = biject_to(site["fn"].support)(unconstrained)
                result.setdefault(site["name"], []).append(value)
        return {name: torch.stack(values) for name, values in result.items()}

    @torch.no_grad()
    def median(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        """Coordinate-wise posterior median of each latent site (Pyro's API).

        Args:
            *args: The model's arguments.
            **kwargs: The model's keyword arguments.

        Returns:
            A dict from site name to its median.
        """
        return {name: value[0] for name, value in self.quantiles([0.5], *args, **kwargs).items()}


class _AutoMixture(_QuantilesFromDraws, AutoContinuous):
    """An AutoContinuous guide whose latent distribution has ``num_components`` components.

    Subclasses build the posterior in :meth:`get_posterior`; this class creates ``locs``
    (spread over the prior by :meth:`_prior_cover`: identical components would receive
    identical gradients and never separate) and ``scales``, and implements :meth:`median`
    and :meth:`quantiles` from the posterior's coordinate-wise marginal quantiles.
    """

    def __init__(
        self,
        model: Callable[..., Any],
        num_components: int = 8,
        *,
        init_loc_fn: Callable[[dict], torch.Tensor] = init_to_median,
        init_scale: float = 0.5,
        init_spread: float = 1.0,
        quantile_samples: int = 10000,
    ) -> None:
        check_positive_int("num_components", num_components)
        check_positive_int("quantile_samples", quantile_samples)
        if not _is_number(init_scale) or not init_scale > 0:
            raise ValueError(f"`init_scale` must be a positive number, got {init_scale!r}")
        if not _is_number(init_spread) or not init_spread >= 0:
            raise ValueError(f"`init_spread` must be a non-negative number, got {init_spread!r}")
        self.num_components = num_components
        self._raw_model = (model,)  # a tuple, so that the model is not a submodule
        self._init_scale = float(init_scale)
        self._init_spread = float(init_spread)
        self._quantile_samples = quantile_samples
        super().__init__(model, init_loc_fn=init_loc_fn)

    def _setup_prototype(self, *args: Any, **kwargs: Any) -> None:
        super()._setup_prototype(*args, **kwargs)
        loc = self._init_loc()  # [D]
        centres = self._prior_cover(*args, **kwargs).to(loc)  # [K, D]
        # PyroParams (not nn.Parameters) also work under `module_local_params`.
        self.locs = PyroParam(loc + self._init_spread * (centres - loc), constraints.real)
        self.scales = PyroParam(
            torch.full_like(self.locs, self._init_scale), constraints.softplus_positive
        )

    def _prior_cover(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``K`` points spread over the prior: k-means centres of ``20 K`` prior draws.

        Independent prior draws leave whole regions empty by chance (with ``K = 8`` in 2-D,
        a quadrant gets none one time in ten); k-means centres stratify the prior, so every
        region of prior mass has a component nearby to start from.
        """
        draws = _prior_draws(self, 20 * self.num_components, args, kwargs)
        seed = int(torch.randint(2**31 - 1, ()))
        kmeans = KMeans(self.num_components, n_init=1, random_state=seed)
        kmeans.fit(draws.double().cpu().numpy())
        return torch.as_tensor(kmeans.cluster_centers_)



def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _prior_draws(guide: AutoContinuous, num_draws: int, args: tuple, kwargs: dict) -> torch.Tensor:
    """Draws of the model's latents from the prior, as unconstrained vectors ``(N, D)``.

    Sites whose prior cannot be sampled (``ImproperUniform``) get a uniform draw on
    ``(-2, 2)`` in unconstrained space, as Pyro's ``init_to_uniform`` does.
    """
    init = InitMessenger(_init_to_sample_or_uniform)(guide._raw_model[0])
    draws = []
    for _ in range(num_draws):
        with poutine.block():
            trace = poutine.trace(init).get_trace(*args, **kwargs)
        parts = []
        for name, site in guide.prototype_trace.iter_stochastic_nodes():
            value = trace.nodes[name]["value"].detach()
            parts.append(biject_to(site["fn"].support).inv(value).reshape(-1))
        draws.append(torch.cat(parts))
    return torch.stack(draws)


def _init_to_sample_or_uniform(site: dict) -> torch.Tensor:
    try:
        return site["fn"].sample().detach()
    except NotImplementedError:
        return init_to_uniform(site)
