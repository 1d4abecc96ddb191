r"""Pyro SVI on sbibm's tractable posteriors: mixture autoguides against Pyro's guides and NUTS.

Four tasks of the simulation-based inference benchmark ``sbibm`` (Lueckmann et al., 2021,
arXiv:2101.04653) whose likelihood is tractable, written as Pyro models: a latent site
``theta`` with the task's prior and a ``pyro.factor`` of the log-likelihood of the task's
observation. Each guide is trained by stock ``pyro.infer.SVI`` and scored by C2ST against
sbibm's reference posterior samples.

**Tasks** (the likelihoods are vectorized rewrites of the simulators; ``tests/test_sbibm_svi.py``
checks them against sbibm's own log-probabilities):

* ``two_moons`` (2-D, two crescents): prior :math:`\mathcal U([-1, 1]^2)`;
  :math:`x = (r\cos a + 0.25 - |z_0|,\ r\sin a + z_1)` with :math:`z` the parameters rotated by
  45°, :math:`a \sim \mathcal U(-\pi/2, \pi/2)` and :math:`r \sim \mathcal N(0.1, 0.01^2)`, so
  :math:`p(x \mid \theta) = \mathcal N(r; 0.1, 0.01^2) / (\pi r)` for :math:`u = r\cos a \ge 0`,
  zero otherwise. sbibm's ``_likelihood`` leaves out the Jacobian :math:`1 / (\pi r)`, which its
  reference samples (drawn from the simulator) include; so do we. The step at :math:`u = 0` is
  smoothed into :math:`\Phi(u / 10^{-3})` so that the ELBO stays finite where a guide draw
  falls outside; it moves about 0.25 % of the mass by about :math:`10^{-3}`.
* ``slcp`` (5-D, four modes: the signs of :math:`\theta_3, \theta_4`): prior
  :math:`\mathcal U([-3, 3]^5)`; four 2-D points, each :math:`\mathcal N(m, S)` with
  :math:`m = (\theta_1, \theta_2)`, :math:`S` built from :math:`s_1 = \theta_3^2`,
  :math:`s_2 = \theta_4^2`, :math:`\rho = \tanh\theta_5` (and sbibm's :math:`10^{-6}` on the
  diagonal).
* ``gaussian_mixture`` (2-D): prior :math:`\mathcal U([-10, 10]^2)`;
  :math:`x \sim \frac12 \mathcal N(\theta, I) + \frac12 \mathcal N(\theta, 0.01 I)`.
* ``bernoulli_glm`` (10-D): Gaussian smoothness prior (sbibm's precision matrix); 100
  Bernoulli spikes with logits :math:`X\theta`, observed through the sufficient statistics
  :math:`s = X^\top y` (sbibm's observation), so
  :math:`\log p(y \mid \theta) = s^\top\theta - \sum_t \log(1 + e^{(X\theta)_t})`.

The box priors are ``Uniform(low, high).to_event(1)``, so every guide works in the
unconstrained (logit) space.

**Methods** (one budget for every guide: Adam, learning rate 5e-3, 3,000 steps):

* Pyro's ``AutoNormal``, ``AutoMultivariateNormal``, ``AutoIAFNormal`` (defaults) and
  ``AutoNormalizingFlow`` with two ``spline_autoregressive`` transforms (16 bins), the order of
  the coordinates reversed between them; the spline's bound covers the prior in the
  unconstrained space (99.9 % of a box prior's logistic image, :math:`\log 1999 \approx 7.6`;
  four prior standard deviations of the widest coordinate of a Gaussian prior). All trained with
  ``Trace_ELBO(num_particles=8, vectorize_particles=True)``.
* Ours with their defaults (K = 16 components) and ``RaoBlackwellELBO(num_particles=1)``, which
  evaluates the model once per component (16 evaluations per step against Pyro's 8):
  ``AutoGaussianMixture``, ``AutoGaussianMixture(covariance="full")`` and
  ``AutoMixtureBaseFlow``; and both ``AutoGaussianMixture`` rows again with
  ``RaoBlackwellELBO(num_particles=1, stick_the_landing=True)`` (the entropy's score term
  dropped from the gradient).
* Pyro's NUTS (``MCMC(NUTS(model))``, defaults otherwise) at about the wall clock of the slowest
  guide on the same task and observation in the same process (``--nuts-seconds`` when it runs
  alone): a timing pilot (100 warmup + 100 draws, counted) sets the iterations of
  ``--nuts-chains`` (4) chains run one after the other from different seeds, each with up to
  500 warmup steps. Chains get equal weights: more than 10,000 draws are thinned evenly within
  each chain; fewer are repeated in turn up to 10,000 (the report gives the distinct draws).

**Score**: 10,000 draws of each guide (``Predictive``) against sbibm's 10,000 reference samples
by ``sbibm.metrics.c2st`` with its defaults (5-fold accuracy of an MLP classifier, 0.5 when the
two sets cannot be told apart; z-scored by the reference), for observations 1-5 (seed =
observation number), reported as mean ± standard error over observations. **Seconds**: wall
clock of the SVI steps (NUTS: the pilot and all chains) on one torch thread. C2ST runs in
``--jobs`` worker processes while the next guide trains (``--jobs 0``: inline), and the scores
still queued when training ends in ``--final-jobs`` (one per CPU).

**Outputs** (in ``--out``): ``sbibm_svi-<tag>.json`` (one process; rewritten after every run
and every score), then the report: ``sbibm_svi.md``, ``sbibm_svi.png`` (the first two
coordinates of 500 draws of each method against the reference, observation 1) and
``sbibm_svi.json`` (the runs the report shows; later records win).

Usage::

    python benchmarks/sbibm_svi.py --quick                 # smoke test (seconds) into $TMPDIR
    python benchmarks/sbibm_svi.py                         # everything, observations 1-5
    python benchmarks/sbibm_svi.py --tasks slcp --tag a --no-report     # one part of the run
    python benchmarks/sbibm_svi.py --report                # sbibm_svi.json + sbibm_svi-*.json

Needs sbibm (``pip install --no-deps sbibm future autograd``) and scikit-learn.
"""

