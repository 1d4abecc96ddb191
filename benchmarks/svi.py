r"""Pyro SVI on multimodal targets: mixture autoguides against Pyro's autoguides at one budget.

Every guide is trained by stock ``pyro.infer.SVI`` on a Pyro model whose log-evidence
:math:`\log Z` is known, then scored from fresh guide draws:

* **log Z error (IS)**: :math:`\log \hat Z - \log Z`, with
  :math:`\log \hat Z = \log \frac1N \sum_n p(x, z_n) / q(z_n)` over :math:`N` guide draws
  (:func:`pyro_mixflow.diagnostics.importance_diagnostics`). A guide that misses a share
  :math:`m` of the posterior mass converges to :math:`\log(1 - m)`: the error sees missed modes.
* **ELBO − log Z**: the ELBO of the same draws minus :math:`\log Z`, i.e. :math:`-\mathrm{KL}(q
  \,\|\, p)`.
* **modes ok**: how many modes receive a share of the guide's draws within ±0.05 of their
  posterior mass (:func:`pyro_mixflow.diagnostics.mode_shares`: each draw goes to its nearest
  mode); **max |share err|** the largest deviation.
* **k̂**: Pareto :math:`\hat k` of the importance weights (PSIS).
* **seconds**: wall clock of the SVI steps (diagnostics not timed).

**Targets** (each a Pyro model; ``log Z`` exact unless said otherwise):

* ``four_modes``: 2-D mixture of 4 Gaussians (scale 0.7) at :math:`(\pm4, \pm4)` with weights
  0.4 / 0.3 / 0.2 / 0.1, written as a wide prior :math:`\mathcal N(0, 5^2 I)` plus a
  ``pyro.factor`` of log target − log prior, so that :math:`\log Z = 0`.
* ``ring``: 2-D ring of radius 3 and radial width 0.3, :math:`p(x) \propto
  \exp(-(\lVert x\rVert - 3)^2 / (2 \cdot 0.3^2))`, normalized in closed form
  (:math:`\int_0^\infty r\, e^{-(r-\mu)^2/2\sigma^2} dr = \mu\sigma\sqrt{2\pi}\,\Phi(\mu/\sigma)
  + \sigma^2 e^{-\mu^2/2\sigma^2}`), same prior-plus-factor form, :math:`\log Z = 0`. "Modes"
  are 8 sectors of 45° (truth 1/8 each); the extra column is the share of 36 sectors of 10°
  that receive at least half their due share of draws (1 = the whole angle is covered).
* ``label_switching``: posterior of the three means :math:`\mu \in \mathbb R^3` of a 1-D
  mixture with known equal weights and unit scales, prior :math:`\mu_k \sim \mathcal N(0,
  10^2)`, given 45 points (15 from each of :math:`\mathcal N(-4, 1)`, :math:`\mathcal N(0, 1)`,
  :math:`\mathcal N(4, 1)`, fixed seed): 6 label-switching modes of mass 1/6 each. By
  exchangeability :math:`Z = 6 \int_{\mu_1 < \mu_2 < \mu_3} p(\mu)\,p(y \mid \mu)\,d\mu`, computed
  by a Riemann sum on a 121³ grid over a box of ±2.5 (about 10 posterior standard deviations)
  around the ordered posterior mode (stored in the JSON, with the change against a 81³ grid).
* ``funnel``: Neal's funnel in 10-D, :math:`v \sim \mathcal N(0, 3^2)`,
  :math:`x_i \mid v \sim \mathcal N(0, e^{v})`, :math:`i = 1..9`; :math:`\log Z = 0`. No modes;
  the extra column is the variance of :math:`v` under the guide (truth 9).
* ``four_modes_flat``, ``ring_flat``: the same two densities written the other common way,
  an improper flat prior (``ImproperUniform``) with the whole target in the factor, as energy
  functions and unnormalized densities are; :math:`\log Z = 0` still. The guides' start cannot
  draw from this prior. (``label_switching`` and ``funnel`` have no flat-prior version: with
  a flat prior on the means, or on :math:`v`, their posteriors are improper.)

**Guides** (one budget for all: Adam, learning rate 5e-3, 3,000 steps, 8 particles):

* Pyro's ``AutoNormal``, ``AutoMultivariateNormal``, ``AutoLowRankMultivariateNormal``
  (default rank), ``AutoIAFNormal`` (defaults: one affine autoregressive transform, hidden
  width ``3 D + 1``), and ``AutoNormalizingFlow`` with two ``spline_autoregressive``
  transforms (hidden widths ``10 D, 10 D``, 16 bins, bound 8, so that the spline reaches the
  modes at ±4; Pyro's default bound 3 would not) with the order of the coordinates reversed
  between them. All trained with
  ``Trace_ELBO(num_particles=8, vectorize_particles=True)``.
* Ours, 8 components each: ``AutoGaussianMixture`` (exact draws with implicit
  reparameterization) with the same ``Trace_ELBO``; ``AutoGaussianMixture``,
  ``AutoMixtureBaseFlow`` (default: one IAF over the mixture) and
  ``AutoClassifierWeightedMixture`` (classifier 32 × 32) with ``RaoBlackwellELBO(num_particles=1)``,
  which evaluates the model once per component, i.e. 8 model evaluations per step: the same
  as 8 particles. Also the default ``AutoGaussianMixture`` (K = 16, 16 evaluations per step),
  and the same with ``covariance="full"``.

Seeds: ``pyro.set_rng_seed(seed)`` and a fresh param store before each guide is built. Runs
use one torch thread (``--threads``).

On the flat-prior targets each trained guide is also checked as a user would check it,
without the truth: :func:`~pyro_mixflow.diagnostics.compare_restarts` of the guide alone
against the reference importance sampler (``reference_samples`` = the diagnostics' draws);
"flagged" counts the seeds where it says the guide misses posterior mass.

**Outputs** (in ``--out``): ``svi-<tag>.json`` (one process; rewritten after every run, so
partial runs survive and merge), then the report: ``svi.md`` (tables), ``svi.png`` (draws of
each guide, first seed, over the target) and ``svi.json`` (the runs the report shows: each
run's metadata, ``source`` file and current records; superseded ones left out).
``benchmarks/results`` keeps only these report files; once a run is folded into a report, its
``svi-<tag>.json`` can go.

Usage::

    python benchmarks/svi.py --quick                     # smoke test (seconds) into $TMPDIR
    python benchmarks/svi.py                             # everything, 3 seeds
    python benchmarks/svi.py --targets four_modes --guides agm_rb auto_normal --no-report
    python benchmarks/svi.py --report                    # svi.json + every svi-*.json in --out
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from itertools import permutations
from pathlib import Path
from typing import Any

import pyro
import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
from pyro.distributions import constraints
from pyro.infer import SVI, Predictive, Trace_ELBO
from pyro.infer.autoguide import (
    AutoIAFNormal,
    AutoLowRankMultivariateNormal,
    AutoMultivariateNormal,
    AutoNormal,
    AutoNormalizingFlow,
)
from pyro.infer.autoguide.initialization import InitMessenger
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from pyro_mixflow import DiagNormalMixture
from pyro_mixflow.diagnostics import compare_restarts, importance_diagnostics, mode_shares

sys.path.insert(0, str(Path(__file__).resolve().parent))
import density as density_benchmark
from _runs import (
    add_run_arguments,
    finite_mean,
    fmt,
    latest_records,
    load_runs,
    output_folder,
    panel_grid,
    record_each,
    report_paths,
    run_meta,
    run_tag,
    runs_of,
    save_run,
)

from pyro_mixflow.infer import (
    AutoClassifierWeightedMixture,
    AutoGaussianMixture,
    AutoMixtureBaseFlow,
    AutoRADFlow,
    RaoBlackwellELBO,
    init_to_median_or_origin,
)

TARGETS = ("four_modes", "ring", "label_switching", "funnel", "four_modes_flat", "ring_flat")
GUIDES = {
    "auto_normal": "AutoNormal (Pyro)",
    "auto_mvn": "AutoMultivariateNormal (Pyro)",
    "auto_lowrank": "AutoLowRankMultivariateNormal (Pyro)",
    "auto_iaf": "AutoIAFNormal (Pyro)",
    "spline_flow": "AutoNormalizingFlow, 2 spline AR (Pyro)",
    "agm_exact": "AutoGaussianMixture, Trace_ELBO (ours)",
    "agm_rb": "AutoGaussianMixture, RaoBlackwellELBO (ours)",
    "mbf_rb": "AutoMixtureBaseFlow, RaoBlackwellELBO (ours)",
    "cwm_rb": "AutoClassifierWeightedMixture, RaoBlackwellELBO (ours)",
    "agm16_rb": "AutoGaussianMixture K = 16 (default), RaoBlackwellELBO (ours; 16 evaluations)",
    "agm16_full_rb": "AutoGaussianMixture K = 16, full covariance, RaoBlackwellELBO (ours)",
    "rad": "AutoRADFlow, Trace_ELBO (ours)",
}
OURS = ("agm_exact", "agm_rb", "mbf_rb", "cwm_rb", "agm16_rb", "agm16_full_rb", "rad")
SHARE_TOLERANCE = 0.05


@dataclass(frozen=True)
class Budget:
    """Sizes of one run; the full budget is the benchmark, :data:`QUICK` a smoke test."""

    steps: int = 3000
    lr: float = 5e-3
    num_particles: int = 8  # Trace_ELBO particles; RaoBlackwellELBO: 1 particle × K components
    num_components: int = 8
    eval_samples: int = 4000  # guide draws for the importance diagnostics and for the shares
    figure_draws: int = 500  # draws of the first seed stored for the figure
    quadrature_points: int = 121  # per axis, label_switching's log Z


FULL = Budget()
QUICK = Budget(steps=20, eval_samples=300, figure_draws=100, quadrature_points=41)


# ---------------------------------------------------------------------------------------------
# Targets


@dataclass
class Target:
    """A Pyro model with known log-evidence, the modes to count draws at, and how to plot it."""

    name: str
    model: Callable[[], None]
    log_z: float
    dim: int
    modes: torch.Tensor | None  # [M, D] in the flattened latent space, or None
    mode_mass: torch.Tensor | None  # [M] the posterior mass nearest to each mode
    plot_sites: tuple[str, ...]  # the latent sites whose first two coordinates are plotted
    extra_name: str = ""
    truth: dict[str, Any] = field(default_factory=dict)


FOUR_MODE_LOCS = torch.tensor([[4.0, 4.0], [-4.0, 4.0], [-4.0, -4.0], [4.0, -4.0]])
FOUR_MODE_WEIGHTS = torch.tensor([0.4, 0.3, 0.2, 0.1])
FOUR_MODE_SCALE = 0.7
RING_RADIUS, RING_WIDTH = 3.0, 0.3
PRIOR_SCALE = 5.0
LABEL_MEANS = (-4.0, 0.0, 4.0)
LABEL_POINTS_PER_CLUSTER = 15
LABEL_PRIOR_SCALE = 10.0
FUNNEL_DIM = 10


def four_modes_log_density(x: torch.Tensor) -> torch.Tensor:
    """Log-density of the 4-mode target at ``x`` (``[..., 2]``)."""
    mixture = DiagNormalMixture(
        FOUR_MODE_LOCS.to(x),
        torch.full((4, 2), FOUR_MODE_SCALE).to(x),
        probs=FOUR_MODE_WEIGHTS.to(x),
    )
    return mixture.log_prob(x)


def ring_log_density(x: torch.Tensor) -> torch.Tensor:
    r"""Normalized log-density of the ring at ``x`` (``[..., 2]``)."""
    mu, sigma = RING_RADIUS, RING_WIDTH
    radial = mu * sigma * math.sqrt(2 * math.pi) * 0.5 * math.erfc(-mu / sigma / math.sqrt(2))
    radial += sigma**2 * math.exp(-(mu**2) / (2 * sigma**2))
    log_norm = math.log(2 * math.pi * radial)
    r = x.norm(dim=-1)
    return -((r - mu) ** 2) / (2 * sigma**2) - log_norm


def _factor_model(log_density: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], None]:
    """A 2-D model: wide prior plus a factor of ``log target − log prior`` (so log Z = 0)."""

    def model() -> None:
        prior = dist.Normal(torch.zeros(2), PRIOR_SCALE).to_event(1)
        x = pyro.sample("x", prior)
        pyro.factor("target", log_density(x) - prior.log_prob(x))

    return model


def _flat_model(log_density: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], None]:
    """A 2-D model: improper flat prior (``ImproperUniform``) and the whole target in a factor."""

    def model() -> None:
        x = pyro.sample("x", dist.ImproperUniform(constraints.real, (), (2,)))
        pyro.factor("target", log_density(x))

    return model


def label_switching_data() -> torch.Tensor:
    """The 45 observations of the label-switching posterior (fixed seed)."""
    generator = torch.Generator().manual_seed(20261121)
    noise = torch.randn(len(LABEL_MEANS), LABEL_POINTS_PER_CLUSTER, generator=generator)
    return (torch.tensor(LABEL_MEANS)[:, None] + noise).flatten()


def label_switching_log_likelihood(mu: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    """``log p(y | mu)`` for ``mu`` of shape ``[..., 3]``, summed over the data."""
    log_lik = dist.Normal(mu[..., None, :], 1.0).log_prob(data[:, None])  # [..., N, 3]
    return (log_lik.logsumexp(-1) - math.log(mu.shape[-1])).sum(-1)


def _label_switching_model(data: torch.Tensor) -> Callable[[], None]:
    def model() -> None:
        mu = pyro.sample(
            "mu", dist.Normal(torch.zeros(len(LABEL_MEANS)), LABEL_PRIOR_SCALE).to_event(1)
        )
        pyro.factor("log_likelihood", label_switching_log_likelihood(mu, data.to(mu)))

    return model


def label_switching_truth(data: torch.Tensor, points: int) -> dict[str, Any]:
    r"""``log Z`` and the ordered posterior mean of the label-switching posterior.

    :math:`Z = 6 \int_{\mu_1<\mu_2<\mu_3} p(\mu)p(y\mid\mu)\,d\mu` by a Riemann sum on a
    ``points``³ grid over a box of ±2.5 around the ordered posterior mode (float64), and the
    same on a coarser grid to show the sum has converged.
    """
    data = data.double()
    prior = dist.Normal(torch.zeros(3, dtype=torch.float64), LABEL_PRIOR_SCALE)

    def log_joint(mu: torch.Tensor) -> torch.Tensor:
        return prior.log_prob(mu).sum(-1) + label_switching_log_likelihood(mu, data)

    mode = torch.tensor(LABEL_MEANS, dtype=torch.float64, requires_grad=True)
    optim = torch.optim.LBFGS([mode], max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optim.zero_grad()
        loss = -log_joint(mode)
        loss.backward()
        return loss

    optim.step(closure)
    mode = mode.detach()

    def integrate(n: int) -> tuple[float, torch.Tensor]:
        axes = [torch.linspace(m - 2.5, m + 2.5, n, dtype=torch.float64) for m in mode]
        cell = math.prod(float(a[1] - a[0]) for a in axes)
        grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
        log_terms, weighted = [], torch.zeros(3, dtype=torch.float64)
        for chunk in grid.split(200_000):
            ordered = (chunk[:, 0] < chunk[:, 1]) & (chunk[:, 1] < chunk[:, 2])
            lp = torch.where(ordered, log_joint(chunk), -math.inf)
            log_terms.append(lp.logsumexp(0))
            weighted += (lp.exp()[:, None] * chunk).sum(0)
        log_mass = torch.stack(log_terms).logsumexp(0)
        mean = weighted / log_mass.exp()
        return float(log_mass + math.log(cell) + math.log(6.0)), mean

    log_z, mean = integrate(points)
    log_z_coarse, _ = integrate(2 * (points // 3) + 1)
    return {
        "log_z": log_z,
        "log_z_coarse_grid_change": log_z - log_z_coarse,
        "ordered_mean": mean.tolist(),
        "ordered_mode": mode.tolist(),
        "grid_points_per_axis": points,
    }


def _funnel_model() -> None:
    v = pyro.sample("v", dist.Normal(0.0, 3.0))
    scale = (v / 2).exp()[..., None].expand(*v.shape, FUNNEL_DIM - 1)
    pyro.sample("x", dist.Normal(torch.zeros(FUNNEL_DIM - 1), scale).to_event(1))


def build_target(name: str, budget: Budget) -> Target:
    """The target ``name``, with its truth."""
    flat = name.endswith("_flat")
    wrap = _flat_model if flat else _factor_model
    if name in ("four_modes", "four_modes_flat"):
        return Target(
            name,
            wrap(four_modes_log_density),
            0.0,
            2,
            FOUR_MODE_LOCS.clone(),
            FOUR_MODE_WEIGHTS.clone(),
            ("x",),
        )
    if name in ("ring", "ring_flat"):
        angles = torch.arange(8) * (2 * math.pi / 8)
        modes = RING_RADIUS * torch.stack([angles.cos(), angles.sin()], -1)
        return Target(
            name,
            wrap(ring_log_density),
            0.0,
            2,
            modes,
            torch.full((8,), 1 / 8),
            ("x",),
            extra_name="angle covered",
        )
    if name == "label_switching":
        data = label_switching_data()
        truth = label_switching_truth(data, budget.quadrature_points)
        mean = torch.tensor(truth["ordered_mean"], dtype=torch.float32)
        modes = torch.stack([mean[list(p)] for p in permutations(range(3))])
        return Target(
            name,
            _label_switching_model(data),
            truth["log_z"],
            3,
            modes,
            torch.full((6,), 1 / 6),
            ("mu",),
            truth=truth,
        )
    if name == "funnel":
        return Target(name, _funnel_model, 0.0, FUNNEL_DIM, None, None, ("v", "x"), "var v (9)")
    raise ValueError(f"unknown target {name!r}; choose from {TARGETS}")


# ---------------------------------------------------------------------------------------------
# Guides


def _spline_flow(dim: int) -> T.ComposeTransformModule:
    """Two spline autoregressive transforms with the coordinate order reversed in between."""
    return T.ComposeTransformModule(
        [
            T.spline_autoregressive(dim, count_bins=16, bound=8.0),
            T.Permute(torch.arange(dim - 1, -1, -1)),
            T.spline_autoregressive(dim, count_bins=16, bound=8.0),
        ]
    )


def build_guide(
    name: str, model: Callable[[], None], budget: Budget, flat_prior: bool = False
) -> tuple[Any, Any]:
    """``(guide, elbo)`` of the guide ``name`` for ``model`` at ``budget``.

    Pyro's guides start from prior draws (``init_to_median``; ``init_to_feasible`` too draws
    once for the shape), which an improper prior cannot give: with ``flat_prior`` they start
    at the origin of the unconstrained space (:func:`pyro_mixflow.infer.init_to_median_or_origin`,
    the same as Pyro's ``init_to_value`` at zero), set by wrapping the model the guide traces
    for its prototype. Ours keep their defaults.
    """
    trace_elbo = Trace_ELBO(num_particles=budget.num_particles, vectorize_particles=True)
    k = budget.num_components
    pyro_guides = {
        "auto_normal": AutoNormal,
        "auto_mvn": AutoMultivariateNormal,
        "auto_lowrank": AutoLowRankMultivariateNormal,
        "auto_iaf": AutoIAFNormal,
        "spline_flow": lambda model: AutoNormalizingFlow(model, _spline_flow),
    }
    if name in pyro_guides:
        if flat_prior:  # the flows take no init_loc_fn: the start wraps the model they trace
            model = InitMessenger(init_to_median_or_origin)(model)
        return pyro_guides[name](model), trace_elbo
    if name == "agm_exact":
        return AutoGaussianMixture(model, num_components=k), trace_elbo
    if name == "agm_rb":
        return AutoGaussianMixture(model, num_components=k), RaoBlackwellELBO(num_particles=1)
    if name == "mbf_rb":
        return AutoMixtureBaseFlow(model, num_components=k), RaoBlackwellELBO(num_particles=1)
    if name == "cwm_rb":
        guide = AutoClassifierWeightedMixture(model, num_components=k, hidden_dims=(32, 32))
        return guide, RaoBlackwellELBO(num_particles=1)
    if name == "agm16_rb":
        return AutoGaussianMixture(model, num_components=16), RaoBlackwellELBO(num_particles=1)
    if name == "agm16_full_rb":
        guide = AutoGaussianMixture(model, num_components=16, covariance="full")
        return guide, RaoBlackwellELBO(num_particles=1)
    if name == "rad":
        return AutoRADFlow(model), trace_elbo
    raise ValueError(f"unknown guide {name!r}; choose from {list(GUIDES)}")


# ---------------------------------------------------------------------------------------------
# Running


@dataclass
class Record:
    """One (target, guide, seed) result, as stored in the JSON."""

    target: str
    guide: str
    seed: int
    log_z_error: float | None = None
    log_z_se: float | None = None
    elbo_error: float | None = None
    elbo_se: float | None = None
    pareto_k: float | None = None
    ess_fraction: float | None = None
    shares: list[float] | None = None
    modes_ok: int | None = None
    max_share_error: float | None = None
    extra: float | None = None
    flagged: bool | None = None  # flat-prior targets: compare_restarts against the reference
    seconds: float | None = None
    final_loss: float | None = None  # mean loss over the last 10% of the steps
    draws: list[list[float]] | None = None  # seed 0: the first 2 coordinates, for the figure
    error: str = ""


def train_and_score(target: Target, guide_name: str, seed: int, budget: Budget) -> Record:
    """Trains one guide with one seed and scores it."""
    record = Record(target.name, guide_name, seed)
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    flat_prior = target.name.endswith("_flat")
    guide, elbo = build_guide(guide_name, target.model, budget, flat_prior)
    svi = SVI(target.model, guide, pyro.optim.Adam({"lr": budget.lr}), elbo)
    losses = []
    start = time.perf_counter()
    for _ in range(budget.steps):
        losses.append(svi.step())
    record.seconds = time.perf_counter() - start
    tail = losses[-max(1, budget.steps // 10) :]
    record.final_loss = sum(tail) / len(tail)
    if not all(math.isfinite(v) for v in tail):
        record.error = "non-finite loss at the end of training"

    with torch.no_grad():
        diag = importance_diagnostics(target.model, guide, num_samples=budget.eval_samples)
        record.log_z_error = diag.log_evidence - target.log_z
        record.log_z_se = diag.log_evidence_se
        record.elbo_error = diag.elbo - target.log_z
        record.elbo_se = diag.elbo_se
        record.pareto_k = diag.pareto_k
        record.ess_fraction = diag.ess_fraction
        if target.modes is not None:
            shares = mode_shares(
                target.model, guide, modes=target.modes, num_samples=budget.eval_samples
            ).shares.double()
            errors = (shares - target.mode_mass.double()).abs()
            record.shares = shares.tolist()
            record.modes_ok = int((errors <= SHARE_TOLERANCE).sum())
            record.max_share_error = float(errors.max())
        if flat_prior:  # would the user, who does not know the truth, be told?
            check = compare_restarts(
                target.model,
                [diag],
                num_samples=budget.eval_samples,
                reference_samples=budget.eval_samples,
            )
            record.flagged = check.flagged[0]
        draws = _draws(target, guide, budget.eval_samples)
        record.extra = _extra(target, draws)
        if seed == 0:  # the figure shows the first seed
            shown = draws[: budget.figure_draws, :2]
            record.draws = [[round(float(v), 3) for v in row] for row in shown]
    return record


def _draws(target: Target, guide: Any, num_samples: int) -> torch.Tensor:
    """``[N, D]`` guide draws of the plotted sites, flattened and concatenated (Predictive).

    The guide alone is run: running the model too would sample its prior, which an improper
    flat prior cannot.
    """
    predictive = Predictive(
        guide,
        num_samples=num_samples,
        return_sites=list(target.plot_sites),
        parallel=True,
    )
    samples = predictive()
    return torch.cat([samples[s].reshape(num_samples, -1) for s in target.plot_sites], -1)


def _extra(target: Target, draws: torch.Tensor) -> float | None:
    if target.name.startswith("ring"):
        angle = torch.atan2(draws[:, 1], draws[:, 0])
        bins = ((angle + math.pi) / (2 * math.pi) * 36).long().clamp(0, 35)
        share = bins.bincount(minlength=36).double() / len(draws)
        return float((share >= 0.5 / 36).double().mean())
    if target.name == "funnel":
        return float(draws[:, 0].double().var())
    return None


def run(
    names: Sequence[str],
    guides: Sequence[str],
    seeds: Sequence[int],
    budget: Budget,
    *,
    out: Path,
    tag: str,
    meta: dict[str, Any],
) -> dict[str, Any]:
    """Trains and scores every (target, guide, seed); rewrites the JSON after each."""
    started = time.time()
    result: dict[str, Any] = {
        **meta,
        "targets": list(names),
        "guides": list(guides),
        "seeds": list(seeds),
        "budget": asdict(budget),
        "started": started,
        "complete": False,
        "truth": {},
        "records": [],
    }
    bar = tqdm(total=len(names) * len(guides) * len(seeds), desc="svi", mininterval=1.0)
    targets = {name: build_target(name, budget) for name in names}
    for name, target in targets.items():
        result["truth"][name] = {
            "log_z": target.log_z,
            "modes": None if target.modes is None else target.modes.tolist(),
            "mode_mass": None if target.mode_mass is None else target.mode_mass.tolist(),
            **target.truth,
        }

    def job(seed: int, name: str, guide_name: str) -> tuple[str, Callable, Callable]:
        def failed(message: str) -> Record:
            return Record(name, guide_name, seed, error=message)

        return (
            f"{name} / {guide_name} / {seed}",
            lambda: train_and_score(targets[name], guide_name, seed, budget),
            failed,
        )

    # Seeds outermost: a run cut short still holds every (target, guide) pair for its first seeds.
    jobs = (job(seed, name, g) for seed in seeds for name in targets for g in guides)
    record_each(jobs, result, lambda: save_run(out, "svi", tag, result), bar)
    return result


# ---------------------------------------------------------------------------------------------
# Report


def load_results(paths: Sequence[Path]) -> list[dict[str, Any]]:
    """Reads runs (oldest first); refuses to mix budgets (see ``_runs.load_runs``)."""
    return load_runs(paths, "svi")


def report(runs: list[dict[str, Any]], out: Path) -> str:
    """Writes ``svi.md`` and ``svi.png`` from the runs (later runs win) and returns the text.

    The records shown go to ``svi.json`` (runs without a shown record are left out), from which
    ``--report`` renders the same files again.
    """
    records, truth, runs = latest_records(runs)
    names = [t for t in TARGETS if t in truth]
    guides = [g for g in GUIDES if any(key[1] == g for key in records)]
    markdown = _markdown(runs, records, truth, names, guides)
    out.mkdir(parents=True, exist_ok=True)
    (out / "svi.md").write_text(markdown)
    _figure(records, truth, names, guides, out / "svi.png")
    save_run(out, "svi", None, {"runs": runs})
    return markdown


def _markdown(
    runs: list[dict[str, Any]],
    records: dict[tuple[str, str, int], dict[str, Any]],
    truth: dict[str, Any],
    names: list[str],
    guides: list[str],
) -> str:
    first = runs[0]
    b = Budget(**first["budget"])
    v = first["versions"]
    seeds = sorted({key[2] for key in records})
    wall = max(r["started"] + r.get("runtime", 0.0) for r in runs) - min(r["started"] for r in runs)
    mode = "quick (smoke test, not a benchmark)" if first["quick"] else "full"
    planned = sum(len(r["targets"]) * len(r["guides"]) * len(r["seeds"]) for r in runs)
    cut = ""
    if not all(r["complete"] for r in runs):
        cut = (
            f"; stopped before the end: {len(records)} of {planned} planned runs done (seeds "
            "are the outer loop, so the last seed may cover only some targets and guides)"
        )
    date = datetime.fromtimestamp(first["started"], UTC).strftime("%Y-%m-%d")
    loads = [r["load_before"][0] for r in runs] + [
        r["load_after"][0] for r in runs if "load_after" in r
    ]
    lines = [
        "# Pyro SVI on multimodal targets",
        "",
        f"{date}; pyro_mixflow {v['pyro_mixflow']}, torch {v['torch']}, pyro-ppl {v['pyro-ppl']}, "
        f"arviz {v['arviz']}, Python {v['python']}; {first['cpu']}; {first['threads']} torch "
        f"thread(s); 1-minute load average {min(loads):.1f}–{max(loads):.1f}.",
        f"Mode: {mode}. Budget: Adam lr {b.lr:g}, {b.steps:,} steps, {b.num_particles} "
        f"particles (`Trace_ELBO(num_particles={b.num_particles}, vectorize_particles=True)`); "
        f"`RaoBlackwellELBO(num_particles=1)` evaluates the model once per component, "
        f"K = {b.num_components}, i.e. the same {b.num_particles} model evaluations per step. "
        f"Seeds {', '.join(map(str, seeds))}; {b.eval_samples:,} guide draws for the "
        f"diagnostics. Total {wall:.0f} s wall clock in {len(runs)} process(es){cut}.",
        "",
        "Means over seeds. **log Z err (IS)**: importance-sampled log-evidence − true log Z "
        "(a guide that misses a share m of the mass tends to log(1 − m)); **ELBO − log Z** = "
        "−KL(q ‖ p); **modes ok**: modes whose share of the draws is within ±0.05 of their "
        "posterior mass, mean [min–max] over seeds; **max |Δshare|**: largest share error; "
        "**k̂**: Pareto k of the importance weights; **s**: seconds of training per run. "
        "Protocol: the docstring of `benchmarks/svi.py`.",
    ]
    for name in names:
        t = truth[name]
        modes = t.get("modes")
        header = f"## {name} (log Z = {t['log_z']:.4f}"
        if name == "label_switching":
            header += (
                f" by quadrature, {t['grid_points_per_axis']}³ grid; change against a coarser "
                f"grid {t['log_z_coarse_grid_change']:+.1e}"
            )
        header += ")"
        extra_name = {
            "ring": "angle covered",
            "ring_flat": "angle covered",
            "funnel": "var v (truth 9)",
        }.get(name)
        columns = ["guide", "log Z err (IS)", "ELBO − log Z"]
        if modes is not None:
            columns += [f"modes ok (of {len(modes)})", "max abs Δshare"]
        if extra_name:
            columns.append(extra_name)
        flat = name.endswith("_flat")
        if flat:
            columns.append("flagged (of seeds)")
        columns += ["k̂", "s", "note"]
        lines += [
            "",
            header,
            "",
            density_benchmark._table_header(columns, align="l" + "r" * (len(columns) - 2) + "l"),
        ]
        for guide in guides:
            rs = runs_of(records, name, guide)
            if not rs:
                continue
            ok = [r for r in rs if r["log_z_error"] is not None]
            errors = sorted({r["error"] for r in rs if r["error"]})
            note = "; ".join(errors)
            if len(ok) < len(rs):
                note = f"{len(rs) - len(ok)} of {len(rs)} seeds failed: {note}"
            cells = [
                GUIDES[guide],
                fmt(finite_mean([r["log_z_error"] for r in ok])),
                fmt(finite_mean([r["elbo_error"] for r in ok])),
            ]
            if modes is not None:
                found = [r["modes_ok"] for r in ok if r["modes_ok"] is not None]
                cells.append(
                    f"{sum(found) / len(found):.1f} [{min(found)}–{max(found)}]" if found else "—"
                )
                cells.append(fmt(finite_mean([r["max_share_error"] for r in ok]), ".3f"))
            if extra_name:
                cells.append(fmt(finite_mean([r["extra"] for r in ok]), ".2f"))
            if flat:
                flags = [r.get("flagged") for r in ok if r.get("flagged") is not None]
                cells.append(f"{sum(flags)}/{len(flags)}" if flags else "—")
            cells += [
                fmt(finite_mean([r["pareto_k"] for r in ok]), ".2f"),
                fmt(finite_mean([r["seconds"] for r in ok]), ".0f"),
                note,
            ]
            lines.append(density_benchmark._row(cells))
    lines += ["", "## Against the issue's targets", "", *_verdicts(records, names, guides), ""]
    return "\n".join(lines)


def _verdicts(records: dict, names: list[str], guides: list[str]) -> list[str]:
    """One line per issue target: which of our guides meet it, on how many seeds."""
    lines = []

    def seeds_meeting(name: str, guide: str, test: Callable[[dict], bool]) -> tuple[int, int]:
        rs = [r for r in runs_of(records, name, guide) if r["log_z_error"] is not None]
        return sum(test(r) for r in rs), len(runs_of(records, name, guide))

    targets = {
        "four_modes": (
            "every mode's share within ±0.05 and |log Z error| < 0.05",
            lambda r: r["modes_ok"] == 4 and abs(r["log_z_error"]) < 0.05,
        ),
        "label_switching": (
            "≥ 5 of 6 modes within ±0.05 and |log Z error| < 0.2",
            lambda r: r["modes_ok"] >= 5 and abs(r["log_z_error"]) < 0.2,
        ),
        "four_modes_flat": (
            "every mode's share within ±0.05 and |log Z error| < 0.05",
            lambda r: r["modes_ok"] == 4 and abs(r["log_z_error"]) < 0.05,
        ),
        "ring_flat": (
            "all 8 sectors within ±0.05",
            lambda r: r["modes_ok"] == 8,
        ),
    }
    for name, (goal, test) in targets.items():
        if name not in names:
            continue
        parts = []
        for guide in guides:
            met, total = seeds_meeting(name, guide, test)
            if total:
                parts.append(f"{GUIDES[guide]} {met}/{total}")
        lines.append(f"- {name}, goal {goal} — seeds meeting it: " + "; ".join(parts) + ".")
    if "funnel" in names and "auto_iaf" in guides:
        iaf = runs_of(records, "funnel", "auto_iaf")
        iaf_err = finite_mean([r["log_z_error"] for r in iaf])
        iaf_elbo = finite_mean([r["elbo_error"] for r in iaf])
        parts = []
        for guide in guides:
            if guide not in OURS:
                continue
            rs = runs_of(records, "funnel", guide)
            if rs:
                err = finite_mean([r["log_z_error"] for r in rs])
                elbo = finite_mean([r["elbo_error"] for r in rs])
                parts.append(f"{GUIDES[guide]} {fmt(err)} / {fmt(elbo)}")
        lines.append(
            f"- funnel, goal no worse than AutoIAFNormal (log Z err {fmt(iaf_err)}, "
            f"ELBO − log Z {fmt(iaf_elbo)}): ours (log Z err / ELBO − log Z) "
            + "; ".join(parts)
            + "."
        )
    return lines


def _figure(
    records: dict, truth: dict[str, Any], names: list[str], guides: list[str], path: Path
) -> None:
    import matplotlib.pyplot as plt

    fig, axes = panel_grid(names, guides, GUIDES)
    for i, name in enumerate(names):
        xs, ys, density = _truth_grid(name)
        for j, guide in enumerate(guides):
            ax = axes[i, j]
            if density is not None:
                ax.contour(xs, ys, density, levels=6, colors="0.6", linewidths=0.5)
            modes = truth[name].get("modes")
            if modes is not None and name == "label_switching":
                ax.scatter([m[0] for m in modes], [m[1] for m in modes], marker="+", c="0.4", s=30)
            rs = runs_of(records, name, guide)
            r = next((r for r in rs if r.get("draws")), None)
            if r is None:
                ax.text(0.5, 0.5, "failed", ha="center", transform=ax.transAxes)
                continue
            draws = torch.tensor(r["draws"])
            ax.scatter(draws[:, 0], draws[:, 1], s=1, alpha=0.5, c="C3")
            ax.set_xlim(xs[0], xs[-1])
            ax.set_ylim(ys[0], ys[-1])
            if r["log_z_error"] is not None:
                ax.text(
                    0.03,
                    0.03,
                    f"Δlog Z {r['log_z_error']:+.2f}",
                    transform=ax.transAxes,
                    fontsize=6,
                    bbox={"facecolor": "white", "alpha": 0.7, "pad": 1, "lw": 0},
                )
    fig.suptitle(
        "guide draws (first seed) over the target; label_switching: (μ1, μ2) with the 6 modes; "
        "funnel: (v, x1)",
        fontsize=8,
    )
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _truth_grid(name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    if name == "label_switching":
        axis = torch.linspace(-7, 7, 100)
        return axis, axis, None
    if name == "funnel":
        vs, xs = torch.linspace(-9, 9, 120), torch.linspace(-15, 15, 120)
        vv, xx = torch.meshgrid(vs, xs, indexing="ij")
        log_p = dist.Normal(0, 3).log_prob(vv) + dist.Normal(0, (vv / 2).exp()).log_prob(xx)
        return vs, xs, log_p.exp().T
    axis = torch.linspace(-7, 7, 150)
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    grid = torch.stack([xx, yy], -1)
    log_p = (
        four_modes_log_density(grid) if name.startswith("four_modes") else ring_log_density(grid)
    )
    return axis, axis, log_p.exp()


# ---------------------------------------------------------------------------------------------
# Command line


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny budget, seconds")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default: benchmarks/results; with --quick, a temporary folder)",
    )
    parser.add_argument("--targets", nargs="+", choices=TARGETS, default=list(TARGETS))
    parser.add_argument("--guides", nargs="+", choices=list(GUIDES), default=list(GUIDES))
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (0, 1, ...)")
    parser.add_argument("--steps", type=int, default=None, help="override the number of steps")
    add_run_arguments(parser, "svi")
    args = parser.parse_args(argv)
    args.out = output_folder(args, "svi", __file__)
    if args.report is not None:
        print(report(load_results(report_paths(args, "svi")), args.out))
        return 0

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    budget = QUICK if args.quick else FULL
    if args.steps is not None:
        budget = Budget(**{**asdict(budget), "steps": args.steps})
    seeds = list(range(1 if args.quick else args.seeds))
    names = [t for t in TARGETS if t in args.targets]
    guides = [g for g in GUIDES if g in args.guides]
    tag = run_tag(args, names, guides, list(GUIDES))
    meta = run_meta(
        args,
        argv,
        density_benchmark.versions(("torch", "pyro-ppl", "arviz", "numpy")),
        f"{density_benchmark._cpu_name()}, {os.cpu_count()} logical CPUs",
    )
    with threadpool_limits(args.threads):
        result = run(names, guides, seeds, budget, out=args.out, tag=tag, meta=meta)
    print(f"svi: {result['runtime']:.0f} s; results in {args.out}/svi-{tag}.json")
    if not args.no_report:
        print(report(load_results([args.out / f"svi-{tag}.json"]), args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
