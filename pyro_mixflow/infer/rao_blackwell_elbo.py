r"""An evidence lower bound with the guide's mixture index summed out (Rao-Blackwellized)."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import pyro
import pyro.poutine as poutine
import torch
from pyro.distributions.util import sum_rightmost
from pyro.infer import ELBO
from pyro.infer.autoguide import AutoContinuous
from pyro.poutine.util import prune_subsample_sites, site_is_subsample
from torch.distributions import biject_to

from pyro_mixflow.distributions.diag_normal_mixture import DiagNormalMixture
from pyro_mixflow.infer.auto_normal_mixture import AutoNormalMixture, SiteBranches, component_draws

__all__ = ["LatentScores", "RaoBlackwellELBO", "score_latents"]

_PARTICLES = "_rao_blackwell_particles"


class RaoBlackwellELBO(ELBO):
    r"""The ELBO of a mixture guide with the component index summed out exactly.

    For a guide :math:`q(u) = \sum_k w_k q_k(u)` over the unconstrained latent vector of an
    :class:`~pyro.infer.autoguide.AutoContinuous` guide, and :math:`x = T(u)` the constrained
    values of the model's latent sites,

    .. math::

        \mathcal{L} = E_q\big[\log p(x, y) - \log q_x(x)\big]
                    = E\Big[\sum_{k=1}^K w_k \big(\log p(T(u_k), y)
                      + \log|\det J_T(u_k)| - \log q(u_k)\big)\Big],

    where :math:`(u_k, \log w_k)` are the branch values of one draw from the guide
    distribution's ``rao_blackwell`` (one reparameterized draw per component for a
    :class:`~pyro_mixflow.DiagNormalMixture` or a flow over one, all branches of one base draw
    for a :class:`~pyro_mixflow.ClassifierWeightedMixture`). The estimate is unbiased, and
    its gradient is too: the weights' gradient is the exact
    :math:`\sum_k \nabla w_k \,(\dots)`, with no score function, no relaxation and no
    heavy-tailed implicit term. The cost is ``K`` model evaluations per particle, run as one
    vectorized batch of ``num_particles * K`` (the model must broadcast over a leading plate,
    as for Pyro's ``vectorize_particles``). The entropy part
    :math:`\sum_k w_k \log q(u_k)` comes from the distribution's ``rao_blackwell_log_prob``
    (exact for diagonal mixtures and flows, an unbiased :math:`O(K)`-classifier-call estimate
    for classifier weighted mixtures).

    **Local latents** (a mixture per plate element): for
    :class:`~pyro_mixflow.infer.AutoNormalMixture`, and for any guide that draws sites inside
    a ``pyro.plate`` from a :class:`~pyro_mixflow.DiagNormalMixture` (an amortized encoder,
    e.g. a conditional :class:`~pyro_mixflow.nn.GMM` of the data), every element's index is
    summed out on its own. Each element draws one value per component; the model runs on
    every combination of the *sites'* branches (:math:`\prod_l K_l` rows per particle for
    the local sites :math:`l`, one vectorized run, the plates' subsample indices replayed
    from the guide); each term of the model is weighted, element by element, by the weights
    of the branches it sees (those of the local sites whose plates contain none outside the
    term's). Exact for every model whose terms each see one element of each local site, as
    plates declare; a term that depends on the branches of a site it cannot weight (say a
    site outside a plate summing its elements) raises ``ValueError``. Sites outside plates
    and sites of other distributions keep one reparameterized draw per particle. The
    mixtures' parameters must not depend on the guide's other draws.

    Why not ``TraceEnum_ELBO`` with an enumerated index: a guide that samples
    :math:`k \sim w` as an enumerated site and then :math:`u \sim q_k` scores the pair with
    :math:`\log w_k + \log q_k(u)`, the *joint* density, so the objective is
    :math:`\mathcal{L} + H(w)`-like and no longer a bound (it can be negative where the true
    KL is not). Here every branch is scored with the mixture density :math:`\log q(u_k)`.

    Args:
        num_particles: Draws of the guide per step (each gives ``K`` model evaluations).
        max_plate_nesting: Plate nesting of the model; guessed from a first run when infinite.
        stick_the_landing: Drop the score term of the entropy part's gradient, "sticking the
            landing" (Roeder, Wu & Duvenaud 2017, arXiv:1703.09194): the gradient of
            :math:`\sum_k w_k \log q_\phi(u_k)` through the guide's parameters :math:`\phi`
            at fixed :math:`u_k` is :math:`\sum_k w_k \nabla_\phi \log q_\phi(u_k)`, of
            expectation :math:`E_q[\nabla_\phi \log q_\phi] = 0`; without it the gradient
            stays unbiased, and vanishes for every draw where :math:`q` is the posterior. The
            estimate itself is unchanged. For :class:`~pyro.infer.autoguide.AutoContinuous`
            mixture guides (one more evaluation of the guide's density per step).
        ignore_jit_warnings: Unused; for signature compatibility with Pyro's ELBOs.

    Example:
        >>> import pyro, pyro.distributions as dist
        >>> from pyro.infer import SVI
        >>> from pyro_mixflow.infer import AutoGaussianMixture
        >>> def model():
        ...     pyro.sample("x", dist.Normal(0.0, 1.0))
        >>> guide = AutoGaussianMixture(model, num_components=2)
        >>> elbo = RaoBlackwellELBO(num_particles=4)
        >>> svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), elbo)
        >>> isinstance(svi.step(), float)
        True

    References:
        Rao-Blackwellised stratified sampling of mixture guides: see Morningstar, Vikram,
        Ham, Gallagher, Dillon, "Automatic Differentiation Variational Inference with
        Mixtures", AISTATS 2021 (arXiv:2003.01687).
    """

    def __init__(
        self,
        num_particles: int = 1,
        max_plate_nesting: float = float("inf"),
        *,
        stick_the_landing: bool = False,
        ignore_jit_warnings: bool = False,
    ) -> None:
        if not isinstance(stick_the_landing, bool):
            raise TypeError(f"`stick_the_landing` must be a bool, got {stick_the_landing!r}")
        self.stick_the_landing = stick_the_landing
        if isinstance(num_particles, bool) or not isinstance(num_particles, int):
            raise TypeError(f"`num_particles` must be an int, got {num_particles!r}")
        if num_particles < 1:
            raise ValueError(f"`num_particles` must be positive, got {num_particles}")
        super().__init__(
            num_particles=num_particles,
            max_plate_nesting=max_plate_nesting,
            vectorize_particles=False,
            ignore_jit_warnings=ignore_jit_warnings,
        )

    def loss(self, model: Any, guide: Any, *args: Any, **kwargs: Any) -> float:
        """Returns the negative ELBO estimate (no gradients).

        Args:
            model: The Pyro model.
            guide: A mixture guide of :mod:`pyro_mixflow.infer`, or a guide drawing local
                sites from :class:`~pyro_mixflow.DiagNormalMixture` distributions.
            *args: The model's arguments.
            **kwargs: The model's keyword arguments.

        Returns:
            The loss as a float.
        """
        with torch.no_grad():
            return self.differentiable_loss(model, guide, *args, **kwargs).item()

    def loss_and_grads(self, model: Any, guide: Any, *args: Any, **kwargs: Any) -> float:
        """Returns the negative ELBO estimate and backpropagates its gradient.

        Args:
            model: The Pyro model.
            guide: A mixture guide (see :meth:`loss`).
            *args: The model's arguments.
            **kwargs: The model's keyword arguments.

        Returns:
            The loss as a float.
        """
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        if loss.requires_grad:
            loss.backward()
        return loss.item()

    def differentiable_loss(
        self, model: Any, guide: Any, *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        """Returns the negative ELBO estimate as a differentiable scalar tensor.

        Args:
            model: The Pyro model.
            guide: A mixture guide (see :meth:`loss`).
            *args: The model's arguments.
            **kwargs: The model's keyword arguments.

        Returns:
            A scalar tensor.
        """
        return -self.elbo_terms(model, guide, *args, **kwargs).mean()

    def elbo_terms(self, model: Any, guide: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        r"""The per-particle Rao-Blackwellized ELBO estimates, shape ``(num_particles,)``.

        For an :class:`~pyro.infer.autoguide.AutoContinuous` mixture guide,

        .. math:: \hat{\mathcal{L}}_s = \sum_k w_{sk} \big(\log p(T(u_{sk}), y)
                  + \log|\det J_T(u_{sk})|\big) - \widehat{\sum_k w_{sk} \log q(u_{sk})}.

        and for local mixtures the per-element weighting of the class docstring. Their mean
        is the estimate; their spread gives its standard error.

        Args:
            model: The Pyro model.
            guide: A mixture guide (see :meth:`loss`).
            *args: The model's arguments.
            **kwargs: The model's keyword arguments.

        Returns:
            Tensor of shape ``(num_particles,)``, differentiable in the guide's and the
            model's parameters.
        """
        if self.max_plate_nesting == float("inf"):
            self._guess_max_plate_nesting(model, guide, args, kwargs)
        if not isinstance(guide, AutoContinuous):
            if self.stick_the_landing:
                raise ValueError(
                    "`stick_the_landing` applies to AutoContinuous mixture guides, not to "
                    f"{_name_of(guide)}"
                )
            return _per_element_elbo_terms(
                model, guide, self.num_particles, int(self.max_plate_nesting), args, kwargs
            )
        posterior = _posterior_of(guide, args, kwargs)
        values, log_weights = posterior.rao_blackwell((self.num_particles,))  # [S, K, D], [S, K]
        num_particles, num_components, dim = values.shape
        scores = score_latents(
            model, guide, values.reshape(-1, dim), int(self.max_plate_nesting), args, kwargs
        )
        log_weights_flat = log_weights.reshape(num_particles, num_components)
        branch = (scores.log_joint + scores.log_det).reshape(num_particles, num_components)
        entropy_part = posterior.rao_blackwell_log_prob(values, log_weights)  # [S]
        if self.stick_the_landing:  # minus its score term: value 0, gradient at fixed draws
            score = posterior.rao_blackwell_log_prob(values.detach(), log_weights.detach())
            entropy_part = entropy_part - (score - score.detach())
        return (log_weights_flat.exp() * branch).sum(-1) - entropy_part

    def _get_trace(self, model: Any, guide: Any, args: tuple, kwargs: dict) -> Any:
        raise NotImplementedError("RaoBlackwellELBO evaluates branch values, not guide traces")


class LatentScores(NamedTuple):
    """The model's log-densities at ``n`` unconstrained latent vectors (each ``(n,)``)."""

    log_joint: torch.Tensor  # log p(T(u), y): every site of the model
    log_det: torch.Tensor  # log |det J_T(u)|
    latent_log_prob: dict[str, torch.Tensor]  # each latent site's own log-density at T(u)
    latent_log_det: dict[str, torch.Tensor]  # each latent site's part of log_det