from __future__ import annotations

import argparse
import logging
import math
import multiprocessing as mp
import os
import platform
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
from pyro.infer import MCMC, NUTS, SVI, Predictive, Trace_ELBO
from pyro.infer.autoguide import (
    AutoIAFNormal,
    AutoMultivariateNormal,
    AutoNormal,
    AutoNormalizingFlow,
)
from threadpoolctl import threadpool_limits

import pyro_mixflow
from pyro_mixflow.infer import AutoGaussianMixture, AutoMixtureBaseFlow, RaoBlackwellELBO

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runs import (
    add_run_arguments,
    load_runs,
    output_folder,
    panel_grid,
    report_paths,
    run_meta,
    run_tag,
    save_run,
)

TASKS = ("two_moons", "slcp", "gaussian_mixture", "bernoulli_glm")
GUIDES = {
    "auto_normal": "AutoNormal (Pyro)",
    "auto_mvn": "AutoMultivariateNormal (Pyro)",
    "auto_iaf": "AutoIAFNormal (Pyro)",
    "spline_flow": "AutoNormalizingFlow, 2 spline AR (Pyro)",
    "agm": "AutoGaussianMixture (ours)",
    "agm_full": "AutoGaussianMixture, full covariance (ours)",
    "mbf": "AutoMixtureBaseFlow (ours)",
    "agm_stl": "AutoGaussianMixture, sticking the landing (ours)",
    "agm_full_stl": "AutoGaussianMixture, full covariance, sticking the landing (ours)",
    "nuts": "NUTS (Pyro MCMC)",
}
PYRO_GUIDES = ("auto_normal", "auto_mvn", "auto_iaf", "spline_flow")
OURS = ("agm", "agm_full", "mbf", "agm_stl", "agm_full_stl")
FIGURE_OBSERVATION = 1  # the observation the figure shows
NUTS_WITHIN = 0.05  # the target: our best guide within this C2ST of NUTS
NUTS_TASKS = ("two_moons", "slcp")
TWO_MOONS_EDGE = 1e-3  # width of the smoothed step at u = 0 (two_moons)


@dataclass(frozen=True)
class Budget:
    """Sizes of one run; :data:`FULL` is the benchmark, :data:`QUICK` a smoke test."""

    steps: int = 3000
    lr: float = 5e-3
    num_particles: int = 8  # Trace_ELBO particles; RaoBlackwellELBO: 1 particle × K components
    draws: int = 10_000  # guide draws for C2ST (and at most this many reference draws)
    figure_draws: int = 500
    nuts_seconds: float = 120.0  # NUTS's wall clock when no guide ran before it
    nuts_chains: int = 4
    nuts_warmup: int = 500  # per chain, at most
    nuts_pilot: int = 100  # warmup steps and draws of the timing pilot, each
    c2st_folds: int = 5  # sbibm's default


FULL = Budget()
QUICK = Budget(
    steps=20,
    draws=100,
    figure_draws=100,
    nuts_seconds=1.0,
    nuts_chains=2,
    nuts_pilot=3,
    c2st_folds=2,
)


# ---------------------------------------------------------------------------------------------
# Likelihoods and models


