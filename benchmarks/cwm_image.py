r"""Table I of *Classifier Weighted Mixtures* on the Euler image, at a documented CPU budget.

The target is the piecewise-constant density of Euler's portrait on the unit square
(:func:`pyro_mixflow.datasets.euler`): grey :math:`g = 0.2989 R + 0.5870 G + 0.1140 B`, a
draw picks a pixel with probability :math:`\propto g` and a uniform point inside it, the
image mapped onto :math:`[0, 1]^2` (the authors' protocol, recovered from their code). Each
model is scored by its mean log-density on held-out draws,

.. math::

    \frac1M \sum_{m=1}^M \log q(x_m) \;\le\; E_p[\log p] = 0.2245 \text{ nats}

(the oracle, the image's negative pixel entropy plus the log pixel area), with its standard
error, and by the paired :math:`\operatorname{KL}(p \,\|\, q) = \frac1M \sum_m [\log p(x_m) -
\log q(x_m)]` (same draws, a smaller standard error). The paper reports CWM 0.221 (39,925
parameters), NSF 0.182, GMM 0.150, RealNVP 0.133 after 1000 epochs of 300,000 draws in
batches of 30,000 (10,000 Adam steps, 3·10^8 draws seen, each costing 49 classifier
evaluations).

**Protocol.** 300,000 training draws (seed ``seed``; the last 10,000 held out for
:func:`pyro_mixflow.fit`'s best-state selection), 100,000 test draws (seed ``seed + 1``).
Models:

* ``GMM diag (EM)`` and ``GMM full (EM)``: scikit-learn ``GaussianMixture(49)``, means
  initialized on the 7 × 7 grid of cell centres :math:`((i + ½)/7, (j + ½)/7)`
  (``means_init``), 200 EM iterations, on the training rows.
* ``CWM``: :class:`pyro_mixflow.nn.CWM` with :math:`K = 49`, started at the diagonal EM fit
  above (locations, scales; classifier's last layer weight 0, bias :math:`\log \pi`, so it
  starts *equal* to ``GMM diag``), a tanh MLP classifier, then :func:`pyro_mixflow.fit`: Adam
  (AdamW form of the paper's weight decay :math:`5 \cdot 10^{-5}`), peak learning rate
  :math:`5 \cdot 10^{-3}` (the paper's) with a cosine schedule.
* ``NSF (nflows)``: ``benchmarks/density.py``'s ``build_nflows_nsf`` (imported, not copied:
  4 rational-quadratic coupling layers, ResidualNet width 64, 8 bins, on standardized data),
  trained by the same :func:`~pyro_mixflow.fit` call with the same steps, batch, learning
  rate and weight decay as the CWM.

**CPU budget** (the default here, for 2 shared cores, one torch thread): the paper's model
and data and the paper's 10,000 Adam steps, but batches of 512 instead of 30,000 and a
classifier of widths (64, 64, 64) instead of (128, 128, 128): 1/59 of the paper's
sample-passes, 1/3.4 of its parameters (about 20 minutes on one core).
The NSF gets the same steps and batches. ``--hidden 128 128 128 --batch-size 30000`` is
the paper's budget (a GPU job). ``--quick`` is a smoke test (seconds, not a benchmark).

Outputs in ``--out`` (default ``benchmarks/results``): ``cwm_image.md`` (the table) and
``cwm_image.png`` (image, CWM samples, and each model's log-density on a grid).

Usage::

    flock /tmp/bench.lock python benchmarks/cwm_image.py          # CPU budget, ~20 min
    python benchmarks/cwm_image.py --quick --out /tmp/cwm          # smoke test
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from sklearn.mixture import GaussianMixture
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parent))
import density as density_benchmark  # benchmarks/density.py: the NSF peer

import pyro_mixflow
from pyro_mixflow import fit
from pyro_mixflow.datasets import euler
from pyro_mixflow.nn import CWM

RESULTS = Path(__file__).resolve().parent / "results"
PAPER = {"CWM": 0.221, "NSF": 0.182, "GMM": 0.150, "RealNVP": 0.133}


@dataclass(frozen=True)
class Budget:
    """Sizes of one run."""

    num_train: int = 300_000
    num_validation: int = 10_000  # of the training draws
    num_test: int = 100_000
    grid_side: int = 7  # K = grid_side ** 2 components
    em_max_iter: int = 200
    hidden: tuple[int, ...] = (64, 64, 64)
    steps: int = 10_000
    batch_size: int = 512
    lr: float = 5e-3
    weight_decay: float = 5e-5
    nsf_hidden: int = 64
    nsf_layers: int = 4
    nsf_bins: int = 8
    figure_grid: int = 200


CPU = Budget()
QUICK = Budget(
    num_train=6000,
    num_validation=1000,
    num_test=4000,
    grid_side=3,
    em_max_iter=20,
    hidden=(16, 16),
    steps=30,
    batch_size=256,
    nsf_hidden=16,
    nsf_layers=2,
    figure_grid=60,
)


@dataclass
class Result:
    """One model's scores and costs."""

    name: str
    log_prob: Callable[[torch.Tensor], torch.Tensor]  # [N, 2] -> [N] float64
    num_params: int
    seconds: float
    note: str = ""


