r"""Reverse-KL training of a CWM: the exact K³ Rao-Blackwellized estimator against ours (K²).

The reverse KL of a CWM :math:`q` to an unnormalized target :math:`\pi`, Rao-Blackwellized
over the component index (one shared base draw :math:`z` per row, :math:`x_k = \mu_k +
\sigma_k z`, :math:`w = \operatorname{softmax}(f(z))`):

.. math::

    \operatorname{KL}(q \,\|\, \pi) + \log Z
    = E_z\Big[\sum_k w_k(z) \big(\log q(x_k) - \log \pi(x_k)\big)\Big].

``exact`` computes :math:`\log q(x_k)` at all :math:`K` branch values: :math:`K` classifier
evaluations per branch, :math:`K^2` per draw (:math:`K^3` outputs), as the authors' code does.
``ours`` keeps the cheap cross-entropy part exact and estimates the entropy part with
:meth:`~pyro_mixflow.distributions.ClassifierWeightedMixture.rao_blackwell_log_prob`: each
:math:`\log q(x_k)` is split into its own-component term (free: computed from :math:`w(z)`
for all :math:`k`) and an overlap term sampled from :math:`m = 2` branches with a
leave-one-out REINFORCE baseline: :math:`mK` evaluations per draw (:math:`mK^2` outputs),
unbiased in value and gradient. ``ours-stl`` also drops the zero-mean score term ("sticking
the landing"; :math:`K` more evaluations per draw).

Three measurements, in one run (one torch thread):

1. **Cost** per optimizer step (loss, backward) at :math:`K = 16, 49, 100`, :math:`D = 2`,
   classifier tanh MLP ``[2, 128, 128, 128, K]``, a batch of ``draws`` base draws: median
   wall time over repetitions (estimators interleaved), and the memory held for the backward
   pass, measured as the bytes of every distinct tensor autograd saves during the forward pass
   (``torch.autograd.graph.saved_tensors_hooks``; the dominant term of the peak on CPU, where
   torch has no allocator statistics).
2. **Gradient variance** at the initial state: the total variance (sum over parameters) of
   the gradient of the loss from ``draws`` base draws, over independent replicates; the
   efficiency is variance × seconds per step (the variance of the gradient one gets per
   second, lower is better), each relative to ``exact``.
3. **Training at equal wall time** (:math:`K = 16`) on a 2-D target with 8 separated modes
   (a ring of Gaussians, radius 4, standard deviation 0.4, unnormalized): Adam, lr
   :math:`10^{-2}`, each estimator for the same number of seconds; the final reverse KL
   :math:`E_q[\log q - \log p]` (exact normalized target) from 20,000 fresh Rao-Blackwellized
   draws, ± s.e.

Usage::

    flock /tmp/bench.lock python benchmarks/cwm_reverse_kl.py     # ~6 min
    python benchmarks/cwm_reverse_kl.py --quick --out /tmp/rkl     # smoke test
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from torch import nn

import pyro_mixflow
from pyro_mixflow import ClassifierWeightedMixture, DiagNormalMixture

RESULTS = Path(__file__).resolve().parent / "results"
ESTIMATORS = ("exact", "ours", "ours-stl")


def make_cwm(num_components: int, hidden: Sequence[int], seed: int) -> nn.Module:
    """A CWM module: locations spread over [-5, 5]², unit scales, a tanh MLP classifier."""
    from pyro_mixflow.nn import CWM

    torch.manual_seed(seed)
    model = CWM(2, num_components, hidden_dims=hidden)
    with torch.no_grad():
        model.locs.uniform_(-5.0, 5.0)
        model.log_scales.fill_(0.0)
    return model


def ring_target() -> DiagNormalMixture:
    """Eight Gaussians of standard deviation 0.4 on a circle of radius 4 (equal weights)."""
    angles = torch.arange(8) * (2 * math.pi / 8)
    locs = 4.0 * torch.stack([angles.cos(), angles.sin()], -1)
    return DiagNormalMixture(locs, torch.full((8, 2), 0.4), torch.zeros(8))


def reverse_kl_loss(
    q: ClassifierWeightedMixture,
    target_log_prob: Callable[[torch.Tensor], torch.Tensor],
    num_draws: int,
    estimator: str,
) -> torch.Tensor:
    r"""Mean over ``num_draws`` base draws of :math:`\sum_k w_k (\log q(x_k) - \log\pi(x_k))`."""
    values, log_weights = q.rao_blackwell((num_draws,))  # [S, K, D], [S, K]
    weights = log_weights.exp()
    cross = (weights * target_log_prob(values)).sum(-1)  # [S]: K target evaluations
    if estimator == "exact":  # K log_prob calls: K^2 classifier evaluations per draw
        log_q = q.log_prob(values.transpose(0, 1)).transpose(0, 1)  # [S, K]
        entropy = (weights * log_q).sum(-1)
    else:
        entropy = q.rao_blackwell_log_prob(
            values, log_weights, stick_the_landing=estimator == "ours-stl"
        )
    return (entropy - cross).mean()


def saved_bytes(fn: Callable[[], torch.Tensor]) -> int:
    """Bytes of the distinct tensors autograd saves for backward while ``fn`` runs."""
    seen: dict[tuple[int, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.device.type == "cpu" and t.untyped_storage().nbytes():
            seen[(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())] = (
                t.untyped_storage().nbytes()
            )
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn()
    del loss
    return sum(seen.values())


def cost(ks: Sequence[int], hidden: Sequence[int], draws: int, reps: int) -> list[dict]:
    target = ring_target()
    rows = []
    for k in ks:
        model = make_cwm(k, hidden, seed=k)
        times: dict[str, list[float]] = {e: [] for e in ESTIMATORS}
        memory = {}
        for e in ESTIMATORS:
            memory[e] = saved_bytes(
                lambda e=e, model=model: reverse_kl_loss(model(), target.log_prob, draws, e)
            )
        for _ in range(reps):
            for e in ESTIMATORS:
                model.zero_grad()
                start = time.perf_counter()
                reverse_kl_loss(model(), target.log_prob, draws, e).backward()
                times[e].append(time.perf_counter() - start)
        for e in ESTIMATORS:
            rows.append(
                {"K": k, "estimator": e, "seconds": statistics.median(times[e]), "bytes": memory[e]}
            )
    return rows


def variance(
    ks: Sequence[int], hidden: Sequence[int], draws: int, replicates: int, seconds: dict
) -> list[dict]:
    target = ring_target()
    rows = []
    for k in ks:
        model = make_cwm(k, hidden, seed=k)
        for e in ESTIMATORS:
            grads = []
            for _ in range(replicates):
                model.zero_grad()
                reverse_kl_loss(model(), target.log_prob, draws, e).backward()
                grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
            g = torch.stack(grads).double()
            total = float(g.var(0).sum())
            rows.append(
                {"K": k, "estimator": e, "variance": total, "efficiency": total * seconds[k, e]}
            )
    return rows


def train_equal_time(
    k: int, hidden: Sequence[int], draws: int, budget_s: float, seed: int
) -> dict[str, dict]:
    target = ring_target()
    out = {}
    for e in ESTIMATORS:
        model = make_cwm(k, hidden, seed=seed)
        optim = torch.optim.Adam(model.parameters(), lr=1e-2)
        start, steps, curve = time.perf_counter(), 0, []
        torch.manual_seed(seed + 1)
        while time.perf_counter() - start < budget_s:
            optim.zero_grad()
            loss = reverse_kl_loss(model(), target.log_prob, draws, e)
            loss.backward()
            optim.step()
            steps += 1
            curve.append((time.perf_counter() - start, float(loss.detach())))
        with torch.no_grad():
            torch.manual_seed(seed + 2)
            q = model()
            values, log_weights = q.rao_blackwell((20_000,))
            log_q = q.log_prob(values.transpose(0, 1)).transpose(0, 1)
            terms = (log_weights.exp() * (log_q - target.log_prob(values))).sum(-1)
            samples = q.sample((3000,))
        out[e] = {
            "steps": steps,
            "kl": float(terms.mean()),
            "kl_se": float(terms.std() / math.sqrt(len(terms))),
            "curve": curve,
            "samples": samples,
        }
    return out


def report(cost_rows, var_rows, training, args, started) -> str:
    exact_time = {r["K"]: r["seconds"] for r in cost_rows if r["estimator"] == "exact"}
    exact_bytes = {r["K"]: r["bytes"] for r in cost_rows if r["estimator"] == "exact"}
    lines = [
        "# CWM reverse KL: exact K³ Rao-Blackwellized estimator vs ours (K²)",
        "",
        f"{time.strftime('%Y-%m-%d', time.gmtime(started))}; pyro_mixflow "
        f"{pyro_mixflow.__version__}, torch {torch.__version__}, Python "
        f"{platform.python_version()}; one torch thread on a 2-core machine shared with other "
        f"jobs (wall-clock, indicative). Mode: {'quick' if args.quick else 'full'}; D = 2, "
        f"classifier tanh MLP {args.hidden}; {args.draws} base draws per step; ours draws "
        "m = 2 branches per draw (leave-one-out baseline). Protocol: the docstring of "
        "`benchmarks/cwm_reverse_kl.py`.",
        "",
        "## Cost per step (loss + backward)",
        "",
        "| K | estimator | classifier points / draw | ms / step | speed-up | memory saved for "
        "backward (MiB) | memory ratio |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in cost_rows:
        k = r["K"]
        points = 1 + {"exact": k * k, "ours": 2 * k, "ours-stl": 3 * k}[r["estimator"]]
        lines.append(
            f"| {k} | {r['estimator']} | {points:,} | {1000 * r['seconds']:.1f} | "
            f"{exact_time[k] / r['seconds']:.1f}× | {r['bytes'] / 2**20:.1f} | "
            f"{exact_bytes[k] / r['bytes']:.1f}× |"
        )
    exact_var = {r["K"]: r for r in var_rows if r["estimator"] == "exact"}
    lines += [
        "",
        f"## Gradient variance at the initial state ({args.replicates} replicates)",
        "",
        "Total variance of the gradient (sum over parameters) of one step's loss; efficiency = "
        "variance × seconds per step (lower is better); ratios against exact (> 1: ours is "
        "better).",
        "",
        "| K | estimator | total variance | variance ratio | efficiency ratio |",
        "| ---: | --- | ---: | ---: | ---: |",
    ]
    for r in var_rows:
        ref = exact_var[r["K"]]
        lines.append(
            f"| {r['K']} | {r['estimator']} | {r['variance']:.4g} | "
            f"{ref['variance'] / r['variance']:.2f} | {ref['efficiency'] / r['efficiency']:.1f} |"
        )
    lines += [
        "",
        f"## Training at equal wall time (K = {args.train_k}, {args.train_seconds:g} s each)",
        "",
        "Reverse KL(q ‖ target) after training, nats ± s.e. (20,000 Rao-Blackwellized draws; "
        "the target is normalized, so 0 is perfect).",
        "",
        "| estimator | Adam steps | KL(q ‖ target) |",
        "| --- | ---: | ---: |",
    ]
    for e, r in training.items():
        lines.append(f"| {e} | {r['steps']:,} | {r['kl']:.4f} ± {r['kl_se']:.4f} |")
    lines.append("")
    return "\n".join(lines)


def figure(training: dict, path: Path) -> None:
    target = ring_target()
    fig, axes = plt.subplots(
        1, 1 + len(training), figsize=(3.2 * (1 + len(training)), 3), layout="constrained"
    )
    for e, r in training.items():
        t, loss = zip(*r["curve"], strict=True)
        window = max(1, len(loss) // 50)
        smooth = (
            torch.tensor(loss).unfold(0, window, 1).mean(-1)
            if len(loss) >= window
            else (torch.tensor(loss))
        )
        axes[0].plot(t[window - 1 :], smooth, label=f"{e} ({r['steps']} steps)")
    axes[0].set_xlabel("seconds")
    axes[0].set_ylabel("loss (KL − log Z), running mean")
    axes[0].legend(fontsize=7)
    points = target.sample((3000,))
    for ax, (e, r) in zip(axes[1:], training.items(), strict=True):
        ax.scatter(*points.T, s=1, color="0.75", label="target")
        ax.scatter(*r["samples"].T, s=1, color="C3", label="CWM")
        ax.set_title(f"{e}: KL {r['kl']:.3f}", fontsize=9)
        ax.set_aspect("equal")
        ax.set_xlim(-6, 6)
        ax.set_ylim(-6, 6)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke test (seconds)")
    parser.add_argument("--out", type=Path, default=None, help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.out is None:
        quick_out = Path(tempfile.gettempdir()) / "pyro_mixflow-cwm_reverse_kl"
        args.out = quick_out if args.quick else RESULTS
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    if args.quick:
        args.hidden, args.ks, args.draws, args.reps = [16, 16], [4, 9], 4, 2
        args.replicates, args.train_k, args.train_seconds = 5, 4, 1.0
    else:
        args.hidden, args.ks, args.draws, args.reps = [128, 128, 128], [16, 49, 100], 8, 5
        args.replicates, args.train_k, args.train_seconds = 100, 16, 60.0
    started = time.time()
    torch.manual_seed(args.seed)
    cost_rows = cost(args.ks, args.hidden, args.draws, args.reps)
    seconds = {(r["K"], r["estimator"]): r["seconds"] for r in cost_rows}
    var_ks = args.ks[:2]  # the exact estimator's replicates at K = 100 cost minutes
    var_rows = variance(var_ks, args.hidden, args.draws, args.replicates, seconds)
    training = train_equal_time(args.train_k, args.hidden, 64, args.train_seconds, args.seed)
    markdown = report(cost_rows, var_rows, training, args, started)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cwm_reverse_kl.md").write_text(markdown)
    figure(training, args.out / "cwm_reverse_kl.png")
    print(markdown)
    print(f"total {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
