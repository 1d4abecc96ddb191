r"""2-D density estimation: KL(truth ‖ model) of our mixture models against peers at one budget.

Every model is fitted to draws of a 2-D benchmark density :math:`p` from
:mod:`pyro_mixflow.datasets` (exact sampler, exact log-density) and scored by

.. math::

    \operatorname{KL}(p \,\|\, q) = E_{x \sim p}[\log p(x) - \log q(x)]
    \approx \frac{1}{M} \sum_{m=1}^{M} \big(\log p(x_m) - \log q(x_m)\big),

over :math:`M` fresh test draws, with its standard error (sample standard deviation of the
terms over :math:`\sqrt M`); the test log-likelihood :math:`\frac1M \sum_m \log q(x_m)` is
reported too (its ceiling, :math:`-H(p)`, is the truth row). For the image density (Euler's
portrait) :math:`\log p` is piecewise constant over pixels; the KL is still well defined.

**Protocol (one fixed budget).** Per dataset, :math:`N = 20{,}000` training draws (generator
seeded with ``seed``) and :math:`M = 20{,}000` test draws (seed ``seed + 1``); the same draws
for every model, independent of which datasets or models a process runs. The last 2,000
training draws are a validation set, the first 18,000 the training rows. Every
gradient-trained model, ours and peers alike, goes through the same
:func:`pyro_mixflow.fit` call: 3,000 Adam steps, batch 512, peak learning rate
:math:`10^{-3}` with a cosine schedule, gradient norm clipped at 10, the validation loss
evaluated 20 times (and at step 0), and the best validated state kept. The EM fits of our
models see the 18,000 training rows only. torch's global seed is reset to ``seed`` before each
model is built. Seconds are wall-clock: "init" is EM (or standardization, nothing to time),
"train" is :func:`~pyro_mixflow.fit` including its validation passes; the evaluation on the
test set and the grid is not timed.

**Models.**

* ``sklearn-gmm``: scikit-learn ``GaussianMixture(50, covariance_type="full",
  max_iter=500)``, EM with k-means initialization on all 20,000 training draws (it has no use
  for a validation set); no Adam steps.
* ``realnvp``: nflows ``SimpleRealNVP(features=2, hidden_features=64, num_layers=8,
  num_blocks_per_layer=2)`` (affine couplings, residual nets) over a standard normal. In
  nflows 0.14 (the release on PyPI) an affine coupling's scale is
  ``sigmoid(u + 2) + 1e-3 <= 1.001``: the data-to-noise map can hardly expand, so
  :math:`\log q(x) \le \log \mathcal N(0; 0, I) + 8 \log 1.001 - \sum_d \log s_d`, a cap
  below the peaks of every dataset here (nflows issue #49, fixed after 0.14 by a
  ``scale_activation`` argument).
* ``realnvp-general``: the same flow with nflows' later ``GENERAL_SCALE_ACTIVATION``,
  scale ``(softplus(u) + 1e-3).clamp(0, 3)`` (a subclass of 0.14's
  ``AffineCouplingTransform``): the fair affine-coupling peer.
* ``nflows-nsf``: nflows neural spline flow: 4 ``PiecewiseRationalQuadraticCouplingTransform``
  layers with alternating masks, ``ResidualNet`` of width 64 and 2 blocks, 8 bins, linear
  tails beyond ``tail_bound=4``, over a standard normal (nflows' own initialization).
* ``zuko-nsf``: ``zuko.flows.NSF(2, transforms=4, hidden_features=(64, 64))`` (autoregressive
  rational-quadratic splines on :math:`[-5, 5]`, which in 2-D are couplings). zuko switches
  torch's argument validation off when imported; it is imported only when this model is
  requested, and the previous setting is restored right after the import, so every model
  runs with torch's default.
* ``mixtureflow`` (ours): ``pyro_mixflow.nn.MixtureFlow(2)`` with its defaults (50-component
  diagonal mixture base, 4 spline couplings of the same shape as ``nflows-nsf``, started at
  the identity), ``init_from_data`` (standardization + EM of the base), then ``fit``.
* ``gmm`` (ours): ``pyro_mixflow.nn.GMM(2, num_components=50)`` (diagonal), ``init_from_data``
  (EM), then ``fit``.
* ``cwm`` (ours): ``pyro_mixflow.nn.CWM(2, 50, hidden_dims=(64, 64))`` (a classifier weighted
  mixture; the paper's classifier is three layers of 128, three times slower per step here),
  ``init_from_data`` (EM; the untrained model is the EM mixture), then ``fit``.
* ``rad`` (ours): ``pyro_mixflow.nn.RAD(2)`` with its defaults (4 RAD couplings: the middle
  two fold with 2 pieces on 3 standard deviations, the first and last do not fold; residual
  networks of two blocks 48 wide, 67,600 parameters against ``nflows-nsf``'s 73,052; splines
  of 8 bins with learned end slopes before and after each fold, started so that the untrained
  model is close to a standard normal), ``init_from_data`` (standardization), then ``fit``.
* RAD ablations (run only when named in ``--models``): ``rad-mlp96``, plain MLP networks of
  two layers 96 wide (77,968 parameters; the default before the residual networks);
  ``rad-64``, plain MLPs 64 wide (39,760 parameters; an earlier default), and that stack
  with one more setting changed: ``rad-nofold``, no layer folds
  (4 two-spline couplings, no gating); ``rad-allfold``, every layer folds
  (``fold_ends=True``); ``rad-6``, 6 layers, the middle two folding
  (``num_pieces=(1, 1, 2, 2, 1, 1)``); ``rad-bound4``, folds and splines on 4 standard
  deviations instead of 3. Results over seeds: ``benchmarks/results/density-seeds.md``.

The three peer flows see standardized data, :math:`z = (x - m) / s` with the training rows'
mean and standard deviation, and their log-density is mapped back,
:math:`\log q(x) = \log q_z((x - m) / s) - \sum_d \log s_d`; our ``MixtureFlow`` does the same
internally. Peers are wrapped in a tiny module whose call returns a
``torch.distributions.Distribution`` with that ``log_prob``, so that :func:`fit` trains them
exactly like ours. For our models the table of details also gives the KL at the EM
initialization, before any Adam step.

**Outputs** (in ``--out``): ``density-<datasets>[-<models>].json`` (metrics of one process,
rewritten after every (dataset, model) pair) and ``.npz`` (log-densities on a 150 × 150 grid
over each dataset's ``bounds``, float16), then the report: ``density.md`` (tables, among them
each model's mass on the checkerboard's empty squares, from the grid), ``density.png`` (rows:
datasets; columns: the truth and every model's log-density on the grid, one colour scale per
row, from 4 nats below the truth's maximum to that maximum, clipped at both ends: a log scale
shows the narrow 25-Gaussian modes and where a model leaks mass), and ``density.json`` +
``density.npz``: the runs and grids the report shows (each run's metadata, ``source`` file and
current records; superseded records and runs left out). ``--seed-report`` writes
``density-seeds.md`` and ``density-seeds.json`` likewise. ``benchmarks/results`` keeps only
these report files; once a run is folded into a report, its per-process files can go.

Usage::

    python benchmarks/density.py                       # everything in one process
    python benchmarks/density.py --quick               # smoke test (~20 s) into $TMPDIR
    python benchmarks/density.py --threads 1 --datasets 8gaussians checkerboard --no-report &
    python benchmarks/density.py --threads 1 --datasets 25gaussians rings euler --no-report &
    wait; python benchmarks/density.py --report        # density.json + every density-*.json
    python benchmarks/density.py --datasets rings --models realnvp-general --no-report
    python benchmarks/density.py --report A.json B.json --out DIR   # combine chosen runs
    python benchmarks/density.py --models rad nflows-nsf --seed 1 --out DIR/1 --no-report
    python benchmarks/density.py --models rad-64 rad-nofold --seed 1 --out DIR/1 --no-report
    python benchmarks/density.py --seed-report benchmarks/results/density-seeds.json \
        DIR/*/density-*.json                            # spread over seeds, new runs added

The stored results re-render without running anything::

    python benchmarks/density.py --report              # density.md, .png from density.json
    python benchmarks/density.py --seed-report benchmarks/results/density-seeds.json

``--report`` refuses runs with different budgets or seeds; where two runs hold the same
(dataset, model) pair (with ``--seed-report``: the same pair and seed), the one started later
wins.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import math
import os
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from threadpoolctl import threadpool_limits
from torch import nn
from torch.distributions import Distribution, constraints
from torch.nn import functional as F
from tqdm import tqdm

import pyro_mixflow
from pyro_mixflow import datasets, fit
from pyro_mixflow.nn import CWM, GMM, RAD, MixtureFlow

DATASETS = ("8gaussians", "checkerboard", "25gaussians", "rings", "euler")
MODELS = {
    "sklearn-gmm": "GMM full, EM (sklearn)",
    "realnvp": "RealNVP (nflows SimpleRealNVP)",
    "realnvp-general": "RealNVP, scales ≤ 3 (nflows)",
    "nflows-nsf": "NSF coupling (nflows)",
    "zuko-nsf": "NSF (zuko)",
    "mixtureflow": "MixtureFlow (ours)",
    "gmm": "GMM diag, EM + Adam (ours)",
    "cwm": "CWM, EM + Adam (ours)",
    "rad": "RAD flow (ours)",
    "rad-mlp96": "RAD, MLPs 96 wide",
    "rad-64": "RAD, MLPs 64 wide",
    "rad-nofold": "RAD 64, no fold",
    "rad-allfold": "RAD 64, every layer folds",
    "rad-6": "RAD 64, 6 layers",
    "rad-bound4": "RAD 64, bound 4",
}
# ``nn.RAD`` arguments of the RAD ablations, on top of ``build_rad``'s: the plain-MLP stacks 96
# and 64 wide (earlier defaults) and changes of the 64-wide one.
_RAD_64 = {"hidden_dims": (64, 64), "network": "mlp"}
RAD_VARIANTS: dict[str, dict[str, Any]] = {
    "rad-mlp96": {"hidden_dims": (96, 96), "network": "mlp"},
    "rad-64": _RAD_64,
    "rad-nofold": {**_RAD_64, "num_pieces": 1},
    "rad-allfold": {**_RAD_64, "fold_ends": True},
    "rad-6": {**_RAD_64, "num_layers": 6, "num_pieces": (1, 1, 2, 2, 1, 1)},
    "rad-bound4": {**_RAD_64, "bound": 4.0},
}
DEFAULT_MODELS = tuple(m for m in MODELS if m not in RAD_VARIANTS)
RECORDS = "density.json"  # the runs density.md shows (grids: density.npz); --report reads it
SEED_RECORDS = "density-seeds.json"  # the runs density-seeds.md shows
LOG_DENSITY_RANGE = 4.0  # nats of log-density the figure shows below the maximum


@dataclass(frozen=True)
class Budget:
    """Sizes of one run; the full budget is the benchmark, :data:`QUICK` a smoke test."""

    num_train: int = 20_000
    num_validation: int = 2_000  # of the training draws, for fit's best-state selection
    num_test: int = 20_000
    steps: int = 3000
    batch_size: int = 512
    lr: float = 1e-3
    num_components: int = 50  # both 50-component mixtures
    em_max_iter: int = 500  # scikit-learn's full-covariance EM
    hidden: int = 64
    realnvp_layers: int = 8
    spline_layers: int = 4
    num_bins: int = 8
    tail_bound: float = 4.0
    # MixtureFlow: None keeps the class defaults (MixtureFlow(2)).
    mixtureflow: dict[str, Any] | None = None
    grid: int = 150


FULL = Budget()
QUICK = Budget(
    num_train=2000,
    num_validation=200,
    num_test=2000,
    steps=30,
    num_components=10,
    em_max_iter=100,
    hidden=16,
    realnvp_layers=2,
    spline_layers=2,
    mixtureflow={"num_components": 4, "num_transforms": 2, "hidden_dims": (16, 16)},
)


@dataclass
class Task:
    """The draws and settings one model is fitted and scored with."""

    x_train: torch.Tensor  # [N - V, 2] float32, training rows
    x_val: torch.Tensor  # [V, 2], validation rows
    x_test: torch.Tensor  # [M, 2], test draws
    log_p_test: torch.Tensor  # [M] float64, truth at the test draws
    budget: Budget
    seed: int


@dataclass
class Trained:
    """A fitted model: its log-density and what fitting it cost."""

    log_prob: Callable[[torch.Tensor], torch.Tensor]  # [N, 2] float32 -> [N] float64
    num_params: int
    init_seconds: float
    train_seconds: float = 0.0
    steps: int = 0  # Adam steps taken (0 for EM)
    best_step: int | None = None
    init_kl: tuple[float, float] | None = None  # KL at the EM initialization, with its s.e.
    note: str = ""


@dataclass
class Record:
    """One (dataset, model) result, as stored in the JSON."""

    dataset: str
    model: str
    kl: float | None = None
    kl_se: float | None = None
    test_ll: float | None = None
    test_ll_se: float | None = None
    nonfinite: int = 0  # test draws where log q is not finite
    num_params: int | None = None
    init_seconds: float | None = None
    train_seconds: float | None = None
    steps: int = 0
    best_step: int | None = None
    init_kl: float | None = None
    init_kl_se: float | None = None
    note: str = ""
    error: str = ""


# ---------------------------------------------------------------------------------------------
# Models


class LogProbDistribution(Distribution):
    """A distribution that only has a ``log_prob`` (what :func:`fit` needs), event shape (2,)."""

    arg_constraints: dict[str, constraints.Constraint] = {}
    support = constraints.real_vector

    def __init__(self, log_prob: Callable[[torch.Tensor], torch.Tensor], dim: int) -> None:
        self._log_prob = log_prob
        super().__init__(torch.Size(), torch.Size([dim]), validate_args=False)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """Log-density of ``value`` (shape ``[N, dim]``)."""
        return self._log_prob(value)


class Standardized(nn.Module):
    r"""A peer flow on standardized data: :math:`\log q(x) = \log q_z((x - m)/s) - \sum \log s`.

    Args:
        flow: An nflows ``Flow`` (``flow.log_prob(z)``) or, with ``lazy=True``, a zuko lazy
            distribution (``flow().log_prob(z)``).
        data: Training rows, whose mean and standard deviation set :math:`m` and :math:`s`.
        lazy: Whether ``flow`` is called to get a distribution.
    """

    def __init__(self, flow: nn.Module, data: torch.Tensor, *, lazy: bool = False) -> None:
        super().__init__()
        self.flow, self.lazy = flow, lazy
        self.register_buffer("shift", data.mean(0))
        self.register_buffer("scale", data.std(0))

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Log-density at ``x`` (shape ``[N, 2]``) in data space."""
        z = (x - self.shift) / self.scale
        inner = self.flow().log_prob(z) if self.lazy else self.flow.log_prob(z)
        return inner - self.scale.log().sum()

    def forward(self) -> LogProbDistribution:
        """Returns the model as a distribution for :func:`fit`."""
        return LogProbDistribution(self.log_prob, self.shift.shape[-1])


