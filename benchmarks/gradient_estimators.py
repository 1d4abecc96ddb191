r"""Bias and variance of pathwise gradient estimators for mixtures of Gaussians.

The target is the gradient of an expectation under a mixture
:math:`q_\theta(z) = \sum_k \pi_k \prod_d \mathcal{N}(z_d; \mu_{kd}, \sigma_{kd}^2)`,
:math:`\pi = \operatorname{softmax}(\text{logits})`, with respect to
:math:`\theta = (\mu, \sigma, \text{logits})`:

.. math::

    \nabla_\theta\, E_{z \sim q_\theta}[f(z)], \qquad f(z) = \cos(a^\top z + b).

The test function has a closed-form expectation. Under one component
:math:`a^\top z \sim \mathcal{N}(a^\top \mu_k, \sum_d a_d^2 \sigma_{kd}^2)`, so

.. math::

    E_{q_\theta}[f] = \sum_k \pi_k \exp\Big(-\tfrac12 \sum_d a_d^2 \sigma_{kd}^2\Big)
    \cos(a^\top \mu_k + b),

and the reference gradient is torch autograd through this formula in float64.

The same holds for components with full covariance :math:`\Sigma_k`, where
:math:`a^\top z \sim \mathcal{N}(a^\top \mu_k, a^\top \Sigma_k a)`:

.. math::

    E_{q_\theta}[f] = \sum_k \pi_k \exp\big(-\tfrac12 a^\top \Sigma_k a\big)
    \cos(a^\top \mu_k + b),

with :math:`\Sigma_k = L_k L_k^\top` for :class:`pyro_mixflow.MultivariateNormalMixture`
(:math:`\theta = (\mu, L, \text{logits})`, the lower triangles of the :math:`L_k` compared) and
:math:`\Sigma_k = W_k W_k^\top + \operatorname{diag} d_k` for
:class:`pyro_mixflow.LowRankMultivariateNormalMixture` (:math:`\theta = (\mu, W, d,
\text{logits})`). For these two only their exact ``rsample`` is measured (no relaxed sampler or
peer has full covariances).

Estimators for the diagonal mixture (each estimate is :math:`\nabla_\theta \frac1M
\sum_{m=1}^M f(z_m)` over one batch of :math:`M` draws, with the distribution rebuilt from fresh
leaf parameters every time):

* ``exact``: ``pyro_mixflow.DiagNormalMixture(...).rsample``. Exact mixture draws with an
  exact pathwise gradient (responsibility-weighted velocities for ``locs``/``scales``,
  implicit reparameterization through the distributional transform for ``logits``). It
  should be unbiased. Its ``logits`` gradient divides by the conditional densities
  :math:`q(z_d \mid z_{<d})`, small between separated conditional modes, so in high
  dimension it is heavy-tailed (flagged † below).
* ``pyro``: ``pyro.distributions.MixtureOfDiagNormals(...).rsample`` (Jankowiak & Karaletsos
  2018), a peer implementation of pathwise gradients, for reference. It shares the
  ``locs``/``scales`` velocity field with ``exact`` (identical gradients on identical draws);
  its ``logits`` gradient is a different construction, which this benchmark finds biased for
  :math:`f = \cos` (Pyro's own test checks a quadratic :math:`f` only).
* ``gumbel τ``: ``pyro_mixflow.GumbelSoftmaxMixture(..., temperature=τ).rsample``. The
  Gumbel-softmax relaxation :math:`z = c^\top \mu + \omega \odot c^\top \sigma` with relaxed
  one-hot weights :math:`c`; the draws do not follow :math:`q_\theta`, so the gradient is
  biased for the mixture objective. The bias shrinks as :math:`\tau \to 0` and the variance
  grows.
* ``ST τ``: the straight-through variant (``straight_through=True``): exact mixture draws in
  the forward pass, gradient through the relaxed weights; biased at every :math:`\tau`.

Estimators for the covariance mixtures: ``exact`` for ``MultivariateNormalMixture(...).rsample``
and ``LowRankMultivariateNormalMixture(...).rsample``: exact draws with the exact pathwise
gradient (responsibility-weighted velocities for the means and factors, implicit
reparameterization through the sequential conditional CDFs for ``logits``; Graves 2016).

For each estimator, ``R`` independent estimates :math:`\hat g_1, \dots, \hat g_R` are drawn and
compared with the true gradient :math:`g`, per parameter group (``locs``, ``scales`` or the
covariance factors, ``logits``):

* relative bias :math:`\lVert \bar g - g \rVert / \lVert g \rVert`, :math:`\bar g` the mean of
  the ``R`` estimates, printed with its noise floor :math:`\sqrt{\operatorname{tr}\hat\Sigma / R}
  / \lVert g \rVert` (the value an unbiased estimator shows on average, :math:`\hat\Sigma`
  the sample covariance of one estimate) and a z-score
  :math:`z = (\lVert \bar g - g \rVert^2 - \operatorname{tr}\hat\Sigma / R) /
  (\sqrt{2 \operatorname{tr}\Sigma^2} / R)`. Under an unbiased estimator :math:`z` has mean 0
  and standard deviation about 1 (Gaussian approximation of the mean of ``R`` estimates,
  correlations between coordinates included); :math:`z > 3` flags a significant bias.
  :math:`\operatorname{tr}\Sigma^2` uses the unbiased Gaussian estimator from the :math:`R \times R`
  Gram matrix. The statistic is approximate when single estimates are heavy-tailed (†).
* relative variance :math:`\operatorname{tr}\hat\Sigma / \lVert g \rVert^2`: the expected
  squared relative error of one ``M``-sample estimate due to noise (multiply by ``M`` for one
  sample).
* heavy-tail flag (†): the largest single estimate carries more than 20 times its fair share
  :math:`1/R` of the total squared deviation
  :math:`\sum_r \lVert \hat g_r - \bar g \rVert^2`; the variance, noise floor and :math:`z`
  are then dominated by a few draws.
* time: median wall-clock milliseconds per estimate (build, ``rsample``, ``f``, backward), on
  one torch thread by default (the tensors are tiny).

Usage::

    python benchmarks/gradient_estimators.py [--quick] [--out DIR] [--reps R] [--batch M]

writes ``gradient_estimators.md`` and ``gradient_estimators.png`` to ``DIR`` (default
``benchmarks/results``). Defaults: ``R = 1000``, ``M = 256`` (``--quick``: ``R = 20``,
``M = 64``). Settings: ``D = 2, K = 4`` and ``D = 16, K = 8`` for each covariance family
(low rank: ``r = 1`` and ``r = 4``); locs ``2 * randn``, logits ``randn``; diagonal: scales
``0.5 + rand``; full: ``scale_tril = diag(0.5 + rand) + tril(randn, -1) / sqrt(D)``; low rank:
``cov_factor = randn / sqrt(r)``, ``cov_diag = 0.25 + rand``; :math:`a \sim \mathcal{N}(0, I /
D)`, :math:`b \sim U(0, 2\pi)`, fixed seeds. ``--settings`` picks a subset (names in the
report's headings).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyro.distributions as pdist
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from tqdm import tqdm

import pyro_mixflow

DTYPE = torch.float64
# Parameter groups of each covariance family, in table order.
FAMILY_GROUPS = {
    "diag": ("locs", "scales", "logits"),
    "full": ("locs", "scale_tril", "logits"),
    "lowrank": ("locs", "cov_factor", "cov_diag", "logits"),
}
FAMILY_TITLES = {
    "diag": "diagonal covariance (`DiagNormalMixture`)",
    "full": "full covariance (`MultivariateNormalMixture`)",
    "lowrank": "low-rank covariance (`LowRankMultivariateNormalMixture`)",
}
GUMBEL_TAUS = (0.05, 0.1, 0.3, 0.5, 1.0, 2.0)
ST_TAUS = (0.1, 0.5, 1.0)
Z_SIGNIFICANT = 3.0
HEAVY_TAIL_FACTOR = 20.0

Params = dict[str, torch.Tensor]
Sampler = Callable[[Params, int], torch.Tensor]


@dataclass(frozen=True)
class Setting:
    r"""One mixture :math:`q_\theta` and test function :math:`f(z) = \cos(a^\top z + b)`."""

    name: str
    family: str  # "diag", "full" or "lowrank"
    params: Params  # the groups of FAMILY_GROUPS[family], in that order
    a: torch.Tensor  # [D]
    b: float

    @property
    def groups(self) -> tuple[str, ...]:
        """Names of the parameter groups."""
        return tuple(self.params)

    @property
    def num_components(self) -> int:
        """Number of components K."""
        return self.params["locs"].shape[0]

    @property
    def dim(self) -> int:
        """Dimension D."""
        return self.params["locs"].shape[1]

    @property
    def title(self) -> str:
        """Heading: name, covariance family and sizes."""
        rank = f", r={self.params['cov_factor'].shape[-1]}" if self.family == "lowrank" else ""
        sizes = f"D={self.dim}, K={self.num_components}{rank}"
        if self.family == "diag":
            return f"{self.name}: {sizes}"
        return f"{self.name}: {FAMILY_TITLES[self.family]}, {sizes}"


@dataclass(frozen=True)
class Estimator:
    """A named gradient estimator: a function drawing ``M`` reparameterized samples."""

    name: str
    family: str  # "exact", "pyro", "gumbel" or "st"
    temperature: float | None
    sampler: Sampler
    covariance: str = "diag"  # the setting family it applies to


@dataclass
class GroupStats:
    """Bias and variance summary of one parameter group."""

    rel_bias: float
    noise_floor: float
    z: float
    rel_var: float
    max_share: float
    reps: int

    @property
    def heavy_tailed(self) -> bool:
        """Whether one estimate dominates the spread (see the module docstring)."""
        return self.max_share > HEAVY_TAIL_FACTOR / self.reps


@dataclass
class Result:
    """Summary of one estimator in one setting."""

    estimator: Estimator
    groups: dict[str, GroupStats] = field(default_factory=dict)
    ms_per_estimate: float = math.nan


def make_setting(
    name: str, dim: int, num_components: int, seed: int, family: str = "diag", rank: int = 1
) -> Setting:
    """Random mixture of one covariance family (see the module docstring for the draws)."""
    gen = torch.Generator().manual_seed(seed)
    locs = 2.0 * torch.randn(num_components, dim, generator=gen, dtype=DTYPE)
    params: Params = {"locs": locs}
    if family == "diag":
        params["scales"] = 0.5 + torch.rand(num_components, dim, generator=gen, dtype=DTYPE)
    elif family == "full":
        diag = 0.5 + torch.rand(num_components, dim, generator=gen, dtype=DTYPE)
        lower = torch.randn(num_components, dim, dim, generator=gen, dtype=DTYPE).tril(-1)
        params["scale_tril"] = torch.diag_embed(diag) + lower / math.sqrt(dim)
    elif family == "lowrank":
        factor = torch.randn(num_components, dim, rank, generator=gen, dtype=DTYPE)
        params["cov_factor"] = factor / math.sqrt(rank)
        params["cov_diag"] = 0.25 + torch.rand(num_components, dim, generator=gen, dtype=DTYPE)
    else:
        raise ValueError(f"unknown covariance family {family!r}")
    params["logits"] = torch.randn(num_components, generator=gen, dtype=DTYPE)
    # Frequencies of order 1 / sqrt(D): a^T Sigma_k a stays of order one in any D, so the
    # damping factor exp(-var / 2) does not flatten the objective.
    a = torch.randn(dim, generator=gen, dtype=DTYPE) / math.sqrt(dim)
    b = float(2 * math.pi * torch.rand((), generator=gen, dtype=DTYPE))
    return Setting(name, family, params, a, b)


def make_settings(seed: int) -> list[Setting]:
    """Every setting, in report order (the diagonal ones first, with their historical seeds)."""
    return [
        make_setting("small", 2, 4, seed),
        make_setting("large", 16, 8, seed + 1),
        make_setting("full-small", 2, 4, seed + 2, "full"),
        make_setting("full-large", 16, 8, seed + 3, "full"),
        make_setting("lowrank-small", 2, 4, seed + 4, "lowrank", rank=1),
        make_setting("lowrank-large", 16, 8, seed + 5, "lowrank", rank=4),
    ]


def component_variance(family: str, params: Params, a: torch.Tensor) -> torch.Tensor:
    r""":math:`a^\top \Sigma_k a` for every component, ``[K]``."""
    if family == "diag":
        return (params["scales"].square() * a.square()).sum(-1)
    if family == "full":
        return (a @ params["scale_tril"]).square().sum(-1)  # ||L_k^T a||^2
    low = (a @ params["cov_factor"]).square().sum(-1)  # ||W_k^T a||^2
    return low + (params["cov_diag"] * a.square()).sum(-1)


def analytic_objective(family: str, params: Params, a: torch.Tensor, b: float) -> torch.Tensor:
    r""":math:`\sum_k \pi_k \exp(-\frac12 a^\top \Sigma_k a) \cos(a^\top\mu_k + b)`."""
    probs = torch.softmax(params["logits"], dim=-1)
    damping = torch.exp(-0.5 * component_variance(family, params, a))
    return (probs * damping * torch.cos(params["locs"] @ a + b)).sum()


def flatten_group(group: str, tensor: torch.Tensor) -> torch.Tensor:
    """The free entries of one group's gradient, flat (lower triangles of ``scale_tril``)."""
    if group == "scale_tril":
        rows, cols = torch.tril_indices(tensor.shape[-1], tensor.shape[-1])
        return tensor[..., rows, cols].reshape(-1)
    return tensor.reshape(-1)


