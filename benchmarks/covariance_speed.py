r"""Speed and peak memory of the full- and low-rank-covariance mixtures against torch's.

Compared implementations of a mixture of :math:`K` Gaussians in :math:`D` dimensions:

* **full**: :class:`pyro_mixflow.MultivariateNormalMixture(locs, scale_tril, logits)` against
  ``torch.distributions.MixtureSameFamily(Categorical(logits), MultivariateNormal(locs,
  scale_tril=scale_tril))``;
* **low rank**: :class:`pyro_mixflow.LowRankMultivariateNormalMixture(locs, cov_factor,
  cov_diag, logits)` of rank :math:`r = \min(4, D)` against ``MixtureSameFamily(Categorical(
  logits), LowRankMultivariateNormal(locs, cov_factor, cov_diag))``;
* references for ``rsample`` (torch's ``MixtureSameFamily`` has none): our diagonal mixture's
  exact sampler :class:`pyro_mixflow.DiagNormalMixture` and the Gumbel-softmax sampler
  :class:`pyro_mixflow.GumbelSoftmaxMixture` (temperature 0.5), at the same shape.

Operations, each a function that builds the distribution object itself (users rebuild it at
every step) and runs on ``N`` points:

1. ``log_prob + backward``: forward and backward of ``log_prob(x).sum()``;
2. ``rsample + backward``: ``z = rsample((N,))`` and backward of ``z.sin().sum()``.

Parameters are float32 leaf tensors with ``requires_grad=True``: ``locs = 3 * randn(K, D)``,
``logits = randn(K)``; full: ``scale_tril = diag(0.5 + rand(K, D)) + 0.5 / sqrt(D) *
tril(randn(K, D, D), -1)``; low rank: ``cov_factor = randn(K, D, r) / sqrt(r)``, ``cov_diag =
0.25 + rand(K, D)``; diagonal references: ``scales = 0.5 + rand(K, D)``. The data ``x`` are exact
draws from our full-covariance mixture (from the low-rank one for the low-rank methods).
Argument validation of ``torch.distributions`` is switched off, so the comparison is of the
computations alone. Before timing, the script checks at every shape that our ``log_prob``
equals torch's (largest absolute difference in the table).

**Speed.** One process, one torch thread (as every benchmark here unless it says otherwise).
Every (shape, operation) runs each method once to warm up, then repeats round-robin over the
methods (the order rotates from one repetition to the next) and takes the median wall time of
each method; the number of repetitions follows the warm-up times (a budget of seconds per shape
and operation, at least 5 and at most 40). Time ratio = peer time / our time (above 1: ours is
faster); for ``rsample`` the ratios are our time over the reference's (above 1: ours is slower).
The report gives the share of CPU time other processes took during the timing (``/proc/stat``).

**Peak memory.** The fork-server child method of ``speed_memory.py`` (its helpers are imported
from there): each (method, shape, operation) runs in a fresh process forked from a fork server
that has already imported torch and pyro_mixflow; the child builds its inputs, runs the
operation once at 64 points, releases memory, reads ``VmRSS``, resets ``VmHWM``
(``/proc/self/clear_refs``), runs the operation once at full size and reports ``VmHWM - VmRSS``
in MiB (``ru_maxrss - VmRSS``, an upper bound, where the kernel ignores ``clear_refs``). Each
case runs in three children; the table gives the median. The children also check that all
gradients are finite.

Usage::

    python benchmarks/covariance_speed.py             # full run, a few minutes on 2 cores
    python benchmarks/covariance_speed.py --quick     # smoke test: N // 64, 2 repetitions
    python benchmarks/covariance_speed.py --out DIR   # write covariance_speed.{md,png} to DIR
"""

from __future__ import annotations

import argparse
import gc
import math
import multiprocessing as mp
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

# speed_memory.py (this folder): /proc readers, the peak-RSS reset, malloc_trim, CPU share,
# the environment line, the memory record and its formatting.
from speed_memory import (
    MemoryResult,
    busy_cpu_seconds,
    clear_refs_works,
    environment_line,
    is_allocation_failure,
    malloc_trim,
    read_status_kib,
    reset_peak_rss,
    run_memory_child,
    shape_label,
)
from torch.distributions import (
    Categorical,
    LowRankMultivariateNormal,
    MixtureSameFamily,
    MultivariateNormal,
)

