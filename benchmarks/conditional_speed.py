r"""Conditional models: speed and memory, and ``nn.GMM`` against sbi's mixture density network.

**Against sbi.** The conditional ``log_prob`` of a mixture density network with K = 10
components in D = 5 dimensions given C = 5 context dimensions, at batch N = 4096:

* **ours**: ``pyro_mixflow.nn.GMM(5, num_components=10, context_dim=5, hidden_dims=(50, 50))``,
  diagonal covariances, ``model(context).log_prob(x)``;
* **sbi mdn**: ``sbi.neural_nets.posterior_nn(model="mdn", num_components=10,
  hidden_features=50)(x, context)``, sbi's ``MixtureDensityEstimator`` around its
  ``MultivariateGaussianMDN`` (two hidden layers of 50, full covariances through upper-triangular
  precision factors, ``x`` and context z-scored), ``estimator.log_prob(x, context)`` with sbi's
  shapes (``x`` of shape ``(N, D)``, context ``(N, C)``, result ``(N,)``).

Both are built from the same draws (our ``init_from_data``: EM start and context
standardization; sbi's builder: z-scoring from the batch) and the same widths. Operations:
``log_prob`` forward and backward of ``.sum()`` (gradients cleared before each call), and
forward only under ``torch.no_grad()``.

**Training steps.** One Adam step (``zero_grad``, forward, backward of the mean negative
log-likelihood, ``step``) at batch 512 for each of our conditional models with ``context_dim=5``
and their defaults otherwise (``nn.GMM``, ``nn.MixtureFlow``, ``nn.CWM``, ``nn.RAD``), at input
dimension 2 and 5, after ``init_from_data``; sbi's mdn with its defaults is a reference row.
The timed steps train the models (their state moves over the repetitions, as in training).

**Timing.** One torch thread, as ``fit`` trains (``pyro_mixflow.fitting.cpu_training``) and as
every benchmark here runs unless it says otherwise. Every case runs once to warm up, then the
cases repeat round-robin (the order rotates between repetitions) and each reports the median
and the interquartile range of its times; the ratios are of medians of the same run, and each
comparison also gives the interquartile range of the per-repetition ratios. Every time is
measured twice: with subnormal floats flushed to zero (``torch.set_flush_denormal(True)``, as
``fit`` trains) and with torch's default (kept), on separate model instances. The report gives
the share of CPU time other processes took while timing (``/proc/stat``).

**Peak memory.** As in ``speed_memory.py``: each case runs in a fresh process forked from a
fork server that has already imported torch, sbi and pyro_mixflow; the child builds the model,
runs the operation once at 64 rows (which also creates Adam's state), releases memory, reads
``VmRSS``, resets ``VmHWM`` (``/proc/self/clear_refs``), runs the operation once at full batch
and reports ``VmHWM - VmRSS`` in MiB (``ru_maxrss - VmRSS``, an upper bound, where the kernel
ignores ``clear_refs``). Subnormals are flushed in the children.

Usage::

    python benchmarks/conditional_speed.py            # full run, about 2 minutes on 2 cores
    python benchmarks/conditional_speed.py --quick    # smoke test: small batches, 2 repetitions
    python benchmarks/conditional_speed.py --out DIR  # write conditional_speed.{md,png} to DIR
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# This folder holds sbi.py (the NPE benchmark): it leaves the import path while the sbi package
# loads, or `import sbi` would find that script.
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
import sbi  # noqa: E402
from sbi.neural_nets import posterior_nn  # noqa: E402

sys.path.insert(0, str(HERE))
# speed_memory.py (this folder): /proc readers, the peak-RSS reset, malloc_trim, CPU share,
# the environment line.
from speed_memory import (  # noqa: E402
    busy_cpu_seconds,
    clear_refs_works,
    environment_line,
    malloc_trim,
    read_status_kib,
    reset_peak_rss,
)

from pyro_mixflow import nn as pmn  # noqa: E402

CONTEXT_DIM = 5
# The comparison: batch, components, dimension, hidden width.
CMP_N, CMP_K, CMP_D, CMP_HIDDEN = 4096, 10, 5, 50
STEP_BATCH = 512
STEP_DIMS = (2, 5)
SMALL_N = 64
LR = 1e-3
SEED = 0
TARGET_SPEEDUP = 3.0
CHILD_TIMEOUT_S = 300.0
MEMORY_REPEATS = 5  # fresh children per case; the tables give the median [min–max]

OURS_GMM, SBI_MDN = "ours_gmm", "sbi_mdn"
GMM, FLOW, CWM, RAD, SBI_REF = "GMM", "MixtureFlow", "CWM", "RAD", "sbi_ref"
STEP_MODELS = [GMM, FLOW, CWM, RAD, SBI_REF]
LABELS = {
    OURS_GMM: "`nn.GMM` (ours)",
    SBI_MDN: "sbi mdn",
    GMM: "`nn.GMM`",
    FLOW: "`nn.MixtureFlow`",
    CWM: "`nn.CWM`",
    RAD: "`nn.RAD`",
    SBI_REF: "sbi mdn (reference)",
}
FWD_BWD, FWD = "fwd_bwd", "fwd"
OP_TITLES = {FWD_BWD: "forward + backward", FWD: "forward (no_grad)"}
FLUSH, KEEP = True, False


@dataclass
class Case:
    """A model, and the call that is timed: ``run(x, context)``."""

    params: int
    run: Callable[[torch.Tensor, torch.Tensor], None]


# ---------------------------------------------------------------------------------------------
# Workloads
# ---------------------------------------------------------------------------------------------


def make_data(n: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` pairs ``(x, context)``: ``x = sin(context A) + 0.3 noise``, ``context`` normal."""
    gen = torch.Generator().manual_seed(seed)
    context = torch.randn(n, CONTEXT_DIM, generator=gen)
    a = torch.randn(CONTEXT_DIM, d, generator=gen)
    x = torch.sin(context @ a) + 0.3 * torch.randn(n, d, generator=gen)
    return x, context


