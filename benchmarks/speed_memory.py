r"""Speed and peak memory of ``DiagNormalMixture`` / ``GumbelSoftmaxMixture`` against peers.

Compared implementations of a mixture of :math:`K` diagonal Gaussians in :math:`D` dimensions:

* **ours**: :class:`pyro_mixflow.DiagNormalMixture` (exact ``rsample``) and
  :class:`pyro_mixflow.GumbelSoftmaxMixture` (relaxed ``rsample``, temperature 0.5);
* **MixtureSameFamily**: ``torch.distributions.MixtureSameFamily(Categorical(logits),
  Independent(Normal(locs, scales), 1))`` (``log_prob`` only, it has no ``rsample``);
* **Pyro**: ``pyro.distributions.MixtureOfDiagNormals(locs, scales, logits)``.

Operations, each a function that builds the distribution object itself (users rebuild it at
every step) and runs on ``N`` points:

1. ``log_prob``: forward only, under ``torch.no_grad()``;
2. ``log_prob + backward``: forward and backward of ``log_prob(x).sum()``;
3. ``rsample + backward``: ``z = rsample((N,))`` and backward of ``z.sin().sum()``.

Parameters are float32 leaf tensors with ``requires_grad=True``: ``locs = 3 * randn(K, D)``,
``scales = 0.5 + rand(K, D)``, ``logits = randn(K)``; the data ``x`` are exact draws from our
mixture. Argument validation of ``torch.distributions`` is switched off for every method, so the
comparison is of the computations alone.

**Speed.** In one process (torch's default thread count), every (shape, operation) runs each
method once to warm up, then repeats round-robin over the methods (the order rotates from one
repetition to the next) and takes the median wall time of each method. The number of
repetitions follows the warm-up times (a few seconds per shape and operation, at least 3 and at
most 30). Speed-up is ``peer time / our time``: above 1 means ours is faster. For ``rsample``
the table also gives ``exact / Gumbel``: the time of our exact sampler over our relaxed one.
The report gives the share of CPU time other processes took during the timing (from
``/proc/stat``): torch's thread pool occupies every core, so a single busy neighbour can slow
parallel kernels by an order of magnitude or more, and such a run is flagged as disturbed.

**Peak memory.** CPU tensors have no allocator statistics, so each (method, shape, operation)
runs in a fresh process forked from a ``multiprocessing`` fork server that has already imported
torch and Pyro. The child builds its inputs, runs the operation once at 64 points (to start the
thread pools, load lazy kernels and check the gradients at a small size), releases memory
(``gc.collect`` and glibc's ``malloc_trim``), reads its resident size ``VmRSS`` from
``/proc/self/status``, resets the high-water mark ``VmHWM`` by writing ``5`` to
``/proc/self/clear_refs``, runs the operation once at full size and reads ``VmHWM``. The
reported peak is ``VmHWM - VmRSS(baseline)``, in MiB; memory ratio is
``peer peak / our peak`` (above 1 means ours uses less). If the kernel ignores ``clear_refs``
(checked at start-up), the child reports ``ru_maxrss - VmRSS(baseline)`` instead, an upper bound.
Each child's address space is capped (``RLIMIT_AS``) at its size before the measured call plus
6 GiB; an allocation failure, or the child dying, is reported as ``OOM (>6 GiB)`` and the method
is left out of the speed measurement for that shape and operation. The children also record
whether all gradients are finite, at 64 points and at full size (``NaN grads`` otherwise).

Usage::

    python benchmarks/speed_memory.py             # full run, a few minutes on 2 cores
    python benchmarks/speed_memory.py --quick     # smoke test: N // 64, 2 repetitions
    python benchmarks/speed_memory.py --out DIR   # write speed_memory.{md,png} to DIR
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import math
import multiprocessing as mp
import os
import platform
import re
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pyro
import pyro.distributions as pyro_dist
import torch
from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal
from tqdm import tqdm

import pyro_mixflow
from pyro_mixflow import DiagNormalMixture, GumbelSoftmaxMixture

Shape = tuple[int, int, int]  # (N, K, D)
Params = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # locs, scales, logits

SHAPES: list[Shape] = [(65536, 8, 2), (65536, 50, 2), (8192, 100, 16), (2048, 64, 256)]
QUICK_DIVISOR = 64
TEMPERATURE = 0.5
MEMORY_CAP_BYTES = 6 * 2**30
SMALL_N = 64
CHILD_TIMEOUT_S = 300.0
SEED = 0

OURS, OURS_GUMBEL, MSF, PYRO = "ours", "ours_gumbel", "msf", "pyro"
LOG_PROB, LOG_PROB_BACKWARD, RSAMPLE_BACKWARD = "log_prob", "log_prob_backward", "rsample"
OP_TITLES: dict[str, str] = {
    LOG_PROB: "log_prob forward (no_grad)",
    LOG_PROB_BACKWARD: "log_prob forward + backward of .sum()",
    RSAMPLE_BACKWARD: "rsample + backward of z.sin().sum()",
}
METHOD_LABELS: dict[str, str] = {
    OURS: "ours",
    OURS_GUMBEL: "ours Gumbel",
    MSF: "MixtureSameFamily",
    PYRO: "Pyro",
}
# Our reference method first, then the methods timed against it.
OP_METHODS: dict[str, list[str]] = {
    LOG_PROB: [OURS, MSF, PYRO],
    LOG_PROB_BACKWARD: [OURS, MSF, PYRO],
    RSAMPLE_BACKWARD: [OURS, OURS_GUMBEL, PYRO],
}
# Peers whose time and memory are divided by ours (speed-up and memory ratio columns).
OP_PEERS: dict[str, list[str]] = {
    LOG_PROB: [MSF, PYRO],
    LOG_PROB_BACKWARD: [MSF, PYRO],
    RSAMPLE_BACKWARD: [PYRO],
}

# Quick mode skips any memory child whose largest N x K x K x D (Pyro rsample) or N x K x D
# float32 tensor exceeds this, so that a smoke test never starts a big run.
QUICK_MAX_TENSOR_BYTES = 64 * 2**20


@dataclass
class MemoryResult:
    """Outcome of one memory child."""

    status: str  # "ok", "oom", "error", "skipped"
    peak_mib: float = math.nan
    baseline_mib: float = math.nan
    grads_finite: bool | None = None  # at full size; None when not measured
    grads_finite_small: bool | None = None  # at SMALL_N points
    detail: str = ""


@dataclass
class Results:
    """All measurements, keyed by (shape, op, method)."""

    times: dict[tuple[Shape, str, str], list[float]] = field(default_factory=dict)
    memory: dict[tuple[Shape, str, str], MemoryResult] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Workloads
# ---------------------------------------------------------------------------------------------


def make_inputs(shape: Shape, seed: int) -> tuple[Params, torch.Tensor]:
    n, k, d = shape
    gen = torch.Generator().manual_seed(seed)
    locs = (3 * torch.randn(k, d, generator=gen)).requires_grad_()
    scales = (0.5 + torch.rand(k, d, generator=gen)).requires_grad_()
    logits = torch.randn(k, generator=gen).requires_grad_()
    torch.manual_seed(seed)
    x = DiagNormalMixture(locs, scales, logits).sample((n,))
    return (locs, scales, logits), x


def build_distribution(method: str, params: Params) -> torch.distributions.Distribution:
    locs, scales, logits = params
    if method == OURS:
        return DiagNormalMixture(locs, scales, logits)
    if method == OURS_GUMBEL:
        return GumbelSoftmaxMixture(locs, scales, logits, temperature=TEMPERATURE)
    if method == MSF:
        return MixtureSameFamily(Categorical(logits=logits), Independent(Normal(locs, scales), 1))
    if method == PYRO:
        return pyro_dist.MixtureOfDiagNormals(locs, scales, logits)
    raise ValueError(f"unknown method {method!r}")


def make_step(method: str, op: str, params: Params, x: torch.Tensor) -> Callable[[], None]:
    """Returns the timed function: build the distribution, run ``op`` on ``len(x)`` points."""
    n = x.shape[0]

    def clear_grads() -> None:
        for p in params:
            p.grad = None

    if op == LOG_PROB:

        def step() -> None:
            with torch.no_grad():
                build_distribution(method, params).log_prob(x)

    elif op == LOG_PROB_BACKWARD:

        def step() -> None:
            clear_grads()
            build_distribution(method, params).log_prob(x).sum().backward()

    elif op == RSAMPLE_BACKWARD:

        def step() -> None:
            clear_grads()
            z = build_distribution(method, params).rsample((n,))
            z.sin().sum().backward()

    else:
        raise ValueError(f"unknown op {op!r}")
    return step


def grads_finite(params: Params) -> bool:
    return all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in params)


def largest_tensor_bytes(method: str, op: str, shape: Shape) -> int:
    n, k, d = shape
    if method == PYRO and op == RSAMPLE_BACKWARD:
        return 4 * n * k * k * d
    return 4 * n * k * d


# ---------------------------------------------------------------------------------------------
# Peak memory (one forked child per measurement)
# ---------------------------------------------------------------------------------------------


def read_status_kib() -> dict[str, int]:
    text = Path("/proc/self/status").read_text()
    return {
        key: int(m.group(1))
        for key in ("VmRSS", "VmHWM", "VmSize")
        if (m := re.search(rf"^{key}:\s+(\d+)\s+kB", text, re.MULTILINE))
    }


def reset_peak_rss() -> bool:
    """Resets ``VmHWM`` to the current ``VmRSS``; returns whether the kernel accepted it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def clear_refs_works() -> bool:
    """Checks that writing 5 to ``/proc/self/clear_refs`` lowers ``VmHWM`` after a free."""
    block = torch.ones(64 * 2**20)  # 256 MiB, returned to the OS on release
    del block
    malloc_trim()
    before = read_status_kib().get("VmHWM", 0)
    if not reset_peak_rss():
        return False
    after = read_status_kib().get("VmHWM", before)
    return before - after > 128 * 2**10


