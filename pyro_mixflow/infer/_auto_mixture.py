r"""Shared set-up of the mixture autoguides: their options, spread-out components, quantiles."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, NamedTuple, TypedDict, Unpack

import pyro.poutine as poutine
import torch
from pyro.distributions import constraints
from pyro.infer.autoguide import AutoContinuous
from pyro.infer.autoguide.initialization import InitMessenger, init_to_median
from pyro.nn import PyroParam
from pyro.poutine.util import prune_subsample_sites
from torch.distributions import biject_to

from pyro_mixflow._checks import check_positive_int
from pyro_mixflow.distributions.diag_normal_mixture import DiagNormalMixture
from pyro_mixflow.fitting.em import em_diagonal
from pyro_mixflow.infer.rao_blackwell_elbo import score_latents

__all__ = [
    "AutoMixture",
    "InitKwargs",
    "InitOptions",
    "QuantilesFromDraws",
    "init_to_median_or_origin",
    "prior_draws",
    "reference_draws",
]

INIT_METHODS = ("tempered", "annealed")
_MIN_INIT_DRAWS = 1000
# Annealed start: Langevin moves per tempering stage, the ESS of each stage's incremental
# weights that sets the ladder (as a fraction of the particles), and a bound on the stages.
_ANNEALED_MOVES = 5
_ANNEALED_ESS = 0.5
_ANNEALED_MAX_STAGES = 500
_MIN_DISTINCT = 5  # distinct draws an initial component needs
# Scales of the broad reference that replaces an improper prior's draws (unconstrained units).
_REFERENCE_SCALES = (0.25, 1.0, 4.0, 16.0, 64.0)


def init_to_median_or_origin(site: dict) -> torch.Tensor:
    """Pyro's ``init_to_median``, or the origin of unconstrained space for a site whose prior
    cannot be sampled (``ImproperUniform``), where Pyro's ``init_to_*`` functions all raise.

    Example:
        >>> import pyro.distributions as dist
        >>> from pyro.distributions import constraints
        >>> flat = dist.ImproperUniform(constraints.positive, (), (2,))
        >>> init_to_median_or_origin({"fn": flat, "name": "x", "is_observed": False})
        tensor([1., 1.])
    """  # noqa: D205
    try:
        return init_to_median(site)
    except NotImplementedError:
        transform = biject_to(site["fn"].support)
        shape = transform.inverse_shape(site["fn"].shape())
        return transform(torch.zeros(shape))


class InitKwargs(TypedDict, total=False):
    """The names and types of ``**init_options``, for type checkers and editors (PEP 692)."""

    init_loc_fn: Callable[[dict], torch.Tensor]
    init_scale: float | None
    init_spread: float
    init_ess: float
    init_method: str
    quantile_samples: int


@dataclass(frozen=True)
class InitOptions:
    """The keyword-only options that every mixture autoguide takes, validated once.

    Their meaning is documented once, in :class:`~pyro_mixflow.infer.AutoGaussianMixture`
    (``**init_options``); :class:`~pyro_mixflow.infer.AutoRADFlow` takes ``init_loc_fn`` and
    ``quantile_samples`` only.
    """

    init_loc_fn: Callable[[dict], torch.Tensor] = init_to_median_or_origin
    init_scale: float | None = None
    init_spread: float = 1.0
    init_ess: float = 0.1
    init_method: str = "tempered"
    quantile_samples: int = 10000

    def __post_init__(self) -> None:
        if not callable(self.init_loc_fn):
            raise TypeError(
                f"`init_loc_fn` must be callable, got {type(self.init_loc_fn).__name__}"
            )
        init_scale, init_spread, init_ess = self.init_scale, self.init_spread, self.init_ess
        if init_scale is not None and (not _is_number(init_scale) or not init_scale > 0):
            raise ValueError(f"`init_scale` must be None or a positive number, got {init_scale!r}")
        if not _is_number(init_spread) or not init_spread >= 0:
            raise ValueError(f"`init_spread` must be a non-negative number, got {init_spread!r}")
        if not _is_number(init_ess) or not 0 < init_ess < 1:
            raise ValueError(f"`init_ess` must be a number in (0, 1), got {init_ess!r}")
        if self.init_method not in INIT_METHODS:
            raise ValueError(
                f"`init_method` must be one of {INIT_METHODS}, got {self.init_method!r}"
            )
        check_positive_int("quantile_samples", self.quantile_samples)
        if init_scale is not None:
            object.__setattr__(self, "init_scale", float(init_scale))
        object.__setattr__(self, "init_spread", float(init_spread))
        object.__setattr__(self, "init_ess", float(init_ess))

    @classmethod
    def of(cls, guide: str, options: Mapping[str, Any]) -> InitOptions:
        """The options from a guide's ``**init_options``, rejecting unknown names as Python does."""
        names = {f.name for f in fields(cls)}
        for name in options:
            if name not in names:
                raise TypeError(f"{guide}() got an unexpected keyword argument {name!r}")
        return cls(**options)