from pyro_mixflow import (
    DiagNormalMixture,
    GumbelSoftmaxMixture,
    LowRankMultivariateNormalMixture,
    MultivariateNormalMixture,
)

Shape = tuple[int, int, int]  # (N, K, D)
Params = dict[str, torch.Tensor]

SHAPES: list[Shape] = [(65536, 8, 2), (8192, 32, 16), (2048, 16, 64)]
TARGET_SHAPE: Shape = (8192, 32, 16)
TARGET_RATIO = 3.0
MAX_RANK = 4
QUICK_DIVISOR = 64
TEMPERATURE = 0.5
MEMORY_CAP_BYTES = 6 * 2**30
MEMORY_REPEATS = 3
SMALL_N = 64
SEED = 0

FULL, FULL_TORCH = "full", "full_torch"
LOWRANK, LOWRANK_TORCH = "lowrank", "lowrank_torch"
DIAG, GUMBEL = "diag", "gumbel"
LOG_PROB, RSAMPLE = "log_prob", "rsample"
OP_TITLES = {
    LOG_PROB: "log_prob forward + backward of .sum()",
    RSAMPLE: "rsample + backward of z.sin().sum()",
}
LABELS = {
    FULL: "`MultivariateNormalMixture`",
    FULL_TORCH: "torch MSF(`MultivariateNormal`)",
    LOWRANK: "`LowRankMultivariateNormalMixture`",
    LOWRANK_TORCH: "torch MSF(`LowRankMultivariateNormal`)",
    DIAG: "`DiagNormalMixture` (exact)",
    GUMBEL: "`GumbelSoftmaxMixture` τ=0.5",
}
SHORT = {
    FULL: "full (ours)",
    FULL_TORCH: "full (torch)",
    LOWRANK: "low rank (ours)",
    LOWRANK_TORCH: "low rank (torch)",
    DIAG: "diagonal exact",
    GUMBEL: "Gumbel-softmax",
}
OP_METHODS = {
    LOG_PROB: [FULL, FULL_TORCH, LOWRANK, LOWRANK_TORCH],
    RSAMPLE: [FULL, LOWRANK, DIAG, GUMBEL],
}
# (numerator, denominator) of the time and memory ratios of each table.
OP_RATIOS = {
    LOG_PROB: [(FULL_TORCH, FULL), (LOWRANK_TORCH, LOWRANK)],
    RSAMPLE: [(FULL, GUMBEL), (LOWRANK, GUMBEL), (FULL, DIAG)],
}
# Parameters each method differentiates (the others are left alone).
METHOD_PARAMS = {
    FULL: ("locs", "scale_tril", "logits"),
    FULL_TORCH: ("locs", "scale_tril", "logits"),
    LOWRANK: ("locs", "cov_factor", "cov_diag", "logits"),
    LOWRANK_TORCH: ("locs", "cov_factor", "cov_diag", "logits"),
    DIAG: ("locs", "scales", "logits"),
    GUMBEL: ("locs", "scales", "logits"),
}


# ---------------------------------------------------------------------------------------------
# Workloads
# ---------------------------------------------------------------------------------------------


def rank_of(dim: int) -> int:
    return min(MAX_RANK, dim)


def make_inputs(shape: Shape, seed: int) -> tuple[Params, dict[str, torch.Tensor]]:
    """Leaf parameters of every family, and data: draws of the full and low-rank mixtures."""
    n, k, d = shape
    r = rank_of(d)
    gen = torch.Generator().manual_seed(seed)
    off_diagonal = torch.randn(k, d, d, generator=gen).tril(-1) * (0.5 / math.sqrt(d))
    params = {
        "locs": 3 * torch.randn(k, d, generator=gen),
        "logits": torch.randn(k, generator=gen),
        "scale_tril": torch.diag_embed(0.5 + torch.rand(k, d, generator=gen)) + off_diagonal,
        "cov_factor": torch.randn(k, d, r, generator=gen) / math.sqrt(r),
        "cov_diag": 0.25 + torch.rand(k, d, generator=gen),
        "scales": 0.5 + torch.rand(k, d, generator=gen),
    }
    params = {name: p.requires_grad_() for name, p in params.items()}
    torch.manual_seed(seed)
    with torch.no_grad():
        data = {
            FULL: build_distribution(FULL, params).sample((n,)),
            LOWRANK: build_distribution(LOWRANK, params).sample((n,)),
        }
    return params, data