def build_model(name: str, d: int, x: torch.Tensor, context: torch.Tensor) -> torch.nn.Module:
    torch.manual_seed(SEED)
    if name == OURS_GMM:
        model = pmn.GMM(
            d, num_components=CMP_K, context_dim=CONTEXT_DIM, hidden_dims=(CMP_HIDDEN,) * 2
        )
        return model.init_from_data(x, context)
    if name == SBI_MDN:
        build = posterior_nn(model="mdn", num_components=CMP_K, hidden_features=CMP_HIDDEN)
        return build(x, context)
    if name == SBI_REF:
        return posterior_nn(model="mdn")(x, context)
    cls = {GMM: pmn.GMM, FLOW: pmn.MixtureFlow, CWM: pmn.CWM, RAD: pmn.RAD}[name]
    return cls(d, context_dim=CONTEXT_DIM).init_from_data(x, context)


def log_prob_of(name: str, model: torch.nn.Module) -> Callable[..., torch.Tensor]:
    if name in (SBI_MDN, SBI_REF):
        return lambda x, context: model.log_prob(x, context)
    return lambda x, context: model(context).log_prob(x)


def num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def log_prob_case(name: str, op: str, x: torch.Tensor, context: torch.Tensor) -> Case:
    """``log_prob`` (forward + backward, or forward only) of a model built from ``x``."""
    model = build_model(name, x.shape[1], x, context)
    log_prob = log_prob_of(name, model)

    def run(x: torch.Tensor, context: torch.Tensor) -> None:
        if op == FWD:
            with torch.no_grad():
                log_prob(x, context)
            return
        model.zero_grad(set_to_none=True)
        log_prob(x, context).sum().backward()

    return Case(num_params(model), run)