def true_gradient(setting: Setting) -> dict[str, torch.Tensor]:
    """Gradient of the closed-form objective, by autograd in float64."""
    params = {g: p.clone().requires_grad_() for g, p in setting.params.items()}
    value = analytic_objective(setting.family, params, setting.a, setting.b)
    grads = torch.autograd.grad(value, list(params.values()))
    return {g: flatten_group(g, t) for g, t in zip(params, grads, strict=True)}


def make_estimators(include_pyro: bool = True) -> list[Estimator]:
    """The estimators compared, in table order."""

    def exact(p: Params, m: int) -> torch.Tensor:
        return pyro_mixflow.DiagNormalMixture(p["locs"], p["scales"], p["logits"]).rsample((m,))

    def pyro_peer(p: Params, m: int) -> torch.Tensor:
        dist = pdist.MixtureOfDiagNormals(p["locs"], p["scales"], component_logits=p["logits"])
        return dist.rsample((m,))

    def relaxed(tau: float, straight_through: bool) -> Sampler:
        def sampler(p: Params, m: int) -> torch.Tensor:
            dist = pyro_mixflow.GumbelSoftmaxMixture(
                p["locs"],
                p["scales"],
                p["logits"],
                temperature=tau,
                straight_through=straight_through,
            )
            return dist.rsample((m,))

        return sampler

    def exact_full(p: Params, m: int) -> torch.Tensor:
        dist = pyro_mixflow.MultivariateNormalMixture(p["locs"], p["scale_tril"], p["logits"])
        return dist.rsample((m,))

    def exact_lowrank(p: Params, m: int) -> torch.Tensor:
        dist = pyro_mixflow.LowRankMultivariateNormalMixture(
            p["locs"], p["cov_factor"], p["cov_diag"], p["logits"]
        )
        return dist.rsample((m,))

    estimators = [Estimator("exact", "exact", None, exact)]
    if include_pyro:
        estimators.append(Estimator("pyro MixtureOfDiagNormals", "pyro", None, pyro_peer))
    estimators += [
        Estimator(f"gumbel τ={t:g}", "gumbel", t, relaxed(t, False)) for t in GUMBEL_TAUS
    ]
    estimators += [Estimator(f"ST τ={t:g}", "st", t, relaxed(t, True)) for t in ST_TAUS]
    estimators.append(Estimator("exact", "exact", None, exact_full, covariance="full"))
    estimators.append(Estimator("exact", "exact", None, exact_lowrank, covariance="lowrank"))
    return estimators