def build_distribution(method: str, p: Params) -> torch.distributions.Distribution:
    if method == FULL:
        return MultivariateNormalMixture(p["locs"], p["scale_tril"], p["logits"])
    if method == FULL_TORCH:
        component = MultivariateNormal(p["locs"], scale_tril=p["scale_tril"])
        return MixtureSameFamily(Categorical(logits=p["logits"]), component)
    if method == LOWRANK:
        return LowRankMultivariateNormalMixture(
            p["locs"], p["cov_factor"], p["cov_diag"], p["logits"]
        )
    if method == LOWRANK_TORCH:
        component = LowRankMultivariateNormal(p["locs"], p["cov_factor"], p["cov_diag"])
        return MixtureSameFamily(Categorical(logits=p["logits"]), component)
    if method == DIAG:
        return DiagNormalMixture(p["locs"], p["scales"], p["logits"])
    if method == GUMBEL:
        return GumbelSoftmaxMixture(p["locs"], p["scales"], p["logits"], temperature=TEMPERATURE)
    raise ValueError(f"unknown method {method!r}")


def data_for(method: str, data: dict[str, torch.Tensor]) -> torch.Tensor:
    return data[LOWRANK] if method in (LOWRANK, LOWRANK_TORCH) else data[FULL]


def make_step(
    method: str, op: str, params: Params, data: dict[str, torch.Tensor], n: int
) -> Callable[[], None]:
    """Returns the timed function: build the distribution, run ``op`` on ``n`` points."""
    used = [params[name] for name in METHOD_PARAMS[method]]
    x = data_for(method, data)[:n]

    def clear_grads() -> None:
        for p in used:
            p.grad = None

    if op == LOG_PROB:

        def step() -> None:
            clear_grads()
            build_distribution(method, params).log_prob(x).sum().backward()

    elif op == RSAMPLE:

        def step() -> None:
            clear_grads()
            z = build_distribution(method, params).rsample((n,))
            z.sin().sum().backward()

    else:
        raise ValueError(f"unknown op {op!r}")
    return step


def grads_finite(method: str, params: Params) -> bool:
    return all(
        params[name].grad is not None and bool(torch.isfinite(params[name].grad).all())
        for name in METHOD_PARAMS[method]
    )


def log_prob_difference(ours: str, peer: str, params: Params, x: torch.Tensor) -> float:
    """Largest absolute difference between two methods' ``log_prob`` at ``x``."""
    with torch.no_grad():
        a = build_distribution(ours, params).log_prob(x)
        b = build_distribution(peer, params).log_prob(x)
    return float((a - b).abs().max())


# ---------------------------------------------------------------------------------------------
# Peak memory (one forked child per measurement; the method of speed_memory.py)
# ---------------------------------------------------------------------------------------------


def measure_memory(spec: dict[str, Any]) -> MemoryResult:
    """Runs in the child: peak RSS increase of one call of ``spec['op']``."""
    gc.freeze()  # objects inherited from the fork server: keep them out of gc.collect below
    torch.set_num_threads(1)
    torch.distributions.Distribution.set_default_validate_args(False)
    method, op, shape = spec["method"], spec["op"], tuple(spec["shape"])
    params, data = make_inputs(shape, spec["seed"])
    small = make_step(method, op, params, data, SMALL_N)
    small()
    step = make_step(method, op, params, data, shape[0])
    for p in params.values():
        p.grad = None
    del small
    gc.collect()
    malloc_trim()
    status = read_status_kib()
    baseline_kib = status["VmRSS"]
    limit = status["VmSize"] * 1024 + spec["cap_bytes"]
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    use_hwm = spec["use_clear_refs"] and reset_peak_rss()
    try:
        step()
    except (MemoryError, RuntimeError) as exc:
        if not is_allocation_failure(exc):
            raise
        resource.setrlimit(resource.RLIMIT_AS, (hard, hard))
        return MemoryResult("oom", baseline_mib=baseline_kib / 1024, detail=str(exc)[:200])
    if use_hwm:
        peak_kib = read_status_kib()["VmHWM"]
    else:
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    resource.setrlimit(resource.RLIMIT_AS, (hard, hard))
    return MemoryResult(
        "ok",
        peak_mib=max(0, peak_kib - baseline_kib) / 1024,
        baseline_mib=baseline_kib / 1024,
        grads_finite=grads_finite(method, params),
    )


