r"""The partition a RAD flow learns: which piece of each layer every point of the plane is in.

A :class:`pyro_mixflow.nn.RAD` (defaults: 4 layers, the middle two folding with 2 pieces) is
fitted to a 2-D benchmark density with the density benchmark's budget (20,000 draws, 3,000 Adam
steps of batch 512, lr :math:`10^{-3}` cosine, best validated state). For every point of a grid
over the dataset's bounds, :meth:`~pyro_mixflow.distributions.RADFlow.piece_indices` gives the
piece of each layer (data-side layer first) that the point falls in; the tuple of pieces labels
the point's region, the set of points that one branch of the flow maps invertibly onto the
latent space. The table gives the KL to the truth on 20,000 test draws (± standard error), the
number of regions met on the grid, and how many regions hold 99% of the model's mass on the
grid.

Outputs in ``--out``: ``rad_partition.md`` (the table) and ``rad_partition.png`` (per dataset:
the model's log-density, each folding layer's pieces, and the regions in random colours).

Usage::

    python benchmarks/rad_partition.py --quick --out /tmp/rad   # seconds (smoke test)
    flock /tmp/bench.lock python benchmarks/rad_partition.py    # full: benchmarks/results/
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

from pyro_mixflow import datasets, fit
from pyro_mixflow.nn import RAD

FULL = {"num_train": 20_000, "steps": 3000, "grid": 300, "kwargs": {}}
QUICK = {
    "num_train": 2000,
    "steps": 30,
    "grid": 80,
    "kwargs": {"num_layers": 2, "num_pieces": 4, "hidden_dims": (16, 16)},
}


def run(name: str, settings: dict, seed: int) -> dict:
    """Fits a RAD to ``name`` and labels a grid by pieces; returns metrics and images."""
    density = datasets.load(name)
    num = settings["num_train"]
    train = density.sample(num, generator=torch.Generator().manual_seed(seed))
    test = density.sample(num, generator=torch.Generator().manual_seed(seed + 1))
    split = num - num // 10
    torch.manual_seed(seed)
    model = RAD(2, **settings["kwargs"]).init_from_data(train[:split])
    start = time.perf_counter()
    fit(
        model,
        train[:split],
        steps=settings["steps"],
        batch_size=512,
        lr=1e-3,
        validation=train[split:],
        seed=seed,
        progress=True,
    )
    seconds = time.perf_counter() - start
    model.eval()
    size = settings["grid"]
    (xmin, xmax), (ymin, ymax) = density.bounds
    xs = torch.linspace(xmin, xmax, size)
    ys = torch.linspace(ymin, ymax, size)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    grid = torch.stack([xx.flatten(), yy.flatten()], -1)
    with torch.no_grad():
        flow = model()
        kl = density.log_prob(test.double()) - flow.log_prob(test).double()
        log_q = flow.log_prob(grid)
        pieces = [p.squeeze(-1) for p in flow.piece_indices(grid)]  # per layer, [G]
    labels = torch.stack(pieces, -1)  # [G, L]
    folding = [i for i, k in enumerate(reversed(model.num_pieces)) if k > 1]  # data side first
    _, region = torch.unique(labels, dim=0, return_inverse=True)
    mass = torch.zeros(int(region.max()) + 1, dtype=torch.float64)
    mass = mass.index_add_(0, region, log_q.exp().double())
    share = mass.sort(descending=True).values.cumsum(0) / mass.sum()
    return {
        "dataset": name,
        "kl": kl.mean().item(),
        "kl_se": kl.std().item() / math.sqrt(len(kl)),
        "regions": int(region.max()) + 1,
        "regions_99": int((share < 0.99).sum()) + 1,
        "seconds": seconds,
        "log_q": log_q.reshape(size, size).numpy(),
        "pieces": {i + 1: pieces[i].reshape(size, size).numpy() for i in folding},
        "region": region.reshape(size, size).numpy(),
        "extent": (xmin, xmax, ymin, ymax),
    }


def table(results: Sequence[dict], steps: int) -> str:
    """The markdown table of the runs."""
    lines = [
        "| dataset | Adam steps | KL(truth ‖ RAD), nats | regions on the grid "
        "| regions with 99% of the mass | train s |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        lines.append(
            f"| {r['dataset']} | {steps} | {r['kl']:.3f} ± {r['kl_se']:.3f} | {r['regions']} "
            f"| {r['regions_99']} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines)


def figure(results: Sequence[dict], path: Path) -> None:
    """Log-density, each folding layer's pieces and the regions, one row per dataset."""
    columns = 2 + len(results[0]["pieces"])
    fig, axes = plt.subplots(
        len(results), columns, figsize=(2.6 * columns, 2.6 * len(results)), squeeze=False
    )
    rng = np.random.default_rng(0)
    for row, r in zip(axes, results, strict=True):
        top = r["log_q"].max()
        row[0].imshow(r["log_q"], origin="lower", extent=r["extent"], vmin=top - 4, vmax=top)
        row[0].set_title(f"{r['dataset']}: log q", fontsize=8)
        for i, (layer, p) in enumerate(r["pieces"].items()):
            row[1 + i].imshow(p, origin="lower", extent=r["extent"], cmap="tab10", vmin=0, vmax=9)
            row[1 + i].set_title(f"layer {layer} (from the data side): piece", fontsize=8)
        colours = rng.random((r["regions"], 3))
        row[-1].imshow(colours[r["region"]], origin="lower", extent=r["extent"])
        row[-1].set_title(f"{r['regions']} regions", fontsize=8)
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny budget, seconds")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--datasets", nargs="+", default=["checkerboard", "rings"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    settings = QUICK if args.quick else FULL
    results = [run(name, settings, args.seed) for name in args.datasets]
    args.out.mkdir(parents=True, exist_ok=True)
    text = table(results, settings["steps"])
    mode = "quick (smoke test)" if args.quick else "full"
    header = f"# RAD flow: learned partitions ({mode})\n\n"
    (args.out / "rad_partition.md").write_text(header + text + "\n")
    figure(results, args.out / "rad_partition.png")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
