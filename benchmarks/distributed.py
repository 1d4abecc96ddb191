r"""Data-parallel ``fit`` on CPU processes (gloo): throughput of 1, 2, ... processes.

Each run trains ``nn.GMM(8, 50)`` (a light step: a few milliseconds) or ``nn.MixtureFlow(8)``
(a heavier one), started from data (EM on 20,000 rows, before timing), by
:func:`pyro_mixflow.fit` on 200,000 synthetic rows for ``--steps`` steps, without
validation, one torch thread per process. With ``R > 1`` processes the script spawns them
(``torch.multiprocessing``), each calls ``torch.distributed.init_process_group("gloo")`` and
runs the same ``fit``: each rank takes a ``1/R`` share of every batch and the gradients are
summed over ranks once per step. Two ways to use them: the same global batch of 4096 split in
``R`` shares (strong scaling: the optimization is that of one process), and 4096 rows per
process, a global batch of ``4096 R`` (weak scaling: ``DistributedDataParallel``'s
convention, where the batch size is per process). Reported: optimizer steps and rows per
second (rank 0's ``fit`` wall clock, after one warm-up run of 5 steps), the speed-up in rows
per second over one process at batch 4096, and the share of the machine's CPU time other
processes used while the run lasted (``/proc/stat``), since a busy machine cannot show the
speed-up. The target of the project is at least 1.6 times the throughput of one process with
2 processes on 2 cores. Each step costs one ``all_reduce`` of the gradients, whose latency
(about 1.7 ms for 1,000 floats between two gloo processes on the 2-core machine of our tables)
bounds the gain of a light step, and each rank pays the per-step cost that does not shrink with
its share of the batch (the operator dispatch of the flow's many small operations).

Usage::

    python benchmarks/distributed.py                    # 1 and 2 processes, 300 steps
    python benchmarks/distributed.py --processes 1 2 4
    python benchmarks/distributed.py --quick --out DIR  # smoke test: 20 steps, small data
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from speed_memory import busy_cpu_seconds, environment_line

from pyro_mixflow import fit
from pyro_mixflow.nn import GMM, MixtureFlow

BATCH, DIM, COMPONENTS, SEED = 4096, 8, 50, 0


def rows(quick: bool) -> torch.Tensor:
    """Synthetic rows: three shifted Gaussian clusters in 8-D."""
    gen = torch.Generator().manual_seed(SEED)
    n = 20_000 if quick else 200_000
    x = torch.randn(n, DIM, generator=gen)
    x[: n // 3] += 3.0
    x[n // 3 : 2 * n // 3] -= 3.0
    return x


MODELS = {"gmm": lambda: GMM(DIM, COMPONENTS), "flow": lambda: MixtureFlow(DIM)}


def train(model_name: str, steps: int, quick: bool, batch: int = BATCH) -> float:
    """Steps per second of ``fit`` at global batch ``batch`` (distributed in a process group)."""
    torch.manual_seed(SEED)
    data = rows(quick)
    model = MODELS[model_name]().init_from_data(data[:20_000])
    options = {"batch_size": batch, "validation": None, "progress": False, "seed": SEED}
    fit(model, data, steps=5, **options)  # warm-up
    history = fit(model, data, steps=steps, **options)
    return steps / history.seconds


def worker(
    rank: int,
    world_size: int,
    init_file: str,
    out_file: str,
    model: str,
    steps: int,
    quick: bool,
    batch: int,
):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    try:
        rate = train(model, steps, quick, batch)
        if rank == 0:
            Path(out_file).write_text(json.dumps({"steps_per_second": rate}))
    finally:
        dist.destroy_process_group()


def run(
    model: str, world_size: int, steps: int, quick: bool, batch: int = BATCH
) -> tuple[float, float]:
    """Steps per second of ``world_size`` processes at global batch ``batch``; others' CPU share."""
    (busy0, own0), children0 = busy_cpu_seconds(), sum(os.times()[2:4])
    start = time.perf_counter()
    if world_size == 1:
        torch.set_num_threads(1)
        rate = train(model, steps, quick, batch)
    else:
        with tempfile.TemporaryDirectory() as folder:
            out_file = os.path.join(folder, "result.json")
            init_file = os.path.join(folder, "init")
            args = (world_size, init_file, out_file, model, steps, quick, batch)
            mp.spawn(worker, args=args, nprocs=world_size)
            rate = json.loads(Path(out_file).read_text())["steps_per_second"]
    wall = time.perf_counter() - start
    (busy1, own1), children1 = busy_cpu_seconds(), sum(os.times()[2:4])
    ours = (own1 - own0) + (children1 - children0)  # this process and the spawned ranks
    others = max(0.0, (busy1 - busy0) - ours) / (wall * (os.cpu_count() or 1))
    return rate, others


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20 steps on 20,000 rows")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--steps", type=int, default=None, help="timed steps (300)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    steps = args.steps or (20 if args.quick else 300)
    args.out.mkdir(parents=True, exist_ok=True)
    # (model, processes, batch per process) -> (steps / s, other processes' CPU share)
    cases = [
        (m, r, per)
        for m in args.models
        for r in args.processes
        for per in sorted({BATCH // r, BATCH})
        if r > 1 or per == BATCH
    ]
    results = {(m, r, per): run(m, r, steps, args.quick, per * r) for m, r, per in cases}
    base = {m: results[(m, 1, BATCH)][0] * BATCH for m in args.models if (m, 1, BATCH) in results}
    lines = [
        "# Data-parallel `fit` on CPU processes (gloo)",
        "",
        f"Generated by `benchmarks/distributed.py`. {environment_line()}.",
        f"`nn.GMM({DIM}, {COMPONENTS})` (gmm) and `nn.MixtureFlow({DIM})` (flow), {steps} timed "
        "steps, one thread per process. Two ways to use R processes: the same global batch "
        f"of {BATCH} split into R shares (the same optimization as one process: strong "
        f"scaling), or {BATCH} rows per process, a global batch of {BATCH} R "
        "(DistributedDataParallel's convention: weak scaling). Speed-up: rows per second "
        f"against one process at batch {BATCH}.",
        "",
        "| model | processes | rows per process per step | global batch | steps / s | rows / s "
        "| speed-up | CPU share of other processes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        *(
            f"| {m} | {r} | {per} | {per * r} | {rate:.1f} | {rate * per * r:,.0f} | "
            f"{rate * per * r / base[m]:.2f} | {other:.0%} |"
            for (m, r, per), (rate, other) in results.items()
            if m in base
        ),
    ]
    text = "\n".join(lines) + "\n"
    (args.out / "distributed.md").write_text(text)
    save_figure(results, args.out / "distributed.png")
    print(text)


def save_figure(results: dict[tuple[str, int, int], tuple[float, float]], path: Path) -> None:
    """Bars of rows per second for every model, process count and batch per process."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({m for m, _, _ in results})
    fig, axes = plt.subplots(1, len(models), figsize=(3.6 * len(models), 3), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        keys = [key for key in results if key[0] == model]
        labels = [f"{r} proc.\n{per}/proc." for _, r, per in keys]
        ax.bar(labels, [results[key][0] * key[1] * key[2] for key in keys])
        ax.set_ylabel("rows / s")
        ax.set_title(f"fit, {model}", fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