def draw_estimates(
    setting: Setting, sampler: Sampler, reps: int, batch: int, seed: int
) -> tuple[dict[str, np.ndarray], float]:
    """``reps`` independent gradient estimates, ``[reps, numel]`` per group, and median ms."""
    torch.manual_seed(seed)
    sizes = {g: flatten_group(g, t).numel() for g, t in setting.params.items()}
    out = {g: np.empty((reps, size)) for g, size in sizes.items()}
    times = np.empty(reps)
    for r in range(reps):
        start = time.perf_counter()
        params = {g: p.clone().requires_grad_() for g, p in setting.params.items()}
        z = sampler(params, batch)
        loss = torch.cos(z @ setting.a + setting.b).mean()
        grads = torch.autograd.grad(loss, list(params.values()))
        times[r] = time.perf_counter() - start
        for g, t in zip(params, grads, strict=True):
            out[g][r] = flatten_group(g, t).numpy()
    return out, 1e3 * float(np.median(times))


def summarize(estimates: np.ndarray, truth: np.ndarray) -> GroupStats:
    """Relative bias with noise floor and z-score, and relative variance, of ``[R, p]``."""
    reps = estimates.shape[0]
    mean = estimates.mean(0)
    centered = estimates - mean
    # Sample covariance S = X^T X / (R - 1); tr S and tr S^2 from the R x R Gram matrix.
    gram = centered @ centered.T
    tr_s = float(np.trace(gram)) / (reps - 1)
    tr_s2 = float(np.square(gram).sum()) / (reps - 1) ** 2
    # Unbiased estimator of tr(Sigma^2) for Gaussian data (Bai & Saranadasa 1996).
    tr_sigma2 = (reps - 1) ** 2 / ((reps - 2) * (reps + 1)) * (tr_s2 - tr_s**2 / (reps - 1))
    tr_sigma2 = max(tr_sigma2, tr_s2 / reps)  # Guard against a non-positive estimate.
    sq_err = float(np.square(mean - truth).sum())
    norm2 = float(np.square(truth).sum())
    z = (sq_err - tr_s / reps) / (math.sqrt(2 * tr_sigma2) / reps) if tr_s > 0 else math.nan
    # Share of the largest single estimate in the total squared deviation: about a few / R for
    # light tails; near one when one outlier dominates (heavy tails, statistics unreliable).
    deviations = np.diag(gram)
    return GroupStats(
        rel_bias=math.sqrt(sq_err / norm2),
        noise_floor=math.sqrt(tr_s / reps / norm2),
        z=z,
        rel_var=tr_s / norm2,
        max_share=float(deviations.max() / deviations.sum()) if tr_s > 0 else math.nan,
        reps=reps,
    )