def median_peak(results: list[MemoryResult] | None) -> float:
    """Median peak MiB over the children of one case (NaN if any failed or none ran)."""
    if not results or any(r.status != "ok" for r in results):
        return math.nan
    return statistics.median(r.peak_mib for r in results)


# ---------------------------------------------------------------------------------------------
# Speed (round-robin in this process)
# ---------------------------------------------------------------------------------------------


def time_call(step: Callable[[], None]) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def round_robin(
    steps: dict[str, Callable[[], None]], budget_s: float, min_reps: int, max_reps: int
) -> dict[str, list[float]]:
    """Warm-up call of each method, then repetitions in rotating order; seconds per method."""
    methods = list(steps)
    warm = sum(time_call(steps[m]) for m in methods)
    reps = max(min_reps, min(max_reps, int(budget_s / max(warm, 1e-9))))
    times: dict[str, list[float]] = {m: [] for m in methods}
    for rep in range(reps):
        shift = rep % len(methods)
        for m in methods[shift:] + methods[:shift]:
            times[m].append(time_call(steps[m]))
    return times


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def median_or_nan(values: list[float] | None) -> float:
    return statistics.median(values) if values else math.nan


def fmt_ms(times: list[float] | None) -> str:
    return f"{1e3 * statistics.median(times):.3g}" if times else "—"


def fmt_ratio(value: float) -> str:
    return f"{value:.2f}" if math.isfinite(value) else "—"


def fmt_mib(results: list[MemoryResult] | None) -> str:
    if not results:
        return "—"
    statuses = {r.status for r in results}
    if statuses != {"ok"}:
        return "OOM (>6 GiB)" if "oom" in statuses else "error"
    return f"{median_peak(results):.1f}"


def markdown_table(
    op: str,
    shapes: list[Shape],
    times: dict[tuple[Shape, str, str], list[float]],
    memory: dict[tuple[Shape, str, str], list[MemoryResult]],
    differences: dict[tuple[Shape, str], float],
) -> str:
    methods, ratios = OP_METHODS[op], OP_RATIOS[op]
    header = ["(N, K, D)", "r"]
    header += [f"{SHORT[m]} (ms)" for m in methods]
    header += [f"time {SHORT[a]} / {SHORT[b]}" for a, b in ratios]
    header += [f"peak MiB {SHORT[m]}" for m in methods]
    header += [f"memory {SHORT[a]} / {SHORT[b]}" for a, b in ratios]
    if op == LOG_PROB:
        header += ["max abs Δ log_prob full / low rank"]
    rows = [header, ["---"] + ["---:"] * (len(header) - 1)]
    for shape in shapes:
        t = {m: times.get((shape, op, m)) for m in methods}
        row = [shape_label(shape), str(rank_of(shape[2]))]
        row += [fmt_ms(t[m]) for m in methods]
        row += [fmt_ratio(median_or_nan(t[a]) / median_or_nan(t[b])) for a, b in ratios]
        row += [fmt_mib(memory.get((shape, op, m))) for m in methods]
        row += [
            fmt_ratio(
                median_peak(memory.get((shape, op, a))) / median_peak(memory.get((shape, op, b)))
            )
            for a, b in ratios
        ]
        if op == LOG_PROB:
            row.append(" / ".join(f"{differences[shape, m]:.1e}" for m in (FULL, LOWRANK)))
        rows.append(row)
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)


COLORS = {
    FULL: "tab:blue",
    FULL_TORCH: "lightsteelblue",
    LOWRANK: "tab:orange",
    LOWRANK_TORCH: "navajowhite",
    DIAG: "tab:green",
    GUMBEL: "tab:gray",
}


