r"""Files of the command line: data rows (CSV, ``.npy``), model files and atomic writes."""

from __future__ import annotations

import contextlib
import csv
import inspect
import os
import pickle
import sys
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from torch import nn

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MODELS",
    "LoadedModel",
    "ModelKind",
    "atomic_write",
    "build_model",
    "check_output_suffix",
    "load_model",
    "read_rows",
    "save_model",
    "write_rows",
]

FORMAT = "pyro-mixflow-model"
FORMAT_VERSION = 1
OUTPUT_SUFFIXES = (".csv", ".npy")


@dataclass(frozen=True)
class ModelKind:
    """How the command line builds one kind of trainable model of :mod:`pyro_mixflow.nn`.

    Attributes:
        class_name: The class in :mod:`pyro_mixflow.nn`, called as ``cls(input_dim, **kwargs)``.
        summary: One line for ``--help``.
        components: The constructor argument that ``--components`` sets (``None``: none).
        hidden_dims: The constructor argument that ``--hidden-dims`` sets (``None``: none).
        em_init: Whether ``init_from_data`` fits ``components`` mixture components by EM
            (which needs at least as many training rows).
        added_kwargs: Constructor arguments added after model files were first written, with
            the value that reproduces the older architecture: a file that lacks one is read
            with that value, not with today's default.
    """

    class_name: str
    summary: str
    components: str | None = "num_components"
    hidden_dims: str | None = None
    em_init: bool = True
    added_kwargs: tuple[tuple[str, Any], ...] = ()

    def resolve(self) -> type[nn.Module]:
        """Returns the model class (imports :mod:`pyro_mixflow.nn` on first use)."""
        from pyro_mixflow import nn as models

        return getattr(models, self.class_name)


# Adding a model to the command line is one entry here (its class needs ``init_from_data`` or
# must train from its constructor's initialization).
MODELS: dict[str, ModelKind] = {
    "gmm": ModelKind("GMM", "mixture of diagonal Gaussians (nn.GMM)"),
    "flow": ModelKind(
        "MixtureFlow",
        "spline flow over a Gaussian-mixture base (nn.MixtureFlow)",
        hidden_dims="hidden_dims",
    ),
    "cwm": ModelKind("CWM", "classifier weighted mixture (nn.CWM)", hidden_dims="hidden_dims"),
    "rad": ModelKind(
        "RAD",
        "real-and-discrete flow; --components sets its pieces per fold (nn.RAD)",
        components="num_pieces",
        hidden_dims="hidden_dims",
        em_init=False,
        added_kwargs=(("network", "mlp"),),  # files from before `network`: plain MLPs
    ),
}