def grid_means(side: int) -> np.ndarray:
    """Centres of the ``side`` x ``side`` grid of cells of the unit square, ``(side², 2)``."""
    centres = (np.arange(side) + 0.5) / side
    xx, yy = np.meshgrid(centres, centres, indexing="ij")
    return np.stack([xx.ravel(), yy.ravel()], axis=-1)


def fit_em(x: torch.Tensor, b: Budget, covariance_type: str, seed: int) -> GaussianMixture:
    """scikit-learn EM with the grid initialization of the means."""
    em = GaussianMixture(
        b.grid_side**2,
        covariance_type=covariance_type,
        means_init=grid_means(b.grid_side),
        max_iter=b.em_max_iter,
        random_state=seed,
    )
    return em.fit(x.double().numpy())


def gmm_result(x: torch.Tensor, b: Budget, covariance_type: str, seed: int) -> Result:
    start = time.perf_counter()
    em = fit_em(x, b, covariance_type, seed)
    seconds = time.perf_counter() - start
    k = b.grid_side**2
    cov = {"diag": 2 * k, "full": 3 * k}[covariance_type]
    note = "" if em.converged_ else f"EM not converged in {em.n_iter_} iterations"
    return Result(
        f"GMM {covariance_type} (EM)",
        lambda v: torch.from_numpy(em.score_samples(v.double().numpy())),
        2 * k + cov + k - 1,
        seconds,
        note,
    )


