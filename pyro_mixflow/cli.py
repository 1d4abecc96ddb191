r"""The ``pyro-mixflow`` command line (also ``python -m pyro_mixflow``)."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import torch

from pyro_mixflow._io import (
    MODELS,
    atomic_write,
    build_model,
    check_output_suffix,
    load_model,
    read_rows,
    save_model,
    write_rows,
)

__all__ = ["main"]

DEMO_DATASETS = ("8gaussians", "checkerboard", "rings")
DEMO_MODELS = ("gmm", "flow")
THREADS_HELP = "CPU threads for torch (default: torch's choice)"
CHUNK_ROWS = 8192  # rows per forward pass of `score`/`sample` (bounded memory, progress bar)

EPILOG = """\
examples:
  pyro-mixflow demo
  pyro-mixflow fit data.csv --model flow --out flow.pt
  pyro-mixflow score flow.pt data.csv --out log_density.csv
  pyro-mixflow sample flow.pt -n 1000 --seed 0 --out draws.csv

DATA is comma-separated text (an optional header row of names, one row per observation) or a
.npy array of shape (N, D) or (N,). Errors are reported on one line with exit status 2
(1 if training diverges, 130 on Ctrl-C); output files are written atomically.
"""


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit status.

    Args:
        argv: Arguments without the program name (``sys.argv[1:]`` when ``None``).

    Returns:
        0 on success; 2 on a usage or input error, 1 if training diverged, 130 on Ctrl-C
        (each reported on one line of stderr, no traceback).

    Example:
        >>> main(["--version"])  # doctest: +ELLIPSIS
        pyro-mixflow ...
        0
    """
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help, or a usage error already reported on one line
        return stop.code if isinstance(stop.code, int) else 2
    if args.version:
        from pyro_mixflow import __version__

        print(f"pyro-mixflow {__version__}")
        return 0
    if args.command is None:
        parser.print_help()
        return 2
    threads = torch.get_num_threads()
    try:
        if getattr(args, "threads", None) is not None:
            torch.set_num_threads(args.threads)
        torch.set_flush_denormal(True)  # subnormals slow training tens of times (see README)
        return args.run(args)
    except _Failed as error:
        return _report(error, 1)
    except BrokenPipeError:  # stdout closed early (`| head`): stop quietly, like Unix tools
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (ValueError, OSError) as error:
        return _report(error, 2)
    except KeyboardInterrupt:
        print("pyro-mixflow: interrupted; output files are left as they were", file=sys.stderr)
        return 130
    finally:
        torch.set_num_threads(threads)
        torch.set_flush_denormal(False)  # torch's default; it offers no getter to restore


class _Failed(Exception):
    """A command that could not finish (training diverged): exit status 1."""