def score_latents(
    model: Any,
    guide: AutoContinuous,
    values: torch.Tensor,
    max_plate_nesting: int,
    args: tuple,
    kwargs: dict,
) -> LatentScores:
    """The model's log-densities at ``values`` ``(n, D)``, in one vectorized run of the model.

    The rows are unpacked by the guide's prototype into the model's latent sites, mapped to
    their supports (``biject_to``), and the model runs once under a plate of size ``n`` to the
    left of its own ``max_plate_nesting`` plates, conditioned on them (it must broadcast over
    that plate, as for Pyro's ``vectorize_particles``). Differentiable in ``values`` and in
    the model's parameters.

    Raises:
        ValueError: If the model has a latent site the guide does not cover.
    """
    n = values.shape[0]
    latent = values.reshape((n,) + (1,) * max_plate_nesting + values.shape[-1:])
    conditioned, log_det = {}, values.new_zeros(n)
    site_log_det = {}
    for site, unconstrained in guide._unpack_latent(latent):
        transform = biject_to(site["fn"].support)
        value = transform(unconstrained)
        ladj = transform.log_abs_det_jacobian(unconstrained, value)
        ladj = sum_rightmost(ladj, ladj.dim() - value.dim() + site["fn"].event_dim)
        site_log_det[site["name"]] = _per_particle(ladj, n)
        log_det = log_det + site_log_det[site["name"]]
        conditioned[site["name"]] = value

    def particle_model() -> Any:
        with pyro.plate(_PARTICLES, n, dim=-(max_plate_nesting + 1)):
            return model(*args, **kwargs)

    model_trace = poutine.trace(poutine.condition(particle_model, conditioned)).get_trace()
    model_trace = prune_subsample_sites(model_trace)
    model_trace.compute_log_prob()
    log_joint = values.new_zeros(n)
    latent_log_prob = {}
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample":
            continue
        if not site["is_observed"]:
            raise ValueError(
                f"model site {name!r} is neither observed nor a latent of the guide; "
                "RaoBlackwellELBO supports continuous latents covered by the guide only"
            )
        term = _per_particle(site["log_prob"], n)
        if name in conditioned:
            latent_log_prob[name] = term
        log_joint = log_joint + term
    return LatentScores(log_joint, log_det, latent_log_prob, site_log_det)


