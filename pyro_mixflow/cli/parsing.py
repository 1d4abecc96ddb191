r"""The arguments of the command line: its ``argparse`` parser and argument types."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn, TypeVar

from pyro_mixflow.cli.commands import INIT_ROWS, run_fit, run_sample, run_score
from pyro_mixflow.cli.demo import DEMO_DATASETS, DEMO_MODELS, run_demo
from pyro_mixflow.io import MODELS

__all__ = ["EPILOG", "THREADS_HELP", "build_parser", "fraction", "positive_float", "positive_int"]

T = TypeVar("T")

THREADS_HELP = "CPU threads for torch (default: 1 while training, torch's choice otherwise)"

EPILOG = """\
examples:
  pyro-mixflow demo
  pyro-mixflow fit data.csv --model flow --out flow.pt
  pyro-mixflow score flow.pt data.csv --out log_density.csv
  pyro-mixflow sample flow.pt -n 1000 --seed 0 --out draws.csv

DATA is comma-separated text (an optional header row of names, one row per observation) or a
.npy array of shape (N, D) or (N,); `fit` memory-maps a .npy file, which may be larger than
memory. Errors are reported on one line with exit status 2
(1 if training diverges, 130 on Ctrl-C); output files are written atomically.
"""


def build_parser() -> argparse.ArgumentParser:
    """Builds the ``pyro-mixflow`` parser; each command sets ``run``, its function of ``args``.

    Usage errors exit with status 2 after one line on stderr (``prog: error: ...``).

    Returns:
        The parser.

    Example:
        >>> args = build_parser().parse_args(["sample", "m.pt", "-n", "5"])
        >>> args.command, args.num_samples, args.run.__name__
        ('sample', 5, 'run_sample')
    """
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


def positive_int(text: str) -> int:
    """An ``argparse`` type: an integer >= 1.

    Args:
        text: The argument.

    Returns:
        Its value.

    Raises:
        argparse.ArgumentTypeError: If it is not a positive integer.

    Example:
        >>> positive_int("3")
        3
    """
    return _argument(text, int, lambda value: value >= 1, "a positive integer")


def positive_float(text: str) -> float:
    """An ``argparse`` type: a finite number > 0.

    Args:
        text: The argument.

    Returns:
        Its value.

    Raises:
        argparse.ArgumentTypeError: If it is not a finite positive number.

    Example:
        >>> positive_float("1e-3")
        0.001
    """
    return _argument(
        text, float, lambda value: math.isfinite(value) and value > 0, "a positive number"
    )


def fraction(text: str) -> float:
    """An ``argparse`` type: a number in ``[0, 1)``.

    Args:
        text: The argument.

    Returns:
        Its value.

    Raises:
        argparse.ArgumentTypeError: If it is not in ``[0, 1)``.

    Example:
        >>> fraction("0.1")
        0.1
    """
    return _argument(text, float, lambda value: 0 <= value < 1, "a fraction in [0, 1)")


def _argument(
    text: str, convert: Callable[[str], T], valid: Callable[[T], bool], expected: str
) -> T:
    """``convert(text)`` if it parses and is ``valid``, else an ``ArgumentTypeError``."""
    try:
        value = convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not valid(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


class _Parser(argparse.ArgumentParser):
    """``argparse`` with usage errors on one line (``prog: error: ...``), no usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _add_demo(commands: argparse._SubParsersAction) -> None:
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
    demo.add_argument("--threads", type=positive_int, metavar="T", help=THREADS_HELP)
    demo.add_argument("--no-progress", action="store_true", help="hide progress bars")
    demo.set_defaults(run=run_demo)


def _add_fit(commands: argparse._SubParsersAction) -> None:
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
    fit.add_argument(
        "data",
        type=Path,
        metavar="DATA",
        help="CSV (optional header) or .npy (memory-mapped: read batch by batch, the model "
        f"started from at most {INIT_ROWS} random training rows)",
    )
    fit.add_argument("--model", required=True, choices=list(MODELS), help="model to fit")
    fit.add_argument(
        "--components",
        type=positive_int,
        metavar="K",
        help="mixture components, or pieces per fold for rad (default: the model's: gmm 50, "
        "flow 50, cwm 50, rad 2)",
    )
    fit.add_argument(
        "--hidden-dims",
        type=positive_int,
        nargs="+",
        metavar="W",
        help=f"hidden layer widths of the networks ({with_hidden}; default: the model's)",
    )
    length = fit.add_mutually_exclusive_group()
    length.add_argument("--steps", type=positive_int, metavar="N", help="Adam steps (1000)")
    length.add_argument("--epochs", type=positive_int, metavar="E", help="passes over DATA")
    fit.add_argument(
        "--batch-size", type=positive_int, default=512, metavar="B", help="rows per step (512)"
    )
    fit.add_argument("--lr", type=positive_float, default=1e-3, help="peak learning rate (1e-3)")
    fit.add_argument(
        "--validation",
        type=fraction,
        default=0.1,
        metavar="F",
        help="fraction of rows held out to pick the best state (0.1; 0 for none)",
    )
    fit.add_argument(
        "--context-columns",
        metavar="COLS",
        help="comma-separated columns of DATA (header names or 0-based positions) that "
        "condition the model: it learns p(other columns | these)",
    )
    fit.add_argument("--seed", type=int, default=0, help="seed of everything random (0)")
    fit.add_argument("--threads", type=positive_int, metavar="T", help=THREADS_HELP)
    fit.add_argument(
        "--device",
        metavar="DEV",
        help="torch device to train on, such as cuda or cuda:1 (default: cpu); the model is "
        "scored and saved on the CPU",
    )
    fit.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    fit.add_argument("--out", type=Path, required=True, metavar="MODEL", help="model file")
    fit.set_defaults(run=run_fit)


def _add_score(commands: argparse._SubParsersAction) -> None:
    score = commands.add_parser(
        "score",
        help="log-density of each row of DATA under MODEL",
        description="Writes log p(x) of each row of DATA under MODEL (natural log), one number "
        "per line in the order of the rows, to stdout or to --out (.csv or .npy). For a model "
        "fitted with --context-columns, DATA has the training file's columns and the score is "
        "log p(x | context).",
    )
    score.add_argument("model", type=Path, metavar="MODEL", help="a file from `fit`")
    score.add_argument("data", type=Path, metavar="DATA", help="CSV (optional header) or .npy")
    score.add_argument("--out", type=Path, metavar="FILE", help=".csv or .npy (default: stdout)")
    score.add_argument("--threads", type=positive_int, metavar="T", help=THREADS_HELP)
    score.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    score.set_defaults(run=run_score)


def _add_sample(commands: argparse._SubParsersAction) -> None:
    sample = commands.add_parser(
        "sample",
        help="draw N rows from MODEL",
        description="Draws N independent rows from MODEL, to stdout or to --out (.csv or "
        ".npy); CSV output has the training data's header row if it had one.",
    )
    sample.add_argument("model", type=Path, metavar="MODEL", help="a file from `fit`")
    sample.add_argument(
        "-n", "--num-samples", type=positive_int, required=True, metavar="N", help="rows to draw"
    )
    sample.add_argument(
        "--context",
        type=Path,
        metavar="FILE",
        help="rows of context values (CSV or .npy) for a conditional model: N draws per row",
    )
    sample.add_argument("--seed", type=int, help="seed (default: fresh randomness)")
    sample.add_argument("--out", type=Path, metavar="FILE", help=".csv or .npy (default: stdout)")
    sample.add_argument("--threads", type=positive_int, metavar="T", help=THREADS_HELP)
    sample.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    sample.set_defaults(run=run_sample)