def run_setting(
    setting: Setting,
    estimators: Sequence[Estimator],
    reps: int,
    batch: int,
    seed: int,
    progress: tqdm,
) -> list[Result]:
    """Runs every estimator of the setting's covariance family on it."""
    truth = {g: t.numpy() for g, t in true_gradient(setting).items()}
    results = []
    for i, est in enumerate(e for e in estimators if e.covariance == setting.family):
        progress.set_postfix_str(f"{setting.name}: {est.name}")
        estimates, ms = draw_estimates(setting, est.sampler, reps, batch, seed + 1000 * i)
        result = Result(est, ms_per_estimate=ms)
        for g in setting.groups:
            result.groups[g] = summarize(estimates[g], truth[g])
        results.append(result)
        progress.update()
    return results


def _fmt(x: float) -> str:
    return f"{x:.3g}" if abs(x) >= 1e-3 else f"{x:.2e}"


def _bias_cell(s: GroupStats) -> str:
    cell = f"{_fmt(s.rel_bias)} ± {_fmt(s.noise_floor)} (z={s.z:+.1f})"
    cell = f"**{cell}**" if s.z > Z_SIGNIFICANT else cell
    return f"{cell} †" if s.heavy_tailed else cell


def markdown_table(setting: Setting, results: Sequence[Result], reps: int, batch: int) -> str:
    """Markdown section for one setting."""
    truth = true_gradient(setting)
    value = float(analytic_objective(setting.family, setting.params, setting.a, setting.b))
    norms = ", ".join(f"‖∇{g}‖={float(t.norm()):.3g}" for g, t in truth.items())
    groups = setting.groups
    lines = [
        f"### {setting.title} (R={reps} estimates of M={batch} samples)",
        "",
        f"E[f] = {value:.4f}; true gradient norms: {norms}.",
        "",
        "| estimator | "
        + " | ".join(f"rel. bias {g}" for g in groups)
        + " | "
        + " | ".join(f"rel. var {g}" for g in groups)
        + " | ms / estimate |",
        "|---|" + "---|" * (2 * len(groups) + 1),
    ]
    for res in results:
        bias = " | ".join(_bias_cell(res.groups[g]) for g in groups)
        var = " | ".join(
            _fmt(res.groups[g].rel_var) + (" †" if res.groups[g].heavy_tailed else "")
            for g in groups
        )
        lines.append(f"| {res.estimator.name} | {bias} | {var} | {res.ms_per_estimate:.2f} |")
    return "\n".join(lines)