def _per_element_elbo_terms(
    model: Any,
    guide: Any,
    num_particles: int,
    max_plate_nesting: int,
    args: tuple,
    kwargs: dict,
) -> torch.Tensor:
    r"""The per-particle ELBO of a guide of local mixtures, each element's index summed out.

    The rows (every combination of the local sites' branches, from
    :meth:`AutoNormalMixture.rao_blackwell` or :func:`_guide_site_branches`) run through the
    model in one vectorized pass, with the plates' subsample indices replayed from the
    guide. A model term ``t`` (a site's log-density, subsampling scale included) in plates
    :math:`P_t` sees the local sites whose plates are a subset of :math:`P_t`; on each of
    their grid axes it is weighted by the weights of the element it sees, and it must not
    vary along the other local sites' axes (checked: such a term would depend on whole
    plates of another site's elements, whose indices are not summed out element by
    element). The guide's own part is :math:`\sum_k w_{ik} (\log q_i(u_i^{(k)}) -
    \log|\det J|)` per element of a local site, and the one draw's for any other site.

    Returns:
        Tensor of shape ``(num_particles,)``.

    Raises:
        ValueError: If a model site is neither observed nor a latent of the guide, or a term
            varies along a local site it cannot weight.
    """
    if isinstance(guide, AutoNormalMixture):
        tracer = poutine.trace(guide.rao_blackwell)
        with guide._pyro_context:
            sites: list[SiteBranches] = tracer(num_particles, *args, **kwargs)
        guide_trace = tracer.trace
    else:
        guide_trace, sites = _guide_site_branches(
            guide, num_particles, max_plate_nesting, args, kwargs
        )
    subsamples = guide_trace.copy()  # the plates' subsample indices, to replay into the model
    for name, node in guide_trace.nodes.items():
        if node["type"] != "sample" or name == _PARTICLES or not site_is_subsample(node):
            subsamples.remove_node(name)
    local = [site for site in sites if site.axis is not None]
    grid = (num_particles,) + tuple(site.log_weights.shape[1] for site in local)
    rows = math.prod(grid)
    conditioned = {  # the particle plate sits left of the model's own plates
        site.name: site.value.reshape(
            (rows,) + (1,) * (max_plate_nesting - len(site.batch_shape)) + site.value.shape[1:]
        )
        for site in sites
    }

    def particle_model() -> Any:
        with pyro.plate(_PARTICLES, rows, dim=-(max_plate_nesting + 1)):
            return model(*args, **kwargs)

    replayed = poutine.replay(poutine.condition(particle_model, conditioned), trace=subsamples)
    model_trace = prune_subsample_sites(poutine.trace(replayed).get_trace())
    model_trace.compute_log_prob()
    total = -sum(  # the guide's part: log q - log|J| per element, weighted by its branches
        (site.log_weights.exp() * site.guide_log_density).reshape(num_particles, -1).sum(-1)
        if site.axis is not None
        else site.guide_log_density.reshape(num_particles, -1).sum(-1)
        for site in sites
    )
    names = {site.name for site in sites}
    for name, node in model_trace.nodes.items():
        if node["type"] != "sample":
            continue
        if not node["is_observed"] and name not in names:
            raise ValueError(
                f"model site {name!r} is neither observed nor a latent of the guide; "
                "RaoBlackwellELBO supports continuous latents covered by the guide only"
            )
        log_prob = torch.as_tensor(node["log_prob"])
        log_prob = log_prob[(None,) * (max_plate_nesting + 1 - log_prob.dim())]
        term = log_prob.expand((rows,) + log_prob.shape[1:]).reshape(grid + log_prob.shape[1:])
        plates = {frame.name for frame in node["cond_indep_stack"] if frame.vectorized}
        for site in local:
            axis = 1 + site.axis
            if site.plates <= plates:  # sees one element of the site: weight by its branch
                weights = site.log_weights.exp()  # [S, K, *B]
                weights = weights.reshape(
                    weights.shape[:1]
                    + (1,) * (axis - 1)
                    + weights.shape[1:2]
                    + (1,) * (len(grid) - axis - 1)
                    + (1,) * (max_plate_nesting - len(site.batch_shape))
                    + site.batch_shape
                )
                term = (term * weights).sum(axis, keepdim=True)
            else:  # must not depend on the site's branch
                first = term.narrow(axis, 0, 1)
                tolerance = 1e3 * torch.finfo(term.dtype).eps * (1 + first.detach().abs())
                if bool(((term - first).detach().abs() > tolerance).any()):
                    raise ValueError(
                        f"model site {name!r} (plates {sorted(plates)}) depends on the "
                        f"latent site {site.name!r} of plates {sorted(site.plates)} outside "
                        "them; RaoBlackwellELBO sums each element's index out only for terms "
                        "that see one element of each local site. Train with Trace_ELBO"
                    )
                term = first
        total = total + term.reshape(num_particles, -1).sum(-1)
    return total