def is_allocation_failure(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    message = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(
        s in message for s in ("can't allocate", "cannot allocate", "out of memory", "bad_alloc")
    )


def measure_memory(spec: dict[str, Any]) -> MemoryResult:
    """Runs in the child: peak RSS increase of one call of ``spec['op']``."""
    gc.freeze()  # objects inherited from the fork server: keep them out of gc.collect below
    torch.distributions.Distribution.set_default_validate_args(False)
    method, op, shape = spec["method"], spec["op"], tuple(spec["shape"])
    params, x = make_inputs(shape, spec["seed"])
    small = make_step(method, op, params, x[:SMALL_N])
    small()
    finite_small = grads_finite(params) if op == RSAMPLE_BACKWARD else None
    step = make_step(method, op, params, x)
    for p in params:
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
        return MemoryResult(
            "oom",
            baseline_mib=baseline_kib / 1024,
            grads_finite_small=finite_small,
            detail=str(exc).splitlines()[0][:200],
        )
    if use_hwm:
        peak_kib = read_status_kib()["VmHWM"]
    else:
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    resource.setrlimit(resource.RLIMIT_AS, (hard, hard))
    return MemoryResult(
        "ok",
        peak_mib=max(0, peak_kib - baseline_kib) / 1024,
        baseline_mib=baseline_kib / 1024,
        grads_finite=grads_finite(params) if op == RSAMPLE_BACKWARD else None,
        grads_finite_small=finite_small,
    )


def memory_child(
    conn: Connection, spec: dict[str, Any], measure: Callable[[dict[str, Any]], MemoryResult]
) -> None:
    try:
        result = measure(spec)
    except BaseException as exc:  # report whatever happened to the parent
        result = MemoryResult("error", detail=f"{type(exc).__name__}: {exc}"[:200])
    conn.send(result)
    conn.close()


def run_memory_child(
    ctx: Any,
    spec: dict[str, Any],
    measure: Callable[[dict[str, Any]], MemoryResult] = measure_memory,
) -> MemoryResult:
    """Runs ``measure(spec)`` in a fresh child of ``ctx``; its result, or why there is none.

    ``measure`` must be a module-level function (the child receives it by reference):
    ``covariance_speed.py`` passes its own.
    """
    receiver, sender = ctx.Pipe(duplex=False)
    process = ctx.Process(target=memory_child, args=(sender, spec, measure))
    process.start()
    sender.close()
    result: MemoryResult | None = None
    try:
        if receiver.poll(CHILD_TIMEOUT_S):
            result = receiver.recv()
    except EOFError:
        result = None
    process.join(10.0)
    if process.is_alive():
        process.kill()
        process.join()
        return result or MemoryResult("error", detail=f"timeout after {CHILD_TIMEOUT_S:.0f} s")
    if result is None:
        # Died without a word: killed (e.g. by the kernel's OOM killer) or aborted.
        return MemoryResult("oom", detail=f"child exited with code {process.exitcode}")
    return result


# ---------------------------------------------------------------------------------------------
# Speed (round-robin in this process)
# ---------------------------------------------------------------------------------------------


def time_call(step: Callable[[], None]) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def measure_speed(
    shape: Shape,
    op: str,
    methods: list[str],
    params: Params,
    x: torch.Tensor,
    budget_s: float,
    min_reps: int,
    max_reps: int,
) -> dict[str, list[float]]:
    steps = {m: make_step(m, op, params, x) for m in methods}
    warm = {m: time_call(steps[m]) for m in methods}
    reps = int(budget_s / max(sum(warm.values()), 1e-9))
    reps = max(min_reps, min(max_reps, reps))
    times: dict[str, list[float]] = {m: [] for m in methods}
    for rep in range(reps):
        shift = rep % len(methods)
        for m in methods[shift:] + methods[:shift]:
            times[m].append(time_call(steps[m]))
    return times


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def fmt_time(times: list[float] | None) -> str:
    return f"{statistics.median(times):.3g}" if times else "—"


def fmt_ratio(num: float, den: float) -> str:
    if not (math.isfinite(num) and math.isfinite(den)) or den <= 0:
        return "—"
    return f"{num / den:.2f}"


def median_or_nan(times: list[float] | None) -> float:
    return statistics.median(times) if times else math.nan


def fmt_memory(result: MemoryResult | None) -> str:
    if result is None:
        return "—"
    if result.status == "ok":
        return f"{result.peak_mib:.1f}"
    if result.status == "oom":
        return "OOM (>6 GiB)"
    if result.status == "skipped":
        return "skipped"
    return "error"


def fmt_memory_ratio(peer: MemoryResult | None, ours: MemoryResult | None) -> str:
    if ours is None or peer is None or ours.status != "ok":
        return "—"
    if peer.status == "oom":
        return f">{MEMORY_CAP_BYTES / 2**20 / max(ours.peak_mib, 0.1):.0f}"
    if peer.status != "ok" or ours.peak_mib < 0.1:
        return "—"
    return f"{peer.peak_mib / ours.peak_mib:.2f}"


def fmt_grads(result: MemoryResult | None) -> str:
    if result is None:
        return "—"
    if result.grads_finite is not None:
        return "finite" if result.grads_finite else "NaN grads"
    if result.grads_finite_small is not None:
        state = "finite" if result.grads_finite_small else "NaN grads"
        return f"{state} (at N={SMALL_N})"
    return "—"


def shape_label(shape: Shape) -> str:
    return f"({shape[0]}, {shape[1]}, {shape[2]})"


def markdown_table(results: Results, shapes: list[Shape], op: str) -> str:
    methods, peers = OP_METHODS[op], OP_PEERS[op]
    label = METHOD_LABELS
    exact = op == RSAMPLE_BACKWARD
    header = ["shape (N, K, D)"]
    header += [f"{'ours exact' if exact and m == OURS else label[m]} (s)" for m in methods]
    header += [f"speed-up vs {label[p]}" for p in peers]
    if exact:
        header.append("exact / Gumbel time")
    header += [f"peak MiB {'ours exact' if exact and m == OURS else label[m]}" for m in methods]
    header += [f"memory ratio {label[p]} / ours" for p in peers]
    if exact:
        header.append("grads finite: exact / Gumbel / Pyro")
    rows = [header, ["---"] + ["---:"] * (len(header) - 1)]
    for shape in shapes:
        t = {m: results.times.get((shape, op, m)) for m in methods}
        mem = {m: results.memory.get((shape, op, m)) for m in methods}
        ours_t = median_or_nan(t[OURS])
        row = [shape_label(shape)]
        row += [fmt_time(t[m]) for m in methods]
        row += [fmt_ratio(median_or_nan(t[p]), ours_t) for p in peers]
        if exact:
            row.append(fmt_ratio(ours_t, median_or_nan(t[OURS_GUMBEL])))
        row += [fmt_memory(mem[m]) for m in methods]
        row += [fmt_memory_ratio(mem[p], mem[OURS]) for p in peers]
        if exact:
            row.append(" / ".join(fmt_grads(mem[m]) for m in methods))
        rows.append(row)
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)


