r"""The ``fit``, ``score`` and ``sample`` commands, each a function of the parsed arguments."""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from pyro_mixflow.cli.files import (
    check_output_suffix,
    map_rows,
    read_rows,
    row_location,
    write_rows,
)
from pyro_mixflow.fitting import Pairs, split_validation
from pyro_mixflow.io import MODELS, build_model, load_model_file, save_model, stored_arguments

__all__ = [
    "CHUNK_ROWS",
    "INIT_ROWS",
    "CommandFailed",
    "context_positions",
    "run_fit",
    "run_sample",
    "run_score",
]

CHUNK_ROWS = 8192  # rows per forward pass of `score`/`sample` (bounded memory, progress bar)
INIT_ROWS = 100_000  # the most training rows of a memory-mapped DATA that start a model


class CommandFailed(Exception):
    """A command that could not finish (training diverged): exit status 1."""


def run_fit(args: argparse.Namespace) -> int:
    r"""``pyro-mixflow fit``: fits model ``args.model`` to the rows of ``args.data``.

    Holds out ``args.validation`` of the rows (:func:`~pyro_mixflow.fitting.split_validation`
    seeded with ``args.seed``), starts the model from the data, trains it with
    :func:`~pyro_mixflow.fit`, prints one summary line and saves it to ``args.out``.

    A ``.npy`` DATA is memory-mapped (:func:`~pyro_mixflow.cli.files.map_rows`), so a file
    larger than memory trains: the model starts from at most ``INIT_ROWS`` training rows drawn
    at random (all of them if there are fewer), :func:`~pyro_mixflow.fit` reads the rows batch
    by batch and holds out the same rows by index, and the summary's log-likelihoods are
    computed chunk by chunk.

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
    device = _device(args.device)
    mapped = args.data.suffix.lower() == ".npy"
    rows, columns = (map_rows(args.data), None) if mapped else read_rows(args.data)
    positions = context_positions(args.context_columns, rows.shape[1], columns)
    hidden = kind.hidden_dims or (kind.context_hidden_dims if positions else None)
    if args.hidden_dims is not None and hidden is None:
        without = " without `--context-columns`" if kind.context_hidden_dims else ""
        raise ValueError(f"`--hidden-dims` does not apply to `--model {args.model}`{without}")
    if args.components is not None and kind.components is None:
        raise ValueError(f"`--components` does not apply to `--model {args.model}`")
    if args.out.is_dir():
        raise ValueError(f"`--out` {args.out} is a directory; give a file name")
    pairs = _MappedRows(rows, positions) if mapped else _split_table(rows, positions)
    train, val = pairs, None
    if args.validation:
        generator = torch.Generator().manual_seed(args.seed)
        try:
            # int32 indices: half the memory for a large memory-mapped DATA, the same rows
            positions_dtype = torch.int32 if mapped and len(rows) < 2**31 else torch.int64
            index, val_index = split_validation(
                torch.arange(len(rows), dtype=positions_dtype), args.validation, generator=generator
            )
        except ValueError:  # the only one possible here: no rows left to train on
            raise ValueError(
                f"`--validation {args.validation}` leaves no training rows out of {len(rows)}"
            ) from None
        train, val = (
            (pairs.subset(index), pairs.subset(val_index))
            if mapped
            else (pairs.take(index), pairs.take(val_index))
        )
    num_val = 0 if val is None else len(val)
    dim = rows.shape[1] - len(positions)

    options: dict[str, Any] = {}
    if kind.components is not None:
        options[kind.components] = args.components
    if hidden is not None:
        options[hidden] = None if args.hidden_dims is None else tuple(args.hidden_dims)
    options["context_dim"] = len(positions) or None
    torch.manual_seed(args.seed)
    try:
        model = build_model(args.model, dim, **options)
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
        first = train
        if mapped:  # a random subsample, read from the file
            chosen = torch.arange(len(train))
            if len(train) > INIT_ROWS:
                generator = torch.Generator().manual_seed(args.seed)
                chosen = torch.randperm(len(train), generator=generator, dtype=torch.int32)
                chosen = chosen[:INIT_ROWS].sort()[0]
            first = train.take(chosen)
        if first.context is None:
            model.init_from_data(first.rows, seed=args.seed)
        else:
            model.init_from_data(first.rows, first.context, seed=args.seed)
    if mapped:  # fit holds out the same rows (split_validation seeded alike), by index
        data, context = rows if not positions else pairs, None
        validation, validation_context = args.validation or None, None
    else:
        data, context = train.rows, train.context
        validation = None if val is None else val.rows
        validation_context = None if val is None else val.context
    try:
        history = fit(
            model,
            data,
            context=context,
            steps=args.steps,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            validation=validation,
            validation_context=validation_context,
            seed=args.seed,
            threads=args.threads or 1,
            progress=not args.no_progress,
            device=device,
        )
    except RuntimeError as error:  # training diverged; fit's message says what to try
        raise CommandFailed(error) from None
    seconds = time.perf_counter() - start
    model.cpu().eval()
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
    if positions:
        info["context_columns"] = positions
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
    given = f" given {len(positions)} context column(s)" if positions else ""
    print(
        f"{args.model} ({size}{num_params} parameters) on {len(train)} rows of dimension "
        f"{dim}{given}: {', '.join(results)} -> {args.out}"
    )
    return 0


def _device(name: str | None) -> torch.device | None:
    """The device of ``--device`` (``None`` when not given), or a ``ValueError`` saying why not."""
    if name is None:
        return None
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(
            f"`--device {name}` is not a torch device (such as cpu, cuda, cuda:1 or mps)"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"`--device {name}`: CUDA is not available on this machine")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"`--device {name}`: MPS is not available on this machine")
    return device


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
    positions = tuple(loaded.info.get("context_columns") or ())
    if rows.shape[1] != loaded.input_dim + len(positions):
        given = f" and {len(positions)} context column(s)" if positions else ""
        raise ValueError(
            f"DATA {args.data} has {rows.shape[1]} column(s) but MODEL {args.model} "
            f"({loaded.name}) was fitted to {loaded.input_dim}{given}"
        )
    if columns is not None and loaded.columns is not None and columns != loaded.columns:
        raise ValueError(
            f"DATA {args.data} has columns ({', '.join(columns)}) but MODEL {args.model} was "
            f"fitted to ({', '.join(loaded.columns)}); reorder them, or drop the header"
        )
    pairs = _split_table(rows, positions)
    chunks = [pairs.take(slice(i, i + CHUNK_ROWS)) for i in range(0, len(pairs), CHUNK_ROWS)]
    log_prob = []
    with torch.no_grad():
        for chunk in _progress(chunks, "score", args.no_progress):
            log_prob.append(chunk.distribution(loaded.model).log_prob(chunk.rows))
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
    positions = tuple(loaded.info.get("context_columns") or ())
    if positions or args.context is not None:
        return _sample_given_context(args, loaded, positions)
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


def context_positions(
    spec: str | None, num_columns: int, columns: tuple[str, ...] | None
) -> tuple[int, ...]:
    """The 0-based positions of ``--context-columns`` (names of the header, or positions).

    Args:
        spec: Comma-separated column names (with a header) or 0-based positions; ``None``
            for none.
        num_columns: The number of columns of DATA.
        columns: DATA's header, or ``None``.

    Returns:
        The positions, in the order given (empty for ``None``).

    Raises:
        ValueError: An unknown name, a position out of range, a repeat, or every column.

    Example:
        >>> context_positions("c,a", 3, ("a", "b", "c")), context_positions("1", 2, None)
        ((2, 0), (1,))
    """
    if spec is None:
        return ()
    positions = []
    for item in (part.strip() for part in spec.split(",")):
        if columns is not None and item in columns:
            positions.append(columns.index(item))
        elif item.isdigit() and int(item) < num_columns:
            positions.append(int(item))
        else:
            known = f"the header's names ({', '.join(columns)}) or " if columns else ""
            raise ValueError(
                f"`--context-columns`: {item!r} is not one of {known}the positions 0 to "
                f"{num_columns - 1}"
            )
    if len(set(positions)) != len(positions):
        raise ValueError(f"`--context-columns` {spec!r} names a column twice")
    if len(positions) == num_columns:
        raise ValueError(f"`--context-columns` {spec!r} leaves no data columns to model")
    return tuple(positions)


def _split_table(table: torch.Tensor, positions: tuple[int, ...]) -> Pairs:
    """The columns at ``positions`` of ``table`` as context rows, the others as data rows."""
    if not positions:
        return Pairs(table)
    rest = [i for i in range(table.shape[1]) if i not in positions]
    return Pairs(table[:, rest], table[:, list(positions)])


def _sample_given_context(args: argparse.Namespace, loaded: Any, positions: tuple[int, ...]) -> int:
    """``sample`` of a conditional model: ``-n`` draws per row of ``--context``.

    The rows are written in the training data's layout, the context columns where they were.
    """
    if not positions:
        raise ValueError(f"`--context` applies to conditional models; MODEL {args.model} is not")
    if args.context is None:
        raise ValueError(
            f"MODEL {args.model} is conditional ({len(positions)} context column(s)): give "
            "`--context FILE`, rows of context values to draw for"
        )
    context, _ = read_rows(args.context, label="CONTEXT", dtype=_dtype(loaded.model))
    if context.shape[1] != len(positions):
        raise ValueError(
            f"CONTEXT {args.context} has {context.shape[1]} column(s) but MODEL {args.model} "
            f"takes {len(positions)}"
        )
    if args.seed is not None:
        torch.manual_seed(args.seed)
    num, dim = args.num_samples, loaded.input_dim
    rest = [i for i in range(dim + len(positions)) if i not in positions]
    per_chunk = max(1, CHUNK_ROWS // num)
    chunks = context.split(per_chunk)
    out = []
    with torch.no_grad():
        for chunk in _progress(chunks, "sample", args.no_progress):
            draws = loaded.model(chunk).sample((num,)).transpose(0, 1)  # [M, n, D]
            table = draws.new_empty(len(chunk), num, dim + len(positions))
            table[..., rest] = draws
            table[..., list(positions)] = chunk.unsqueeze(1)
            out.append(table.reshape(-1, dim + len(positions)))
    write_rows(args.out, torch.cat(out).numpy(), columns=loaded.columns)
    return 0


class _MappedRows(Dataset):
    """Rows of a memory-mapped table at ``index`` (all if ``None``), read on demand.

    The columns at ``positions`` are context rows. Items are rows, or ``(row, context)`` pairs.
    """

    def __init__(
        self, table: np.ndarray, positions: tuple[int, ...], index: torch.Tensor | None = None
    ) -> None:
        self.table, self.positions, self.index = table, positions, index

    def __len__(self) -> int:
        return len(self.table) if self.index is None else len(self.index)

    def subset(self, index: torch.Tensor) -> _MappedRows:
        return _MappedRows(self.table, self.positions, self._source(index))

    def take(self, index: torch.Tensor | slice) -> Pairs:
        """The rows at ``index``, read in the file's order, returned in the order asked."""
        source = self._source(index)
        ordered, order = torch.sort(source)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(len(order))
        values = torch.from_numpy(np.array(self.table[ordered.numpy()], dtype=np.float32))
        return _split_table(values[inverse], self.positions)

    def __getitem__(self, i: int) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: list[int]) -> list[Any]:
        pairs = self.take(torch.tensor(indices, dtype=torch.long))
        if pairs.context is None:
            return list(pairs.rows)
        return list(zip(pairs.rows, pairs.context, strict=True))

    def _source(self, index: torch.Tensor | slice) -> torch.Tensor:
        if self.index is not None:
            return self.index[index]
        if isinstance(index, slice):
            return torch.arange(*index.indices(len(self)))
        return index


@torch.no_grad()
def _mean_log_prob(model: torch.nn.Module, pairs: Pairs | _MappedRows) -> float:
    chunks = (pairs.take(slice(i, i + CHUNK_ROWS)) for i in range(0, len(pairs), CHUNK_ROWS))
    total = sum(  # one chunk in memory at a time
        chunk.distribution(model).log_prob(chunk.rows).double().sum().item() for chunk in chunks
    )
    return total / len(pairs) if math.isfinite(total) else total


def _progress(items: Sequence, desc: str, hide: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, disable=hide or len(items) < 8, mininterval=0.5)


def _dtype(model: torch.nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