def _guide_site_branches(
    guide: Any, num_particles: int, max_plate_nesting: int, args: tuple, kwargs: dict
) -> tuple[Any, list[SiteBranches]]:
    """The rows of a guide whose local sites are drawn from :class:`DiagNormalMixture` s.

    The guide runs once under a plate of ``num_particles`` particles; every sample site in a
    plate whose distribution is a ``DiagNormalMixture`` gets one draw per element and
    component on its own grid axis (as :meth:`AutoNormalMixture.rao_blackwell` lays them
    out); every other latent site keeps its (reparameterized) draw on all of its particle's
    rows. The mixtures' parameters must not depend on the guide's other draws (an encoder of
    the data, as in amortized inference, is fine).
    """

    def particle_guide() -> Any:
        with pyro.plate(_PARTICLES, num_particles, dim=-(max_plate_nesting + 1)):
            return guide(*args, **kwargs)

    guide_trace = poutine.trace(particle_guide).get_trace()
    names = [
        name
        for name, node in guide_trace.nodes.items()
        if node["type"] == "sample" and not node["is_observed"] and not site_is_subsample(node)
    ]
    plates = {
        name: frozenset(f.name for f in guide_trace.nodes[name]["cond_indep_stack"] if f.vectorized)
        - {_PARTICLES}
        for name in names
    }
    local = [
        name
        for name in names
        if plates[name] and isinstance(guide_trace.nodes[name]["fn"], DiagNormalMixture)
    ]
    if not local:
        raise TypeError(
            f"`RaoBlackwellELBO` found no index to sum out in {_name_of(guide)}: it needs a "
            "mixture guide of pyro_mixflow.infer, or a guide that draws local sites (in a "
            "pyro.plate) from DiagNormalMixture distributions"
        )
    auxiliary = [name for name in local if guide_trace.nodes[name]["infer"].get("is_auxiliary")]
    if auxiliary:
        raise TypeError(
            f"the guide's mixture sites {auxiliary} are auxiliary: other guide sites are "
            "computed from their draws, which RaoBlackwellELBO replaces by one draw per "
            "component; draw the model's sites from the mixtures directly"
        )
    grid = (num_particles,) + tuple(
        guide_trace.nodes[name]["fn"].logits.shape[-1] for name in local
    )
    sites = []
    for name in names:
        node = guide_trace.nodes[name]
        fn, scale = node["fn"], node["scale"]
        batch_shape = fn.batch_shape[1:]  # right of the particles: the model's plate dims
        if name in local:
            axis = local.index(name)
            flat, log_weights, log_q = component_draws(fn, num_particles)  # [S, K, *B, (D)]
            spread = (num_particles,) + (1,) * axis + grid[1 + axis : 2 + axis]
            spread += (1,) * (len(local) - axis - 1)
            value = flat.reshape(spread + flat.shape[2:])
        else:
            if not fn.has_rsample:
                raise TypeError(
                    f"guide site {name!r} ({type(fn).__name__}) has no rsample; "
                    "RaoBlackwellELBO needs reparameterized guide sites"
                )
            axis, log_weights, value = None, None, node["value"]
            log_q = fn.log_prob(value)  # [S, *B]
            value = value.reshape((num_particles,) + (1,) * len(local) + value.shape[1:])
        value = value.expand(grid + value.shape[len(grid) :])
        sites.append(
            SiteBranches(
                name,
                value.reshape((-1,) + value.shape[len(grid) :]),
                log_weights,
                _scaled(log_q, scale, name),
                batch_shape,
                plates[name],
                axis,
            )
        )
    return guide_trace, sites


