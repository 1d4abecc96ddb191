r"""The ``fit``, ``score`` and ``sample`` commands, each a function of the parsed arguments."""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from typing import Any

import torch

from pyro_mixflow.cli.files import check_output_suffix, read_rows, row_location, write_rows
from pyro_mixflow.fitting import split_validation
from pyro_mixflow.io import MODELS, build_model, load_model_file, save_model, stored_arguments

__all__ = ["CHUNK_ROWS", "CommandFailed", "run_fit", "run_sample", "run_score"]

CHUNK_ROWS = 8192  # rows per forward pass of `score`/`sample` (bounded memory, progress bar)


class CommandFailed(Exception):
    """A command that could not finish (training diverged): exit status 1."""


def run_fit(args: argparse.Namespace) -> int:
    r"""``pyro-mixflow fit``: fits model ``args.model`` to the rows of ``args.data``.

    Holds out ``args.validation`` of the rows (:func:`~pyro_mixflow.fitting.split_validation`
    seeded with ``args.seed``), starts the model from the data, trains it with
    :func:`~pyro_mixflow.fit`, prints one summary line and saves it to ``args.out``.

    Args:
        args: The parsed ``fit`` arguments.

    Returns:
        0.

    Raises:
        ValueError: On bad input (one line).
        CommandFailed: If training diverged.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from pyro_mixflow.cli.parsing import build_parser
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     text = "".join(f"{i % 7},{i % 3}\n" for i in range(50))
        ...     _ = Path(f"{folder}/x.csv").write_text(text)
        ...     args = build_parser().parse_args(
        ...         ["fit", f"{folder}/x.csv", "--model", "gmm", "--components", "2"]
        ...         + ["--steps", "2", "--no-progress", "--out", f"{folder}/m.pt"]
        ...     )
        ...     run_fit(args)  # doctest: +ELLIPSIS
        gmm (num_components=2, 10 parameters) on 45 rows of dimension 2: train log-lik ...
        0
    """
    from pyro_mixflow import fit

    kind = MODELS[args.model]
    if args.hidden_dims is not None and kind.hidden_dims is None:
        raise ValueError(f"`--hidden-dims` does not apply to `--model {args.model}`")
    if args.components is not None and kind.components is None:
        raise ValueError(f"`--components` does not apply to `--model {args.model}`")
    if args.out.is_dir():
        raise ValueError(f"`--out` {args.out} is a directory; give a file name")
    rows, columns = read_rows(args.data)
    train, val = rows, None
    if args.validation:
        generator = torch.Generator().manual_seed(args.seed)
        try:
            train, val = split_validation(rows, args.validation, generator=generator)
        except ValueError:  # the only one possible here: no rows left to train on
            raise ValueError(
                f"`--validation {args.validation}` leaves no training rows out of {len(rows)}"
            ) from None
    num_val = 0 if val is None else len(val)

    options: dict[str, Any] = {}
    if kind.components is not None:
        options[kind.components] = args.components
    if kind.hidden_dims is not None:
        options[kind.hidden_dims] = None if args.hidden_dims is None else tuple(args.hidden_dims)
    torch.manual_seed(args.seed)
    try:
        model = build_model(args.model, rows.shape[1], **options)
    except ValueError as error:
        raise ValueError(f"`--model {args.model}`: {error}") from None
    kwargs = stored_arguments(model)
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
            validation=val,
            seed=args.seed,
            threads=args.threads or 1,
            progress=not args.no_progress,
        )
    except RuntimeError as error:  # training diverged; fit's message says what to try
        raise CommandFailed(error) from None
    seconds = time.perf_counter() - start
    model.eval()
    train_ll = _mean_log_prob(model, train)
    val_ll = None if val is None else _mean_log_prob(model, val)
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
    save_model(model, args.out, columns=columns, info=info)
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


def run_score(args: argparse.Namespace) -> int:
    r"""``pyro-mixflow score``: writes the log-density of each row of ``args.data``.

    One number per data row, in order, to stdout or ``args.out``. A row whose log-density is
    not finite (too far from the data the model was fitted to for its float arithmetic) is an
    error that names it, never a silent ``nan``; so is a blank line between data rows, which
    would shift the output rows against the data's lines.

    Args:
        args: The parsed ``score`` arguments.

    Returns:
        0.

    Raises:
        ValueError: On bad input (one line).

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from pyro_mixflow.cli.parsing import build_parser
        >>> from pyro_mixflow.io import save_model
        >>> from pyro_mixflow.nn import GMM
        >>> model = GMM(1, 1)  # a standard normal, once its mean is 0
        >>> with torch.no_grad():
        ...     _ = model.locs.zero_()
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     save_model(model, f"{folder}/m.pt")
        ...     _ = Path(f"{folder}/x.csv").write_text("0.5\n-1\n")
        ...     run_score(build_parser().parse_args(["score", f"{folder}/m.pt", f"{folder}/x.csv"]))
        -1.04393852
        -1.41893852
        0
    """
    check_output_suffix(args.out)
    loaded = load_model_file(args.model)
    rows, columns = read_rows(args.data, dtype=_dtype(loaded.model), skip_blank_lines=False)
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
    scores = torch.cat(log_prob)
    bad = (~torch.isfinite(scores)).nonzero().flatten()
    if len(bad):
        first = int(bad[0])
        raise ValueError(
            f"DATA {args.data} has {len(bad)} row(s) whose log-density under MODEL "
            f"{args.model} is not finite (first: {row_location(args.data, first)}, "
            f"{scores[first].item()}); they are too far from the data it was fitted to: check "
            "their units, or remove them"
        )
    write_rows(args.out, scores.numpy())
    return 0


def run_sample(args: argparse.Namespace) -> int:
    r"""``pyro-mixflow sample``: draws ``args.num_samples`` rows from the model ``args.model``.

    Rows go to stdout or ``args.out``, with the training data's header if it had one.

    Args:
        args: The parsed ``sample`` arguments.

    Returns:
        0.

    Raises:
        ValueError: On bad input (one line).

    Example:
        >>> import tempfile
        >>> from pyro_mixflow.cli.parsing import build_parser
        >>> from pyro_mixflow.io import save_model
        >>> from pyro_mixflow.nn import GMM
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     save_model(GMM(2, 2), f"{folder}/m.pt", columns=("a", "b"))
        ...     args = build_parser().parse_args(["sample", f"{folder}/m.pt", "-n", "2"])
        ...     run_sample(args)  # doctest: +ELLIPSIS
        a,b
        ...,...
        ...,...
        0
    """
    check_output_suffix(args.out)
    loaded = load_model_file(args.model)
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


def _progress(items: Sequence, desc: str, hide: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, disable=hide or len(items) < 8, mininterval=0.5)


def _dtype(model: torch.nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