class QuantilesFromDraws:
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


class AutoMixture(QuantilesFromDraws, AutoContinuous):
    """An AutoContinuous guide whose latent distribution has ``num_components`` components.

    Subclasses build the posterior in :meth:`get_posterior`; this class validates the shared
    options (:class:`InitOptions`), creates ``locs`` and ``scales`` (and
    ``_init_log_weights`` for subclasses with weights) from :func:`_tempered_start`, and
    implements :meth:`median` and :meth:`quantiles` from the posterior's coordinate-wise
    marginal quantiles.
    """

    def __init__(
        self, model: Callable[..., Any], num_components: int, **init_options: Unpack[InitKwargs]
    ) -> None:
        check_positive_int("num_components", num_components)
        self._init_options = options = InitOptions.of(type(self).__name__, init_options)
        self.num_components = num_components
        self._raw_model = (model,)  # a tuple, so that the model is not a submodule
        self._quantile_samples = options.quantile_samples
        super().__init__(model, init_loc_fn=options.init_loc_fn)

    def _setup_prototype(self, *args: Any, **kwargs: Any) -> None:
        super()._setup_prototype(*args, **kwargs)
        loc = self._init_loc()  # [D]
        options = self._init_options
        num_draws = max(_MIN_INIT_DRAWS, 20 * self.num_components)
        if options.init_method == "annealed":
            start = _annealed_start(self, num_draws, args, kwargs)
        else:
            start = _tempered_start(self, num_draws, options.init_ess, args, kwargs)
        locs, scales, log_weights = (t.to(loc) for t in start[:3])
        if options.init_scale is not None:
            scales = torch.full_like(scales, options.init_scale)
        # PyroParams (not nn.Parameters) also work under `module_local_params`.
        self.locs = PyroParam(loc + options.init_spread * (locs - loc), constraints.real)
        self.scales = PyroParam(scales, constraints.softplus_positive)
        self._init_log_weights = log_weights


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def prior_draws(guide: AutoContinuous, num_draws: int, args: tuple, kwargs: dict) -> torch.Tensor:
    """Draws of the model's latents from the prior, as unconstrained vectors ``(N, D)``.

    Sites whose prior cannot be sampled (``ImproperUniform``) are drawn from the broad
    reference of :func:`reference_draws`.
    """
    return reference_draws(guide._raw_model[0], num_draws, args, kwargs, guide.prototype_trace)[0]


