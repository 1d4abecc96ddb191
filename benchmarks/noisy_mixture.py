r"""NoisyMixture: vectorized sampling against the how-to's loop, and extreme deconvolution.

Two measurements, in one run:

1. **Sampling speed.** ``NoisyMixture(...).sample((N,))`` with :math:`K = 50` one-dimensional
   components against the how-to's sampler, which draws the component indices and then loops
   over the components, filling each one's draws through a boolean mask. One row per error
   process: (a) scale jitter :math:`\sigma_k + |e_k Z|`, (b) additive :math:`\mathcal{N}(m_k,
   s_k)`, (c) shift :math:`\lfloor U[-2, 3) \rfloor`. Median wall time over repetitions
   (round-robin, same process); ratio = loop time / ours.
2. **Deconvolution accuracy.** Draws from a known 2-D latent mixture of 3 components are
   observed with heteroscedastic Gaussian errors :math:`s_{nd} \sim U[0.3, 1.2]` (larger than
   the latent scales). ``pyro_mixflow.fitting.deconvolve`` (extreme-deconvolution EM) is
   compared with the same EM ignoring the errors (``errors = 0``, a plain Gaussian-mixture EM).
   Components are matched to the truth by the assignment that minimizes the distance of the
   means. Metrics: mean absolute error of the means, the scales and the weights; held-out mean
   log-likelihood of fresh *latent* draws under the fitted latent density (the truth's value is
   the ceiling); held-out mean log-likelihood of fresh *noisy* draws with their errors. Mean and
   standard deviation over seeds.

Usage::

    python benchmarks/noisy_mixture.py                 # full: N = 10^6 draws, 5 seeds
    python benchmarks/noisy_mixture.py --quick         # smoke test (a few seconds)
    python benchmarks/noisy_mixture.py --out DIR       # where the .md and .png go
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

import pyro_mixflow
from pyro_mixflow import DiagNormalMixture
from pyro_mixflow.distributions.noisy_mixture import (
    AdditiveNormal,
    IntegerShift,
    NoisyMixture,
    ScaleJitter,
)
from pyro_mixflow.fitting import deconvolve

RESULTS = Path(__file__).resolve().parent / "results"
NUM_COMPONENTS = 50


def loop_sampler(num, means, stds, weights, *, jitter=None, error=None, shift=None):
    """The how-to's sampler: component indices, then one masked fill per component."""
    index = torch.distributions.Categorical(probs=weights).sample((num,))
    out = torch.zeros(num, dtype=means.dtype)
    for k in range(len(means)):
        mask = index == k
        if mask.any():
            count = int(mask.sum())
            std = stds[k]
            if jitter is not None:
                std = std + torch.abs(jitter[k] * torch.randn(count, dtype=means.dtype))
            value = torch.distributions.Normal(means[k], std).sample(
                () if jitter is not None else (count,)
            )
            if error is not None:
                value = value + torch.distributions.Normal(error[0][k], error[1][k]).sample(
                    (count,)
                )
            if shift is not None:
                u = torch.distributions.Uniform(float(shift[0]), float(shift[1]))
                value = value + u.sample((count,)).floor()
            out[mask] = value
    return out