def two_moons_log_likelihood(theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    r"""Log-likelihood of the two-moons simulator, Jacobian included, with a smoothed edge.

    .. math::

        \log p(x \mid \theta) = \log\mathcal N(r; 0.1, 0.01^2) - \log(\pi r)
        + \log\Phi(u / 10^{-3}),

    where :math:`(u, v) = (x_0 + |z_0| - 0.25,\ x_1 - z_1)`, :math:`r = \lVert (u, v) \rVert`,
    :math:`z_0 = (\theta_0 + \theta_1)/\sqrt2`, :math:`z_1 = (\theta_1 - \theta_0)/\sqrt2`.

    Args:
        theta: Parameters, ``[..., 2]``.
        x: One observation, ``[2]``.

    Returns:
        ``[...]`` log-likelihoods.
    """
    half = math.sqrt(0.5)
    z0 = half * (theta[..., 0] + theta[..., 1])
    z1 = half * (theta[..., 1] - theta[..., 0])
    u = x[0] + z0.abs() - 0.25
    v = x[1] - z1
    r = torch.hypot(u, v).clamp_min(1e-30)
    radial = dist.Normal(0.1, 0.01).log_prob(r) - torch.log(math.pi * r)
    return radial + torch.special.log_ndtr(u / TWO_MOONS_EDGE)


def slcp_log_likelihood(theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    r"""Log-likelihood of SLCP's four 2-D Gaussian points, in closed form for 2 × 2 covariances.

    .. math::

        \log p(x \mid \theta) = \sum_{n=1}^4 \log \mathcal N(x_n; m, S), \quad
        S = \begin{pmatrix} s_1^2 + \epsilon & \rho s_1 s_2 \\ \rho s_1 s_2 & s_2^2 + \epsilon
        \end{pmatrix},

    with :math:`m = (\theta_1, \theta_2)`, :math:`s_1 = \theta_3^2`, :math:`s_2 = \theta_4^2`,
    :math:`\rho = \tanh \theta_5`, :math:`\epsilon = 10^{-6}` (sbibm's). The determinant is
    summed from positive terms (:math:`1 - \rho^2 = \cosh^{-2}\theta_5`).

    Args:
        theta: Parameters, ``[..., 5]``.
        x: One observation, ``[8]`` (four points, flattened as sbibm stores them) or ``[4, 2]``.

    Returns:
        ``[...]`` log-likelihoods.
    """
    eps = 1e-6
    points = x.reshape(-1, 2)  # [4, 2]
    a = theta[..., 2] ** 4  # s1²
    d = theta[..., 3] ** 4  # s2²
    b = torch.tanh(theta[..., 4]) * (theta[..., 2] * theta[..., 3]) ** 2  # rho s1 s2
    det = a * d * torch.cosh(theta[..., 4]).pow(-2) + eps * (a + d) + eps**2
    diff = points - theta[..., None, :2]  # [..., 4, 2]
    quad = (d + eps)[..., None] * diff[..., 0] ** 2 + (a + eps)[..., None] * diff[..., 1] ** 2
    quad = quad - 2 * b[..., None] * diff[..., 0] * diff[..., 1]  # [..., 4]
    per_point = -0.5 * quad / det[..., None] - 0.5 * det.log()[..., None] - math.log(2 * math.pi)
    return per_point.sum(-1)


def gaussian_mixture_log_likelihood(theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    r"""Log-likelihood of sbibm's Gaussian mixture simulator.

    .. math::

        p(x \mid \theta) = \tfrac12 \mathcal N(x; \theta, I) + \tfrac12 \mathcal N(x; \theta,
        0.1^2 I).

    Args:
        theta: Parameters, ``[..., 2]``.
        x: One observation, ``[2]``.

    Returns:
        ``[...]`` log-likelihoods.
    """
    scales = torch.tensor([1.0, 0.1]).to(theta)
    log_component = dist.Normal(theta[..., None, :], scales[:, None]).log_prob(x)  # [..., 2, 2]
    return (log_component.sum(-1) + math.log(0.5)).logsumexp(-1)


def bernoulli_glm_log_likelihood(
    theta: torch.Tensor, stats: torch.Tensor, design: torch.Tensor
) -> torch.Tensor:
    r"""Log-likelihood of the Bernoulli GLM's spike train, from its sufficient statistics.

    .. math::

        \log p(y \mid \theta) = s^\top \theta - \sum_t \log\left(1 + e^{(X\theta)_t}\right),
        \quad s = X^\top y.

    Args:
        theta: Parameters, ``[..., 10]``.
        stats: The sufficient statistics :math:`X^\top y`, ``[10]`` (sbibm's observation).
        design: The design matrix :math:`X`, ``[T, 10]``.

    Returns:
        ``[...]`` log-likelihoods.
    """
    logits = theta @ design.T  # [..., T]
    return theta @ stats - torch.nn.functional.softplus(logits).sum(-1)


@dataclass
class Posterior:
    """One task and observation as a Pyro model, with sbibm's reference samples."""

    task: str
    observation: int
    prior: dist.TorchDistribution
    log_likelihood: Callable[[torch.Tensor], torch.Tensor]
    reference: torch.Tensor  # [10000, D]

    @property
    def dim(self) -> int:
        """The number of parameters."""
        return self.reference.shape[-1]

    def model(self) -> None:
        """The Pyro model: ``theta`` from the prior, a factor of the log-likelihood."""
        theta = pyro.sample("theta", self.prior)
        pyro.factor("log_likelihood", self.log_likelihood(theta))


def load_posterior(task_name: str, observation: int) -> Posterior:
    """The posterior of an sbibm task given its observation ``observation`` (1 to 10).

    sbibm switches torch's argument validation off for the whole process when it builds a
    task (``set_default_validate_args(False)``), as its own scripts run.

    Args:
        task_name: One of :data:`TASKS`.
        observation: sbibm's observation number.

    Returns:
        The model's pieces and the reference posterior samples.
    """
    import sbibm

    if task_name not in TASKS:
        raise ValueError(f"unknown task {task_name!r}; choose from {TASKS}")
    task = sbibm.get_task(task_name)
    x = task.get_observation(num_observation=observation).reshape(-1)
    reference = task.get_reference_posterior_samples(num_observation=observation)
    params = task.prior_params
    if task_name == "bernoulli_glm":
        covariance = torch.linalg.inv(params["precision_matrix"])
        scale_tril = torch.linalg.cholesky(covariance)
        prior = dist.MultivariateNormal(params["loc"], scale_tril=scale_tril)
        design = torch.load(task.path / "files" / "design_matrix.pt")
        log_likelihood = partial(bernoulli_glm_log_likelihood, stats=x, design=design)
    else:
        prior = dist.Uniform(params["low"], params["high"]).to_event(1)
        function = {
            "two_moons": two_moons_log_likelihood,
            "slcp": slcp_log_likelihood,
            "gaussian_mixture": gaussian_mixture_log_likelihood,
        }[task_name]
        log_likelihood = partial(function, x=x)
    return Posterior(task_name, observation, prior, log_likelihood, reference)


# ---------------------------------------------------------------------------------------------
# Methods


def spline_bound(prior: dist.TorchDistribution) -> float:
    r"""The spline flow's bound: where the prior lies in the unconstrained space.

    Args:
        prior: A box prior (``Uniform(...).to_event(1)``) or a Gaussian one.

    Returns:
        :math:`\log 1999` (99.9 % of a box prior's logistic image) for a box prior, four
        standard deviations of the widest coordinate for a Gaussian one.
    """
    if isinstance(prior, dist.MultivariateNormal):
        return 4.0 * float(prior.covariance_matrix.diagonal().sqrt().max())
    return math.log(1999.0)


def _spline_flow(dim: int, bound: float) -> T.ComposeTransformModule:
    """Two spline autoregressive transforms with the coordinate order reversed in between."""
    return T.ComposeTransformModule(
        [
            T.spline_autoregressive(dim, count_bins=16, bound=bound),
            T.Permute(torch.arange(dim - 1, -1, -1)),
            T.spline_autoregressive(dim, count_bins=16, bound=bound),
        ]
    )


def build_guide(name: str, posterior: Posterior, budget: Budget) -> tuple[Any, Any]:
    """``(guide, elbo)`` of the guide ``name`` for the posterior's model.

    Args:
        name: A key of :data:`GUIDES` other than ``"nuts"``.
        posterior: The task and observation.
        budget: The run's sizes (particles).

    Returns:
        The autoguide and the ELBO it is trained with.
    """
    model = posterior.model
    trace_elbo = Trace_ELBO(num_particles=budget.num_particles, vectorize_particles=True)
    if name == "auto_normal":
        return AutoNormal(model), trace_elbo
    if name == "auto_mvn":
        return AutoMultivariateNormal(model), trace_elbo
    if name == "auto_iaf":
        return AutoIAFNormal(model), trace_elbo
    if name == "spline_flow":
        flow = partial(_spline_flow, bound=spline_bound(posterior.prior))
        return AutoNormalizingFlow(model, flow), trace_elbo
    rao_blackwell = RaoBlackwellELBO(num_particles=1)
    if name == "agm":
        return AutoGaussianMixture(model), rao_blackwell
    if name == "agm_full":
        return AutoGaussianMixture(model, covariance="full"), rao_blackwell
    if name in ("agm_stl", "agm_full_stl"):
        covariance = "full" if name == "agm_full_stl" else "diag"
        elbo = RaoBlackwellELBO(num_particles=1, stick_the_landing=True)
        return AutoGaussianMixture(model, covariance=covariance), elbo
    if name == "mbf":
        return AutoMixtureBaseFlow(model), rao_blackwell
    raise ValueError(f"unknown guide {name!r}; choose from {list(GUIDES)}")


@dataclass
class Record:
    """One (task, method, observation) result, as stored in the JSON."""

    task: str
    method: str
    observation: int
    c2st: float | None = None
    seconds: float | None = None
    final_loss: float | None = None  # mean loss over the last 10 % of the steps
    nonfinite_losses: int | None = None  # steps whose loss was not finite
    num_draws: int | None = None  # distinct draws compared by C2ST (NUTS: may be repeated)
    nuts: dict[str, Any] | None = None  # NUTS: chains, warmup, draws, divergences, target s
    error: str = ""


def train_guide(
    posterior: Posterior, name: str, budget: Budget, seed: int
) -> tuple[Record, torch.Tensor | None]:
    """Trains one guide by SVI and draws from it.

    Args:
        posterior: The task and observation.
        name: A key of :data:`GUIDES` other than ``"nuts"``.
        budget: Steps, learning rate, particles and draws.
        seed: Pyro's seed, set before the guide is built.

    Returns:
        The record (without its C2ST) and ``[budget.draws, D]`` draws, or ``None`` when the
        training failed.
    """
    record = Record(posterior.task, name, posterior.observation)
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    guide, elbo = build_guide(name, posterior, budget)
    svi = SVI(posterior.model, guide, pyro.optim.Adam({"lr": budget.lr}), elbo)
    losses = []
    start = time.perf_counter()
    for _ in range(budget.steps):
        losses.append(svi.step())
    record.seconds = time.perf_counter() - start
    tail = losses[-max(1, budget.steps // 10) :]
    record.final_loss = sum(tail) / len(tail)
    record.nonfinite_losses = sum(not math.isfinite(v) for v in losses)
    with torch.no_grad():
        predictive = Predictive(
            guide, num_samples=budget.draws, return_sites=["theta"], parallel=True
        )
        draws = predictive()["theta"].reshape(budget.draws, -1)
    if not torch.isfinite(draws).all():
        record.error = "non-finite draws"
        return record, None
    return record, draws


def run_nuts(
    posterior: Posterior, budget: Budget, seed: int, seconds: float
) -> tuple[Record, torch.Tensor]:
    """NUTS chains at about ``seconds`` of wall clock, pilot included.

    A pilot chain (``budget.nuts_pilot`` warmup steps and draws) measures the seconds per
    iteration; then ``budget.nuts_chains`` chains, one after the other, share what is left,
    each with ``min(budget.nuts_warmup, half its iterations)`` warmup steps. Each chain keeps
    the same number of draws; more than ``budget.draws`` in all are thinned evenly in each,
    fewer are repeated in turn up to ``budget.draws``.

    Args:
        posterior: The task and observation.
        budget: Chains, warmup and draws.
        seed: Pyro's seed of the pilot; chain ``c`` uses ``seed + 1 + c``.
        seconds: The wall clock to aim at.

    Returns:
        The record (without its C2ST) and the ``[budget.draws, D]`` draws.
    """
    record = Record(posterior.task, "nuts", posterior.observation)
    start = time.perf_counter()
    pyro.set_rng_seed(seed)
    pilot = MCMC(
        NUTS(posterior.model),
        num_samples=budget.nuts_pilot,
        warmup_steps=budget.nuts_pilot,
        disable_progbar=True,
    )
    pilot.run()
    per_iteration = (time.perf_counter() - start) / (2 * budget.nuts_pilot)
    left = max(0.0, seconds - (time.perf_counter() - start))
    iterations = max(8, int(left / budget.nuts_chains / per_iteration))  # diagnostics: 4 draws
    warmup = min(budget.nuts_warmup, iterations // 2)
    num_samples = iterations - warmup
    chains, divergences = [], 0
    for chain in range(budget.nuts_chains):
        pyro.set_rng_seed(seed + 1 + chain)
        mcmc = MCMC(
            NUTS(posterior.model),
            num_samples=num_samples,
            warmup_steps=warmup,
            disable_progbar=True,
        )
        mcmc.run()
        chains.append(mcmc.get_samples()["theta"].reshape(num_samples, -1))
        divergences += sum(len(d) for d in mcmc.diagnostics()["divergences"].values())
    record.seconds = time.perf_counter() - start
    per_chain = min(num_samples, budget.draws // budget.nuts_chains)
    draws = torch.cat([c[_spread(num_samples, per_chain)] for c in chains])
    record.num_draws = len(draws)  # distinct draws
    draws = draws[torch.arange(budget.draws) % len(draws)]
    record.nuts = {
        "target_seconds": seconds,
        "chains": budget.nuts_chains,
        "warmup": warmup,
        "samples_per_chain": num_samples,
        "divergences": divergences,
    }
    if not torch.isfinite(draws).all():
        record.error = "non-finite draws"
    return record, draws


def c2st_job(draws: np.ndarray, reference: np.ndarray, n_folds: int = 5) -> float:
    """The C2ST of sbibm (its defaults, z-scored by the reference) on one thread.

    Args:
        draws: ``[N, D]`` draws of a method.
        reference: ``[N, D]`` reference posterior draws.
        n_folds: Cross-validation folds (sbibm's default 5; the smoke test takes 2).

    Returns:
        The cross-validated accuracy of the classifier (0.5: indistinguishable).
    """
    from sbibm.metrics import c2st

    torch.set_num_threads(1)
    with threadpool_limits(1), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn's convergence warnings
        score = c2st(torch.from_numpy(reference), torch.from_numpy(draws), n_folds=n_folds)
        return float(score[0])


# ---------------------------------------------------------------------------------------------
# Running


def _run(
    tasks: Sequence[str],
    methods: Sequence[str],
    observations: Sequence[int],
    budget: Budget,
    *,
    jobs: int,
    final_jobs: int,
    out: Path,
    tag: str,
    meta: dict[str, Any],
) -> dict[str, Any]:
    """Trains and scores every (observation, task, method); rewrites the JSON after each."""
    started = time.time()
    result: dict[str, Any] = {
        **meta,
        "tasks": list(tasks),
        "methods": list(methods),
        "observations": list(observations),
        "budget": asdict(budget),
        "started": started,
        "complete": False,
        "records": [],
        "figure": {},
    }
    spawn = mp.get_context("spawn")
    pool = ProcessPoolExecutor(max_workers=jobs, mp_context=spawn) if jobs else None
    pools = [pool] if pool is not None else []
    pending: list[tuple[dict[str, Any], tuple, Future]] = []  # record, C2ST inputs, job
    total = len(tasks) * len(methods) * len(observations)
    try:
        # Observations outermost: a run cut short holds every (task, method) pair for the first.
        for observation in observations:
            for task_name in tasks:
                posterior = load_posterior(task_name, observation)
                if observation == FIGURE_OBSERVATION:
                    shown = posterior.reference[: budget.figure_draws].tolist()
                    result["figure"][f"{task_name}/reference"] = _rounded(shown)
                slowest = 0.0
                for name in methods:
                    done = len(result["records"])
                    print(
                        f"[{done + 1}/{total}] {task_name} / {name} / obs {observation}", flush=True
                    )
                    draws = None
                    try:
                        if name == "nuts":
                            seconds = slowest or budget.nuts_seconds
                            record, draws = run_nuts(posterior, budget, observation, seconds)
                        else:
                            record, draws = train_guide(posterior, name, budget, observation)
                            slowest = max(slowest, record.seconds or 0.0)
                    except Exception as exc:  # a failing method is a result, not a crash
                        traceback.print_exc()
                        record = Record(task_name, name, observation)
                        record.error = (
                            f"{type(exc).__name__}: {str(exc).partition(chr(10))[0][:200]}"
                        )
                    row = asdict(record)
                    result["records"].append(row)
                    if draws is not None and not record.error:
                        n = min(len(draws), budget.draws, len(posterior.reference))
                        row["num_draws"] = row["num_draws"] or n
                        inputs = (
                            draws[:n].numpy().astype(np.float32),
                            posterior.reference[:n].numpy().astype(np.float32),
                            budget.c2st_folds,
                        )
                        if pool is None:
                            row["c2st"] = c2st_job(*inputs)
                        else:
                            pending.append((row, inputs, pool.submit(c2st_job, *inputs)))
                        if observation == FIGURE_OBSERVATION:  # spread over NUTS's chains
                            shown = draws[_spread(len(draws), budget.figure_draws)].tolist()
                            result["figure"][f"{task_name}/{name}"] = _rounded(shown)
                    pending = _collect(pending, block=False)
                    result["runtime"] = time.time() - started
                    _save(out, tag, result)
        # Training is over: the scores still queued move to a pool on the other cores.
        if pool is not None and pending and final_jobs > jobs:
            pools.append(ProcessPoolExecutor(max_workers=final_jobs - jobs, mp_context=spawn))
            for i, (row, inputs, job) in enumerate(pending):
                if job.cancel():
                    pending[i] = (row, inputs, pools[1].submit(c2st_job, *inputs))
        for item in pending:
            _collect([item], block=True)
            _save(out, tag, result)
    finally:
        for executor in pools:
            executor.shutdown(cancel_futures=True)
    result["complete"] = True
    result["runtime"] = time.time() - started
    result["load_after"] = os.getloadavg()
    _save(out, tag, result)
    return result


def _spread(length: int, count: int) -> torch.Tensor:
    """At most ``count`` evenly spaced indices into ``range(length)``."""
    return torch.linspace(0, length - 1, min(count, length)).round().long()


def _rounded(rows: list[list[float]]) -> list[list[float]]:
    return [[round(v, 4) for v in row] for row in rows]


def _collect(
    pending: list[tuple[dict[str, Any], tuple, Future]], *, block: bool
) -> list[tuple[dict[str, Any], tuple, Future]]:
    """Stores the finished C2ST scores in their records (all of them when ``block``)."""
    left = []
    for row, inputs, job in pending:
        if block or job.done():
            try:
                row["c2st"] = job.result()
            except Exception as exc:
                row["error"] = f"C2ST failed: {type(exc).__name__}: {exc}"[:200]
        else:
            left.append((row, inputs, job))
    return left


def _save(out: Path, tag: str | None, result: dict[str, Any]) -> None:
    save_run(out, "sbibm_svi", tag, result)


# ---------------------------------------------------------------------------------------------
# Report


def load_results(paths: Sequence[Path]) -> list[dict[str, Any]]:
    """Reads runs (oldest first); refuses to mix budgets (see ``_runs.load_runs``)."""
    return load_runs(paths, "sbibm_svi")


def report(runs: list[dict[str, Any]], out: Path) -> str:
    """Writes ``sbibm_svi.{md,png,json}`` from the runs (later records win).

    Args:
        runs: From :func:`load_results`.
        out: The folder to write to.

    Returns:
        The markdown text.
    """
    records: dict[tuple[str, str, int], dict[str, Any]] = {}
    figure: dict[str, Any] = {}
    for run_ in runs:
        for r in run_["records"]:
            records[r["task"], r["method"], r["observation"]] = r
        if FIGURE_OBSERVATION in run_.get("observations", [FIGURE_OBSERVATION]):
            figure.update(run_.get("figure", {}))  # (runs before 2026-12-06 drew the first)
    shown_runs = []
    for run_ in runs:
        shown = [
            r for r in run_["records"] if records[r["task"], r["method"], r["observation"]] is r
        ]
        if shown:
            shown_runs.append({**run_, "records": shown})
    tasks = [t for t in TASKS if any(key[0] == t for key in records)]
    methods = [m for m in GUIDES if any(key[1] == m for key in records)]
    markdown = _markdown(shown_runs, records, tasks, methods)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sbibm_svi.md").write_text(markdown)
    _figure(figure, tasks, methods, out / "sbibm_svi.png")
    _save(out, None, {"runs": shown_runs})
    return markdown


def _scores(records: dict, task: str, method: str) -> list[dict[str, Any]]:
    return [r for (t, m, _), r in sorted(records.items()) if t == task and m == method]


def _mean_se(values: Sequence[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(var / len(values))


def _pm(mean: float | None, se: float | None) -> str:
    if mean is None:
        return "—"
    return f"{mean:.3f}" if se is None else f"{mean:.3f} ± {se:.3f}"


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _markdown(
    runs: list[dict[str, Any]], records: dict, tasks: list[str], methods: list[str]
) -> str:
    first = runs[0]
    b = Budget(**first["budget"])
    v = first["versions"]
    observations = sorted({key[2] for key in records})
    wall = max(r["started"] + r.get("runtime", 0.0) for r in runs) - min(r["started"] for r in runs)
    mode = "quick (smoke test, not a benchmark)" if first["quick"] else "full"
    date = datetime.fromtimestamp(first["started"], UTC).strftime("%Y-%m-%d")
    loads = [r["load_before"][0] for r in runs] + [
        r["load_after"][0] for r in runs if "load_after" in r
    ]
    cut = "" if all(r["complete"] for r in runs) else "; stopped before the end"
    lines = [
        "# Pyro SVI on sbibm posteriors (C2ST against the reference, 0.5 is best)",
        "",
        f"{date}; pyro_mixflow {v['pyro_mixflow']}, torch {v['torch']}, pyro-ppl {v['pyro-ppl']}, "
        f"sbibm {v['sbibm']}, scikit-learn {v['scikit-learn']}, Python {v['python']}; "
        f"{first['cpu']}; {first['threads']} torch thread(s); 1-minute load average "
        f"{min(loads):.1f}–{max(loads):.1f}.",
        f"Mode: {mode}. Budget: Adam lr {b.lr:g}, {b.steps:,} steps; Pyro's guides "
        f"`Trace_ELBO(num_particles={b.num_particles}, vectorize_particles=True)`, ours "
        "`RaoBlackwellELBO(num_particles=1)` (K = 16: 16 model evaluations per step). "
        f"C2ST (`sbibm.metrics.c2st`, {b.c2st_folds}-fold) of {b.draws:,} draws against as many "
        f"reference draws; observations {', '.join(map(str, observations))}. Total {wall:.0f} s "
        f"wall clock in {len(runs)} process(es){cut}. Protocol: the docstring of "
        "`benchmarks/sbibm_svi.py`.",
        "",
        "C2ST, mean ± standard error over observations (bold: best of each column):",
        "",
        _row(["method", *tasks]),
        _row(["---", *["---:"] * len(tasks)]),
    ]
    means: dict[tuple[str, str], float] = {}
    cells: dict[tuple[str, str], str] = {}
    for task in tasks:
        for method in methods:
            rs = _scores(records, task, method)
            scored = [r["c2st"] for r in rs if r["c2st"] is not None]
            mean, se = _mean_se(scored)
            text = _pm(mean, se)
            if rs and len(scored) < len(rs):
                errors = sorted({r["error"] for r in rs if r["error"]})
                text += f" ({len(rs) - len(scored)} of {len(rs)} failed{': ' if errors else ''}"
                text += "; ".join(errors)[:80] + ")"
            cells[task, method] = text
            if mean is not None:
                means[task, method] = mean
    for task in tasks:
        scored = [means[task, m] for m in methods if (task, m) in means]
        for method in methods:
            if scored and means.get((task, method)) == min(scored):
                cells[task, method] = f"**{cells[task, method]}**"
    for method in methods:
        lines.append(_row([GUIDES[method], *[cells[t, method] for t in tasks]]))
    lines += [
        "",
        "Seconds of training (NUTS: pilot and chains), mean over observations:",
        "",
        _row(["method", *tasks]),
        _row(["---", *["---:"] * len(tasks)]),
    ]
    for method in methods:
        row = []
        for task in tasks:
            secs = [r["seconds"] for r in _scores(records, task, method) if r["seconds"]]
            row.append(f"{sum(secs) / len(secs):.0f}" if secs else "—")
        lines.append(_row([GUIDES[method], *row]))
    nuts = [r for (_, m, _), r in sorted(records.items()) if m == "nuts" and r.get("nuts")]
    if nuts:
        parts = []
        for task in tasks:
            rs = [r for r in nuts if r["task"] == task]
            if rs:
                n = rs[0]["nuts"]
                target = sum(r["nuts"]["target_seconds"] for r in rs) / len(rs)
                parts.append(
                    f"{task}: {n['chains']} chains × ({n['warmup']} warmup + "
                    f"{n['samples_per_chain']:,} draws) at obs {rs[0]['observation']}, aimed at "
                    f"{target:.3g} s, {sum(r['nuts']['divergences'] for r in rs)} divergences"
                )
        lines += [
            "",
            "NUTS aims at the slowest guide's seconds on the same task and observation: "
            + "; ".join(parts)
            + ".",
        ]
    lines += ["", "## Against the issue's targets", "", *_verdicts(means, tasks, methods), ""]
    return "\n".join(lines)


def _verdicts(means: dict[tuple[str, str], float], tasks: list[str], methods: list[str]) -> list:
    """Our best mixture guide below every Pyro guide on each task; within 0.05 of NUTS."""
    lines = []
    for task in tasks:
        ours = {m: means[task, m] for m in OURS if (task, m) in means}
        peers = {m: means[task, m] for m in PYRO_GUIDES if (task, m) in means}
        if not ours:
            continue
        best = min(ours, key=ours.get)
        text = f"- {task}: our best {GUIDES[best]} {ours[best]:.3f}"
        if peers:
            met = all(ours[best] < v for v in peers.values())
            listed = "; ".join(f"{GUIDES[m].split(' (')[0]} {v:.3f}" for m, v in peers.items())
            text += f"; below every Pyro guide's ({listed}): {'met' if met else 'not met'}"
        if task in NUTS_TASKS and (task, "nuts") in means:
            nuts = means[task, "nuts"]
            met = ours[best] <= nuts + NUTS_WITHIN
            text += (
                f"; within {NUTS_WITHIN} of NUTS's {nuts:.3f} (at most {nuts + NUTS_WITHIN:.3f}): "
                f"{'met' if met else 'not met'}"
            )
        lines.append(text + ".")
    return lines


def _figure(figure: dict[str, Any], tasks: list[str], methods: list[str], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = panel_grid([f"{task}\nθ2 vs θ1" for task in tasks], methods, GUIDES)
    for row, task in zip(axes, tasks, strict=True):
        reference = np.asarray(figure.get(f"{task}/reference", []))
        for ax, method in zip(row, methods, strict=True):
            draws = np.asarray(figure.get(f"{task}/{method}", []))
            if len(draws):
                color = "C3" if method in OURS else "C0"
                ax.scatter(draws[:, 0], draws[:, 1], s=1, c=color, alpha=0.5, linewidths=0)
            else:
                ax.text(0.5, 0.5, "failed", ha="center", transform=ax.transAxes)
            if len(reference):  # on top, so that the draws cannot hide it; one frame per row
                ax.scatter(reference[:, 0], reference[:, 1], s=0.5, c="k", alpha=0.3, linewidths=0)
                for limits, values in (
                    (ax.set_xlim, reference[:, 0]),
                    (ax.set_ylim, reference[:, 1]),
                ):
                    low, high = np.quantile(values, [0.005, 0.995])
                    pad = 0.25 * (high - low)
                    limits(low - pad, high + pad)
    fig.suptitle(
        "Draws (color; red: ours) against the reference (black), observation 1,\nfirst two "
        "coordinates; the frame is the reference's 99 % range, padded",
        fontsize=8,
    )
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Command line


def _observations(text: str) -> list[int]:
    """``"1-5"`` or ``"1,4,7"`` to a list of observation numbers (sbibm has 1 to 10)."""
    if "-" in text:
        low, high = text.split("-", 1)
        values = list(range(int(low), int(high) + 1))
    else:
        values = [int(v) for v in text.split(",")]
    if not values or not all(1 <= v <= 10 for v in values):
        raise argparse.ArgumentTypeError(f"observations are 1 to 10, got {text!r}")
    return values


def _versions() -> dict[str, str]:
    found = {"python": platform.python_version(), "pyro_mixflow": pyro_mixflow.__version__}
    for package in ("torch", "pyro-ppl", "sbibm", "scikit-learn", "numpy"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} logical CPUs"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs"


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the benchmark (or only its report) from command-line arguments.

    Args:
        argv: The arguments (default: ``sys.argv[1:]``); ``--help`` lists them.

    Returns:
        The exit status, 0.
    """
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: 20 steps, 100 draws, short NUTS chains, observation 1, inline "
        "2-fold C2ST",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default: benchmarks/results; with --quick, a temporary folder)",
    )
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--guides", nargs="+", choices=list(GUIDES), default=list(GUIDES))
    parser.add_argument("--observations", type=_observations, default=_observations("1-5"))
    parser.add_argument("--steps", type=int, default=None, help="override the number of steps")
    parser.add_argument(
        "--nuts-seconds",
        type=float,
        default=None,
        help="NUTS's wall clock when no guide ran before it on the task (default 120)",
    )
    parser.add_argument(
        "--jobs", type=int, default=None, help="C2ST worker processes (default 1; quick: 0)"
    )
    parser.add_argument(
        "--final-jobs",
        type=int,
        default=os.cpu_count() or 1,
        help="C2ST worker processes for the scores still queued when training is over",
    )
    add_run_arguments(parser, "sbibm_svi")
    args = parser.parse_args(argv)
    args.out = output_folder(args, "sbibm_svi", __file__)
    if args.report is not None:
        print(report(load_results(report_paths(args, "sbibm_svi")), args.out))
        return 0

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    logging.getLogger("pyro").setLevel(logging.WARNING)  # "Guessed max_plate_nesting" lines
    budget = QUICK if args.quick else FULL
    if args.steps is not None:
        budget = Budget(**{**asdict(budget), "steps": args.steps})
    if args.nuts_seconds is not None:
        budget = Budget(**{**asdict(budget), "nuts_seconds": args.nuts_seconds})
    observations = args.observations[:1] if args.quick else args.observations
    jobs = args.jobs if args.jobs is not None else (0 if args.quick else 1)
    tasks = [t for t in TASKS if t in args.tasks]
    methods = [m for m in GUIDES if m in args.guides]
    tag = run_tag(args, tasks, methods, list(GUIDES))
    meta = run_meta(args, argv, _versions(), _cpu())
    with threadpool_limits(args.threads):
        result = _run(
            tasks,
            methods,
            observations,
            budget,
            jobs=jobs,
            final_jobs=args.final_jobs,
            out=args.out,
            tag=tag,
            meta=meta,
        )
    print(f"sbibm_svi: {result['runtime']:.0f} s; results in {args.out}/sbibm_svi-{tag}.json")
    if not args.no_report:
        print(report(load_results([args.out / f"sbibm_svi-{tag}.json"]), args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
