r"""Model files: save a trained model of :mod:`pyro_mixflow.nn` and load it back safely.

A model file is a ``torch.save`` of plain values and tensors only (no pickled classes), read
back with ``torch.load(weights_only=True)``: the registry name of the model, its constructor
arguments (which every model of :mod:`pyro_mixflow.nn` records in ``init_arguments``), its
parameters, and optional column names and training summary. The ``pyro-mixflow`` command line
writes and reads the same files.
"""

from __future__ import annotations

import codecs
import contextlib
import inspect
import os
import pickle
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

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
    "load_model",
    "load_model_file",
    "save_model",
    "stored_arguments",
]

FORMAT = "pyro-mixflow-model"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class ModelKind:
    """How a model file names, and the command line builds, one trainable model class.

    Attributes:
        class_name: The class in :mod:`pyro_mixflow.nn`, called as ``cls(input_dim, **kwargs)``.
        summary: One line for ``--help``.
        components: The constructor argument that ``--components`` sets (``None``: none).
        hidden_dims: The constructor argument that ``--hidden-dims`` sets (``None``: none).
        context_hidden_dims: The argument ``--hidden-dims`` sets for a conditional model only
            (with ``--context-columns``), where it differs from ``hidden_dims``.
        em_init: Whether ``init_from_data`` fits ``components`` mixture components by EM
            (which needs at least as many training rows).
        added_kwargs: Constructor arguments added after model files were first written, with
            the value that reproduces the older architecture: a file that lacks one is read
            with that value, not with today's default.

    Example:
        >>> MODELS["gmm"].resolve().__name__
        'GMM'
    """

    class_name: str
    summary: str
    components: str | None = "num_components"
    hidden_dims: str | None = None
    context_hidden_dims: str | None = None
    em_init: bool = True
    added_kwargs: tuple[tuple[str, Any], ...] = ()

    def resolve(self) -> type[nn.Module]:
        """Returns the model class (imports :mod:`pyro_mixflow.nn` on first use)."""
        from pyro_mixflow import nn as models

        return getattr(models, self.class_name)


