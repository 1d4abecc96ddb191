r"""Vectorized draws of a guide, scored by its model: log weights and latent values."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pyro
import torch
from pyro import poutine
from pyro.infer.importance import vectorized_importance_weights
from pyro.infer.util import plate_log_prob_sum
from pyro.nn import PyroModule
from pyro.poutine import Trace
from pyro.poutine.util import prune_subsample_sites

__all__ = ["GuideDraws", "check_distinct_parameters", "draw_guide"]


@dataclass(frozen=True)
class GuideDraws:
    r"""``num_samples`` guide draws scored by the model.

    Attributes:
        log_joint: ``(N,)`` :math:`\log p(x, z_n)` (observed and latent sites, plates summed).
        log_guide: ``(N,)`` :math:`\log q(z_n)` (every guide site, auxiliary ones included).
        latents: ``{name: (N, *shape)}`` latent and deterministic model sites, constrained space,
            in model order.
        dims: ``{name: [dim name, ...]}`` names of ``shape`` (plate names where they apply).
        deterministic: names of the ``pyro.deterministic`` sites among ``latents``.
    """

    log_joint: torch.Tensor
    log_guide: torch.Tensor
    latents: dict[str, torch.Tensor]
    dims: dict[str, list[str]]
    deterministic: tuple[str, ...] = ()

    @property
    def log_weights(self) -> torch.Tensor:
        r"""``(N,)`` log importance weights :math:`\log p(x, z_n) - \log q(z_n)`."""
        return self.log_joint - self.log_guide


@torch.no_grad()
def draw_guide(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    *,
    num_samples: int,
    max_plate_nesting: int | None = None,
    chunk_size: int | None = None,
) -> GuideDraws:
    r"""Draw ``num_samples`` from ``guide`` in vectorized chunks and score them under ``model``.

    The model and guide run inside one extra ``pyro.plate`` left of every model plate, as in
    :func:`pyro.infer.importance.vectorized_importance_weights`; both must be vectorizable
    (static structure, shapes that broadcast on the left).

    Args:
        model: Pyro model.
        guide: Pyro guide for ``model``.
        args: positional arguments of both.
        kwargs: keyword arguments of both.
        num_samples: number of draws :math:`N \ge 2`.
        max_plate_nesting: bound on nested plates; ``None`` guesses it from one trace.
        chunk_size: draws per vectorized pass (bounds memory); ``None`` draws all at once.

    Returns:
        The draws.
    """
    if not isinstance(num_samples, int) or num_samples < 2:
        raise ValueError(f"`num_samples` must be an integer >= 2, got {num_samples!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 2):
        raise ValueError(f"`chunk_size` must be an integer >= 2 or None, got {chunk_size!r}")
    probe_guide, probe_model = _probe(model, guide, args, kwargs)
    if max_plate_nesting is None:
        max_plate_nesting = _max_plate_nesting(probe_guide, probe_model)
    sites = _latent_sites(probe_model)
    chunk_size = num_samples if chunk_size is None else chunk_size
    log_joint, log_guide, values = [], [], {name: [] for name in sites}
    for start in range(0, num_samples, chunk_size):
        size = min(chunk_size, num_samples - start)
        if size == 1:  # Pyro sums a single particle over everything: draw one spare, drop it
            size = 2
        try:
            _, model_trace, guide_trace = vectorized_importance_weights(
                model, guide, *args, num_samples=size, max_plate_nesting=max_plate_nesting, **kwargs
            )
        except (ValueError, RuntimeError) as error:
            raise ValueError(
                f"drawing {size} guide samples in parallel failed ({error}); the model and the "
                f"guide must be vectorizable (static structure; shapes that broadcast on the "
                f"left, e.g. no `.unsqueeze(-1)` on a latent outside its plate) and "
                f"`max_plate_nesting` ({max_plate_nesting}) must bound their plates"
            ) from error
        symbol = guide_trace.plate_to_symbol["num_particles_vectorized"]
        log_joint.append(plate_log_prob_sum(model_trace, symbol))
        log_guide.append(plate_log_prob_sum(guide_trace, symbol))
        for name, site in sites.items():
            values[name].append(_per_draw(model_trace.nodes[name]["value"], size, site, name))
    stop = slice(0, num_samples)
    return GuideDraws(
        log_joint=torch.cat(log_joint)[stop],
        log_guide=torch.cat(log_guide)[stop],
        latents={name: torch.cat(v)[stop] for name, v in values.items()},
        dims={name: site["dims"] for name, site in sites.items()},
        deterministic=tuple(name for name, site in sites.items() if site["deterministic"]),
    )


def check_distinct_parameters(guides: list, argument: str) -> None:
    """Raise if two guides read the same parameters from Pyro's global param store.

    Two ``PyroModule`` guides with the same name (two ``AutoNormal(model)``, say) share their
    parameters unless ``pyro.settings.set(module_local_params=True)``: restarts trained that
    way are one guide trained several times, and comparing them shows nothing.
    """
    if pyro.settings.get("module_local_params"):
        return
    seen = {}
    for i, guide in enumerate(guides):
        name = getattr(guide, "_pyro_name", None)
        if not isinstance(guide, PyroModule) or not name:
            continue
        if name in seen:
            raise ValueError(
                f"`{argument}[{seen[name]}]` and `{argument}[{i}]` read the same parameters "
                f"(module name {name!r}) from Pyro's global param store, so they are one guide; "
                f"build and train each restart under "
                f"`pyro.settings.context(module_local_params=True)` (or give them distinct "
                f"names) and compare them under the same setting"
            )
        seen[name] = i


def _probe(model: Callable, guide: Callable, args: tuple, kwargs: dict) -> tuple[Trace, Trace]:
    """One unvectorized run of the guide and of the model replayed on it (sets the guide up)."""
    with poutine.block():
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
            *args, **kwargs
        )
    return prune_subsample_sites(guide_trace), prune_subsample_sites(model_trace)


def _max_plate_nesting(*traces: Trace) -> int:
    dims = [
        frame.dim
        for trace in traces
        for site in trace.nodes.values()
        if site["type"] == "sample"
        for frame in site["cond_indep_stack"]
        if frame.vectorized
    ]
    return -min(dims) if dims else 0


def _latent_sites(model_trace: Trace) -> dict[str, dict]:
    """Latent and deterministic sample sites of the model: shape and dim names per site."""
    sites = {}
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample":
            continue
        deterministic = site["infer"].get("_deterministic", False)
        if site["is_observed"] and not deterministic:
            continue
        shape = tuple(site["value"].shape)
        event_dim = len(site["fn"].event_shape) if hasattr(site["fn"], "event_shape") else 0
        plates = {frame.dim: frame for frame in site["cond_indep_stack"] if frame.vectorized}
        dims = []
        for i, size in enumerate(shape):
            dim = i - len(shape) + event_dim  # negative batch dim, >= 0 for event dims
            frame = plates.get(dim) if dim < 0 else None
            if frame is not None and frame.size == size:
                dims.append(frame.name)
            else:
                dims.append(f"{name}_dim_{i}")
        sites[name] = {"shape": shape, "dims": dims, "deterministic": deterministic}
    return sites


def _per_draw(value: torch.Tensor, size: int, site: dict, name: str) -> torch.Tensor:
    """Reshape a vectorized value ``(size, 1, ..., *shape)`` to ``(size, *shape)``."""
    shape = site["shape"]
    numel = torch.Size(shape).numel()
    if value.numel() == numel:  # the same for every draw (e.g. a deterministic of the data)
        return value.reshape(shape).expand((size, *shape))
    if value.dim() == 0 or value.shape[0] != size or value.numel() != size * numel:
        raise ValueError(
            f"site `{name}` has vectorized shape {tuple(value.shape)}, which does not match "
            f"{size} draws of shape {shape}; is the model vectorizable (static structure, "
            f"shapes that broadcast on the left), and is `max_plate_nesting` large enough?"
        )
    return value.reshape((size, *shape))