def step_case(name: str, x: torch.Tensor, context: torch.Tensor) -> Case:
    """One Adam step on the mean negative log-likelihood, for a model built from ``x``."""
    model = build_model(name, x.shape[1], x, context)
    log_prob = log_prob_of(name, model)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)

    def run(x: torch.Tensor, context: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        (-log_prob(x, context).mean()).backward()
        optimizer.step()

    return Case(num_params(model), run)


# ---------------------------------------------------------------------------------------------
# Peak memory (one forked child per case)
# ---------------------------------------------------------------------------------------------


def measure_memory(spec: dict[str, Any]) -> float:
    """Runs in the child: peak RSS increase (MiB) of one call at full batch."""
    gc.freeze()  # objects inherited from the fork server: keep them out of gc.collect below
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    torch.distributions.Distribution.set_default_validate_args(False)
    x, context = make_data(spec["n"], spec["d"], SEED)
    # The model timed (built from the full batch), warmed up on SMALL_N rows.
    if spec["kind"] == "step":
        case = step_case(spec["model"], x, context)
    else:
        case = log_prob_case(spec["model"], spec["op"], x, context)
    case.run(x[:SMALL_N], context[:SMALL_N])
    gc.collect()
    malloc_trim()
    baseline_kib = read_status_kib()["VmRSS"]
    use_hwm = spec["use_clear_refs"] and reset_peak_rss()
    case.run(x, context)
    if use_hwm:
        peak_kib = read_status_kib()["VmHWM"]
    else:
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return max(0, peak_kib - baseline_kib) / 1024


def memory_child(conn: Any, spec: dict[str, Any]) -> None:
    try:
        result: float | str = measure_memory(spec)
    except BaseException as exc:  # report whatever happened to the parent
        result = f"{type(exc).__name__}: {exc}"[:200]
    conn.send(result)
    conn.close()


def run_memory_child(ctx: Any, spec: dict[str, Any]) -> float | str:
    receiver, sender = ctx.Pipe(duplex=False)
    process = ctx.Process(target=memory_child, args=(sender, spec))
    process.start()
    sender.close()
    result: float | str = f"timeout after {CHILD_TIMEOUT_S:.0f} s"
    try:
        if receiver.poll(CHILD_TIMEOUT_S):
            result = receiver.recv()
    except EOFError:
        result = "child died"
    process.join(10.0)
    if process.is_alive():
        process.kill()
        process.join()
    return result


# ---------------------------------------------------------------------------------------------
# Speed (round-robin in this process)
# ---------------------------------------------------------------------------------------------


@dataclass
class Timed:
    """A case with its inputs and whether subnormals are flushed while it runs."""

    case: Case
    x: torch.Tensor
    context: torch.Tensor
    flush: bool


def time_call(timed: Timed) -> float:
    torch.set_flush_denormal(timed.flush)
    start = time.perf_counter()
    timed.case.run(timed.x, timed.context)
    return time.perf_counter() - start


def round_robin(
    cases: dict[Any, Timed], budget_s: float, min_reps: int, max_reps: int
) -> dict[Any, list[float]]:
    """Warm-up call of each case, then repetitions in rotating order; seconds per case."""
    keys = list(cases)
    warm = sum(time_call(cases[k]) for k in keys)
    reps = max(min_reps, min(max_reps, int(budget_s / max(warm, 1e-9))))
    times: dict[Any, list[float]] = {k: [] for k in keys}
    for rep in range(reps):
        shift = rep % len(keys)
        for k in keys[shift:] + keys[:shift]:
            times[k].append(time_call(cases[k]))
    torch.set_flush_denormal(True)
    return times


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        v = values[0] if values else math.nan
        return v, v, v
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def fmt_ms(times: list[float]) -> str:
    q1, q2, q3 = (1e3 * v for v in quartiles(times))
    return f"{q2:.3g} [{q1:.3g}–{q3:.3g}]"


def fmt_ratio(num: list[float], den: list[float]) -> str:
    """Ratio of medians, with the interquartile range of the per-repetition ratios."""
    ratio = statistics.median(num) / statistics.median(den)
    q1, _, q3 = quartiles([a / b for a, b in zip(num, den, strict=True)])
    return f"{ratio:.2f} [{q1:.2f}–{q3:.2f}]"


def median_mib(values: list[float | str] | None) -> float:
    """Median peak MiB over the repeated children (NaN if any failed or none ran)."""
    if not values or any(isinstance(v, str) for v in values):
        return math.nan
    return statistics.median(values)


def fmt_mib(values: list[float | str] | None) -> str:
    if not values:
        return "—"
    if math.isnan(median_mib(values)):
        return "error"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{median_mib(values):.1f} [{min(values):.1f}–{max(values):.1f}]"


def comparison_table(
    cmp_times: dict[Any, list[float]],
    cmp_memory: dict[Any, list[float | str]],
    params: dict[str, int],
) -> str:
    rows = [
        "| operation | subnormals | ours (ms) | sbi mdn (ms) | speed-up sbi / ours | "
        "peak MiB ours | peak MiB sbi |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for op in (FWD_BWD, FWD):
        for flush in (FLUSH, KEEP):
            ours, peer = cmp_times[op, OURS_GMM, flush], cmp_times[op, SBI_MDN, flush]
            mem = [cmp_memory.get((op, m)) if flush else None for m in (OURS_GMM, SBI_MDN)]
            rows.append(
                f"| {OP_TITLES[op]} | {'flushed' if flush else 'kept'} | {fmt_ms(ours)} | "
                f"{fmt_ms(peer)} | {fmt_ratio(peer, ours)} | {fmt_mib(mem[0])} | "
                f"{fmt_mib(mem[1])} |"
            )
    header = [
        "| model | covariances | hidden layers | parameters |",
        "|---|---|---|---:|",
        f"| {LABELS[OURS_GMM]} | diagonal | {CMP_HIDDEN} × 2 (ReLU) | {params[OURS_GMM]:,} |",
        f"| {LABELS[SBI_MDN]} | full (precision factors) | {CMP_HIDDEN} × 2 (ReLU) | "
        f"{params[SBI_MDN]:,} |",
    ]
    return "\n".join(header) + "\n\n" + "\n".join(rows)


def step_table(
    step_times: dict[Any, list[float]],
    step_memory: dict[Any, list[float | str]],
    params: dict[Any, int],
    dims: tuple[int, ...],
) -> str:
    rows = [
        "| model | D | parameters | ms per step | steps/s | ms per step, subnormals kept | "
        "kept / flushed | peak MiB per step |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in STEP_MODELS:
        for d in dims:
            flushed, kept = step_times[name, d, FLUSH], step_times[name, d, KEEP]
            rows.append(
                f"| {LABELS[name]} | {d} | {params[name, d]:,} | {fmt_ms(flushed)} | "
                f"{1 / statistics.median(flushed):.0f} | {fmt_ms(kept)} | "
                f"{fmt_ratio(kept, flushed)} | {fmt_mib(step_memory.get((name, d)))} |"
            )
    return "\n".join(rows)


def save_figure(
    cmp_times: dict[Any, list[float]],
    step_times: dict[Any, list[float]],
    step_memory: dict[Any, list[float | str]],
    dims: tuple[int, ...],
    n_cmp: int,
    n_step: int,
    path: Path,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    ax = axes[0]
    groups = [(op, flush) for op in (FWD_BWD, FWD) for flush in (FLUSH, KEEP)]
    xs = np.arange(len(groups))
    for i, (name, color) in enumerate(((OURS_GMM, "tab:green"), (SBI_MDN, "tab:gray"))):
        meds = [1e3 * statistics.median(cmp_times[op, name, f]) for op, f in groups]
        bars = ax.bar(
            xs + (i - 0.5) * 0.38, meds, 0.38, label=LABELS[name].replace("`", ""), color=color
        )
        if name == SBI_MDN:
            for bar, (op, f) in zip(bars, groups, strict=True):
                ratio = statistics.median(cmp_times[op, name, f]) / statistics.median(
                    cmp_times[op, OURS_GMM, f]
                )
                ax.annotate(
                    f"{ratio:.1f}×",
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center",
                    va="bottom",
                    fontsize=8,
                )
    short = {FWD_BWD: "fwd + bwd", FWD: "fwd"}
    labels = [f"{short[op]}\n{'flushed' if f else 'kept'}" for op, f in groups]
    ax.set_xticks(xs, labels, fontsize=7)
    ax.set_ylabel("ms (median)")
    ax.set_title(
        f"log_prob, N = {n_cmp}, K = {CMP_K}, D = {CMP_D}, C = {CONTEXT_DIM}\n"
        "(labels: sbi time / ours; subnormals flushed or kept)",
        fontsize=9,
    )
    ax.legend(fontsize=8)

    xs = np.arange(len(STEP_MODELS))
    width = 0.8 / (2 * len(dims))
    colors = ["tab:blue", "tab:red", "tab:olive", "tab:cyan"]
    for j, d in enumerate(dims):
        for k, flush in enumerate((FLUSH, KEEP)):
            i = 2 * j + k
            meds = [1e3 * statistics.median(step_times[m, d, flush]) for m in STEP_MODELS]
            pos = xs + (i - (2 * len(dims) - 1) / 2) * width
            label = f"D = {d}, subnormals {'flushed' if flush else 'kept'}"
            style = {} if flush else {"alpha": 0.45, "hatch": "//"}
            axes[1].bar(pos, meds, width, label=label, color=colors[j % 4], **style)
        mems = [median_mib(step_memory.get((m, d))) for m in STEP_MODELS]
        heights = [0.0 if math.isnan(v) else v for v in mems]
        pos = xs + (j - (len(dims) - 1) / 2) * (0.8 / len(dims))
        axes[2].bar(pos, heights, 0.8 / len(dims), label=f"D = {d}", color=colors[j % 4])
    names = [LABELS[m].replace("`", "").replace("nn.", "") for m in STEP_MODELS]
    for ax, ylabel, title in (
        (axes[1], "ms per step (median)", f"Adam step, batch {n_step}, C = {CONTEXT_DIM}"),
        (axes[2], "peak MiB of one step", f"peak resident growth, batch {n_step}"),
    ):
        ax.set_xticks(xs, names, fontsize=8, rotation=15)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: small batches, 2 reps")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent / "results",
        help="output directory for conditional_speed.md and conditional_speed.png",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    torch.distributions.Distribution.set_default_validate_args(False)
    n_cmp, n_step = (256, 128) if args.quick else (CMP_N, STEP_BATCH)
    dims = STEP_DIMS
    budget_s, min_reps, max_reps = (0.05, 2, 2) if args.quick else (25.0, 10, 80)
    memory_repeats = 1 if args.quick else MEMORY_REPEATS

    # Peak memory, one fresh process per case.
    use_clear_refs = clear_refs_works()
    ctx = mp.get_context("forkserver")
    # sklearn: the EM start of init_from_data; torch._dynamo: imported by the first optimizer.
    preload = ["torch", "torch._dynamo", "sbi.neural_nets", "sklearn.mixture", "pyro_mixflow"]
    preload.append("__main__")
    ctx.set_forkserver_preload(preload)
    cmp_specs = {
        (op, m): {"kind": "log_prob", "model": m, "op": op, "n": n_cmp, "d": CMP_D}
        for op in (FWD_BWD, FWD)
        for m in (OURS_GMM, SBI_MDN)
    }
    step_specs = {
        (m, d): {"kind": "step", "model": m, "n": n_step, "d": d} for m in STEP_MODELS for d in dims
    }
    cmp_memory: dict[Any, list[float | str]] = {}
    step_memory: dict[Any, list[float | str]] = {}
    for _ in range(memory_repeats):
        for specs, out in ((cmp_specs, cmp_memory), (step_specs, step_memory)):
            for key, spec in specs.items():
                value = run_memory_child(ctx, {**spec, "use_clear_refs": use_clear_refs})
                out.setdefault(key, []).append(value)
                print(
                    f"memory {key}: {fmt_mib([value])} MiB ({time.perf_counter() - start:.1f} s)",
                    file=sys.stderr,
                )
    memory_s = time.perf_counter() - start

    # Speed: the comparison, then the training steps.
    busy_start = busy_cpu_seconds()
    x, context = make_data(n_cmp, CMP_D, SEED)
    cmp_cases = {
        (op, m, flush): Timed(log_prob_case(m, op, x, context), x, context, flush)
        for op in (FWD_BWD, FWD)
        for m in (OURS_GMM, SBI_MDN)
        for flush in (FLUSH, KEEP)
    }
    cmp_params = {m: cmp_cases[FWD_BWD, m, FLUSH].case.params for m in (OURS_GMM, SBI_MDN)}
    cmp_times = round_robin(cmp_cases, 2 * budget_s, min_reps, max_reps)
    print(f"comparison timed ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    step_cases: dict[Any, Timed] = {}
    for d in dims:
        x, context = make_data(n_step, d, SEED)
        for m in STEP_MODELS:
            for flush in (FLUSH, KEEP):
                step_cases[m, d, flush] = Timed(step_case(m, x, context), x, context, flush)
    step_params = {(m, d): step_cases[m, d, FLUSH].case.params for m in STEP_MODELS for d in dims}
    step_times = round_robin(step_cases, 3 * budget_s, min_reps, max_reps)
    speed_s = time.perf_counter() - start - memory_s
    busy_end = busy_cpu_seconds()
    foreign_share = max(0.0, (busy_end[0] - busy_start[0]) - (busy_end[1] - busy_start[1])) / (
        max(speed_s, 1e-9) * (os.cpu_count() or 1)
    )
    free_share = 1 - 1 / (os.cpu_count() or 1)
    reps_cmp = len(next(iter(cmp_times.values())))
    reps_step = len(next(iter(step_times.values())))

    args.out.mkdir(parents=True, exist_ok=True)
    png = args.out / "conditional_speed.png"
    save_figure(cmp_times, step_times, step_memory, dims, n_cmp, n_step, png)
    elapsed = time.perf_counter() - start

    fwd_bwd = [
        statistics.median(cmp_times[FWD_BWD, SBI_MDN, f])
        / statistics.median(cmp_times[FWD_BWD, OURS_GMM, f])
        for f in (FLUSH, KEEP)
    ]
    met = all(r >= TARGET_SPEEDUP for r in fwd_bwd)
    verdict = (
        f"**Target (issue 18): `nn.GMM` forward + backward at least {TARGET_SPEEDUP:g}× faster "
        f"than sbi's mdn — {'met' if met else 'not met'}**: {fwd_bwd[0]:.2f}× with subnormals "
        f"flushed, {fwd_bwd[1]:.2f}× with torch's default."
    )
    if args.quick:
        verdict = "(--quick: batches too small for the target; no verdict.)"
    lines = [
        "# Conditional models: speed and memory; `nn.GMM` vs sbi's mixture density network",
        "",
        environment_line(f"sbi {sbi.__version__}") + ".",
        f"Mode: {'--quick (small batches, smoke test only)' if args.quick else 'full'}; "
        f"total runtime {elapsed:.0f} s (memory children {memory_s:.0f} s, speed "
        f"{speed_s:.0f} s); {reps_cmp} and {reps_step} interleaved repetitions; other processes "
        f"used {100 * foreign_share:.0f}% of the CPUs during timing"
        # One torch thread leaves the other cores to other processes; beyond them it competes.
        + (" (**timings disturbed**)" if foreign_share > free_share + 0.05 else "")
        + "; peak-memory method: "
        + ("VmHWM after clear_refs" if use_clear_refs else "ru_maxrss (clear_refs unavailable)")
        + ".",
        "",
        "Times: median ms [interquartile range] over round-robin repetitions, one torch thread. "
        "Ratios: of medians [interquartile range of the per-repetition ratios]. Subnormals "
        "flushed: `torch.set_flush_denormal(True)`, as `fit` trains; kept: torch's default. "
        "Peak MiB: resident growth of one call in a fresh process (subnormals flushed), "
        f"median [min–max] over {memory_repeats} processes.",
        "",
        f"## `log_prob` of a ({n_cmp}, {CMP_D}) batch given ({n_cmp}, {CONTEXT_DIM}) contexts, "
        f"K = {CMP_K}",
        "",
        comparison_table(cmp_times, cmp_memory, cmp_params),
        "",
        verdict,
        "",
        f"## One Adam step at batch {n_step}, context dimension {CONTEXT_DIM}",
        "",
        "Our models with their defaults (50 components; `GMM`: hidden 64 × 64; `MixtureFlow`: "
        "4 spline transforms, 64 × 64; `CWM`: 64 × 64 tanh; `RAD`: 4 layers, residual 48 × 48), "
        "after `init_from_data`; sbi's mdn with its defaults (10 components, hidden 50, full "
        "covariances) for reference.",
        "",
        step_table(step_times, step_memory, step_params, dims),
    ]
    errors = [
        f"- {key}: {value}"
        for key, values in [*cmp_memory.items(), *step_memory.items()]
        for value in values
        if isinstance(value, str)
    ]
    if errors:
        lines += ["", "Memory-child errors:", "", *errors]
    markdown = "\n".join(lines) + "\n"
    (args.out / "conditional_speed.md").write_text(markdown)
    print(markdown)
    print(f"wrote {args.out / 'conditional_speed.md'} and {png}")


if __name__ == "__main__":
    main()