def markdown_report(
    sections: Sequence[str], reps: int, batch: int, elapsed: float, quick: bool, note: str = ""
) -> str:
    """Full markdown document."""
    header = [
        "## Gradient estimators for E_q[cos(a·z + b)], q a mixture of Gaussians "
        "(diagonal, full and low-rank covariance)",
        "",
        f"float64, R={reps} independent estimates per estimator, each from M={batch} samples"
        f"{' (--quick)' if quick else ''}; torch {torch.__version__}, "
        f"torch threads: {torch.get_num_threads()}; total {elapsed:.1f} s.{note}",
        "",
        "* rel. bias: ‖mean of R estimates − true‖ / ‖true‖, ± its noise floor "
        "sqrt(tr Σ̂ / R) / ‖true‖ (what an unbiased estimator shows on average); "
        f"z standardizes the excess ‖mean − true‖² − tr Σ̂ / R (≈ N(0, 1) if unbiased; "
        f"bold: z > {Z_SIGNIFICANT:g}).",
        "* rel. var: tr Σ̂ / ‖true‖², Σ̂ the covariance of one M-sample estimate.",
        f"* †: heavy tails; one of the R estimates carries more than {HEAVY_TAIL_FACTOR:g} "
        "times its 1/R share of the total squared deviation, so the variance, noise floor "
        "and z are dominated by a few draws and unreliable.",
        "* ms / estimate: median wall-clock time to build the distribution, draw M samples, "
        "evaluate f and backpropagate.",
        "* scale_tril: the lower triangles of the Cholesky factors (the free entries).",
        "",
    ]
    return "\n".join(header) + "\n" + "\n\n".join(sections) + "\n"