# Adding a model to the files and the command line is one entry here (its class derives from
# `DensityModel`, and has `init_from_data` or trains from its constructor's initialization).
MODELS: dict[str, ModelKind] = {
    "gmm": ModelKind(
        "GMM",
        "mixture of diagonal Gaussians; with --context-columns a mixture density network (nn.GMM)",
        context_hidden_dims="hidden_dims",  # its context network's widths
    ),
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


def build_model(name: str, input_dim: int, **options: Any) -> nn.Module:
    """Builds model ``name`` of :data:`MODELS` from plain constructor arguments.

    Args:
        name: A key of :data:`MODELS`.
        input_dim: Dimension of a data row.
        **options: Constructor arguments (``None`` values mean "the class default"), plain
            values only (numbers, strings, bools, tuples of them): a model file must hold them.

    Returns:
        The model; :func:`stored_arguments` gives the configuration a model file records.

    Raises:
        ValueError: If ``name`` is not a key of :data:`MODELS`.
        TypeError: If an option is not a plain value.

    Example:
        >>> model = build_model("gmm", 2, num_components=3)
        >>> type(model).__name__, model.init_arguments["num_components"]
        ('GMM', 3)
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    given = {"input_dim": input_dim, **{k: v for k, v in options.items() if v is not None}}
    for key, value in given.items():
        if not _is_plain(value):
            raise TypeError(f"`{key}` ({_short(value)}) is not a plain value a model file can hold")
    return MODELS[name].resolve()(**given)


def stored_arguments(model: nn.Module) -> dict[str, Any]:
    """The constructor arguments that :func:`save_model` writes for ``model``.

    Every argument the model was built with, defaults included (so that a saved model reloads
    with the same architecture even if a later version changes a default); lists become
    tuples, and an argument left at a default that is not a plain value (an activation class)
    is left out, to be the default again on loading.

    Args:
        model: A model of a class in :data:`MODELS`.

    Returns:
        ``kwargs`` with ``type(model)(**kwargs)`` rebuilding the architecture.

    Raises:
        TypeError: If ``model`` is not of a class in :data:`MODELS`, or was built with an
            argument that is not a plain value (numbers, strings, bools, None, tuples of them).

    Example:
        >>> from pyro_mixflow.nn import CWM
        >>> stored_arguments(CWM(2, num_components=3, hidden_dims=[8]))
        {'input_dim': 2, 'num_components': 3, 'hidden_dims': (8,), 'context_dim': None}
    """
    cls = type(model)
    _registry_name(model)
    defaults = {
        name: parameter.default for name, parameter in inspect.signature(cls).parameters.items()
    }
    kwargs = {}
    for key, value in model.init_arguments.items():
        if _is_plain(value):
            kwargs[key] = _tuples(value)
        elif value is not defaults.get(key, inspect.Parameter.empty):
            raise TypeError(
                f"`{key}` ({_short(value)}) is not a plain value a model file can hold; "
                f"{cls.__name__} built with it cannot be saved (numbers, strings, bools, None "
                "and tuples of them can)"
            )
    return kwargs


@dataclass
class LoadedModel:
    """A model file read back by :func:`load_model_file`.

    Attributes:
        model: The module, in eval mode, with its saved parameters.
        name: Its key in :data:`MODELS`.
        kwargs: Its stored constructor arguments (:func:`stored_arguments`).
        columns: Column names of the training data, or ``None`` (no header).
        info: What was recorded with it (``pyro-mixflow fit``: rows, steps, log-likelihoods,
            seconds).

    Example:
        >>> LoadedModel(build_model("gmm", 3), "gmm", {"input_dim": 3}).input_dim
        3
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
    model: nn.Module,
    path: str | Path,
    *,
    columns: tuple[str, ...] | None = None,
    info: dict[str, Any] | None = None,
) -> None:
    """Writes ``model`` to a model file, atomically: a ``torch.save`` of plain values and tensors.

    The file holds ``{"format", "format_version", "pyro_mixflow_version", "model", "kwargs",
    "columns", "info", "state_dict"}``, readable with ``torch.load(weights_only=True)``.

    Args:
        model: A model of :mod:`pyro_mixflow.nn` (a class in :data:`MODELS`).
        path: Output file (missing folders are created).
        columns: Column names of the training data.
        info: Plain values to record (a training summary).

    Raises:
        TypeError: If ``model`` cannot be stored (see :func:`stored_arguments`) or an ``info``
            value is not plain.

    Example:
        >>> import tempfile
        >>> from pyro_mixflow.nn import GMM
        >>> model = GMM(2, 3)
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     save_model(model, f"{folder}/gmm.pt")
        ...     model2 = load_model(f"{folder}/gmm.pt")
        >>> x = torch.randn(4, 2)
        >>> torch.equal(model2().log_prob(x), model().log_prob(x))
        True
    """
    from pyro_mixflow import __version__

    name, kwargs = _registry_name(model), stored_arguments(model)
    for key, value in (info or {}).items():
        if not _is_plain(value):
            raise TypeError(f"`{key}` ({_short(value)}) is not a plain value a model file can hold")
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "pyro_mixflow_version": __version__,
        "model": name,
        "kwargs": kwargs,
        "columns": None if columns is None else tuple(columns),
        "info": dict(info or {}),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    with atomic_write(path) as file:
        torch.save(payload, file)


def load_model(path: str | Path) -> nn.Module:
    """Reads the model of a file written by :func:`save_model`, safely (no arbitrary unpickling).

    Args:
        path: The model file.

    Returns:
        The model, on the CPU, in eval mode. :func:`load_model_file` also returns what the
        file records besides (column names, training summary).

    Raises:
        ValueError: One line saying what is wrong (see :func:`load_model_file`).

    Example:
        >>> import tempfile
        >>> from pyro_mixflow.nn import MixtureFlow
        >>> model = MixtureFlow(2, num_components=3, num_transforms=1, hidden_dims=(8,))
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     save_model(model, f"{folder}/flow.pt")
        ...     model2 = load_model(f"{folder}/flow.pt")
        >>> x = torch.randn(4, 2)
        >>> with torch.no_grad():
        ...     torch.equal(model2().log_prob(x), model().log_prob(x))
        True
    """
    return load_model_file(path).model