def speed(num: int, reps: int) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    k = NUM_COMPONENTS
    means = 10 * torch.rand(k, generator=gen)
    stds = 0.5 + torch.rand(k, generator=gen)
    weights = torch.rand(k, generator=gen) + 0.1
    weights = weights / weights.sum()
    jitter = 0.2 * torch.rand(k, generator=gen)
    err = (0.1 * torch.randn(k, generator=gen), 0.1 + 0.1 * torch.rand(k, generator=gen))
    latent = DiagNormalMixture(means.unsqueeze(-1), stds.unsqueeze(-1), probs=weights)
    cases = {
        "(a) scale jitter": (ScaleJitter(jitter.unsqueeze(-1)), {"jitter": jitter}),
        "(b) additive normal": (
            AdditiveNormal(err[0].unsqueeze(-1), err[1].unsqueeze(-1)),
            {"error": err},
        ),
        "(c) integer shift": (IntegerShift(-2, 3), {"shift": (-2, 3)}),
    }
    rows = []
    for name, (noise, loop_kwargs) in cases.items():
        d = NoisyMixture(latent, noise)
        ours, loop = [], []
        d.sample((1000,))  # warm-up
        loop_sampler(1000, means, stds, weights, **loop_kwargs)
        for _ in range(reps):
            start = time.perf_counter()
            d.sample((num,))
            ours.append(time.perf_counter() - start)
            start = time.perf_counter()
            loop_sampler(num, means, stds, weights, **loop_kwargs)
            loop.append(time.perf_counter() - start)
        t_ours, t_loop = statistics.median(ours), statistics.median(loop)
        rows.append({"case": name, "ours": t_ours, "loop": t_loop, "ratio": t_loop / t_ours})
    return rows


TRUE_LOCS = torch.tensor([[-3.0, 0.0], [0.5, 3.0], [3.0, -1.5]], dtype=torch.float64)
TRUE_SCALES = torch.tensor([[0.5, 0.8], [0.7, 0.35], [0.6, 0.6]], dtype=torch.float64)
TRUE_PROBS = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)