COLORS = {
    "locs": "tab:blue",
    "scales": "tab:orange",
    "logits": "tab:green",
    "scale_tril": "tab:red",
    "cov_factor": "tab:purple",
    "cov_diag": "tab:brown",
}
# (line style, marker, legend label) per estimator family.
STYLES = {
    "gumbel": ("-", "o", "Gumbel-softmax"),
    "st": ("--", "s", "straight-through"),
    "exact": ("-", "", "exact (DiagNormalMixture)"),
    "pyro": (":", "", "pyro MixtureOfDiagNormals"),
}


def plot(settings: Sequence[Setting], all_results: dict[str, list[Result]], path: Path) -> None:
    """Bias and variance: one row per diagonal setting, then one for the covariance mixtures.

    In the diagonal rows, Gumbel-softmax and straight-through are curves over the temperature;
    the exact and Pyro estimators do not depend on it and are horizontal lines. In their bias
    panels the thin dash-dot line is the exact estimator's noise floor: values near it are
    indistinguishable from zero bias at this number of estimates. The bottom row has one bar
    per covariance setting and parameter group (exact samplers); in its bias panel the black
    tick on each bar is its noise floor and the number above it the z-score.
    """
    diagonal = [s for s in settings if s.family == "diag"]
    covariance = [s for s in settings if s.family != "diag"]
    rows = len(diagonal) + bool(covariance)
    fig = Figure(figsize=(11, 4 * rows + 0.8), layout="constrained")
    axes = fig.subplots(rows, 2, squeeze=False)
    for row, setting in zip(axes, diagonal, strict=False):
        name = f"{setting.name} (D={setting.dim}, K={setting.num_components})"
        for ax, metric, label in (
            (row[0], "rel_bias", "relative bias ‖ḡ − g‖ / ‖g‖"),
            (row[1], "rel_var", "relative variance tr Σ / ‖g‖²"),
        ):
            _plot_panel(ax, all_results[setting.name], metric)
            ax.set(xscale="log", yscale="log", xlabel="temperature τ", ylabel=label)
            ax.set_title(f"{name}: {'bias' if metric == 'rel_bias' else 'variance'}")
            ax.grid(True, which="major", alpha=0.3)
    if covariance:
        _plot_covariance(axes[-1], covariance, all_results)
    groups = {g for s in settings for g in s.groups}
    handles = [Line2D([], [], color=c, lw=6, label=g) for g, c in COLORS.items() if g in groups]
    if diagonal:
        handles += [
            Line2D([], [], color="0.3", ls=ls, marker=mk, label=lab)
            for ls, mk, lab in STYLES.values()
        ]
        handles.append(Line2D([], [], color="0.3", ls="-.", lw=0.8, label="noise floor (exact)"))
    fig.legend(handles=handles, loc="outside lower center", ncols=5, fontsize=8, frameon=False)
    fig.savefig(path, dpi=120)


