r"""SVI on a correlated posterior: Bayesian logistic regression of the breast-cancer data.

The model is scikit-learn's ``load_breast_cancer`` (569 rows, 30 features standardized to mean
0 and standard deviation 1, plus an intercept column: :math:`D = 31`),

.. math:: w \sim \mathcal{N}(0, I_{31}), \qquad y_n \mid w \sim
          \operatorname{Bernoulli}(\sigma(x_n^\top w)),

whose posterior is unimodal but strongly correlated (the features are). Every guide is trained
by stock ``pyro.infer.SVI`` with Adam (learning rate 5e-3, 3,000 steps) at **one budget: 16
model evaluations per step**, i.e. Pyro's guides with
``Trace_ELBO(num_particles=16, vectorize_particles=True)`` and our :math:`K`-component mixtures
with ``RaoBlackwellELBO(num_particles=16 // K)`` (which evaluates the model once per component
and particle). Guides:

* Pyro's ``AutoNormal``, ``AutoMultivariateNormal`` and ``AutoLowRankMultivariateNormal``
  (default rank, :math:`\operatorname{round}(\sqrt{31}) = 6`);
* ``AutoGaussianMixture()``: the diagonal default, :math:`K = 16`;
* ``AutoGaussianMixture(covariance="full")`` with :math:`K = 1, 2, 4, 16` (16, 8, 4 and 1
  particles) and ``AutoGaussianMixture(covariance="lowrank")`` (default rank 6) with
  :math:`K = 4, 16`.

Scores, from 3,000 fresh guide draws (:func:`pyro_mixflow.diagnostics.importance_diagnostics`):
the **ELBO** (mean log weight), the importance-sampled **log Z** (:math:`\log \frac1N \sum_n
p(x, z_n) / q(z_n)`, higher is better: it approaches the true log-evidence from below in
expectation as the guide improves, since log Z is not known here), Pareto :math:`\hat k` (below
0.7: the log Z estimate can be trusted) and the training seconds (one torch thread; the
diagnostics are not timed). Mean ± standard deviation over ``--seeds``.

Outputs in ``--out``: ``breast_cancer.md`` (the table), ``breast_cancer.png`` (log Z and ELBO
per guide and seed, and the training loss of the first seed) and ``breast_cancer.json``.

Usage::

    python benchmarks/breast_cancer.py --quick --out /tmp/bc        # seconds (smoke test)
    OMP_NUM_THREADS=1 python benchmarks/breast_cancer.py    # full, 3 seeds: benchmarks/results/
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import (
    AutoLowRankMultivariateNormal,
    AutoMultivariateNormal,
    AutoNormal,
)

from pyro_mixflow.diagnostics import importance_diagnostics
from pyro_mixflow.infer import AutoGaussianMixture, RaoBlackwellELBO

EVALUATIONS = 16  # model evaluations per SVI step, for every guide
FULL = {"steps": 3000, "draws": 3000}
QUICK = {"steps": 20, "draws": 200}


@dataclass(frozen=True)
class Guide:
    """A guide of the benchmark: its label, how it is built, and its components."""

    label: str
    build: Callable[[Callable], object]
    num_components: int | None = None  # None: a Pyro guide, trained with Trace_ELBO

    def loss(self) -> pyro.infer.ELBO:
        """The ELBO at the shared budget of :data:`EVALUATIONS` model evaluations per step."""
        if self.num_components is None:
            return Trace_ELBO(num_particles=EVALUATIONS, vectorize_particles=True)
        return RaoBlackwellELBO(num_particles=max(1, EVALUATIONS // self.num_components))


GUIDES = {
    "auto_normal": Guide("Pyro AutoNormal", AutoNormal),
    "auto_mvn": Guide("Pyro AutoMultivariateNormal", AutoMultivariateNormal),
    "auto_lowrank": Guide("Pyro AutoLowRankMultivariateNormal", AutoLowRankMultivariateNormal),
    "agm_diag": Guide(
        "AutoGaussianMixture(), diag K=16 (ours)", lambda m: AutoGaussianMixture(m, 16), 16
    ),
    "agm_full1": Guide(
        'AutoGaussianMixture(covariance="full"), K=1 (ours)',
        lambda m: AutoGaussianMixture(m, 1, covariance="full"),
        1,
    ),
    "agm_full2": Guide(
        'AutoGaussianMixture(covariance="full"), K=2 (ours)',
        lambda m: AutoGaussianMixture(m, 2, covariance="full"),
        2,
    ),
    "agm_full4": Guide(
        'AutoGaussianMixture(covariance="full"), K=4 (ours)',
        lambda m: AutoGaussianMixture(m, 4, covariance="full"),
        4,
    ),
    "agm_full16": Guide(
        'AutoGaussianMixture(covariance="full"), K=16 (ours)',
        lambda m: AutoGaussianMixture(m, 16, covariance="full"),
        16,
    ),
    "agm_lowrank4": Guide(
        'AutoGaussianMixture(covariance="lowrank"), K=4 (ours)',
        lambda m: AutoGaussianMixture(m, 4, covariance="lowrank"),
        4,
    ),
    "agm_lowrank16": Guide(
        'AutoGaussianMixture(covariance="lowrank"), K=16 (ours)',
        lambda m: AutoGaussianMixture(m, 16, covariance="lowrank"),
        16,
    ),
}


def load_data(dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Standardized features with an intercept column ``(569, 31)`` and labels ``(569,)``."""
    from sklearn.datasets import load_breast_cancer

    features, labels = load_breast_cancer(return_X_y=True)
    features = (features - features.mean(0)) / features.std(0)
    x = np.concatenate([np.ones((len(features), 1)), features], axis=1)
    return torch.as_tensor(x, dtype=dtype), torch.as_tensor(labels, dtype=dtype)


