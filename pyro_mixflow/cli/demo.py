r"""The ``demo`` command: fit models on 2-D benchmark densities, print a table, save a picture."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from pyro_mixflow.io import atomic_write

__all__ = ["DEMO_DATASETS", "DEMO_MODELS", "run_demo"]

DEMO_DATASETS = ("8gaussians", "checkerboard", "rings")
DEMO_MODELS = ("gmm", "flow")


def run_demo(args: argparse.Namespace) -> int:
    r"""``pyro-mixflow demo``: fits each model of ``args.models`` on each of ``args.datasets``.

    Prints a markdown table of test log-likelihood, :math:`\mathrm{KL}(p \,\|\, q)`, parameter
    count and seconds per pair, and saves the learned densities beside the truth as a PNG.

    Args:
        args: The parsed ``demo`` arguments.

    Returns:
        0.

    Raises:
        ValueError: On bad input (one line).

    Example:
        >>> import tempfile
        >>> from pyro_mixflow.cli.parsing import build_parser
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     args = build_parser().parse_args(
        ...         ["demo", "--datasets", "8gaussians", "--models", "gmm", "--steps", "1"]
        ...         + ["--num-train", "100", "--num-test", "100", "--no-progress"]
        ...         + ["--out", f"{folder}/demo.png"]
        ...     )
        ...     run_demo(args)  # doctest: +ELLIPSIS
        | dataset | model | test log-lik | KL(truth ‖ model) | parameters | seconds |
        |---|---|---:|---:|---:|---:|
        | 8gaussians | gmm | ... |
        picture: .../demo.png
        0
    """
    from pyro_mixflow import datasets, fit

    if args.steps < 1 or args.num_train < 100 or args.num_test < 100:
        raise ValueError("`--steps` must be >= 1 and `--num-train`/`--num-test` >= 100")
    generator = torch.Generator().manual_seed(args.seed)
    rows, panels = [], []
    for name in args.datasets:
        truth = datasets.load(name)
        train = truth.sample(args.num_train, generator=generator)
        test = truth.sample(args.num_test, generator=generator)
        fitted = []
        for model_name in args.models:
            torch.manual_seed(args.seed)
            model = _make_model(model_name, train.shape[-1])
            start = time.perf_counter()
            model.init_from_data(train)
            fit(
                model,
                train,
                steps=args.steps,
                seed=args.seed,
                threads=args.threads or 1,
                progress=not args.no_progress,
            )
            seconds = time.perf_counter() - start
            with torch.no_grad():
                test_ll = model().log_prob(test).mean().item()
                kl, kl_se = datasets.kl_divergence(truth, model().log_prob, generator=generator)
            num_params = sum(p.numel() for p in model.parameters())
            rows.append((name, model_name, test_ll, kl, kl_se, num_params, seconds))
            fitted.append((model_name, model))
        panels.append((truth, fitted))
    _print_table(rows)
    _save_picture(panels, args.out)
    print(f"picture: {args.out}")
    return 0


def _make_model(name: str, input_dim: int) -> torch.nn.Module:
    from pyro_mixflow.nn import GMM, MixtureFlow

    if name == "gmm":
        return GMM(input_dim, num_components=50)
    return MixtureFlow(input_dim)


def _print_table(rows: list[tuple[Any, ...]]) -> None:
    header = "| dataset | model | test log-lik | KL(truth ‖ model) | parameters | seconds |"
    print(header)
    print("|---|---|---:|---:|---:|---:|")
    for name, model, test_ll, kl, kl_se, params, seconds in rows:
        print(
            f"| {name} | {model} | {test_ll:.3f} | {kl:.3f} ± {kl_se:.3f} | {params} | "
            f"{seconds:.1f} |"
        )


def _save_picture(panels: list[tuple[Any, list]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = 1 + max(len(fitted) for _, fitted in panels)
    fig, axes = plt.subplots(
        len(panels), columns, figsize=(3 * columns, 3 * len(panels)), squeeze=False
    )
    for row, (truth, fitted) in zip(axes, panels, strict=True):
        (x0, x1), (y0, y1) = truth.bounds
        xs, ys = torch.linspace(x0, x1, 200), torch.linspace(y0, y1, 200)
        grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1).reshape(-1, 2)
        densities = [("truth", truth.log_prob)] + [
            (name, model().log_prob) for name, model in fitted
        ]
        for ax, (title, log_prob) in zip(row, densities, strict=False):
            with torch.no_grad():
                z = log_prob(grid).exp().reshape(200, 200)
            ax.imshow(z.numpy(), origin="lower", extent=(x0, x1, y0, y1), cmap="magma")
            ax.set_title(f"{truth.name}: {title}", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    try:
        with atomic_write(path) as file:  # no half-written picture after a failure
            fig.savefig(file, dpi=80, format="png")
    finally:
        plt.close(fig)