def _plot_panel(ax: Axes, results: Sequence[Result], metric: str) -> None:
    by_family: dict[str, list[Result]] = {}
    for res in results:
        by_family.setdefault(res.estimator.family, []).append(res)
    for g in FAMILY_GROUPS["diag"]:
        color = COLORS[g]
        for family in ("gumbel", "st"):
            rows = by_family.get(family, [])
            if rows:
                style, marker, _ = STYLES[family]
                taus = [r.estimator.temperature for r in rows]
                vals = [getattr(r.groups[g], metric) for r in rows]
                ax.plot(taus, vals, style, marker=marker, color=color)
        for family in ("exact", "pyro"):
            for r in by_family.get(family, []):
                ax.axhline(getattr(r.groups[g], metric), ls=STYLES[family][0], color=color)
        if metric == "rel_bias":
            for r in by_family.get("exact", []):
                ax.axhline(r.groups[g].noise_floor, ls="-.", lw=0.8, color=color, alpha=0.6)


def _plot_covariance(
    row: Sequence[Axes], settings: Sequence[Setting], all_results: dict[str, list[Result]]
) -> None:
    """Bars of relative bias (with noise floor and z) and variance of the exact samplers."""
    slots = max(len(s.groups) for s in settings)
    width = 0.8 / slots
    for ax, metric, label in (
        (row[0], "rel_bias", "relative bias ‖ḡ − g‖ / ‖g‖"),
        (row[1], "rel_var", "relative variance tr Σ / ‖g‖²"),
    ):
        for x, setting in enumerate(settings):
            (result,) = all_results[setting.name]
            for i, g in enumerate(setting.groups):
                stats = result.groups[g]
                pos = x + (i - (len(setting.groups) - 1) / 2) * width
                value = getattr(stats, metric)
                ax.bar(pos, value, width, color=COLORS[g], edgecolor="0.3", lw=0.5)
                if metric == "rel_bias":
                    ax.plot([pos - width / 2, pos + width / 2], [stats.noise_floor] * 2, "k-")
                    top = max(value, stats.noise_floor) * 1.1
                    ax.text(pos, top, f"{stats.z:+.1f}", ha="center", fontsize=6)
                if stats.heavy_tailed:
                    top = max(value, stats.noise_floor) * (1.5 if metric == "rel_bias" else 1.1)
                    ax.text(pos, top, "†", ha="center")
        ax.set_xticks(
            range(len(settings)),
            [f"{s.name}\nD={s.dim}, K={s.num_components}" for s in settings],
            fontsize=8,
        )
        ax.set(yscale="log", ylabel=label)
        kind = "bias (tick: noise floor; z above)" if metric == "rel_bias" else "variance"
        ax.set_title(f"exact rsample, full and low-rank covariance: {kind}", fontsize=9)
        ax.grid(True, axis="y", which="major", alpha=0.3)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small R and M (seconds)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--reps", type=int, default=None, help="estimates per estimator (1000)")
    parser.add_argument("--batch", type=int, default=None, help="samples per estimate (256)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: tensors are tiny)"
    )
    parser.add_argument("--no-pyro", action="store_true", help="skip MixtureOfDiagNormals")
    names = [s.name for s in make_settings(0)]
    parser.add_argument(
        "--settings", nargs="+", choices=names, default=names, help="settings to run (all)"
    )
    parser.add_argument("--note", default="", help="a sentence appended to the report's header")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    reps = args.reps or (20 if args.quick else 1000)
    batch = args.batch or (64 if args.quick else 256)
    if reps < 3 or batch < 1:
        parser.error("--reps must be at least 3 and --batch positive")

    # Each setting keeps its seed and its estimators' seeds whatever subset runs.
    indexed = [(j, s) for j, s in enumerate(make_settings(args.seed)) if s.name in args.settings]
    settings = [s for _, s in indexed]
    estimators = make_estimators(include_pyro=not args.no_pyro)
    total = sum(e.covariance == s.family for s in settings for e in estimators)
    start = time.perf_counter()
    all_results: dict[str, list[Result]] = {}
    with tqdm(total=total, desc="estimators", file=sys.stderr) as bar:
        for j, setting in indexed:
            seed = args.seed + 100_000 * (j + 1)
            all_results[setting.name] = run_setting(setting, estimators, reps, batch, seed, bar)
    elapsed = time.perf_counter() - start

    sections = [markdown_table(s, all_results[s.name], reps, batch) + "\n" for s in settings]
    note = f" {args.note}" if args.note else ""
    report = markdown_report(sections, reps, batch, elapsed, args.quick, note)
    print(report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gradient_estimators.md").write_text(report, encoding="utf-8")
    plot(settings, all_results, args.out / "gradient_estimators.png")
    print(f"wrote {args.out / 'gradient_estimators.md'} and gradient_estimators.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