def save_figure(
    shapes: list[Shape],
    times: dict[tuple[Shape, str, str], list[float]],
    memory: dict[tuple[Shape, str, str], list[MemoryResult]],
    path: Path,
) -> None:
    """Median time and peak memory of every method, grouped by shape (log scales)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import FuncFormatter

    fig, axes = plt.subplots(2, len(OP_METHODS), figsize=(11, 7), squeeze=False)
    xs = np.arange(len(shapes))
    for col, (op, methods) in enumerate(OP_METHODS.items()):
        width = 0.8 / len(methods)
        for row, quantity in enumerate(("time (ms)", "peak memory (MiB)")):
            ax = axes[row, col]
            for i, m in enumerate(methods):
                if row == 0:
                    values = [1e3 * median_or_nan(times.get((s, op, m))) for s in shapes]
                else:
                    values = [median_peak(memory.get((s, op, m))) for s in shapes]
                pos = xs + (i - (len(methods) - 1) / 2) * width
                ax.bar(pos, values, width, label=SHORT[m], color=COLORS[m], edgecolor="0.3")
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
            ax.set_xticks(xs, [shape_label(s) for s in shapes], fontsize=8)
            ax.set_title(f"{OP_TITLES[op]}: {quantity.split(' (')[0]}", fontsize=9)
            ax.set_ylabel(quantity, fontsize=8)
            ax.grid(True, axis="y", which="major", alpha=0.3)
            ax.legend(fontsize=7)
        axes[1, col].set_xlabel("(N, K, D)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: N // 64, 2 reps")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent / "results",
        help="output directory for covariance_speed.md and covariance_speed.png",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    torch.set_num_threads(1)
    torch.distributions.Distribution.set_default_validate_args(False)
    shapes = [(n // QUICK_DIVISOR, k, d) for n, k, d in SHAPES] if args.quick else SHAPES
    budget_s, min_reps, max_reps = (0.05, 2, 2) if args.quick else (10.0, 5, 40)
    repeats = 1 if args.quick else MEMORY_REPEATS

    use_clear_refs = clear_refs_works()
    ctx = mp.get_context("forkserver")
    # The first torch.broadcast_shapes call imports torch._refs and sympy (about 0.3 s).
    preload = ["torch", "torch.fx.experimental.symbolic_shapes", "pyro_mixflow", "__main__"]
    ctx.set_forkserver_preload(preload)
    memory: dict[tuple[Shape, str, str], list[MemoryResult]] = {}
    for _ in range(repeats):
        for shape in shapes:
            for op, methods in OP_METHODS.items():
                for method in methods:
                    spec = {
                        "method": method,
                        "op": op,
                        "shape": shape,
                        "seed": SEED,
                        "cap_bytes": MEMORY_CAP_BYTES,
                        "use_clear_refs": use_clear_refs,
                    }
                    result = run_memory_child(ctx, spec, measure_memory)
                    memory.setdefault((shape, op, method), []).append(result)
                    print(
                        f"memory {shape_label(shape)} {op} {method}: {fmt_mib([result])} MiB "
                        f"({time.perf_counter() - start:.0f} s)",
                        file=sys.stderr,
                    )
    memory_s = time.perf_counter() - start

    busy_start = busy_cpu_seconds()
    times: dict[tuple[Shape, str, str], list[float]] = {}
    differences: dict[tuple[Shape, str], float] = {}
    for shape in shapes:
        gc.collect()
        params, data = make_inputs(shape, SEED)
        for ours, peer in ((FULL, FULL_TORCH), (LOWRANK, LOWRANK_TORCH)):
            differences[shape, ours] = log_prob_difference(ours, peer, params, data_for(ours, data))
        for op, methods in OP_METHODS.items():
            # Methods that ran out of memory or failed in a child are not timed.
            ok = [m for m in methods if math.isfinite(median_peak(memory.get((shape, op, m))))]
            steps = {m: make_step(m, op, params, data, shape[0]) for m in ok}
            for m, ts in round_robin(steps, budget_s, min_reps, max_reps).items():
                times[shape, op, m] = ts
            print(
                f"timed {shape_label(shape)} {op} ({time.perf_counter() - start:.0f} s)",
                file=sys.stderr,
            )
        del params, data
    speed_s = time.perf_counter() - start - memory_s
    busy_end = busy_cpu_seconds()
    foreign_share = max(0.0, (busy_end[0] - busy_start[0]) - (busy_end[1] - busy_start[1])) / (
        max(speed_s, 1e-9) * (os.cpu_count() or 1)
    )
    free_share = 1 - 1 / (os.cpu_count() or 1)
    load = os.getloadavg()

    args.out.mkdir(parents=True, exist_ok=True)
    png = args.out / "covariance_speed.png"
    save_figure(shapes, times, memory, png)
    elapsed = time.perf_counter() - start

    speedup = median_or_nan(times.get((TARGET_SHAPE, LOG_PROB, FULL_TORCH))) / median_or_nan(
        times.get((TARGET_SHAPE, LOG_PROB, FULL))
    )
    leaner = median_peak(memory.get((TARGET_SHAPE, LOG_PROB, FULL_TORCH))) / median_peak(
        memory.get((TARGET_SHAPE, LOG_PROB, FULL))
    )
    met = speedup >= TARGET_RATIO and leaner >= TARGET_RATIO
    verdict = (
        f"**Target (issue 19): full-covariance `log_prob` forward + backward at least "
        f"{TARGET_RATIO:g}× faster than torch's `MixtureSameFamily(MultivariateNormal)` with at "
        f"least {TARGET_RATIO:g}× less peak memory at {shape_label(TARGET_SHAPE)} — "
        f"{'met' if met else 'not met'}**: {speedup:.2f}× the speed, {leaner:.2f}× less memory."
    )
    if args.quick:
        verdict = "(--quick: sizes too small for the target; no verdict.)"
    reps = [len(v) for v in times.values()]
    not_finite = [
        f"- {shape_label(s)} {op} {SHORT[m]}"
        for (s, op, m), results in memory.items()
        if any(r.grads_finite is False for r in results)
    ]
    failures = [
        f"- {shape_label(s)} {op} {SHORT[m]}: {r.status} — {r.detail}"
        for (s, op, m), results in memory.items()
        for r in results
        if r.status in ("oom", "error")
    ]
    lines = [
        "# Full- and low-rank-covariance mixtures: speed and peak memory against torch",
        "",
        environment_line() + ".",
        f"Mode: {'--quick (N // 64, smoke test only)' if args.quick else 'full'}; "
        f"total runtime {elapsed:.0f} s (memory children {memory_s:.0f} s, speed {speed_s:.0f} s); "
        f"{min(reps, default=0)} to {max(reps, default=0)} interleaved repetitions per (shape, "
        f"operation); other processes used {100 * foreign_share:.0f}% of the CPUs during timing "
        f"(load average at the end {load[0]:.1f})"
        + (" (**timings disturbed**)" if foreign_share > free_share + 0.05 else "")
        + "; peak-memory method: "
        + ("VmHWM after clear_refs" if use_clear_refs else "ru_maxrss (clear_refs unavailable)")
        + f", median of {repeats} child processes per case.",
        "",
        f"Full: {LABELS[FULL]} vs {LABELS[FULL_TORCH]}; low rank (rank r = min({MAX_RANK}, D)): "
        f"{LABELS[LOWRANK]} vs {LABELS[LOWRANK_TORCH]}; `rsample` references (torch's "
        f"`MixtureSameFamily` has no `rsample`): {LABELS[DIAG]} and {LABELS[GUMBEL]} with "
        "diagonal components at the same shape. Times: median ms over round-robin repetitions, "
        "one torch thread. Peak MiB: resident growth of one call in a fresh process. "
        "`log_prob` ratios: torch / ours (>1: ours faster or leaner); `rsample` ratios: ours / "
        "reference (>1: ours slower or heavier).",
        "",
        f"## {OP_TITLES[LOG_PROB]}",
        "",
        markdown_table(LOG_PROB, shapes, times, memory, differences),
        "",
        verdict,
        "",
        f"## {OP_TITLES[RSAMPLE]}",
        "",
        markdown_table(RSAMPLE, shapes, times, memory, differences),
        "",
        "All gradients finite in every memory child."
        if not not_finite
        else "Non-finite gradients:\n\n" + "\n".join(not_finite),
    ]
    if failures:
        lines += ["", "Memory-child failures:", "", *failures]
    markdown = "\n".join(lines) + "\n"
    (args.out / "covariance_speed.md").write_text(markdown)
    print(markdown)
    print(f"wrote {args.out / 'covariance_speed.md'} and {png}")


if __name__ == "__main__":
    main()
