r"""Guide draws as ArviZ data (``InferenceData``), one chain per guide."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pyro
import torch

from pyro_mixflow.diagnostics._arviz import from_dict
from pyro_mixflow.diagnostics._sampling import check_distinct_parameters, draw_guide

__all__ = ["to_inference_data"]


def to_inference_data(
    model: Callable,
    guide: Callable | Sequence[Callable],
    *args: Any,
    num_samples: int = 1000,
    max_plate_nesting: int | None = None,
    chunk_size: int | None = None,
    **kwargs: Any,
) -> Any:
    r"""Draws of ``guide`` as ArviZ data, for ``az.summary``, ``az.plot_pair`` and friends.

    Each guide contributes one chain of ``num_samples`` independent draws
    :math:`z_n \sim q`; pass several independently trained guides (restarts) to see in
    ``az.summary`` / ``az.plot_pair`` whether they agree — an R-hat far from 1 across restarts
    means they found different solutions (a rank statistic across chains of i.i.d. draws, not a
    convergence diagnostic of MCMC).

    Groups:

    - ``posterior``: every latent (and ``pyro.deterministic``) site of the model, named as in
      the model, in constrained space, shaped ``(chain, draw, *site_shape)``; dimensions that
      belong to a ``pyro.plate`` take the plate's name.
    - ``sample_stats``: ``lp`` :math:`= \log p(x, z_n)` and ``log_weight``
      :math:`= \log p(x, z_n) - \log q(z_n)`, shaped ``(chain, draw)``.

    Args:
        model: Pyro model.
        guide: a Pyro guide for ``model``, or a sequence of them (one chain each); the guides
            must give the same latent sites and shapes, and must not share parameters (build
            and train ``PyroModule`` restarts such as autoguides under
            ``pyro.settings.context(module_local_params=True)``).
        *args: positional arguments of the model and guide.
        num_samples: draws per guide.
        max_plate_nesting: bound on nested ``pyro.plate`` contexts; ``None`` guesses it.
        chunk_size: draws per vectorized pass (bounds memory); ``None`` draws all at once.
        **kwargs: keyword arguments of the model and guide.

    Returns:
        ``arviz.InferenceData`` (ArviZ 0.x) or ``xarray.DataTree`` (ArviZ 1.x).

    Example:
        >>> import pyro
        >>> import pyro.distributions as dist
        >>> from pyro.infer.autoguide import AutoNormal
        >>> def model(x):
        ...     scale = pyro.sample("scale", dist.HalfNormal(1.0))
        ...     with pyro.plate("data", len(x)):
        ...         pyro.sample("x", dist.Normal(0.0, scale), obs=x)
        >>> with pyro.settings.context(module_local_params=True):  # restarts: own parameters
        ...     guides = [AutoNormal(model), AutoNormal(model)]
        ...     data = to_inference_data(model, guides, torch.randn(10), num_samples=100)
        >>> dict(data.posterior["scale"].sizes)
        {'chain': 2, 'draw': 100}
        >>> bool((data.posterior["scale"] > 0).all())
        True
    """
    guides = list(guide) if isinstance(guide, Sequence) else [guide]
    if not guides:
        raise ValueError("`guide` is an empty sequence; pass a guide or a list of guides")
    if not all(callable(g) for g in guides):
        raise TypeError(f"`guide` must be callable or a sequence of callables, got {guide!r}")
    check_distinct_parameters(guides, "guide")
    chains = [
        draw_guide(
            model,
            g,
            args,
            kwargs,
            num_samples=num_samples,
            max_plate_nesting=max_plate_nesting,
            chunk_size=chunk_size,
        )
        for g in guides
    ]
    first = chains[0]
    for i, chain in enumerate(chains[1:], start=1):
        shapes = {name: tuple(v.shape) for name, v in chain.latents.items()}
        expected = {name: tuple(v.shape) for name, v in first.latents.items()}
        if shapes != expected:
            raise ValueError(
                f"`guide[{i}]` gives latent sites {shapes}, but `guide[0]` gives {expected}"
            )
    posterior = {
        name: torch.stack([c.latents[name] for c in chains]).cpu().numpy() for name in first.latents
    }
    sample_stats = {
        "lp": torch.stack([c.log_joint for c in chains]).cpu().numpy(),
        "log_weight": torch.stack([c.log_weights for c in chains]).cpu().numpy(),
    }
    attrs = {
        "inference_library": "pyro",
        "inference_library_version": pyro.__version__,
        "guides": ", ".join(getattr(g, "__name__", type(g).__name__) for g in guides),
    }
    return from_dict(posterior, sample_stats=sample_stats, dims=first.dims, attrs=attrs)