def build_model(name: str, input_dim: int, **options: Any) -> tuple[nn.Module, dict[str, Any]]:
    """Builds model ``name`` of :data:`MODELS` and returns it with its full configuration.

    The configuration holds every constructor argument whose value is plain (numbers, strings,
    tuples of them), the defaults included, so that a saved model reloads with the same
    architecture even if a later version changes a default.

    Args:
        name: A key of :data:`MODELS`.
        input_dim: Dimension of a data row.
        **options: Constructor arguments (``None`` values mean "the class default"), plain
            values only (numbers, strings, tuples of them): a model file must hold them.

    Returns:
        ``(model, kwargs)`` with ``type(model)(**kwargs)`` rebuilding the architecture.

    Example:
        >>> model, kwargs = build_model("gmm", 2, num_components=3)
        >>> kwargs["input_dim"], kwargs["num_components"], kwargs["estimator"]
        (2, 3, 'exact')
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    cls = MODELS[name].resolve()
    given = {"input_dim": input_dim, **{k: v for k, v in options.items() if v is not None}}
    for key, value in given.items():
        if not _is_plain(value):
            raise TypeError(f"`{key}` ({value!r}) is not a plain value a model file can hold")
    kwargs = {}
    for parameter in inspect.signature(cls).parameters.values():
        value = given.get(parameter.name, parameter.default)
        if value is not inspect.Parameter.empty and _is_plain(value):
            kwargs[parameter.name] = tuple(value) if isinstance(value, list) else value
    return cls(**given), kwargs


@dataclass
class LoadedModel:
    """A model read back by :func:`load_model`.

    Attributes:
        model: The module, in eval mode, with its saved parameters.
        name: Its key in :data:`MODELS`.
        kwargs: Its constructor arguments.
        columns: Column names of the training data, or ``None`` (no header).
        info: What ``fit`` recorded (rows, steps, log-likelihoods, seconds, version).
    """

    model: nn.Module
    name: str
    kwargs: dict[str, Any]
    columns: tuple[str, ...] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def input_dim(self) -> int:
        """Dimension of a data row."""
        return int(self.kwargs["input_dim"])


def save_model(
    path: str | Path,
    model: nn.Module,
    name: str,
    kwargs: dict[str, Any],
    *,
    columns: tuple[str, ...] | None = None,
    info: dict[str, Any] | None = None,
) -> None:
    """Writes a model file atomically: a ``torch.save`` of plain values and tensors only.

    The file holds ``{"format", "format_version", "pyro_mixflow_version", "model", "kwargs",
    "columns", "info", "state_dict"}``, readable with ``torch.load(weights_only=True)``.

    Args:
        path: Output file.
        model: The trained module.
        name: Its key in :data:`MODELS`.
        kwargs: Its constructor arguments (plain values, from :func:`build_model`).
        columns: Column names of the training data.
        info: Plain values to record (training summary).

    Example:
        >>> import tempfile
        >>> model, kwargs = build_model("gmm", 2, num_components=3)
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     save_model(f"{folder}/gmm.pt", model, "gmm", kwargs)
        ...     loaded = load_model(f"{folder}/gmm.pt")
        >>> x = torch.randn(4, 2)
        >>> torch.equal(loaded.model().log_prob(x), model().log_prob(x))
        True
    """
    from pyro_mixflow import __version__

    for key, value in {**kwargs, **(info or {})}.items():
        if not _is_plain(value):
            raise TypeError(f"`{key}` ({value!r}) is not a plain value a model file can hold")
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "pyro_mixflow_version": __version__,
        "model": name,
        "kwargs": dict(kwargs),
        "columns": None if columns is None else tuple(columns),
        "info": dict(info or {}),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    with atomic_write(path) as file:
        torch.save(payload, file)


def load_model(path: str | Path) -> LoadedModel:
    """Reads a model file written by :func:`save_model`, safely (no arbitrary unpickling).

    Args:
        path: The model file.

    Returns:
        The :class:`LoadedModel`, on the CPU, in eval mode.

    Raises:
        ValueError: One line saying what is wrong: missing, not a torch file, a pickle of
            arbitrary objects (refused), another kind of torch file, a newer format, or a
            configuration that does not match the parameters.

    Example:
        >>> import tempfile
        >>> model, kwargs = build_model("cwm", 1, num_components=2, hidden_dims=(4,))
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     save_model(f"{folder}/m.pt", model, "cwm", kwargs)
        ...     loaded = load_model(f"{folder}/m.pt")
        >>> loaded.name, loaded.kwargs["hidden_dims"], loaded.input_dim
        ('cwm', (4,), 1)
    """
    path = Path(path)
    if not path.is_file():
        what = "is a directory, not" if path.is_dir() else "does not exist; expected"
        raise ValueError(f"MODEL {path} {what} a model file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(
            f"MODEL {path} holds Python objects that a safe load refuses to run; it was not "
            "written by `pyro-mixflow fit` (only load pickles you trust, in Python)"
        ) from None
    except Exception as error:
        detail = f" ({type(error).__name__})" if not str(error).strip() else ""
        raise ValueError(
            f"MODEL {path} is not a readable PyTorch file{detail}; is it a model written by "
            "`pyro-mixflow fit`?"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(
            f"MODEL {path} is a PyTorch file but not a pyro-mixflow model (no "
            f"{FORMAT!r} tag); write one with `pyro-mixflow fit`"
        )
    version = payload.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"MODEL {path} has format version {version!r}, newer than this pyro-mixflow reads "
            f"({FORMAT_VERSION}); upgrade pyro-mixflow"
        )
    name, kwargs = payload.get("model"), payload.get("kwargs")
    if name not in MODELS:
        raise ValueError(
            f"MODEL {path} holds model {name!r}, which this pyro-mixflow does not know "
            f"({', '.join(MODELS)})"
        )
    state_dict = payload.get("state_dict")
    if not isinstance(kwargs, dict) or not isinstance(state_dict, dict):
        raise ValueError(f"MODEL {path} is damaged: no configuration or no parameters")
    kwargs = {**dict(MODELS[name].added_kwargs), **kwargs}  # files from before an argument
    try:
        with torch.random.fork_rng():  # constructors draw initial values: keep the caller's RNG
            model = MODELS[name].resolve()(**kwargs)
        model.load_state_dict(state_dict)
    except (TypeError, ValueError, RuntimeError, KeyError) as error:
        first = " ".join(str(error).split())[:300]
        raise ValueError(
            f"MODEL {path}: its parameters do not fit model {name!r} with its saved "
            f"configuration ({first})"
        ) from None
    model.eval()
    columns = payload.get("columns")
    return LoadedModel(
        model,
        name,
        dict(kwargs),
        None if columns is None else tuple(columns),
        dict(payload.get("info") or {}),
    )


def read_rows(
    path: str | Path, *, label: str = "DATA", dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, tuple[str, ...] | None]:
    r"""Reads a table of numbers: a ``.npy`` array, or CSV text with an optional header row.

    A header is a first row in which no field is a number. Blank lines are skipped. Every
    problem is a ``ValueError`` of one line that names the file and the line (text) or row
    index (``.npy``).

    Args:
        path: The file; ``.npy`` by extension, comma-separated text otherwise.
        label: How messages name the file's role (``DATA``).
        dtype: The dtype of the returned rows; values beyond its range are an error.

    Returns:
        ``(rows (N, D), column names or None)``; a 1-D ``.npy`` array gives ``D = 1``.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     _ = Path(f"{folder}/x.csv").write_text("a, b\n1, 2\n\n3, 4.5\n")
        ...     rows, columns = read_rows(f"{folder}/x.csv")
        >>> rows, columns
        (tensor([[1.0000, 2.0000],
                [3.0000, 4.5000]]), ('a', 'b'))
    """
    path = Path(path)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise ValueError(f"{label} {path} {what}")
    if path.suffix.lower() == ".npy":
        values, columns = _read_npy(path, label), None
        where = _index_of
    else:
        fast = _read_text_fast(path)
        values, columns = fast if fast is not None else _read_text(path, label)[:2]

        def where(i: int) -> str:  # only for an error message: parse again for line numbers
            return f"line {_read_text(path, label)[2][i]}"

    bad = np.flatnonzero(~np.isfinite(values).all(axis=1))
    if len(bad):
        raise ValueError(
            f"{label} {path} has {len(bad)} row(s) with NaN or infinite values (first: "
            f"{where(int(bad[0]))}); remove or impute them"
        )
    rows = torch.from_numpy(values).to(dtype)
    dtype_name = str(dtype).removeprefix("torch.")
    bad = (~torch.isfinite(rows).all(dim=1)).nonzero().flatten()
    if len(bad):
        raise ValueError(
            f"{label} {path} has {len(bad)} row(s) with values beyond the {dtype_name} range "
            f"(first: {where(int(bad[0]))}); rescale the data"
        )
    return rows, columns


def check_output_suffix(path: str | Path | None, option: str = "--out") -> None:
    """Raises ``ValueError`` unless ``path`` is ``None`` (stdout) or ends in ``.csv``/``.npy``.

    Example:
        >>> check_output_suffix("scores.npy")
    """
    if path is not None and Path(path).suffix.lower() not in OUTPUT_SUFFIXES:
        raise ValueError(f"`{option}` must end in .csv or .npy, got {path}")


def write_rows(
    path: str | Path | None, values: np.ndarray, *, columns: tuple[str, ...] | None = None
) -> None:
    """Writes numbers to stdout (``path=None``) or atomically to a ``.csv`` or ``.npy`` file.

    Text has one row per line, comma-separated, with enough digits to read the values back
    exactly (9 significant digits for float32, 17 for float64), and a header if ``columns``.

    Example:
        >>> write_rows(None, np.array([0.5, -1.25], dtype=np.float32))
        0.5
        -1.25
    """
    check_output_suffix(path)
    digits = 9 if values.dtype == np.float32 else 17
    header = "" if columns is None else ",".join(columns)
    options = {"fmt": f"%.{digits}g", "delimiter": ",", "header": header, "comments": ""}
    if path is None:
        np.savetxt(sys.stdout, values, **options)
    elif Path(path).suffix.lower() == ".npy":
        with atomic_write(path) as file:
            np.save(file, values)
    else:
        with atomic_write(path, text=True) as file:
            np.savetxt(file, values, **options)


@contextlib.contextmanager
def atomic_write(path: str | Path, *, text: bool = False) -> Iterator[IO[Any]]:
    """Opens a temporary file beside ``path``; on success renames it to ``path``.

    On any exception, Ctrl-C included, the temporary file is removed and ``path`` keeps its
    previous content (or stays absent). Missing parent folders are created. The file gets the
    permissions of a normal new file (``0o666`` minus the umask).

    Args:
        path: Final path.
        text: Open in text mode (UTF-8, ``newline=""``) instead of binary.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     with atomic_write(f"{folder}/a.txt", text=True) as file:
        ...         _ = file.write("done")
        ...     print(Path(f"{folder}/a.txt").read_text(), sorted(os.listdir(folder)))
        done ['a.txt']
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"output {path} is a directory")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(
            prefix=f".{path.name}.", suffix=".tmp", dir=path.parent
        )
    except OSError as error:
        raise ValueError(f"cannot write {path}: {error.strerror or error}") from None
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        mode = {"mode": "w", "encoding": "utf-8", "newline": ""} if text else {"mode": "wb"}
        with os.fdopen(handle, **mode) as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def _is_plain(value: Any) -> bool:
    """Whether ``torch.load(weights_only=True)`` reads ``value`` back as it was."""
    if value is None or isinstance(value, bool | int | float | str):
        return True
    if isinstance(value, tuple | list):
        return all(_is_plain(v) for v in value)
    return False