def _name_of(guide: Any) -> str:
    """A guide's name for messages: its class, or its function's name."""
    if isinstance(guide, torch.nn.Module):
        return type(guide).__name__
    return getattr(guide, "__name__", type(guide).__name__)


def _scaled(log_density: torch.Tensor, scale: Any, name: str) -> torch.Tensor:
    """A guide site's log-density ``[S, (K,) *B]`` times its scale (subsampling, poutine.scale)."""
    if isinstance(scale, torch.Tensor) and scale.dim() > 0:
        raise ValueError(
            f"guide site {name!r} has a tensor scale of shape {tuple(scale.shape)}; "
            "RaoBlackwellELBO supports a scalar scale per site"
        )
    return log_density * scale


def _posterior_of(guide: AutoContinuous, args: tuple, kwargs: dict) -> Any:
    """The guide's distribution over its unconstrained latent vector.

    Read inside the module's context, so that its parameters are registered with the active
    handlers (SVI's parameter capture), as in a guide call.
    """
    with guide._pyro_context:
        if guide.prototype_trace is None:
            guide._setup_prototype(*args, **kwargs)
        posterior = guide.get_posterior(*args, **kwargs)
    for method in ("rao_blackwell", "rao_blackwell_log_prob"):
        if not hasattr(posterior, method):
            raise TypeError(
                f"the guide's posterior {type(posterior).__name__} has no `{method}`; "
                "use a mixture guide from pyro_mixflow.infer"
            )
    if posterior.batch_shape != torch.Size():
        raise ValueError(f"the guide's posterior must be unbatched, got {posterior.batch_shape}")
    return posterior


def _per_particle(log_prob: torch.Tensor | float, n: int) -> torch.Tensor:
    """Sums a site's log-density over all but the leading (particle) dimension."""
    if not isinstance(log_prob, torch.Tensor) or log_prob.dim() == 0:
        return torch.as_tensor(log_prob).expand(n)
    return log_prob.reshape(log_prob.shape[0], -1).sum(-1).expand(n)