def _draw(num: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    index = torch.multinomial(TRUE_PROBS, num, replacement=True, generator=gen)
    noise = torch.randn(num, 2, dtype=torch.float64, generator=gen)
    latent = TRUE_LOCS[index] + TRUE_SCALES[index] * noise
    errors = 0.3 + 0.9 * torch.rand(num, 2, dtype=torch.float64, generator=gen)
    observed = latent + errors * torch.randn(num, 2, dtype=torch.float64, generator=gen)
    return latent, observed, errors


def accuracy(num: int, seeds: list[int]) -> tuple[list[dict], dict]:
    truth = DiagNormalMixture(TRUE_LOCS, TRUE_SCALES, probs=TRUE_PROBS)
    per_method: dict[str, dict[str, list[float]]] = {}
    example = {}
    for seed in seeds:
        gen = torch.Generator().manual_seed(seed)
        _, observed, errors = _draw(num, gen)
        test_latent, test_observed, test_errors = _draw(20000, gen)
        start = time.perf_counter()
        fits = {"extreme deconvolution": deconvolve(observed, errors, 3, seed=seed)}
        seconds = {"extreme deconvolution": time.perf_counter() - start}
        start = time.perf_counter()
        fits["plain EM (ignores errors)"] = deconvolve(observed, 0.0, 3, seed=seed)
        seconds["plain EM (ignores errors)"] = time.perf_counter() - start
        fits["truth"] = None
        for name, fit in fits.items():
            mixture = truth if fit is None else fit.mixture
            cost = torch.cdist(mixture.locs, TRUE_LOCS).numpy()
            _, match = linear_sum_assignment(cost)
            order = torch.as_tensor(np.argsort(match))
            row = per_method.setdefault(name, {})
            metrics = {
                "means": (mixture.locs[order] - TRUE_LOCS).abs().mean().item(),
                "scales": (mixture.scales[order] - TRUE_SCALES).abs().mean().item(),
                "weights": (mixture.probs[order] - TRUE_PROBS).abs().mean().item(),
                "latent": mixture.log_prob(test_latent).mean().item(),
                "noisy": NoisyMixture(mixture)
                .with_errors(test_errors)
                .log_prob(test_observed)
                .mean()
                .item(),
                "iterations": 0 if fit is None else len(fit.log_likelihood),
                "seconds": seconds.get(name, 0.0),
            }
            for key, value in metrics.items():
                row.setdefault(key, []).append(value)
            if seed == seeds[0]:
                example[name] = mixture
        if seed == seeds[0]:
            example["observed"] = observed
    rows = []
    for name, metrics in per_method.items():
        rows.append(
            {"method": name}
            | {
                key: (statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0)
                for key, v in metrics.items()
            }
        )
    return rows, example


def figure(example: dict, path: Path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.3), sharex=True, sharey=True)
    xs = torch.linspace(-6, 6, 241, dtype=torch.float64)
    ys = torch.linspace(-4.5, 5.5, 201, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1)
    true_density = example["truth"].log_prob(grid).exp().numpy()
    levels = true_density.max() * np.array([0.02, 0.1, 0.3, 0.6, 0.9])  # the same for all
    obs = example["observed"].numpy()
    axes[0].scatter(obs[:, 0], obs[:, 1], s=1, alpha=0.3, color="grey")
    axes[0].contour(xs, ys, true_density, levels=levels, colors="k", linewidths=0.8)
    axes[0].set_title("noisy data (grey), true latent density (black)", fontsize=10)
    for ax, name, color in (
        (axes[1], "extreme deconvolution", "tab:blue"),
        (axes[2], "plain EM (ignores errors)", "tab:red"),
    ):
        density = example[name].log_prob(grid).exp().numpy()
        ax.contour(xs, ys, true_density, levels=levels, colors="k", linewidths=0.8)
        ax.contour(xs, ys, density, levels=levels, colors=color, linewidths=1.0)
        ax.set_title(f"{name} (colour) vs truth (black)", fontsize=10)
    for ax in axes:
        ax.set_aspect("equal")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: small sizes")
    parser.add_argument("--out", type=Path, default=RESULTS, help="output folder")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    num, reps = (10**5, 3) if args.quick else (10**6, 15)
    num_fit, seeds = (1000, [0, 1]) if args.quick else (5000, [0, 1, 2, 3, 4])
    torch.manual_seed(0)
    speed_rows = speed(num, reps)
    accuracy_rows, example = accuracy(num_fit, seeds)
    figure(example, args.out / "noisy_mixture.png")

    lines = [
        "# NoisyMixture: sampling speed and deconvolution accuracy",
        "",
        f"torch {torch.__version__}, pyro_mixflow {pyro_mixflow.__version__}, Python "
        f"{platform.python_version()}; torch threads {torch.get_num_threads()}. Mode: "
        f"{'--quick (smoke test only)' if args.quick else 'full'}; total runtime "
        f"{time.perf_counter() - start:.0f} s.",
        "",
        f"## Sampling {num:.0e} draws, K = {NUM_COMPONENTS}, D = 1 (float32, median of {reps})",
        "",
        "| error process | ours (s) | how-to loop (s) | speed-up (loop / ours) |",
        "| --- | ---: | ---: | ---: |",
    ]
    for r in speed_rows:
        lines.append(f"| {r['case']} | {r['ours']:.4f} | {r['loop']:.4f} | {r['ratio']:.1f} |")
    lines += [
        "",
        f"## Deconvolution, N = {num_fit} noisy 2-D points, errors U[0.3, 1.2], K = 3 "
        f"(mean ± sd over {len(seeds)} seeds)",
        "",
        "Errors are mean absolute errors after matching components to the truth. Held-out "
        "log-likelihoods on 20000 fresh points: latent draws under the fitted latent density, "
        "and noisy draws under the fitted density convolved with their errors.",
        "",
        "| method | means error | scales error | weights error | held-out latent log-lik "
        "| held-out noisy log-lik | EM iterations | time (s) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]

    def fmt(pair, digits=3):
        return f"{pair[0]:.{digits}f} ± {pair[1]:.{digits}f}"

    for r in accuracy_rows:
        lines.append(
            f"| {r['method']} | {fmt(r['means'])} | {fmt(r['scales'])} | {fmt(r['weights'])} "
            f"| {fmt(r['latent'])} | {fmt(r['noisy'])} | {r['iterations'][0]:.0f} "
            f"| {r['seconds'][0]:.2f} |"
        )
    markdown = "\n".join(lines) + "\n"
    print(markdown)
    (args.out / "noisy_mixture.md").write_text(markdown)


if __name__ == "__main__":
    main()