def figure_values(results: Results, shapes: list[Shape], op: str, peer: str) -> list[float]:
    """Time ratio ``peer / ours`` per shape (NaN where either was not timed)."""
    out = []
    for shape in shapes:
        ours_t = median_or_nan(results.times.get((shape, op, OURS)))
        out.append(median_or_nan(results.times.get((shape, op, peer))) / ours_t)
    return out


def memory_values(results: Results, shapes: list[Shape], op: str, peer: str) -> list[float]:
    """Peak-memory ratio ``peer / ours`` per shape (NaN where either has no measurement)."""
    out = []
    for shape in shapes:
        ours = results.memory.get((shape, op, OURS))
        other = results.memory.get((shape, op, peer))
        ok = ours is not None and other is not None and ours.status == other.status == "ok"
        out.append(other.peak_mib / ours.peak_mib if ok and ours.peak_mib >= 0.1 else math.nan)
    return out


def save_figure(results: Results, shapes: list[Shape], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import FuncFormatter

    ops = list(OP_METHODS)
    fig, axes = plt.subplots(2, len(ops), figsize=(4.2 * len(ops), 6.8), squeeze=False)
    xs = np.arange(len(shapes))
    colors = {MSF: "tab:blue", PYRO: "tab:orange", OURS_GUMBEL: "tab:green"}
    rows: list[tuple[str, Callable[[Results, list[Shape], str, str], list[float]]]] = [
        ("time", figure_values),
        ("peak memory", memory_values),
    ]
    for row, (quantity, values_of) in enumerate(rows):
        for col, op in enumerate(ops):
            ax = axes[row, col]
            bars = OP_PEERS[op] + ([OURS_GUMBEL] if op == RSAMPLE_BACKWARD else [])
            width = 0.8 / len(bars)
            for i, peer in enumerate(bars):
                values = values_of(results, shapes, op, peer)
                ours_name = "exact" if op == RSAMPLE_BACKWARD else "ours"
                pos = xs + (i - (len(bars) - 1) / 2) * width
                # Bars start at 1, so that they point up where ours is better.
                heights = [v - 1.0 if math.isfinite(v) else 0.0 for v in values]
                ax.bar(
                    pos,
                    heights,
                    width,
                    bottom=1.0,
                    label=f"{METHOD_LABELS[peer]} / {ours_name}",
                    color=colors[peer],
                )
                for p, v, shape in zip(pos, values, shapes, strict=True):
                    if math.isfinite(v):
                        continue
                    mem = results.memory.get((shape, op, peer))
                    text = fmt_memory(mem) if mem is not None and mem.status != "ok" else "n/a"
                    ax.text(p, 1.0, text.split(" ")[0], ha="center", va="bottom", fontsize=7)
            ax.axhline(1.0, color="black", linewidth=0.8)
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
            ax.set_xticks(xs, [shape_label(s) for s in shapes], rotation=25, ha="right", fontsize=7)
            ax.set_title(f"{OP_TITLES[op]}: {quantity}", fontsize=8)
            ax.legend(fontsize=7)
        axes[row, 0].set_ylabel(f"{quantity} ratio peer / ours\n(>1: ours better)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def busy_cpu_seconds() -> tuple[float, float]:
    """Returns (CPU seconds all processes spent busy, CPU seconds this process spent)."""
    ticks = os.sysconf("SC_CLK_TCK")
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    own = os.times()
    return (sum(fields[:8]) - idle) / ticks, own.user + own.system


def environment_line(peers: str | None = None) -> str:
    """Versions, CPU and threads; ``peers`` names the peer libraries (default: Pyro's version)."""
    peers = f"pyro-ppl {pyro.__version__}" if peers is None else peers
    cpu = platform.processor() or platform.machine()
    try:
        text = Path("/proc/cpuinfo").read_text()
        if m := re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE):
            cpu = m.group(1).strip()
    except OSError:
        pass
    return (
        f"torch {torch.__version__}, {peers}, "
        f"pyro_mixflow {pyro_mixflow.__version__}, Python {platform.python_version()}; "
        f"{cpu}, {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}; float32"
    )


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
        help="output directory for speed_memory.md and speed_memory.png",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    torch.distributions.Distribution.set_default_validate_args(False)
    shapes = [(n // QUICK_DIVISOR, k, d) for n, k, d in SHAPES] if args.quick else SHAPES
    budget_s, min_reps, max_reps = (0.05, 2, 2) if args.quick else (6.0, 3, 30)
    results = Results()

    use_clear_refs = clear_refs_works()
    ctx = mp.get_context("forkserver")
    # The first torch.broadcast_shapes call imports torch._refs and sympy (about 0.3 s).
    preload = ["torch", "torch.fx.experimental.symbolic_shapes", "pyro.distributions"]
    preload += ["pyro_mixflow", "__main__"]
    ctx.set_forkserver_preload(preload)
    cases = [
        (shape, op, method)
        for shape in shapes
        for op, methods in OP_METHODS.items()
        for method in methods
    ]
    for shape, op, method in tqdm(cases, desc="peak memory", file=sys.stderr):
        if args.quick and largest_tensor_bytes(method, op, shape) > QUICK_MAX_TENSOR_BYTES:
            results.memory[shape, op, method] = MemoryResult("skipped", detail="--quick")
            continue
        spec = {
            "method": method,
            "op": op,
            "shape": shape,
            "seed": SEED,
            "cap_bytes": MEMORY_CAP_BYTES,
            "use_clear_refs": use_clear_refs,
        }
        results.memory[shape, op, method] = run_memory_child(ctx, spec)

    memory_s = time.perf_counter() - start
    busy_start = busy_cpu_seconds()
    speed_cases = [(shape, op) for shape in shapes for op in OP_METHODS]
    inputs: dict[Shape, tuple[Params, torch.Tensor]] = {}
    for shape, op in tqdm(speed_cases, desc="speed", file=sys.stderr):
        if shape not in inputs:
            inputs.clear()
            gc.collect()
            inputs[shape] = make_inputs(shape, SEED)
        params, x = inputs[shape]
        methods = [m for m in OP_METHODS[op] if results.memory[shape, op, m].status == "ok"]
        times = measure_speed(shape, op, methods, params, x, budget_s, min_reps, max_reps)
        for m, ts in times.items():
            results.times[shape, op, m] = ts
    inputs.clear()
    speed_s = time.perf_counter() - start - memory_s
    busy_end = busy_cpu_seconds()
    # CPU time that other processes took while this one was timing: with torch's thread pool on
    # every core, even one busy neighbour slows parallel kernels by large factors.
    foreign_share = max(0.0, (busy_end[0] - busy_start[0]) - (busy_end[1] - busy_start[1])) / (
        max(speed_s, 1e-9) * (os.cpu_count() or 1)
    )

    args.out.mkdir(parents=True, exist_ok=True)
    save_figure(results, shapes, args.out / "speed_memory.png")
    elapsed = time.perf_counter() - start

    lines = [
        "# Speed and peak memory: pyro_mixflow mixtures vs peers",
        "",
        environment_line() + ".",
        f"Mode: {'--quick (N // 64, smoke test only)' if args.quick else 'full'}; "
        f"total runtime {elapsed:.0f} s (memory children {memory_s:.0f} s, speed {speed_s:.0f} s); "
        f"other processes used {100 * foreign_share:.0f}% of the CPUs during timing"
        + (" (**timings disturbed, rerun on an idle machine**)" if foreign_share > 0.05 else "")
        + "; peak-memory method: "
        + ("VmHWM after clear_refs" if use_clear_refs else "ru_maxrss (clear_refs unavailable)")
        + ".",
        "",
        "Times: median seconds over round-robin repetitions. Speed-up = peer time / our time "
        "(>1: ours faster). Peak MiB = peak RSS increase of one call in a fresh process. "
        "Memory ratio = peer peak / our peak (>1: ours leaner; `>x` where the peer hit the "
        "6 GiB cap). MixtureSameFamily has no `rsample`. Methods that ran out of memory are not "
        "timed (—).",
    ]
    for op in OP_METHODS:
        lines += ["", f"## {OP_TITLES[op]}", "", markdown_table(results, shapes, op)]
    failures = [
        f"- {shape_label(s)} {op} {METHOD_LABELS[m]}: {r.status} — {r.detail}"
        for (s, op, m), r in results.memory.items()
        if r.status in ("oom", "error") and r.detail
    ]
    if failures:
        lines += ["", "Memory-child notes:", "", *failures]
    markdown = "\n".join(lines) + "\n"
    (args.out / "speed_memory.md").write_text(markdown)
    print(markdown)
    print(f"wrote {args.out / 'speed_memory.md'} and {args.out / 'speed_memory.png'}")


if __name__ == "__main__":
    main()
