r"""Bias and variance of pathwise gradient estimators for a mixture of diagonal Gaussians.

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

Estimators (each estimate is :math:`\nabla_\theta \frac1M \sum_{m=1}^M f(z_m)` over one batch
of :math:`M` draws, with the distribution rebuilt from fresh leaf parameters every time):

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

For each estimator, ``R`` independent estimates :math:`\hat g_1, \dots, \hat g_R` are drawn and
compared with the true gradient :math:`g`, per parameter group (``locs``, ``scales``,
``logits``):

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
``M = 64``). Settings: ``D = 2, K = 4`` and ``D = 16, K = 8``, locs ``2 * randn``, scales
``0.5 + rand``, logits ``randn``, :math:`a \sim \mathcal{N}(0, I / D)`,
:math:`b \sim U(0, 2\pi)`, fixed seeds.
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
GROUPS = ("locs", "scales", "logits")
GUMBEL_TAUS = (0.05, 0.1, 0.3, 0.5, 1.0, 2.0)
ST_TAUS = (0.1, 0.5, 1.0)
Z_SIGNIFICANT = 3.0
HEAVY_TAIL_FACTOR = 20.0

Sampler = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


@dataclass(frozen=True)
class Setting:
    r"""One mixture :math:`q_\theta` and test function :math:`f(z) = \cos(a^\top z + b)`."""

    name: str
    locs: torch.Tensor  # [K, D]
    scales: torch.Tensor  # [K, D]
    logits: torch.Tensor  # [K]
    a: torch.Tensor  # [D]
    b: float

    @property
    def num_components(self) -> int:
        """Number of components K."""
        return self.locs.shape[0]

    @property
    def dim(self) -> int:
        """Dimension D."""
        return self.locs.shape[1]


@dataclass(frozen=True)
class Estimator:
    """A named gradient estimator: a function drawing ``M`` reparameterized samples."""

    name: str
    family: str  # "exact", "pyro", "gumbel" or "st"
    temperature: float | None
    sampler: Sampler


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


def make_setting(name: str, dim: int, num_components: int, seed: int) -> Setting:
    """Random mixture: locs ``2 * randn``, scales ``0.5 + rand``, logits ``randn``."""
    gen = torch.Generator().manual_seed(seed)
    locs = 2.0 * torch.randn(num_components, dim, generator=gen, dtype=DTYPE)
    scales = 0.5 + torch.rand(num_components, dim, generator=gen, dtype=DTYPE)
    logits = torch.randn(num_components, generator=gen, dtype=DTYPE)
    # Frequencies of order 1 / sqrt(D): sum_d a_d^2 sigma_d^2 stays of order one in any D, so
    # the damping factor exp(-var / 2) does not flatten the objective.
    a = torch.randn(dim, generator=gen, dtype=DTYPE) / math.sqrt(dim)
    b = float(2 * math.pi * torch.rand((), generator=gen, dtype=DTYPE))
    return Setting(name, locs, scales, logits, a, b)


def analytic_objective(
    locs: torch.Tensor, scales: torch.Tensor, logits: torch.Tensor, a: torch.Tensor, b: float
) -> torch.Tensor:
    r""":math:`\sum_k \pi_k \exp(-\frac12 \sum_d a_d^2 \sigma_{kd}^2) \cos(a^\top\mu_k + b)`."""
    probs = torch.softmax(logits, dim=-1)
    damping = torch.exp(-0.5 * (scales.square() * a.square()).sum(-1))
    return (probs * damping * torch.cos(locs @ a + b)).sum()


def true_gradient(setting: Setting) -> dict[str, torch.Tensor]:
    """Gradient of the closed-form objective, by autograd in float64."""
    params = [p.clone().requires_grad_() for p in (setting.locs, setting.scales, setting.logits)]
    value = analytic_objective(*params, setting.a, setting.b)
    grads = torch.autograd.grad(value, params)
    return {g: t.reshape(-1) for g, t in zip(GROUPS, grads, strict=True)}


def make_estimators(include_pyro: bool = True) -> list[Estimator]:
    """The estimators compared, in table order."""

    def exact(
        locs: torch.Tensor, scales: torch.Tensor, logits: torch.Tensor, m: int
    ) -> torch.Tensor:
        return pyro_mixflow.DiagNormalMixture(locs, scales, logits).rsample((m,))

    def pyro_peer(
        locs: torch.Tensor, scales: torch.Tensor, logits: torch.Tensor, m: int
    ) -> torch.Tensor:
        return pdist.MixtureOfDiagNormals(locs, scales, component_logits=logits).rsample((m,))

    def relaxed(tau: float, straight_through: bool) -> Sampler:
        def sampler(
            locs: torch.Tensor, scales: torch.Tensor, logits: torch.Tensor, m: int
        ) -> torch.Tensor:
            dist = pyro_mixflow.GumbelSoftmaxMixture(
                locs, scales, logits, temperature=tau, straight_through=straight_through
            )
            return dist.rsample((m,))

        return sampler

    estimators = [Estimator("exact", "exact", None, exact)]
    if include_pyro:
        estimators.append(Estimator("pyro MixtureOfDiagNormals", "pyro", None, pyro_peer))
    estimators += [
        Estimator(f"gumbel τ={t:g}", "gumbel", t, relaxed(t, False)) for t in GUMBEL_TAUS
    ]
    estimators += [Estimator(f"ST τ={t:g}", "st", t, relaxed(t, True)) for t in ST_TAUS]
    return estimators


def draw_estimates(
    setting: Setting, sampler: Sampler, reps: int, batch: int, seed: int
) -> tuple[dict[str, np.ndarray], float]:
    """``reps`` independent gradient estimates, ``[reps, numel]`` per group, and median ms."""
    torch.manual_seed(seed)
    out = {g: np.empty((reps, t.numel())) for g, t in zip(GROUPS, _params(setting), strict=True)}
    times = np.empty(reps)
    for r in range(reps):
        start = time.perf_counter()
        params = [p.clone().requires_grad_() for p in _params(setting)]
        z = sampler(*params, batch)
        loss = torch.cos(z @ setting.a + setting.b).mean()
        grads = torch.autograd.grad(loss, params)
        times[r] = time.perf_counter() - start
        for g, t in zip(GROUPS, grads, strict=True):
            out[g][r] = t.reshape(-1).numpy()
    return out, 1e3 * float(np.median(times))


def _params(setting: Setting) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return setting.locs, setting.scales, setting.logits


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
    """Runs every estimator on one setting."""
    truth = {g: t.numpy() for g, t in true_gradient(setting).items()}
    results = []
    for i, est in enumerate(estimators):
        progress.set_postfix_str(f"{setting.name}: {est.name}")
        estimates, ms = draw_estimates(setting, est.sampler, reps, batch, seed + 1000 * i)
        result = Result(est, ms_per_estimate=ms)
        for g in GROUPS:
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
    value = float(analytic_objective(*_params(setting), setting.a, setting.b))
    norms = ", ".join(f"‖∇{g}‖={float(t.norm()):.3g}" for g, t in truth.items())
    lines = [
        f"### {setting.name}: D={setting.dim}, K={setting.num_components} "
        f"(R={reps} estimates of M={batch} samples)",
        "",
        f"E[f] = {value:.4f}; true gradient norms: {norms}.",
        "",
        "| estimator | rel. bias locs | rel. bias scales | rel. bias logits "
        "| rel. var locs | rel. var scales | rel. var logits | ms / estimate |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for res in results:
        bias = " | ".join(_bias_cell(res.groups[g]) for g in GROUPS)
        var = " | ".join(
            _fmt(res.groups[g].rel_var) + (" †" if res.groups[g].heavy_tailed else "")
            for g in GROUPS
        )
        lines.append(f"| {res.estimator.name} | {bias} | {var} | {res.ms_per_estimate:.2f} |")
    return "\n".join(lines)


def markdown_report(
    sections: Sequence[str], reps: int, batch: int, elapsed: float, quick: bool
) -> str:
    """Full markdown document."""
    header = [
        "## Gradient estimators for E_q[cos(a·z + b)], q a mixture of diagonal Gaussians",
        "",
        f"float64, R={reps} independent estimates per estimator, each from M={batch} samples"
        f"{' (--quick)' if quick else ''}; torch {torch.__version__}, "
        f"torch threads: {torch.get_num_threads()}; total {elapsed:.1f} s.",
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
        "",
    ]
    return "\n".join(header) + "\n" + "\n\n".join(sections) + "\n"


COLORS = {"locs": "tab:blue", "scales": "tab:orange", "logits": "tab:green"}
# (line style, marker, legend label) per estimator family.
STYLES = {
    "gumbel": ("-", "o", "Gumbel-softmax"),
    "st": ("--", "s", "straight-through"),
    "exact": ("-", "", "exact (DiagNormalMixture)"),
    "pyro": (":", "", "pyro MixtureOfDiagNormals"),
}


def plot(all_results: dict[str, list[Result]], path: Path) -> None:
    """Bias and variance against temperature, one row per setting.

    Gumbel-softmax and straight-through are curves over the temperature; the exact and Pyro
    estimators do not depend on it and are horizontal lines. In the bias panels the thin
    dash-dot line is the exact estimator's noise floor: values near it are indistinguishable
    from zero bias at this number of estimates.
    """
    fig = Figure(figsize=(11, 4 * len(all_results) + 0.8), layout="constrained")
    axes = fig.subplots(len(all_results), 2, squeeze=False)
    for row, (name, results) in zip(axes, all_results.items(), strict=True):
        for ax, metric, label in (
            (row[0], "rel_bias", "relative bias ‖ḡ − g‖ / ‖g‖"),
            (row[1], "rel_var", "relative variance tr Σ / ‖g‖²"),
        ):
            _plot_panel(ax, results, metric)
            ax.set(xscale="log", yscale="log", xlabel="temperature τ", ylabel=label)
            ax.set_title(f"{name}: {'bias' if metric == 'rel_bias' else 'variance'}")
            ax.grid(True, which="major", alpha=0.3)
    handles = [Line2D([], [], color=c, lw=6, label=g) for g, c in COLORS.items()]
    handles += [
        Line2D([], [], color="0.3", ls=ls, marker=mk, label=lab) for ls, mk, lab in STYLES.values()
    ]
    handles.append(Line2D([], [], color="0.3", ls="-.", lw=0.8, label="noise floor (exact)"))
    fig.legend(handles=handles, loc="outside lower center", ncols=4, fontsize=8, frameon=False)
    fig.savefig(path, dpi=120)


def _plot_panel(ax: Axes, results: Sequence[Result], metric: str) -> None:
    by_family: dict[str, list[Result]] = {}
    for res in results:
        by_family.setdefault(res.estimator.family, []).append(res)
    for g, color in COLORS.items():
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
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    reps = args.reps or (20 if args.quick else 1000)
    batch = args.batch or (64 if args.quick else 256)
    if reps < 3 or batch < 1:
        parser.error("--reps must be at least 3 and --batch positive")

    settings = [
        make_setting("small", dim=2, num_components=4, seed=args.seed),
        make_setting("large", dim=16, num_components=8, seed=args.seed + 1),
    ]
    estimators = make_estimators(include_pyro=not args.no_pyro)
    start = time.perf_counter()
    all_results: dict[str, list[Result]] = {}
    with tqdm(total=len(settings) * len(estimators), desc="estimators", file=sys.stderr) as bar:
        for j, setting in enumerate(settings):
            seed = args.seed + 100_000 * (j + 1)
            all_results[setting.name] = run_setting(setting, estimators, reps, batch, seed, bar)
    elapsed = time.perf_counter() - start

    sections = [markdown_table(s, all_results[s.name], reps, batch) + "\n" for s in settings]
    report = markdown_report(sections, reps, batch, elapsed, args.quick)
    print(report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gradient_estimators.md").write_text(report, encoding="utf-8")
    plot(
        {f"{s.name} (D={s.dim}, K={s.num_components})": all_results[s.name] for s in settings},
        args.out / "gradient_estimators.png",
    )
    print(f"wrote {args.out / 'gradient_estimators.md'} and gradient_estimators.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
