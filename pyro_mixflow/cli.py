r"""The ``pyro-mixflow`` command line (also ``python -m pyro_mixflow``)."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

__all__ = ["main"]

DEMO_DATASETS = ("8gaussians", "checkerboard", "rings")
DEMO_MODELS = ("gmm", "flow")


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit status.

    Args:
        argv: Arguments without the program name (``sys.argv[1:]`` when ``None``).

    Returns:
        0 on success, 2 on a usage or input error (reported on one line, no traceback).

    Example:
        >>> main(["--version"])  # doctest: +ELLIPSIS
        pyro-mixflow ...
        0
    """
    parser = _parser()
    args = parser.parse_args(argv)
    if args.version:
        from pyro_mixflow import __version__

        print(f"pyro-mixflow {__version__}")
        return 0
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.run(args)
    except (ValueError, OSError) as error:
        print(f"pyro-mixflow: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pyro-mixflow: interrupted", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyro-mixflow",
        description="Mixture-based density models and samplers for Pyro and torch.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    commands = parser.add_subparsers(dest="command")
    demo = commands.add_parser(
        "demo",
        help="fit the models on 2-D benchmark densities; print a table and save a picture",
        description="Fits an EM-initialized Gaussian mixture and a mixture-base spline flow "
        "on 2-D benchmark densities with known log-density, prints test log-likelihood, "
        "KL(truth || model), parameter counts and seconds, and saves the learned densities "
        "next to the truth as a PNG.",
    )
    demo.add_argument("--datasets", nargs="+", default=list(DEMO_DATASETS), metavar="NAME")
    demo.add_argument("--models", nargs="+", default=list(DEMO_MODELS), choices=DEMO_MODELS)
    demo.add_argument("--steps", type=int, default=1500, help="Adam steps per model (1500)")
    demo.add_argument("--num-train", type=int, default=20000, help="training draws (20000)")
    demo.add_argument("--num-test", type=int, default=20000, help="test draws (20000)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", type=Path, default=Path("pyro-mixflow-demo.png"), help="PNG path")
    demo.add_argument("--no-progress", action="store_true", help="hide progress bars")
    demo.set_defaults(run=_demo)
    return parser


def _make_model(name: str, input_dim: int):
    from pyro_mixflow.nn import GMM, MixtureFlow

    if name == "gmm":
        return GMM(input_dim, num_components=50)
    return MixtureFlow(input_dim)


def _demo(args: argparse.Namespace) -> int:
    from pyro_mixflow import datasets, fit

    if args.steps < 1 or args.num_train < 100 or args.num_test < 100:
        raise ValueError("`--steps` must be >= 1 and `--num-train`/`--num-test` >= 100")
    torch.set_flush_denormal(True)  # a process-wide choice for this command (see README)
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
            fit(model, train, steps=args.steps, seed=args.seed, progress=not args.no_progress)
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


def _print_table(rows) -> None:
    header = "| dataset | model | test log-lik | KL(truth ‖ model) | parameters | seconds |"
    print(header)
    print("|---|---|---:|---:|---:|---:|")
    for name, model, test_ll, kl, kl_se, params, seconds in rows:
        print(
            f"| {name} | {model} | {test_ll:.3f} | {kl:.3f} ± {kl_se:.3f} | {params} | "
            f"{seconds:.1f} |"
        )


def _save_picture(panels, path: Path) -> None:
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
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    fig.savefig(temporary, dpi=80, format="png")
    plt.close(fig)
    temporary.replace(path)  # atomic: no half-written picture after a failure