def model(x: torch.Tensor, y: torch.Tensor) -> None:
    """Logistic regression with a N(0, 1) prior on each of the 31 coefficients."""
    w = pyro.sample("w", dist.Normal(x.new_zeros(x.shape[-1]), 1.0).to_event(1))
    logits = (w * x).sum(-1)  # w: (*particles, 1, D) broadcasts over the rows of x
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Bernoulli(logits=logits), obs=y)


def run(name: str, seed: int, settings: dict, data: tuple) -> dict:
    """Trains guide ``name`` with one seed; its scores, seconds and loss curve."""
    spec = GUIDES[name]
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    guide = spec.build(model)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 5e-3}), spec.loss())
    losses, start = [], time.perf_counter()
    for _ in range(settings["steps"]):
        losses.append(svi.step(*data))
    seconds = time.perf_counter() - start
    torch.manual_seed(10_000 + seed)
    with torch.no_grad():
        result = importance_diagnostics(
            model,
            guide,
            *data,
            num_samples=settings["draws"],
            max_plate_nesting=1,
            chunk_size=500,
        )
    return {
        "guide": name,
        "seed": seed,
        "elbo": result.elbo,
        "elbo_se": result.elbo_se,
        "log_z": result.log_evidence,
        "log_z_se": result.log_evidence_se,
        "pareto_k": result.pareto_k,
        "ess_fraction": result.ess_fraction,
        "seconds": seconds,
        "losses": losses,
    }