def reference_draws(
    model: Callable[..., Any],
    num_draws: int,
    args: tuple,
    kwargs: dict,
    prototype_trace: poutine.Trace | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Prior draws ``(N, D)`` of the model's latents (unconstrained) and log importance weights.

    For a proper prior the weight of a draw is its log-likelihood: the summed log-probability
    of the model's sites that are not latent (observed sites and ``pyro.factor`` terms, scaled
    by their plates' subsampling, as in the ELBO). NaN counts as :math:`-\infty`.

    Sites whose prior cannot be sampled (an improper ``ImproperUniform``, the whole target in
    a ``pyro.factor``) have no prior draws to start from. Their unconstrained coordinates
    :math:`v` are drawn from a broad reference instead, a scale mixture of centred Gaussians
    :math:`r(v) = \frac1L \sum_{l} \mathcal N(v; 0, s_l^2 I)` with scales
    :math:`s_l \in \{1/4, 1, 4, 16, 64\}` (draw :math:`i` uses :math:`s_{i \bmod L}`), and
    the weight also gets their own log-density, the log-Jacobian of the map to their support
    and :math:`-\log r(v)`: the draws are then importance draws of the unnormalized target,
    whatever its scale between about 0.1 and 100 units from the origin. Either way
    :math:`\frac1N \sum_i w_i` is an unbiased estimate of the model's evidence :math:`Z`
    (exactly so when :math:`N` is a multiple of :math:`L`: each scale then draws the same
    number of times). Cost: ``N`` model runs, one at a time.

    Args:
        model: The Pyro model.
        num_draws: ``N``.
        args: The model's positional arguments.
        kwargs: The model's keyword arguments.
        prototype_trace: A trace whose stochastic nodes name the latent sites, their order and
            shapes (an autoguide's ``prototype_trace``); ``None`` traces the model once.

    Returns:
        ``(draws, log_weights)``: ``(N, D)`` unconstrained draws, the sites concatenated in
        the prototype's order, and ``(N,)`` float64 log weights.
    """
    if prototype_trace is None:
        with poutine.block(), torch.no_grad():
            traced = InitMessenger(init_to_median_or_origin)(model)
            trace = poutine.trace(traced).get_trace(*args, **kwargs)
        prototype_trace = prune_subsample_sites(trace)
    latent = {name for name, _ in prototype_trace.iter_stochastic_nodes()}
    improper: dict[str, torch.Tensor] = {}  # unconstrained reference draws of the current run
    scale = torch.ones(())

    def init(site: dict) -> torch.Tensor:
        try:
            return site["fn"].sample().detach()
        except NotImplementedError:
            transform = biject_to(site["fn"].support)
            prototype = prototype_trace.nodes[site["name"]]["value"]
            shape = transform.inverse_shape(prototype.shape)
            improper[site["name"]] = scale * torch.randn(shape, dtype=prototype.dtype)
            return transform(improper[site["name"]])

    model = InitMessenger(init)(model)
    draws, log_weights = [], []
    for i in range(num_draws):
        improper.clear()
        scale = torch.tensor(_REFERENCE_SCALES[i % len(_REFERENCE_SCALES)], dtype=torch.float64)
        with poutine.block(), torch.no_grad():
            trace = poutine.trace(model).get_trace(*args, **kwargs)
            trace.compute_log_prob(
                site_filter=lambda name, site: name not in latent or name in improper
            )
        log_weight = torch.zeros((), dtype=torch.float64)
        for name, site in trace.nodes.items():
            if site["type"] == "sample" and (name not in latent or name in improper):
                log_weight = log_weight + site["log_prob_sum"].double()
        parts = []
        for name, site in prototype_trace.iter_stochastic_nodes():
            value = trace.nodes[name]["value"].detach()
            transform = biject_to(site["fn"].support)
            unconstrained = transform.inv(value)
            parts.append(unconstrained.reshape(-1))
            if name in improper:
                jacobian = transform.log_abs_det_jacobian(unconstrained, value)
                log_weight = log_weight + jacobian.sum().double()
        if improper:
            log_weight = log_weight - _reference_log_density(
                torch.cat([v.reshape(-1) for v in improper.values()]).double()
            )
        draws.append(torch.cat(parts))
        log_weights.append(log_weight.nan_to_num(nan=-math.inf))
    return torch.stack(draws), torch.stack(log_weights)


def _reference_log_density(v: torch.Tensor) -> torch.Tensor:
    """``log r(v)`` of the reference scale mixture for improper coordinates ``v`` ``(..., m)``."""
    scales = torch.tensor(_REFERENCE_SCALES, dtype=v.dtype, device=v.device)  # [L]
    squares = v.square().sum(-1, keepdim=True)  # [..., 1]
    log_normal = -0.5 * squares / scales.square() - v.shape[-1] * (
        scales.log() + 0.5 * math.log(2 * math.pi)
    )  # [..., L]
    return log_normal.logsumexp(-1) - math.log(len(scales))


class _Start(NamedTuple):
    locs: torch.Tensor  # [K, D]
    scales: torch.Tensor  # [K, D]
    log_weights: torch.Tensor  # [K]
    beta: float


def _tempered_start(
    guide: AutoContinuous, num_draws: int, ess_fraction: float, args: tuple, kwargs: dict
) -> _Start:
    r"""Starting ``(locs, scales, log_weights, beta)``: a mixture fit to tempered draws.

    With :math:`u_i` prior draws (unconstrained) and :math:`\ell_i` their log-likelihoods,
    the draws are weighted by :math:`w_i = e^{\beta \ell_i}` with the largest :math:`\beta \in
    [0, 1]` whose effective sample size :math:`(\sum_i w_i)^2 / \sum_i w_i^2` is at least
    ``ess_fraction`` of the draws (bisection), resampled (systematic resampling) and fitted by
    a diagonal Gaussian mixture (EM, :func:`~pyro_mixflow.fitting.em_diagonal`, with no
    component on a lone draw: :func:`_fit_without_stragglers`). The scales
    are the fitted ones times :math:`\sqrt\beta`: tempering a likelihood by :math:`\beta`
    widens a Gaussian posterior by :math:`1 / \sqrt\beta` where the likelihood dominates,
    so this undoes it.

    With no likelihood (a prior-only model) :math:`\beta = 1` and this is EM on prior draws.
    Why this start, with figures: :class:`~pyro_mixflow.infer.AutoGaussianMixture`.
    """
    draws, log_likelihood = reference_draws(
        guide._raw_model[0], num_draws, args, kwargs, guide.prototype_trace
    )
    num_components = guide.num_components
    finite = torch.isfinite(log_likelihood)
    if int(finite.sum()) >= num_components:
        draws, log_likelihood = draws[finite], log_likelihood[finite]
    else:  # (almost) no draw has a finite likelihood: fall back to the prior
        log_likelihood = torch.zeros(len(draws), dtype=torch.float64)
    beta = _tempering_power(log_likelihood, ess_fraction)
    weights = (beta * log_likelihood).softmax(0)
    # systematic resampling: each draw appears floor or ceil of N w_i times
    positions = (torch.rand((), dtype=torch.float64) + torch.arange(len(draws))) / len(draws)
    index = torch.searchsorted(weights.cumsum(0), positions).clamp(max=len(draws) - 1)
    resampled = draws[index].double()
    seed = int(torch.randint(2**31 - 1, ()))
    means, variances, mixture_weights = _fit_without_stragglers(
        resampled, draws[index.unique()].double(), num_components, seed
    )
    floor = (1e-3 * resampled.std(0)).square().clamp(min=1e-12)
    scales = (beta * variances.clamp(min=floor)).sqrt()
    return _Start(means, scales, mixture_weights.log(), beta)


def _annealed_start(guide: AutoContinuous, num_draws: int, args: tuple, kwargs: dict) -> _Start:
    r"""Starting ``(locs, scales, log_weights, 1.0)``: a mixture fit to annealed particles.

    The particles start as the ``N`` draws of the reference :math:`r` of
    :func:`reference_draws` (the prior, or the broad scale mixture for sites whose prior
    cannot be sampled) and are carried, in the unconstrained space, along the tempering
    ladder :math:`\pi_\beta \propto r^{1 - \beta} p^\beta` from :math:`\beta = 0` to
    :math:`1`, :math:`p(u) = p(T(u), y) \, |\det J_T(u)|` the unnormalized posterior, as in
    annealed importance sampling (Neal, 2001): each stage takes the largest step in
    :math:`\beta` whose incremental weights keep an effective sample size of half the
    particles (bisection), then moves every particle by ``_ANNEALED_MOVES``
    Metropolis-adjusted Langevin steps that leave :math:`\pi_\beta` invariant
    (preconditioned by the particles' per-coordinate standard deviation, step size adapted
    to an acceptance near 0.5). Each particle ends in the mode whose basin it falls into
    along the way. A diagonal mixture is then fitted by EM to the final particles
    (:func:`_fit_without_stragglers`), unweighted and at :math:`\beta = 1` (no rescaling).

    Why no weights and no resampling: the moves are local, so a mode keeps the particles that
    reached it; sequential Monte Carlo's resampling at every stage lets the number of particles
    per mode drift at random, stage after stage, until most modes have none (on a 40-mode
    Gaussian mixture in 50 dimensions, 7 modes kept particles with resampling, 39 without).
    The start needs every mode's place; the mixture weights are then learned by the ELBO,
    whose gradient in them is exact with :class:`RaoBlackwellELBO`.

    Cost: one vectorized run of the model with its gradient per move, so
    ``_ANNEALED_MOVES + 1`` runs of ``N`` particles per stage, over a few to a few hundred
    stages (``guide._init_stages`` after the start), plus the ``N`` single runs of the
    reference draws. The model must broadcast over a plate to the left of its own plates (as
    for :class:`RaoBlackwellELBO`).
    """
    model = guide._raw_model[0]
    draws = reference_draws(model, num_draws, args, kwargs, guide.prototype_trace)[0]
    with poutine.block(), torch.no_grad():  # the plates of every site, observed ones too
        trace = poutine.trace(InitMessenger(init_to_median_or_origin)(model)).get_trace(
            *args, **kwargs
        )
    nesting = max(
        [-frame.dim for site in trace.nodes.values() if site["type"] == "sample"
         for frame in site["cond_indep_stack"] if frame.vectorized],
        default=0,
    )  # fmt: skip
    improper = set()
    for name, site in guide.prototype_trace.iter_stochastic_nodes():
        try:
            site["fn"].sample()
        except NotImplementedError:
            improper.add(name)

    def log_densities(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(log r(u), log p(u))`` of the rows of ``u``, non-finite as ``-inf``."""
        try:
            scores = score_latents(model, guide, u, nesting, args, kwargs)
        except Exception as error:
            raise ValueError(
                "init_method='annealed' runs the model on a batch of particles under a plate to "
                f"the left of its own plates, and that failed ({type(error).__name__}: "
                f"{error}); make the model broadcast over such a plate, or use the default "
                "init_method='tempered'"
            ) from error
        log_r = u.new_zeros(len(u))
        improper_parts = []
        for site, unconstrained in guide._unpack_latent(u):
            name = site["name"]
            if name in improper:
                improper_parts.append(unconstrained.reshape(len(u), -1))
            else:
                log_r = log_r + scores.latent_log_prob[name] + scores.latent_log_det[name]
        if improper_parts:
            log_r = log_r + _reference_log_density(torch.cat(improper_parts, -1))
        log_p = scores.log_joint + scores.log_det
        return log_r.nan_to_num(nan=-math.inf), log_p.nan_to_num(nan=-math.inf)

    def tempered(u: torch.Tensor, beta: float) -> tuple[torch.Tensor, ...]:
        """``log pi_beta(u)``, its gradient (zero where it is not finite), ``log r``, ``log p``."""
        u = u.detach().requires_grad_(True)
        with torch.enable_grad():
            log_r, log_p = log_densities(u)
            value = (1 - beta) * log_r + beta * log_p if beta > 0 else log_r
            finite = torch.isfinite(value)
            (grad,) = torch.autograd.grad(value[finite].sum(), u, allow_unused=True)
        grad = torch.zeros_like(u) if grad is None else grad.nan_to_num(0.0, 0.0, 0.0)
        return value.detach(), grad, log_r.detach(), log_p.detach()

    with torch.no_grad():
        log_r, log_p = log_densities(draws)
    u = draws
    beta, step, stages = 0.0, 0.5, 0
    for _ in range(_ANNEALED_MAX_STAGES):
        if beta >= 1.0:
            break
        ratio = (log_p - log_r).double()  # the log-likelihood, for a proper prior
        ratio = torch.where(torch.isfinite(ratio), ratio, -math.inf)
        if not torch.isfinite(ratio).any():
            break  # nothing to weight: keep the reference draws
        beta += _tempering_power(ratio, _ANNEALED_ESS, 1.0 - beta)
        stages += 1
        scale = u.std(0).clamp(min=1e-6)
        value, grad, log_r, log_p = tempered(u, beta)
        for _ in range(_ANNEALED_MOVES):
            noise = torch.randn_like(u)
            proposal = u + 0.5 * step**2 * scale.square() * grad + step * scale * noise
            new_value, new_grad, new_log_r, new_log_p = tempered(proposal, beta)
            # log q(u | u') - log q(u' | u) of the Langevin proposal, preconditioned by scale^2
            back = (u - proposal - 0.5 * step**2 * scale.square() * new_grad) / (step * scale)
            log_accept = new_value - value + 0.5 * (noise.square() - back.square()).sum(-1)
            accept = torch.rand_like(value).log() < log_accept.nan_to_num(nan=-math.inf)
            u = torch.where(accept[:, None], proposal, u)
            grad = torch.where(accept[:, None], new_grad, grad)
            value, log_r, log_p = (
                torch.where(accept, new, old)
                for new, old in ((new_value, value), (new_log_r, log_r), (new_log_p, log_p))
            )
            rate = float(accept.double().mean())
            step *= 1.3 if rate > 0.6 else (0.7 if rate < 0.4 else 1.0)
    particles = u.detach().double()
    guide._init_stages = stages  # diagnostics: the length of the ladder
    seed = int(torch.randint(2**31 - 1, ()))
    means, variances, mixture_weights = _fit_without_stragglers(
        particles, particles.unique(dim=0), guide.num_components, seed
    )
    floor = (1e-3 * particles.std(0)).square().clamp(min=1e-12)
    return _Start(means, variances.clamp(min=floor).sqrt(), mixture_weights.log(), 1.0)


def _fit_without_stragglers(
    resampled: torch.Tensor, distinct: torch.Tensor, num_components: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""EM with ``K`` components, none of them fitted to fewer than a few distinct draws.

    ``resampled`` are the (resampled, repeated) draws EM fits, ``distinct`` the distinct ones.

    Heavy tails (Neal's funnel: prior draws reach :math:`|u| \approx 10^3`) make EM spend
    components on single far draws; a guide's component started there has a tiny scale, no
    weight, and no gradient to leave. Such components (fewer than ``_MIN_DISTINCT`` distinct
    draws nearest to them) are dropped, and the heaviest components split along their widest
    axis relative to the draws' spread (means :math:`\pm` half a standard deviation, weights
    halved) until there are ``K`` again.
    """
    fit = em_diagonal(resampled, num_components, seed=seed)
    means, variances, weights = (torch.as_tensor(a) for a in fit)
    mixture = DiagNormalMixture(means, variances.sqrt(), weights.log())
    nearest = mixture.log_responsibilities(distinct).argmax(-1)
    kept = nearest.bincount(minlength=num_components) >= _MIN_DISTINCT
    if not kept.any():
        kept[weights.argmax()] = True
    means, variances, weights = means[kept], variances[kept], weights[kept] / weights[kept].sum()
    spread = resampled.var(0).clamp(min=1e-12)
    while len(means) < num_components:
        k = int(weights.argmax())
        axis = int((variances[k] / spread).argmax())
        offset = torch.zeros_like(means[k])
        offset[axis] = 0.5 * variances[k, axis].sqrt()
        variance = variances[k].clone()
        variance[axis] *= 0.75  # the two halves together keep the component's variance
        means = torch.cat([means, (means[k] + offset)[None]])
        means[k] -= offset
        variances = torch.cat([variances, variance[None]])
        variances[k] = variance
        weights = torch.cat([weights, weights[k, None] / 2])
        weights[k] /= 2
    return means, variances, weights


def _tempering_power(
    log_likelihood: torch.Tensor, ess_fraction: float, upper: float = 1.0
) -> float:
    """The largest ``beta <= upper`` with ``ESS(beta * log_likelihood) >= ess_fraction N``."""

    def ess_fraction_at(beta: float) -> float:
        log_w = (beta * log_likelihood).log_softmax(0)
        return float(1 / (2 * log_w).exp().sum()) / len(log_likelihood)

    if ess_fraction_at(upper) >= ess_fraction:
        return upper
    low, high = 0.0, upper
    for _ in range(50):
        middle = (low + high) / 2
        if ess_fraction_at(middle) >= ess_fraction:
            low = middle
        else:
            high = middle
    return low