class _Parser(argparse.ArgumentParser):
    """``argparse`` with usage errors on one line (``prog: error: ...``), no usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _report(error: BaseException, status: int) -> int:
    message = " ".join(str(error).split())  # one line, whatever the exception held
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        message = f"{error.filename}: {error.strerror}"
    print(f"pyro-mixflow: error: {message}", file=sys.stderr)
    return status


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="pyro-mixflow",
        description="Mixture-based density models and samplers for Pyro and torch:\n"
        "fit a model to a table of numbers, score rows under it, draw samples from it.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_demo(commands)
    _add_fit(commands)
    _add_score(commands)
    _add_sample(commands)
    return parser


def _add_demo(commands) -> None:
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
    demo.add_argument("--threads", type=_positive_int, metavar="T", help=THREADS_HELP)
    demo.add_argument("--no-progress", action="store_true", help="hide progress bars")
    demo.set_defaults(run=_demo)


def _add_fit(commands) -> None:
    models = "\n".join(f"  {name:5} {kind.summary}" for name, kind in MODELS.items())
    with_hidden = ", ".join(name for name, kind in MODELS.items() if kind.hidden_dims)
    fit = commands.add_parser(
        "fit",
        help="fit a density model to DATA by maximum likelihood and save it",
        description="Fits a model to the rows of DATA: a data-driven start (EM for the "
        "mixtures, standardization for the flows), then mini-batch Adam on the mean negative "
        "log-likelihood, keeping the parameters with the best log-likelihood on held-out rows. "
        "Prints one summary line and writes MODEL atomically (a torch file of tensors and "
        "plain values, read back safely by `score` and `sample`).",
        epilog=f"models:\n{models}\n\nexample:\n  pyro-mixflow fit data.csv --model flow "
        "--components 20 --steps 2000 --out flow.pt",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    fit.add_argument("data", type=Path, metavar="DATA", help="CSV (optional header) or .npy")
    fit.add_argument("--model", required=True, choices=list(MODELS), help="model to fit")
    fit.add_argument(
        "--components",
        type=_positive_int,
        metavar="K",
        help="mixture components, or pieces per fold for rad (default: the model's: gmm 8, "
        "flow 50, cwm 8, rad 2)",
    )
    fit.add_argument(
        "--hidden-dims",
        type=_positive_int,
        nargs="+",
        metavar="W",
        help=f"hidden layer widths of the networks ({with_hidden}; default: the model's)",
    )
    length = fit.add_mutually_exclusive_group()
    length.add_argument("--steps", type=_positive_int, metavar="N", help="Adam steps (1000)")
    length.add_argument("--epochs", type=_positive_int, metavar="E", help="passes over DATA")
    fit.add_argument(
        "--batch-size", type=_positive_int, default=512, metavar="B", help="rows per step (512)"
    )
    fit.add_argument("--lr", type=_positive_float, default=1e-3, help="peak learning rate (1e-3)")
    fit.add_argument(
        "--validation",
        type=_fraction,
        default=0.1,
        metavar="F",
        help="fraction of rows held out to pick the best state (0.1; 0 for none)",
    )
    fit.add_argument("--seed", type=int, default=0, help="seed of everything random (0)")
    fit.add_argument("--threads", type=_positive_int, metavar="T", help=THREADS_HELP)
    fit.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    fit.add_argument("--out", type=Path, required=True, metavar="MODEL", help="model file")
    fit.set_defaults(run=_fit)


def _add_score(commands) -> None:
    score = commands.add_parser(
        "score",
        help="log-density of each row of DATA under MODEL",
        description="Writes log p(x) of each row of DATA under MODEL (natural log), one number "
        "per line in the order of the rows, to stdout or to --out (.csv or .npy).",
    )
    score.add_argument("model", type=Path, metavar="MODEL", help="a file from `fit`")
    score.add_argument("data", type=Path, metavar="DATA", help="CSV (optional header) or .npy")
    score.add_argument("--out", type=Path, metavar="FILE", help=".csv or .npy (default: stdout)")
    score.add_argument("--threads", type=_positive_int, metavar="T", help=THREADS_HELP)
    score.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    score.set_defaults(run=_score)


def _add_sample(commands) -> None:
    sample = commands.add_parser(
        "sample",
        help="draw N rows from MODEL",
        description="Draws N independent rows from MODEL, to stdout or to --out (.csv or "
        ".npy); CSV output has the training data's header row if it had one.",
    )
    sample.add_argument("model", type=Path, metavar="MODEL", help="a file from `fit`")
    sample.add_argument(
        "-n", "--num-samples", type=_positive_int, required=True, metavar="N", help="rows to draw"
    )
    sample.add_argument("--seed", type=int, help="seed (default: fresh randomness)")
    sample.add_argument("--out", type=Path, metavar="FILE", help=".csv or .npy (default: stdout)")
    sample.add_argument("--threads", type=_positive_int, metavar="T", help=THREADS_HELP)
    sample.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    sample.set_defaults(run=_sample)


def _fit(args: argparse.Namespace) -> int:
    from pyro_mixflow import fit

    kind = MODELS[args.model]
    if args.hidden_dims is not None and kind.hidden_dims is None:
        raise ValueError(f"`--hidden-dims` does not apply to `--model {args.model}`")
    if args.components is not None and kind.components is None:
        raise ValueError(f"`--components` does not apply to `--model {args.model}`")
    if args.out.is_dir():
        raise ValueError(f"`--out` {args.out} is a directory; give a file name")
    rows, columns = read_rows(args.data)
    generator = torch.Generator().manual_seed(args.seed)
    num_val = max(1, round(args.validation * len(rows))) if args.validation else 0
    if num_val >= len(rows):
        raise ValueError(
            f"`--validation {args.validation}` leaves no training rows out of {len(rows)}"
        )
    order = torch.randperm(len(rows), generator=generator)
    train, val = rows[order[num_val:]], rows[order[:num_val]]

    options = {}
    if kind.components is not None:
        options[kind.components] = args.components
    if kind.hidden_dims is not None:
        options[kind.hidden_dims] = None if args.hidden_dims is None else tuple(args.hidden_dims)
    torch.manual_seed(args.seed)
    try:
        model, kwargs = build_model(args.model, rows.shape[1], **options)
    except ValueError as error:
        raise ValueError(f"`--model {args.model}`: {error}") from None
    components = kwargs.get(kind.components) if kind.components else None
    if kind.em_init and components is not None and components > len(train):
        raise ValueError(
            f"`--components` ({components}) is more than the {len(train)} training row(s); "
            "give fewer components or more data"
        )

    start = time.perf_counter()
    if hasattr(model, "init_from_data"):
        model.init_from_data(train, seed=args.seed)
    try:
        history = fit(
            model,
            train,
            steps=args.steps,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            validation=val if num_val else None,
            seed=args.seed,
            progress=not args.no_progress,
        )
    except RuntimeError as error:  # training diverged; fit's message says what to try
        raise _Failed(error) from None
    seconds = time.perf_counter() - start
    model.eval()
    train_ll = _mean_log_prob(model, train)
    val_ll = _mean_log_prob(model, val) if num_val else None
    num_params = sum(p.numel() for p in model.parameters())
    info = {
        "train_rows": len(train),
        "validation_rows": num_val,
        "steps": len(history.train_loss),
        "best_step": history.best_step,
        "train_log_lik": train_ll,
        "validation_log_lik": val_ll,
        "parameters": num_params,
        "seconds": seconds,
    }
    save_model(args.out, model, args.model, kwargs, columns=columns, info=info)
    size = f"{kind.components}={components}, " if components is not None else ""
    results = [f"train log-lik {train_ll:.4f}"]
    if val_ll is None:
        results.append("no validation")
    else:
        results.append(
            f"validation log-lik {val_ll:.4f} ({num_val} rows, best step {history.best_step})"
        )
    results += [f"{info['steps']} steps", f"{seconds:.1f} s"]
    print(
        f"{args.model} ({size}{num_params} parameters) on {len(train)} rows of dimension "
        f"{rows.shape[1]}: {', '.join(results)} -> {args.out}"
    )
    return 0


def _score(args: argparse.Namespace) -> int:
    check_output_suffix(args.out)
    loaded = load_model(args.model)
    rows, columns = read_rows(args.data, dtype=_dtype(loaded.model))
    if rows.shape[1] != loaded.input_dim:
        raise ValueError(
            f"DATA {args.data} has {rows.shape[1]} column(s) but MODEL {args.model} "
            f"({loaded.name}) was fitted to {loaded.input_dim}"
        )
    if columns is not None and loaded.columns is not None and columns != loaded.columns:
        raise ValueError(
            f"DATA {args.data} has columns ({', '.join(columns)}) but MODEL {args.model} was "
            f"fitted to ({', '.join(loaded.columns)}); reorder them, or drop the header"
        )
    chunks = rows.split(CHUNK_ROWS)
    log_prob = []
    with torch.no_grad():
        dist = loaded.model()
        for chunk in _progress(chunks, "score", args.no_progress):
            log_prob.append(dist.log_prob(chunk))
    write_rows(args.out, torch.cat(log_prob).numpy())
    return 0


def _sample(args: argparse.Namespace) -> int:
    check_output_suffix(args.out)
    loaded = load_model(args.model)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    sizes = [CHUNK_ROWS] * (args.num_samples // CHUNK_ROWS)
    sizes += [args.num_samples % CHUNK_ROWS] if args.num_samples % CHUNK_ROWS else []
    draws = []
    with torch.no_grad():
        dist = loaded.model()
        for size in _progress(sizes, "sample", args.no_progress):
            draws.append(dist.sample((size,)).reshape(size, loaded.input_dim))
    write_rows(args.out, torch.cat(draws).numpy(), columns=loaded.columns)
    return 0


@torch.no_grad()
def _mean_log_prob(model: torch.nn.Module, rows: torch.Tensor) -> float:
    dist = model()
    total = sum(dist.log_prob(chunk).double().sum().item() for chunk in rows.split(CHUNK_ROWS))
    return total / len(rows) if math.isfinite(total) else total


def _progress(items: Sequence, desc: str, hide: bool):
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, disable=hide or len(items) < 8, mininterval=0.5)


def _dtype(model: torch.nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1), got {text!r}")
    return value


def _make_model(name: str, input_dim: int):
    from pyro_mixflow.nn import GMM, MixtureFlow

    if name == "gmm":
        return GMM(input_dim, num_components=50)
    return MixtureFlow(input_dim)


def _demo(args: argparse.Namespace) -> int:
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
    try:
        with atomic_write(path) as file:  # no half-written picture after a failure
            fig.savefig(file, dpi=80, format="png")
    finally:
        plt.close(fig)