def cwm_result(train: torch.Tensor, val: torch.Tensor, b: Budget, seed: int) -> tuple[Result, CWM]:
    start = time.perf_counter()
    em = fit_em(train, b, "diag", seed)
    torch.manual_seed(seed)
    model = CWM(2, b.grid_side**2, hidden_dims=b.hidden)
    with torch.no_grad():  # start exactly at the EM mixture (see CWM.init_from_data)
        model.locs.copy_(torch.as_tensor(em.means_))
        model.log_scales.copy_(0.5 * torch.as_tensor(em.covariances_).log())
        model.classifier[-1].weight.zero_()
        model.classifier[-1].bias.copy_(torch.as_tensor(em.weights_).log())
    history = fit(
        model,
        train,
        steps=b.steps,
        batch_size=b.batch_size,
        lr=b.lr,
        weight_decay=b.weight_decay,
        validation=val,
        eval_every=max(1, b.steps // 20),
        seed=seed,
        progress=True,
    )
    seconds = time.perf_counter() - start
    num_params = sum(p.numel() for p in model.parameters())
    note = f"best validated step {history.best_step} of {b.steps}"
    return Result("CWM (ours)", _model_log_prob(model), num_params, seconds, note), model


def nsf_result(
    train: torch.Tensor,
    val: torch.Tensor,
    test: torch.Tensor,
    log_p: torch.Tensor,
    b: Budget,
    seed: int,
) -> Result:
    peer_budget = replace(
        density_benchmark.Budget(),
        steps=b.steps,
        batch_size=b.batch_size,
        lr=b.lr,
        hidden=b.nsf_hidden,
        spline_layers=b.nsf_layers,
        num_bins=b.nsf_bins,
    )
    task = density_benchmark.Task(train, val, test, log_p, peer_budget, seed)
    trained = density_benchmark.build_nflows_nsf(task)
    note = trained.note or f"best validated step {trained.best_step} of {trained.steps}"
    return Result("NSF (nflows)", trained.log_prob, trained.num_params, trained.train_seconds, note)


def _model_log_prob(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    @torch.no_grad()
    def log_prob(x: torch.Tensor) -> torch.Tensor:
        dist = model()
        return torch.cat([dist.log_prob(chunk.float()).double() for chunk in x.split(8192)])

    return log_prob


def mean_se(values: torch.Tensor) -> tuple[float, float]:
    values = values.double()
    return float(values.mean()), float(values.std() / math.sqrt(len(values)))


def _pm(mean_and_se: tuple[float, float]) -> str:
    return f"{mean_and_se[0]:+.4f} ± {mean_and_se[1]:.4f}"


def run(b: Budget, seed: int, out: Path, quick: bool) -> str:
    started = time.time()
    truth = euler()
    train = truth.sample(b.num_train, generator=torch.Generator().manual_seed(seed)).float()
    test = truth.sample(b.num_test, generator=torch.Generator().manual_seed(seed + 1)).float()
    log_p = truth.log_prob(test.double())
    split = b.num_train - b.num_validation
    x_train, x_val = train[:split], train[split:]

    results = [gmm_result(x_train, b, "diag", seed), gmm_result(x_train, b, "full", seed)]
    nsf = nsf_result(x_train, x_val, test, log_p, b, seed)
    cwm, model = cwm_result(x_train, x_val, b, seed)
    results += [nsf, cwm]

    rows = []
    for r in results:
        log_q = r.log_prob(test)
        rows.append(
            {
                "result": r,
                "ll": mean_se(log_q),
                "kl": mean_se(log_p - log_q),
            }
        )
    oracle = truth.optimal_mean_log_prob
    lines = [
        "# Table I of *Classifier Weighted Mixtures*: Euler image, mean log-density",
        "",
        f"{time.strftime('%Y-%m-%d', time.gmtime(started))}; pyro_mixflow "
        f"{pyro_mixflow.__version__}, torch {torch.__version__}, Python "
        f"{platform.python_version()}; one torch thread on a 2-core machine shared with other "
        f"jobs. Mode: {'quick (smoke test, not a benchmark)' if quick else 'CPU budget'}; "
        f"total {time.time() - started:.0f} s.",
        f"Budget: {b.num_train:,} training draws ({b.num_validation:,} of them for validation), "
        f"{b.num_test:,} test draws, K = {b.grid_side**2} ({b.grid_side}×{b.grid_side} grid "
        f"initialization, {b.em_max_iter} EM iterations); CWM classifier tanh MLP "
        f"{list((2, *b.hidden, b.grid_side**2))}; CWM and NSF: {b.steps:,} Adam steps of "
        f"batch {b.batch_size}, lr {b.lr:g} cosine, weight decay {b.weight_decay:g}; seed "
        f"{seed}. Protocol: the docstring of `benchmarks/cwm_image.py`.",
        "",
        "Mean log q over the test draws ± s.e. (higher is better; the oracle is the ceiling); "
        "KL(p ‖ q) paired on the same draws ± s.e.; seconds = EM + training wall clock.",
        "",
        "| model | mean log-density | KL(p ‖ q) | paper | parameters | seconds | note |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
        f"| oracle (exact image density) | {oracle:.4f} (test draws: "
        f"{mean_se(log_p)[0]:.4f} ± {mean_se(log_p)[1]:.4f}) | 0 | 0.2245 | — | — | |",
    ]
    paper = {"GMM diag (EM)": "0.150 (GMM)", "NSF (nflows)": "0.182", "CWM (ours)": "0.221"}
    for row in rows:
        r = row["result"]
        ll, kl = row["ll"], row["kl"]
        lines.append(
            f"| {r.name} | {ll[0]:.4f} ± {ll[1]:.4f} | {kl[0]:.4f} ± {kl[1]:.4f} | "
            f"{paper.get(r.name, '—')} | {r.num_params:,} | {r.seconds:.0f} | {r.note} |"
        )
    by_name = {row["result"].name: row["result"] for row in rows}
    cwm_q, nsf_q = by_name["CWM (ours)"].log_prob(test), by_name["NSF (nflows)"].log_prob(test)
    gmm_q = by_name["GMM full (EM)"].log_prob(test)
    lines += [
        "",
        "Paired differences of log q on the same test draws (± s.e.): CWM − NSF "
        f"{_pm(mean_se(cwm_q - nsf_q))}, NSF − GMM full {_pm(mean_se(nsf_q - gmm_q))}, "
        f"CWM − GMM full {_pm(mean_se(cwm_q - gmm_q))}.",
        "",
    ]
    markdown = "\n".join(lines)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cwm_image.md").write_text(markdown)
    figure(truth, model, results, b, out / "cwm_image.png")
    return markdown


def figure(truth, model: CWM, results: Sequence[Result], b: Budget, path: Path) -> None:
    """Image, CWM samples, and every model's log-density on the unit square."""
    size = b.figure_grid
    xs = (torch.arange(size, dtype=torch.float64) + 0.5) / size
    yy, xx = torch.meshgrid(xs, xs, indexing="ij")
    grid = torch.stack([xx.flatten(), yy.flatten()], -1)
    panels = [("image (truth)", truth.log_prob(grid).reshape(size, size))]
    for r in results:
        panels.append((r.name, r.log_prob(grid.float()).reshape(size, size)))
    vmax = float(panels[0][1][torch.isfinite(panels[0][1])].max())
    vmin = vmax - 4.0
    with torch.no_grad():
        samples = model().sample((200_000,)).numpy()
    fig, axes = plt.subplots(
        1, len(panels) + 1, figsize=(2.3 * (len(panels) + 1), 2.8), layout="constrained"
    )
    for ax, (title, values) in zip(axes, panels, strict=False):
        ax.imshow(
            values.clamp(min=vmin).nan_to_num(vmin).numpy(),
            origin="lower",
            extent=(0, 1, 0, 1),
            cmap="gray",
            vmin=vmin,
            vmax=vmax,
        )
        ax.set_title(title, fontsize=8)
    ax = axes[-1]
    ax.hist2d(samples[:, 0], samples[:, 1], bins=100, range=((0, 1), (0, 1)), cmap="gray")
    ax.set_aspect("equal")
    ax.set_title("CWM samples (histogram)", fontsize=8)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(
        f"log-density, {vmax - vmin:g} nats below the image's maximum (black) to it (white)",
        fontsize=9,
    )
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke test (seconds)")
    parser.add_argument("--out", type=Path, default=None, help="output folder")
    parser.add_argument("--steps", type=int, default=None, help="Adam steps (CWM and NSF)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--hidden", type=int, nargs="+", default=None, help="CWM widths")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = Path(tempfile.gettempdir()) / "pyro_mixflow-cwm_image" if args.quick else RESULTS
    b = QUICK if args.quick else CPU
    if args.steps is not None:
        b = replace(b, steps=args.steps)
    if args.batch_size is not None:
        b = replace(b, batch_size=args.batch_size)
    if args.hidden is not None:
        b = replace(b, hidden=tuple(args.hidden))
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    with threadpool_limits(args.threads):
        print(run(b, args.seed, args.out, args.quick))
    print(f"budget: {asdict(b)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