def build_sklearn_gmm(task: Task) -> Trained:
    from sklearn.mixture import GaussianMixture

    b = task.budget
    x = torch.cat([task.x_train, task.x_val]).double().numpy()
    start = time.perf_counter()
    em = GaussianMixture(
        b.num_components, covariance_type="full", max_iter=b.em_max_iter, random_state=task.seed
    ).fit(x)
    seconds = time.perf_counter() - start

    def log_prob(value: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(em.score_samples(value.double().numpy()))

    dim = x.shape[1]
    num_params = b.num_components * (dim + dim * (dim + 1) // 2) + b.num_components - 1
    note = "" if em.converged_ else f"EM not converged after {em.n_iter_} iterations"
    return Trained(log_prob, num_params, seconds, note=note)


def build_realnvp(task: Task) -> Trained:
    from nflows.flows import SimpleRealNVP

    b = task.budget
    torch.manual_seed(task.seed)
    flow = SimpleRealNVP(
        features=2,
        hidden_features=b.hidden,
        num_layers=b.realnvp_layers,
        num_blocks_per_layer=2,
    )
    return _fit_peer(Standardized(flow, task.x_train), task)


def build_realnvp_general(task: Task) -> Trained:
    from nflows.distributions import StandardNormal
    from nflows.flows import Flow
    from nflows.nn.nets import ResidualNet
    from nflows.transforms import AffineCouplingTransform, CompositeTransform

    class GeneralAffineCoupling(AffineCouplingTransform):
        """nflows 0.14's affine coupling with the later ``GENERAL_SCALE_ACTIVATION``."""

        def _scale_and_shift(
            self, transform_params: torch.Tensor
        ) -> tuple[torch.Tensor, torch.Tensor]:
            unconstrained_scale = transform_params[:, self.num_transform_features :, ...]
            shift = transform_params[:, : self.num_transform_features, ...]
            return (F.softplus(unconstrained_scale) + 1e-3).clamp(0, 3), shift

    b = task.budget
    torch.manual_seed(task.seed)

    def net(in_features: int, out_features: int) -> nn.Module:
        return ResidualNet(in_features, out_features, b.hidden, num_blocks=2)

    mask = torch.ones(2)
    mask[::2] = -1  # SimpleRealNVP's masks, alternating from layer to layer
    layers = []
    for _ in range(b.realnvp_layers):
        layers.append(GeneralAffineCoupling(mask.clone(), net))
        mask *= -1
    flow = Flow(CompositeTransform(layers), StandardNormal([2]))
    return _fit_peer(Standardized(flow, task.x_train), task)


def build_nflows_nsf(task: Task) -> Trained:
    from nflows.distributions import StandardNormal
    from nflows.flows import Flow
    from nflows.nn.nets import ResidualNet
    from nflows.transforms import CompositeTransform, PiecewiseRationalQuadraticCouplingTransform

    b = task.budget
    torch.manual_seed(task.seed)

    def net(in_features: int, out_features: int) -> nn.Module:
        return ResidualNet(in_features, out_features, b.hidden, num_blocks=2)

    layers = [
        PiecewiseRationalQuadraticCouplingTransform(
            (torch.arange(2) + i) % 2,
            net,
            num_bins=b.num_bins,
            tails="linear",
            tail_bound=b.tail_bound,
        )
        for i in range(b.spline_layers)
    ]
    flow = Flow(CompositeTransform(layers), StandardNormal([2]))
    return _fit_peer(Standardized(flow, task.x_train), task)


def build_zuko_nsf(task: Task) -> Trained:
    validate = Distribution._validate_args
    import zuko  # switches torch's argument validation off globally (zuko/distributions.py)

    Distribution.set_default_validate_args(validate)

    b = task.budget
    torch.manual_seed(task.seed)
    flow = zuko.flows.NSF(
        2, transforms=b.spline_layers, hidden_features=(b.hidden, b.hidden), bins=b.num_bins
    )
    return _fit_peer(Standardized(flow, task.x_train, lazy=True), task)


def build_mixtureflow(task: Task) -> Trained:
    b = task.budget
    torch.manual_seed(task.seed)
    model = MixtureFlow(2, **(b.mixtureflow or {}))
    return _fit_ours(model, task)


def build_gmm(task: Task) -> Trained:
    torch.manual_seed(task.seed)
    return _fit_ours(GMM(2, num_components=task.budget.num_components), task)


def build_cwm(task: Task) -> Trained:
    b = task.budget
    torch.manual_seed(task.seed)
    return _fit_ours(CWM(2, b.num_components, hidden_dims=(b.hidden, b.hidden)), task)


def build_rad(task: Task, **overrides: Any) -> Trained:
    b = task.budget
    torch.manual_seed(task.seed)
    width = _rad_width(b)
    kwargs = {"num_layers": b.spline_layers, "hidden_dims": (width, width), **overrides}
    return _fit_ours(RAD(2, **kwargs), task)


def _rad_width(b: Budget) -> int:
    """RAD's network width: 48 at the full budget (``nn.RAD``'s default), 12 in quick mode.

    With its residual networks that is 67,600 parameters, against NSF's 73,052.

    Derived from ``b.hidden`` rather than a field of :class:`Budget`, so that runs saved before
    it keep the same budget and still combine with newer ones in the reports.
    """
    return 3 * b.hidden // 4


BUILDERS: dict[str, Callable[[Task], Trained]] = {
    "sklearn-gmm": build_sklearn_gmm,
    "realnvp": build_realnvp,
    "realnvp-general": build_realnvp_general,
    "nflows-nsf": build_nflows_nsf,
    "zuko-nsf": build_zuko_nsf,
    "mixtureflow": build_mixtureflow,
    "gmm": build_gmm,
    "cwm": build_cwm,
    "rad": build_rad,
    **{name: functools.partial(build_rad, **kwargs) for name, kwargs in RAD_VARIANTS.items()},
}


def _fit_peer(model: Standardized, task: Task) -> Trained:
    return _train(model, task, init_seconds=0.0)


def _fit_ours(model: MixtureFlow | GMM | CWM | RAD, task: Task) -> Trained:
    start = time.perf_counter()
    model.init_from_data(task.x_train, seed=task.seed)
    init_seconds = time.perf_counter() - start
    log_q = _model_log_prob(model)(task.x_test)
    init_kl = _mean_se(task.log_p_test - log_q)
    return _train(model, task, init_seconds=init_seconds, init_kl=init_kl)


def _train(
    model: nn.Module,
    task: Task,
    *,
    init_seconds: float,
    init_kl: tuple[float, float] | None = None,
) -> Trained:
    b = task.budget
    note = ""
    try:
        history = fit(
            model,
            task.x_train,
            steps=b.steps,
            batch_size=b.batch_size,
            lr=b.lr,
            validation=task.x_val,
            seed=task.seed,
            progress=False,
        )
        seconds, steps, best = history.seconds, len(history.train_loss), history.best_step
    except RuntimeError as exc:  # divergence: fit restored the best validated state
        note = str(exc).splitlines()[0]
        seconds, steps, best = math.nan, b.steps, None
    num_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return Trained(
        _model_log_prob(model),
        num_params,
        init_seconds,
        seconds,
        steps,
        best,
        init_kl,
        note,
    )


def _model_log_prob(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x -> log q(x)`` in float64, under ``no_grad``, in eval mode, in chunks."""

    @torch.no_grad()
    def log_prob(x: torch.Tensor) -> torch.Tensor:
        model.eval()
        try:
            dist = model()
            return torch.cat([dist.log_prob(chunk).double() for chunk in x.split(8192)])
        finally:
            model.train()

    return log_prob


def _mean_se(values: torch.Tensor) -> tuple[float, float]:
    values = values.double()
    if not bool(torch.isfinite(values).all()):
        return math.inf, math.nan
    return float(values.mean()), float(values.std() / math.sqrt(len(values)))


# ---------------------------------------------------------------------------------------------
# Running


def load_dataset(name: str) -> datasets.Density2D:
    """The density ``name`` from :mod:`pyro_mixflow.datasets`."""
    return datasets.load(name)


def grid_points(bounds: Sequence[Sequence[float]], size: int) -> torch.Tensor:
    """``[size * size, 2]`` points, row ``i * size + j`` at ``(x_j, y_i)`` (imshow order)."""
    (xmin, xmax), (ymin, ymax) = bounds
    xs = torch.linspace(xmin, xmax, size, dtype=torch.float64)
    ys = torch.linspace(ymin, ymax, size, dtype=torch.float64)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([xx.flatten(), yy.flatten()], -1)


def run(
    names: Sequence[str],
    models: Sequence[str],
    budget: Budget,
    *,
    seed: int,
    out: Path,
    tag: str,
    meta: dict[str, Any],
) -> dict[str, Any]:
    """Fits and scores every (dataset, model) pair; rewrites the JSON after each pair."""
    started = time.time()
    result: dict[str, Any] = {
        **meta,
        "datasets": list(names),
        "models": list(models),
        "budget": asdict(budget),
        "seed": seed,
        "started": started,
        "complete": False,
        "truth": {},
        "bounds": {},
        "records": [],
    }
    grids: dict[str, np.ndarray] = {}
    bar = tqdm(total=len(names) * len(models), desc="density", mininterval=1.0)
    for name in names:
        density = load_dataset(name)
        train = density.sample(budget.num_train, generator=torch.Generator().manual_seed(seed))
        test = density.sample(budget.num_test, generator=torch.Generator().manual_seed(seed + 1))
        log_p = density.log_prob(test.double())
        split = budget.num_train - budget.num_validation
        task = Task(train[:split], train[split:], test, log_p, budget, seed)
        grid = grid_points(density.bounds, budget.grid)
        log_p_grid = density.log_prob(grid).reshape(budget.grid, budget.grid)
        grids[f"{name}/truth"] = log_p_grid.numpy().astype(np.float16)
        result["truth"][name] = {
            "neg_entropy": _mean_se(log_p),
            "exact_log_prob": bool(getattr(density, "has_exact_log_prob", True)),
            # fingerprints of the draws, to check that merged runs used the same data
            "train_sum": float(train.double().sum()),
            "test_sum": float(test.double().sum()),
        }
        result["bounds"][name] = [list(map(float, axis)) for axis in density.bounds]
        for model_name in models:
            bar.set_postfix_str(f"{name} / {model_name}")
            record = Record(name, model_name)
            if model_name == "zuko-nsf" and importlib.util.find_spec("zuko") is None:
                record.error = "zuko is not installed (pip install zuko)"
            else:
                try:
                    _score(BUILDERS[model_name](task), task, record, grid, grids)
                except Exception as exc:  # a failing model is a result, not a crash
                    traceback.print_exc()
                    record.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            result["records"].append(asdict(record))
            result["runtime"] = time.time() - started
            _save(out, tag, result, grids)
            bar.update()
    bar.close()
    result["complete"] = True
    result["runtime"] = time.time() - started
    result["load_after"] = os.getloadavg()
    _save(out, tag, result, grids)
    return result


def _score(
    trained: Trained,
    task: Task,
    record: Record,
    grid: torch.Tensor,
    grids: dict[str, np.ndarray],
) -> None:
    log_q = trained.log_prob(task.x_test)
    record.nonfinite = int((~torch.isfinite(log_q)).sum())
    record.kl, record.kl_se = _mean_se(task.log_p_test - log_q)
    record.test_ll, record.test_ll_se = _mean_se(log_q)
    record.num_params = trained.num_params
    record.init_seconds, record.train_seconds = trained.init_seconds, trained.train_seconds
    record.steps, record.best_step = trained.steps, trained.best_step
    if trained.init_kl is not None:
        record.init_kl, record.init_kl_se = trained.init_kl
    record.note = trained.note
    size = task.budget.grid
    log_q_grid = trained.log_prob(grid.float()).reshape(size, size)
    grids[f"{record.dataset}/{record.model}"] = log_q_grid.numpy().astype(np.float16)


def _save(out: Path, tag: str, result: dict[str, Any], grids: dict[str, np.ndarray]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out / f"density-{tag}.npz", **grids)
    path = out / f"density-{tag}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1, allow_nan=True) + "\n")
    tmp.replace(path)


def versions(
    packages: Sequence[str] = ("torch", "pyro-ppl", "nflows", "zuko", "scikit-learn", "numpy"),
) -> dict[str, str]:
    """Versions of ``packages`` (the libraries compared), without importing them."""
    found = {"python": platform.python_version()}
    for package in packages:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    found["pyro_mixflow"] = pyro_mixflow.__version__
    return found


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ---------------------------------------------------------------------------------------------
# Report


def load_results(
    paths: Sequence[Path], *, one_seed: bool = True
) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
    """Reads JSON results (oldest first) and their grids; checks budgets and seeds.

    A file holds one process's run (``density-<tag>.json``) or the runs a report shows
    (``density.json``, ``density-seeds.json``: ``{"runs": [...]}``). All runs must share one
    budget and, with ``one_seed``, one seed.
    """
    runs, grids = [], {}
    files = [(Path(path), _read_runs(Path(path))) for path in paths]
    for path, file_runs in sorted(files, key=lambda f: max(r["started"] for r in f[1])):
        runs += file_runs
        npz = path.with_suffix(".npz")
        if npz.exists():
            with np.load(npz) as data:
                grids.update({key: data[key] for key in data.files})
    if not runs:
        raise SystemExit("no density-*.json results to report")
    runs.sort(key=lambda r: r["started"])
    first = runs[0]
    for run_ in runs[1:]:
        if run_["budget"] != first["budget"] or (one_seed and run_["seed"] != first["seed"]):
            raise SystemExit(
                f"{run_['file']} and {first['file']} have different budgets or seeds; "
                "report them separately (move one out of the folder or name the files)"
            )
    return runs, grids


def _read_runs(path: Path) -> list[dict[str, Any]]:
    data = json.loads(path.read_text())
    runs = data["runs"] if "runs" in data else [data]
    for run_ in runs:
        run_["file"] = path.name
    return runs


def _save_runs(path: Path, runs: Sequence[dict[str, Any]], keep: Callable[..., bool]) -> None:
    """Writes ``{"runs": [...]}``: each run with the records ``keep(run, record)`` accepts.

    Runs with no such record are left out; ``source`` names the file a run was first written to.
    """
    kept = []
    for run_ in runs:
        records = [r for r in run_["records"] if keep(run_, r)]
        if records:
            meta = {k: v for k, v in run_.items() if k not in ("file", "records")}
            kept.append({**meta, "source": run_.get("source", run_["file"]), "records": records})
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"runs": kept}, indent=1, allow_nan=True) + "\n")
    tmp.replace(path)


def seed_report(
    paths: Sequence[Path],
    out: Path,
    names: Sequence[str] = DATASETS,
    models: Sequence[str] = tuple(MODELS),
) -> str:
    """Writes ``density-seeds.md``: each model's KL over runs with different seeds.

    A seed draws other training and test data and another initialization, so the spread
    over seeds is what a user fitting one model to one sample sees. Runs must share a budget;
    per (dataset, model, seed) the run started later wins. Only ``names`` and ``models`` are
    reported; the records shown go to ``density-seeds.json`` (the report's only input when
    rerun).
    """
    runs, _ = load_results(paths, one_seed=False)
    kl: dict[tuple[str, str], dict[int, float]] = {}
    shown: dict[tuple[str, str, int], dict[str, Any]] = {}
    for run_ in runs:
        for r in run_["records"]:
            if r["kl"] is not None and r["dataset"] in names and r["model"] in models:
                kl.setdefault((r["dataset"], r["model"]), {})[run_["seed"]] = r["kl"]
                shown[r["dataset"], r["model"], run_["seed"]] = r
    names = [d for d in DATASETS if any(key[0] == d for key in kl)]
    models = [m for m in MODELS if any(key[1] == m for key in kl)]
    lines = [
        "# 2-D density estimation over seeds: KL(truth ‖ model)",
        "",
        "Each seed draws other training and test data and another initialization; budget as "
        "in `density.md`. Cells: mean ± standard deviation over seeds [min–max] (seeds); "
        "then each seed's KL. Lower is better.",
        "",
        _table_header(["model", *names]),
    ]
    per_seed = []
    for model in models:
        cells = []
        for name in names:
            values = kl.get((name, model), {})
            if not values:
                cells.append("—")
                continue
            v = np.array([values[k] for k in sorted(values)])
            sd = f"{v.std(ddof=1):.3f}" if len(v) > 1 else "—"
            cells.append(f"{v.mean():.3f} ± {sd} [{v.min():.3f}–{v.max():.3f}] ({len(v)})")
            seeds = ", ".join(f"{k}: {values[k]:.3f}" for k in sorted(values))
            per_seed.append(f"- {name}, {MODELS[model]}: {seeds}")
        lines.append(f"| {MODELS[model]} | " + " | ".join(cells) + " |")
    text = "\n".join([*lines, "", "Per seed:", "", *per_seed, ""])
    out.mkdir(parents=True, exist_ok=True)
    (out / "density-seeds.md").write_text(text)
    _save_runs(
        out / SEED_RECORDS,
        runs,
        lambda run_, r: shown.get((r["dataset"], r["model"], run_["seed"])) is r,
    )
    return text


def report(runs: list[dict[str, Any]], grids: dict[str, np.ndarray], out: Path) -> str:
    """Writes ``density.md`` and ``density.png`` from the runs; returns the markdown.

    The records and grids shown go to ``density.json`` and ``density.npz``, from which
    ``--report`` renders the same files again.
    """
    records: dict[tuple[str, str], dict[str, Any]] = {}
    truth: dict[str, Any] = {}
    bounds: dict[str, Any] = {}
    for run_ in runs:  # later runs win
        records.update({(r["dataset"], r["model"]): r for r in run_["records"]})
        truth.update(run_["truth"])
        bounds.update(run_["bounds"])
    names = [d for d in DATASETS if d in truth] + [d for d in truth if d not in DATASETS]
    models = [m for m in MODELS if any(key[1] == m for key in records)]
    markdown = _markdown(runs, records, truth, names, models, _empty_squares(grids, bounds, models))
    out.mkdir(parents=True, exist_ok=True)
    (out / "density.md").write_text(markdown)
    _figure(grids, records, bounds, names, models, out / "density.png")
    _save_runs(out / RECORDS, runs, lambda _, r: records[r["dataset"], r["model"]] is r)
    shown = [f"{d}/truth" for d in names] + [f"{d}/{m}" for d, m in records]
    np.savez_compressed(
        out / RECORDS.replace(".json", ".npz"), **{key: grids[key] for key in shown if key in grids}
    )
    return markdown


def _empty_squares(
    grids: dict[str, np.ndarray], bounds: dict[str, Any], models: list[str]
) -> list[str]:
    r"""Markdown lines: each model's mass on the checkerboard's empty squares (none: no grid).

    A grid sum, :math:`h^2 \sum_{\text{grid points where } p = 0} q`, with :math:`h` the grid
    spacing: the mass a model leaks across the edges of the squares (blurred or misplaced
    edges), where the truth has none. The grid is the figure's (``Budget.grid`` points a side
    over the dataset's bounds).
    """
    truth = grids.get("checkerboard/truth")
    if truth is None:
        return []
    empty = ~np.isfinite(truth.astype(np.float64))
    (xmin, xmax), (ymin, ymax) = bounds["checkerboard"]
    cell = (xmax - xmin) / (truth.shape[1] - 1) * (ymax - ymin) / (truth.shape[0] - 1)
    lines = [
        "",
        "## Checkerboard: model mass on the empty squares",
        "",
        "The mass a model puts where the truth has none (across blurred or misplaced edges): "
        "a sum over the figure's grid, h² Σ q on the grid points of the empty squares (the "
        "sum over the whole grid, about 1, is the mass in the bounds). Lower is sharper; "
        "the truth's is 0.",
        "",
        _table_header(["model", "mass on the empty squares", "mass in the bounds"]),
    ]
    for model in models:
        key = f"checkerboard/{model}"
        if key in grids:
            q = np.exp(grids[key].astype(np.float64))
            total, leaked = q.sum() * cell, q[empty].sum() * cell
            lines.append(_row([MODELS[model], f"{leaked:.4f}", f"{total:.3f}"]))
    return lines


def _markdown(
    runs: list[dict[str, Any]],
    records: dict[tuple[str, str], dict[str, Any]],
    truth: dict[str, Any],
    names: list[str],
    models: list[str],
    extra: Sequence[str] = (),
) -> str:
    first = runs[0]
    b = Budget(**{k: v for k, v in first["budget"].items() if k != "mixtureflow"})
    v = first["versions"]
    wall = max(r["started"] + r.get("runtime", 0.0) for r in runs) - min(r["started"] for r in runs)
    processes = ", ".join(
        f"{'+'.join(r['datasets'])}"
        + (f" × {r['models'][0]}" if len(r["models"]) == 1 else f" × {len(r['models'])} models")
        + f": {r.get('runtime', math.nan):.0f} s"
        + ("" if r["complete"] else " (incomplete)")
        for r in runs
    )
    mode = "quick (smoke test, not a benchmark)" if first["quick"] else "full"
    date = datetime.fromtimestamp(first["started"], UTC).strftime("%Y-%m-%d")
    spans = [(r["started"], r["started"] + r.get("runtime", 0.0)) for r in runs]
    concurrent = max(sum(s <= start < e for s, e in spans) for start, _ in spans)
    overlap = f", up to {concurrent} at a time" if len(runs) > 1 else ""
    samples = [r["load_before"][0] for r in runs] + [
        r["load_after"][0] for r in runs if "load_after" in r
    ]
    loads = f"{min(samples):.1f}–{max(samples):.1f}"
    lines = [
        "# 2-D density estimation: KL(truth ‖ model)",
        "",
        f"{date}; pyro_mixflow {v['pyro_mixflow']}, torch {v['torch']}, pyro-ppl "
        f"{v['pyro-ppl']}, nflows {v['nflows']}, zuko {v['zuko']}, scikit-learn "
        f"{v['scikit-learn']}, numpy {v['numpy']}, Python {v['python']}; {first['cpu']}; "
        f"torch and BLAS threads {first['threads']} per process, {len(runs)} process(es)"
        f"{overlap}; 1-minute load average {loads} at the starts and ends of the runs.",
        f"Mode: {mode}. Budget: {b.num_train:,} training draws ({b.num_validation:,} of them "
        f"held out for validation), {b.num_test:,} test draws, {b.steps:,} Adam steps of "
        f"batch {b.batch_size}, lr {b.lr:g} cosine, seed {first['seed']}; mixtures of "
        f"{b.num_components} components, flow networks {b.hidden} wide (RAD's: residual, "
        f"{_rad_width(b)} wide). "
        f"Total runtime {wall:.0f} s wall clock ({processes}).",
        "",
        "KL(truth ‖ model) = E_truth[log p − log q] over the test draws, in nats, ± standard "
        "error; lower is better, 0 is perfect; best per dataset in bold (and any within two "
        "standard errors of it). Protocol and peers: the docstring of "
        "`benchmarks/density.py`.",
        "",
        "## KL(truth ‖ model), nats",
        "",
        _table_header(["model", *names]),
    ]
    best = {}
    for name in names:
        scored = [records[name, m] for m in models if (name, m) in records]
        finite = [r for r in scored if r["kl"] is not None and math.isfinite(r["kl"])]
        best[name] = min(finite, key=lambda r: r["kl"]) if finite else None
    for model in models:
        cells = []
        for name in names:
            r = records.get((name, model))
            cell = _kl_cell(r)
            top = best[name]
            if (
                r is not None
                and top is not None
                and r["kl"] is not None
                and math.isfinite(r["kl"])
                and r["kl"] - top["kl"] <= 2 * math.hypot(r["kl_se"], top["kl_se"])
            ):
                cell = f"**{cell}**"
            cells.append(cell)
        lines.append(_row([MODELS[model], *cells]))
    lines += [
        "",
        "## Test log-likelihood, nats per point (truth: −entropy, the ceiling)",
        "",
        _table_header(["model", *names]),
        _row(["truth", *(_pm(*truth[n]["neg_entropy"]) for n in names)]),
    ]
    for model in models:
        cells = []
        for name in names:
            r = records.get((name, model))
            ok = r is not None and r["test_ll"] is not None
            cells.append(_pm(r["test_ll"], r["test_ll_se"]) if ok else _missing(r))
        lines.append(_row([MODELS[model], *cells]))
    lines += [
        *extra,
        "",
        "## Parameters and seconds",
        "",
        "Seconds per dataset as init + train: EM (ours: the initialization) + `fit` "
        f"({b.steps:,} steps with its validation passes). ms/step = mean over datasets of "
        "train seconds / Adam steps. Parameters: trainable numbers (scikit-learn: free "
        "parameters of the mixture). Wall-clock seconds on a machine shared with other jobs "
        f"(load average {loads} on 2 cores), so indicative only: the same network ran at "
        "different speeds in different runs.",
        "",
        _table_header(["model", "parameters", "Adam steps", "ms/step", *names]),
    ]
    for model in models:
        rows = [records[n, model] for n in names if (n, model) in records]
        done = [r for r in rows if r["num_params"] is not None]
        params = sorted({r["num_params"] for r in done})
        steps = sorted({r["steps"] for r in done})
        per_step = [
            r["train_seconds"] / r["steps"]
            for r in done
            if r["steps"] and r["train_seconds"] is not None and math.isfinite(r["train_seconds"])
        ]
        ms = f"{1000 * sum(per_step) / len(per_step):.1f}" if per_step else "—"
        cells = []
        for name in names:
            r = records.get((name, model))
            if r is None or r["num_params"] is None:
                cells.append(_missing(r))
            elif r["steps"]:
                cells.append(f"{r['init_seconds']:.1f} + {r['train_seconds']:.1f}")
            else:
                cells.append(f"{r['init_seconds']:.1f} (EM)")
        lines.append(
            _row(
                [
                    MODELS[model],
                    "/".join(f"{p:,}" for p in params) or "—",
                    "/".join(str(s) for s in steps) or "—",
                    ms,
                    *cells,
                ]
            )
        )
    lines += [
        "",
        "## Training details",
        "",
        "Best step: the step whose validation loss was lowest, whose state the model keeps "
        "(0 = training never beat the initialization). KL at init: our models after EM, before "
        "Adam.",
        "",
        _table_header(
            ["dataset", "model", "KL at init", "KL after fit", "best step", "note"], align="llrrrl"
        ),
    ]
    flagged = []
    for name in names:
        for model in models:
            r = records.get((name, model))
            if r is None:
                continue
            note = r["error"] or r["note"]
            if r["nonfinite"]:
                note = f"{note}; log q not finite at {r['nonfinite']} test draws".lstrip("; ")
            init = "—" if r["init_kl"] is None else _pm(r["init_kl"], r["init_kl_se"])
            if r["init_kl"] is not None and r["kl"] is not None and r["kl"] > r["init_kl"]:
                rise = r["kl"] - r["init_kl"]
                note = f"{note}; test KL {rise:+.4f} above its EM initialization".lstrip("; ")
            if r["steps"] and r["best_step"] == 0:
                note = f"{note}; training never beat the initialization".lstrip("; ")
            best_step = "—" if not r["steps"] else str(r["best_step"])
            lines.append(_row([name, MODELS[model], init, _kl_cell(r), best_step, note]))
            if note:
                flagged.append(f"{name} / {MODELS[model]}: {note}")
    inexact = [n for n in names if not truth[n].get("exact_log_prob", True)]
    if inexact:
        lines += ["", f"Datasets whose log p is not exact: {', '.join(inexact)}."]
    if "realnvp" in models:
        flagged.append(
            f"{MODELS['realnvp']}: nflows 0.14 bounds every affine-coupling scale by 1.001, "
            "which caps its density below each dataset's peaks (see the docstring); "
            f"{MODELS.get('realnvp-general')} is the same flow with later nflows' "
            "`GENERAL_SCALE_ACTIVATION`."
        )
    lines += [
        "",
        "## Notes",
        "",
        *(f"- {f}" for f in flagged),
        *([] if flagged else ["- No model failed or was flagged."]),
        "",
    ]
    return "\n".join(lines)


def _figure(
    grids: dict[str, np.ndarray],
    records: dict[tuple[str, str], dict[str, Any]],
    bounds: dict[str, Any],
    names: list[str],
    models: list[str],
    path: Path,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = ["truth", *models]
    fig, axes = plt.subplots(
        len(names),
        len(columns),
        figsize=(1.9 * len(columns), 1.9 * len(names) + 0.4),
        squeeze=False,
        layout="constrained",
    )
    for i, name in enumerate(names):
        (xmin, xmax), (ymin, ymax) = bounds[name]
        log_truth = grids[f"{name}/truth"].astype(np.float64)
        vmax = float(log_truth[np.isfinite(log_truth)].max())
        vmin = vmax - LOG_DENSITY_RANGE
        for j, column in enumerate(columns):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title("truth" if column == "truth" else MODELS[column], fontsize=8)
            if j == 0:
                ax.set_ylabel(name, fontsize=9)
            key = f"{name}/{column}"
            if key not in grids:
                r = records.get((name, column))
                text = "failed" if r and r["error"] else "not run"
                ax.text(0.5, 0.5, text, ha="center", transform=ax.transAxes)
                ax.set_facecolor("0.9")
                continue
            log_density = np.nan_to_num(grids[key].astype(np.float64), nan=vmin)
            ax.imshow(
                np.clip(log_density, vmin, vmax),
                extent=(xmin, xmax, ymin, ymax),
                origin="lower",
                cmap="magma",
                vmin=vmin,
                vmax=vmax,
                interpolation="nearest",
            )
            r = records.get((name, column))
            if r is not None and r["kl"] is not None:
                ax.text(
                    0.03,
                    0.03,
                    f"KL {r['kl']:.3f}",
                    transform=ax.transAxes,
                    color="white",
                    fontsize=7,
                    bbox={"facecolor": "black", "alpha": 0.6, "pad": 1.5, "linewidth": 0},
                )
    fig.suptitle(
        f"log-density on each dataset's bounds, {LOG_DENSITY_RANGE:g} nats below the truth's "
        "maximum (black) to that maximum (white); KL(truth ‖ model) in nats",
        fontsize=9,
    )
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _table_header(columns: Sequence[str], *, align: str | None = None) -> str:
    """Header and alignment rows; ``align`` has one ``l``/``r`` per column (default ``lrr…``)."""
    align = align or "l" + "r" * (len(columns) - 1)
    return _row(columns) + "\n" + _row(["---:" if a == "r" else "---" for a in align])


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _pm(mean: float | None, se: float | None) -> str:
    if mean is None:
        return "—"
    if not math.isfinite(mean):
        return str(mean)
    decimals = 3 if not se or not math.isfinite(se) else min(4, max(3, -math.floor(math.log10(se))))
    return f"{mean:.{decimals}f} ± {se:.{decimals}f}"


def _kl_cell(r: dict[str, Any] | None) -> str:
    if r is None or r["kl"] is None:
        return _missing(r)
    return _pm(r["kl"], r["kl_se"])


def _missing(r: dict[str, Any] | None) -> str:
    return "not run" if r is None else "failed" if r["error"] else "—"


# ---------------------------------------------------------------------------------------------
# Command line


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny budget, seconds")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default: benchmarks/results; with --quick, a temporary folder, so "
        "that a smoke test never overwrites the benchmark's results)",
    )
    parser.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    parser.add_argument(
        "--models",
        nargs="+",
        choices=list(MODELS),
        default=None,
        help="models to run (default: all but the RAD ablations, "
        + ", ".join(RAD_VARIANTS)
        + "; with --seed-report, every model in the records)",
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch and BLAS threads (1: batches are small)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--no-report", action="store_true", help="write the JSON only (for parallel runs)"
    )
    parser.add_argument(
        "--report",
        nargs="*",
        type=Path,
        metavar="JSON",
        help=f"combine these results (default: {RECORDS} and every density-*.json run in "
        "--out) into density.md and density.png, without running anything",
    )
    parser.add_argument(
        "--seed-report",
        nargs="+",
        type=Path,
        metavar="JSON",
        help="summarize runs with different seeds into density-seeds.md in --out (mean, "
        "spread and each seed's KL of --models on --datasets), without running anything",
    )
    args = parser.parse_args(argv)
    if args.out is None:
        quick_out = Path(tempfile.gettempdir()) / "pyro_mixflow-density-quick"
        args.out = quick_out if args.quick else Path(__file__).parent / "results"
    if args.seed_report:
        print(seed_report(args.seed_report, args.out, args.datasets, args.models or list(MODELS)))
        return 0
    if args.report is not None:
        paths = args.report or [
            p
            for p in [args.out / RECORDS, *sorted(args.out.glob("density-*.json"))]
            if p.exists() and p.name != SEED_RECORDS
        ]
        runs, grids = load_results(paths)
        print(report(runs, grids, args.out))
        return 0

    threads = args.threads
    torch.set_num_threads(threads)
    names = [d for d in DATASETS if d in args.datasets]
    models = [m for m in MODELS if m in (args.models or DEFAULT_MODELS)]
    tag = "+".join(names) + ("" if models == list(DEFAULT_MODELS) else "-" + "+".join(models))
    if args.quick:
        tag = "quick-" + tag
    meta = {
        "versions": versions(),
        "quick": args.quick,
        "threads": threads,
        "cpu": f"{_cpu_name()}, {os.cpu_count()} logical CPUs",
        "load_before": os.getloadavg(),
        "argv": sys.argv[1:] if argv is None else list(argv),
    }
    with threadpool_limits(threads):
        result = run(
            names,
            models,
            QUICK if args.quick else FULL,
            seed=args.seed,
            out=args.out,
            tag=tag,
            meta=meta,
        )
    print(f"density: {result['runtime']:.0f} s; results in {args.out}/density-{tag}.json")
    if not args.no_report:
        runs, grids = load_results([args.out / f"density-{tag}.json"])
        print(report(runs, grids, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