def _index_of(i: int) -> str:
    return f"index {i}"


def _read_npy(path: Path, label: str) -> np.ndarray:
    with open(path, "rb") as file:
        is_npy = file.read(6) == b"\x93NUMPY"
    try:
        if not is_npy:
            raise ValueError("no .npy header")
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        reason = "it holds Python objects" if "Object arrays" in str(error) else "not a .npy array"
        raise ValueError(f"{label} {path} cannot be read ({reason})") from None
    if array.dtype.kind not in "iuf":
        raise ValueError(f"{label} {path} must hold real numbers, got dtype {array.dtype}")
    if array.ndim not in (1, 2):
        raise ValueError(f"{label} {path} must have shape (N, D) or (N,), got {array.shape}")
    if array.size == 0:
        raise ValueError(f"{label} {path} is empty (shape {array.shape})")
    with np.errstate(over="ignore"):
        return array.astype(np.float64).reshape(len(array), -1)


def _read_text_fast(path: Path) -> tuple[np.ndarray, tuple[str, ...] | None] | None:
    """``np.loadtxt`` (C speed) for well-formed files; ``None`` to use :func:`_read_text`."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as file:
            skip, first = 0, ""
            for first in file:
                skip += 1
                if first.strip():
                    break
        fields = [f.strip() for f in next(csv.reader([first]), [])]
        header = bool(fields) and all(_number(f) is None for f in fields)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "input contained no data": handled below
            values = np.loadtxt(
                path,
                delimiter=",",
                comments=None,
                skiprows=skip if header else 0,
                ndmin=2,
                dtype=np.float64,
                encoding="utf-8-sig",
            )
    except (ValueError, csv.Error):  # UnicodeDecodeError is a ValueError
        return None
    if values.size == 0 or (header and values.shape[1] != len(fields)):
        return None
    return values, tuple(fields) if header else None


def _read_text(path: Path, label: str) -> tuple[np.ndarray, tuple[str, ...] | None, list[int]]:
    rows: list[list[float]] = []
    lines: list[int] = []
    columns = None
    try:
        with open(path, encoding="utf-8-sig", newline="") as file:
            reader = csv.reader(file)
            for fields in reader:
                fields = [f.strip() for f in fields]
                if not any(fields):
                    continue
                numbers = [_number(f) for f in fields]
                if not rows and columns is None and all(v is None for v in numbers):
                    columns = tuple(fields)
                    continue
                width = len(columns) if columns is not None else len(rows[0]) if rows else None
                if width is not None and len(fields) != width:
                    first = "the header" if not rows else f"line {lines[0]}"
                    raise ValueError(
                        f"{label} {path} line {reader.line_num} has {len(fields)} value(s), "
                        f"but {first} has {width}"
                    )
                for column, (text, value) in enumerate(zip(fields, numbers, strict=True)):
                    if value is None:
                        shown = repr(text) if text else "an empty field"
                        raise ValueError(
                            f"{label} {path} line {reader.line_num}, column {column + 1}: "
                            f"{shown} is not a number"
                        )
                rows.append(numbers)
                lines.append(reader.line_num)
    except UnicodeDecodeError:
        raise ValueError(
            f"{label} {path} is not UTF-8 text; give comma-separated numbers or a .npy file"
        ) from None
    except csv.Error as error:
        raise ValueError(f"{label} {path} is not readable as CSV ({error})") from None
    if not rows:
        what = "has a header but no data rows" if columns else "has no data rows"
        raise ValueError(f"{label} {path} is empty: it {what}")
    return np.array(rows, dtype=np.float64), columns, lines


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None