def _mean_sd(values: Sequence[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f}"


def table(records: Sequence[dict], names: Sequence[str]) -> str:
    """Markdown table: one row per guide, mean ± sd over seeds."""
    lines = [
        "| guide | model evals / step | ELBO | log Z (IS) | Pareto k̂ | ESS % | seconds |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in names:
        rows = [r for r in records if r["guide"] == name]
        if not rows:
            continue
        spec = GUIDES[name]
        if spec.num_components is None:
            budget = f"{EVALUATIONS} particles"
        else:
            budget = f"{spec.num_components} × {max(1, EVALUATIONS // spec.num_components)}"
        k_hat = max(r["pareto_k"] for r in rows)
        ess = np.mean([100 * r["ess_fraction"] for r in rows])
        lines.append(
            f"| {spec.label} | {budget} | {_mean_sd([r['elbo'] for r in rows])} "
            f"| {_mean_sd([r['log_z'] for r in rows])} | {k_hat:.2f} (max) | {ess:.1f} "
            f"| {np.mean([r['seconds'] for r in rows]):.0f} |"
        )
    return "\n".join(lines)


def figure(records: Sequence[dict], names: Sequence[str], path: Path) -> None:
    """Log Z and ELBO per guide (a point per seed), and the first seed's smoothed loss."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    shown = [n for n in names if any(r["guide"] == n for r in records)]
    for ax, key, title in zip(axes[:2], ("log_z", "elbo"), ("log Z (IS)", "ELBO"), strict=True):
        for i, name in enumerate(shown):
            values = [r[key] for r in records if r["guide"] == name]
            ax.scatter([i] * len(values), values, s=18)
        ax.set_xticks(range(len(shown)))
        ax.set_xticklabels(
            [GUIDES[n].label.replace(" (ours)", "*") for n in shown], rotation=70, fontsize=7
        )
        ax.set_title(f"{title} (higher is better)")
    seed = min(r["seed"] for r in records)
    for name in shown:
        (r,) = [r for r in records if r["guide"] == name and r["seed"] == seed]
        loss = np.asarray(r["losses"])
        width = max(1, len(loss) // 50)
        smooth = np.convolve(loss, np.ones(width) / width, mode="valid")
        axes[2].plot(smooth, label=GUIDES[name].label, lw=1)
    if len(records[0]["losses"]) > 1:
        low = min(np.percentile(r["losses"][len(r["losses"]) // 2 :], 5) for r in records)
        axes[2].set_ylim(low - 5, low + 80)
    axes[2].set_xlabel("step")
    axes[2].set_title(f"-ELBO estimate during training (seed {seed}, smoothed)")
    axes[2].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny budget, seconds")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--guides", nargs="+", default=list(GUIDES), choices=list(GUIDES))
    parser.add_argument(
        "--seeds", nargs="+", type=int, default=None, help="default: 0 1 2 (quick: 0)"
    )
    parser.add_argument("--steps", type=int, default=None, help="override the SVI steps")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = dict(QUICK if args.quick else FULL)
    if args.steps is not None:
        settings["steps"] = args.steps
    if args.seeds is None:
        args.seeds = [0] if args.quick else [0, 1, 2]
    data = load_data()
    records = []
    for seed in args.seeds:
        for name in args.guides:
            record = run(name, seed, settings, data)
            records.append(record)
            print(
                f"# {name} seed {seed}: ELBO {record['elbo']:.2f}, log Z {record['log_z']:.2f}, "
                f"k {record['pareto_k']:.2f}, {record['seconds']:.0f} s",
                flush=True,
            )
    args.out.mkdir(parents=True, exist_ok=True)
    text = table(records, args.guides)
    mode = "quick (smoke test)" if args.quick else "full"
    header = (
        f"# Bayesian logistic regression, breast cancer (D = 31): SVI guides ({mode})\n\n"
        f"Adam lr 5e-3, {settings['steps']} steps, {EVALUATIONS} model evaluations per step for "
        f"every guide; scores from {settings['draws']} guide draws; seeds "
        f"{', '.join(map(str, args.seeds))} (mean ± sd; k̂ the largest). Above k̂ = 0.7 the "
        "log Z estimate is unreliable (typically too low). `benchmarks/breast_cancer.py`.\n\n"
    )
    (args.out / "breast_cancer.md").write_text(header + text + "\n")
    summary = [{k: v for k, v in r.items() if k != "losses"} for r in records]
    (args.out / "breast_cancer.json").write_text(json.dumps(summary, indent=1) + "\n")
    figure(records, args.guides, args.out / "breast_cancer.png")
    print(text)
    if any(not math.isfinite(r["log_z"]) for r in records):
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