def load_model_file(path: str | Path) -> LoadedModel:
    """Reads a model file written by :func:`save_model`, safely, with all that it records.

    Args:
        path: The model file.

    Returns:
        The :class:`LoadedModel`: the model on the CPU in eval mode, its registry name, stored
        constructor arguments, column names and recorded information.

    Raises:
        ValueError: One line saying what is wrong: missing, not a model file (CSV text, a
            ``.npy`` array), not a torch file, a pickle of arbitrary objects (refused), another
            kind of torch file, a newer format, or a configuration that does not match the
            parameters.

    Example:
        >>> import tempfile
        >>> model = build_model("cwm", 1, num_components=2, hidden_dims=(4,))
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     save_model(model, f"{folder}/m.pt", columns=("x",), info={"steps": 10})
        ...     loaded = load_model_file(f"{folder}/m.pt")
        >>> loaded.name, loaded.kwargs["hidden_dims"], loaded.input_dim, loaded.columns
        ('cwm', (4,), 1, ('x',))
    """
    path = Path(path)
    if not path.is_file():
        what = "is a directory, not" if path.is_dir() else "does not exist; expected"
        raise ValueError(f"MODEL {path} {what} a model file")
    looks_like = _not_torch(path)
    if looks_like is not None:
        raise ValueError(
            f"MODEL {path} is not a model file (it looks like {looks_like}); give a file "
            "written by `pyro-mixflow fit` or `save_model`"
        )
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


@contextlib.contextmanager
def atomic_write(path: str | Path, *, text: bool = False) -> Iterator[IO[Any]]:
    """Opens a temporary file beside ``path``; on success renames it to ``path``.

    On any exception, Ctrl-C included, the temporary file is removed and ``path`` keeps its
    previous content (or stays absent). Missing parent folders are created. The file gets the
    permissions of a normal new file (``0o666`` minus the umask).

    Args:
        path: Final path.
        text: Open in text mode (UTF-8, ``newline=""``) instead of binary.

    Yields:
        The open temporary file.

    Raises:
        ValueError: If ``path`` is a directory or its folder cannot be written.

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


def _registry_name(model: nn.Module) -> str:
    """The key of :data:`MODELS` whose class is exactly ``type(model)``."""
    for name, kind in MODELS.items():
        if type(model) is kind.resolve():
            return name
    known = ", ".join(kind.class_name for kind in MODELS.values())
    raise TypeError(
        f"`model` ({type(model).__name__}) is not one of the models a model file can hold ({known})"
    )


def _is_plain(value: Any) -> bool:
    """Whether ``torch.load(weights_only=True)`` reads ``value`` back as it was."""
    if value is None or isinstance(value, bool | int | float | str):
        return True
    if isinstance(value, tuple | list):
        return all(_is_plain(v) for v in value)
    return False


def _tuples(value: Any) -> Any:
    """``value`` with lists turned into tuples, at any depth."""
    if isinstance(value, tuple | list):
        return tuple(_tuples(v) for v in value)
    return value


def _short(value: Any) -> str:
    """``repr(value)`` on one line, at most 80 characters."""
    text = " ".join(repr(value).split())
    return text if len(text) <= 80 else f"{text[:77]}..."


def _not_torch(path: Path) -> str | None:
    r"""What a file that is surely no torch file looks like (``None``: it may be one).

    A ``torch.save`` file is a zip archive (``PK``) or, in the legacy format, a pickle
    (``\x80``); CSV text and ``.npy`` arrays are the usual mistakes (arguments swapped).
    """
    with open(path, "rb") as file:
        head = file.read(4096)
    if not head or head.startswith((b"PK\x03\x04", b"\x80")):
        return None
    if head.startswith(b"\x93NUMPY"):
        return "a .npy array"
    try:  # an incremental decoder accepts a character cut at the end of `head`
        text = codecs.getincrementaldecoder("utf-8-sig")().decode(head, final=False)
    except UnicodeDecodeError:
        return None
    lines = text.splitlines()[: -1 if len(head) == 4096 else None]
    for line in lines:
        fields = [f.strip() for f in line.split(",")]
        if line.strip() and all(_is_number(f) for f in fields):
            return "CSV text"
    return None


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
