r"""Data files of the command line: rows of numbers in CSV text or ``.npy`` arrays."""

from __future__ import annotations

import contextlib
import csv
import mmap
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

from pyro_mixflow.io import atomic_write

__all__ = [
    "CHECK_ROWS",
    "OUTPUT_SUFFIXES",
    "check_output_suffix",
    "map_rows",
    "read_rows",
    "row_location",
    "write_rows",
]

OUTPUT_SUFFIXES = (".csv", ".npy")
CHECK_ROWS = 65536  # rows per chunk of the checks of a memory-mapped array


def read_rows(
    path: str | Path,
    *,
    label: str = "DATA",
    dtype: torch.dtype = torch.float32,
    skip_blank_lines: bool = True,
) -> tuple[torch.Tensor, tuple[str, ...] | None]:
    r"""Reads a table of numbers: a ``.npy`` array, or CSV text with an optional header row.

    A header is a first row in which no field is a number. Every problem is a ``ValueError``
    of one line that names the file and the line (text) or row index (``.npy``).

    Args:
        path: The file; ``.npy`` by extension, comma-separated text otherwise.
        label: How messages name the file's role (``DATA``).
        dtype: The dtype of the returned rows; values beyond its range are an error.
        skip_blank_lines: Skip blank lines in CSV text; if ``False``, a blank line between
            two rows is an error (for outputs with one row per data row), while blank lines
            before the first row or after the last are still skipped.

    Returns:
        ``(rows (N, D), column names or None)``; a 1-D ``.npy`` array gives ``D = 1``.

    Raises:
        ValueError: If the file is missing, unreadable, ragged, not numbers, holds NaN or
            infinite values or values beyond ``dtype``, or has a blank line that is not skipped.

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
    if _is_npy(path):
        values, columns = _read_npy(path, label), None
    else:
        if not skip_blank_lines:
            line = _first_inner_blank_line(path)
            if line is not None:
                raise ValueError(
                    f"{label} {path} line {line} is blank; remove blank lines between data "
                    "rows (each data row gets one output row)"
                )
        fast = _read_text_fast(path)
        values, columns = fast if fast is not None else _read_text(path, label)[:2]

    bad = np.flatnonzero(~np.isfinite(values).all(axis=1))
    if len(bad):
        raise ValueError(
            f"{label} {path} has {len(bad)} row(s) with NaN or infinite values (first: "
            f"{row_location(path, int(bad[0]), label=label)}); remove or impute them"
        )
    rows = torch.from_numpy(values).to(dtype)
    dtype_name = str(dtype).removeprefix("torch.")
    bad = (~torch.isfinite(rows).all(dim=1)).nonzero().flatten()
    if len(bad):
        raise ValueError(
            f"{label} {path} has {len(bad)} row(s) with values beyond the {dtype_name} range "
            f"(first: {row_location(path, int(bad[0]), label=label)}); rescale the data"
        )
    return rows, columns


def map_rows(
    path: str | Path, *, label: str = "DATA", dtype: torch.dtype = torch.float32
) -> np.memmap:
    r"""Opens a ``.npy`` array memory-mapped, as rows ``(N, D)``, checked chunk by chunk.

    The array stays on disk (read-only): the checks of :func:`read_rows`, with its messages,
    read ``CHECK_ROWS`` rows at a time, so a file larger than memory can be given to
    :func:`~pyro_mixflow.fit`, which reads it batch by batch.

    Args:
        path: A ``.npy`` file.
        label: How messages name the file's role (``DATA``).
        dtype: The dtype the rows will be read as; values beyond its range are an error.

    Returns:
        The memory map, ``(N, D)`` (``D = 1`` for a 1-D array), of the file's dtype.

    Raises:
        ValueError: If the file is missing or not a ``.npy`` array of real numbers of shape
            ``(N, D)`` or ``(N,)``, is empty, or holds NaN or infinite values or values beyond
            ``dtype``.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     np.save(f"{folder}/x.npy", np.arange(6.0))
        ...     rows = map_rows(f"{folder}/x.npy")
        ...     type(rows).__name__, rows.shape, rows[4:].tolist()
        ('memmap', (6, 1), [[4.0], [5.0]])
    """
    path = Path(path)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise ValueError(f"{label} {path} {what}")
    array = _read_npy(path, label, mmap_mode="r")
    dtype_name = str(dtype).removeprefix("torch.")
    non_finite = beyond = 0
    first_non_finite = first_beyond = -1
    for start in range(0, len(array), CHECK_ROWS):
        chunk = np.asarray(array[start : start + CHECK_ROWS])
        finite = np.isfinite(chunk).all(axis=1)
        with np.errstate(over="ignore"):
            fits = torch.isfinite(torch.from_numpy(chunk.astype(np.float64)).to(dtype)).all(dim=1)
        beyond_here = np.flatnonzero(finite & ~fits.numpy())
        if first_non_finite < 0 and not finite.all():
            first_non_finite = start + int(np.flatnonzero(~finite)[0])
        if first_beyond < 0 and len(beyond_here):
            first_beyond = start + int(beyond_here[0])
        non_finite += int((~finite).sum())
        beyond += len(beyond_here)
    if non_finite:
        raise ValueError(
            f"{label} {path} has {non_finite} row(s) with NaN or infinite values (first: "
            f"{row_location(path, first_non_finite, label=label)}); remove or impute them"
        )
    if beyond:
        raise ValueError(
            f"{label} {path} has {beyond} row(s) with values beyond the {dtype_name} range "
            f"(first: {row_location(path, first_beyond, label=label)}); rescale the data"
        )
    _release_pages(array)
    return array


def row_location(path: str | Path, index: int, *, label: str = "DATA") -> str:
    r"""Where row ``index`` (from 0) of a file read by :func:`read_rows` is, for a message.

    Text files are parsed again to count lines (header and blank lines included), so call it
    only to report a problem.

    Args:
        path: The file given to :func:`read_rows`.
        index: A row index of the rows it returned.
        label: How messages name the file's role (``DATA``).

    Returns:
        ``"line L"`` (from 1) for CSV text, ``"index i"`` for a ``.npy`` array.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     _ = Path(f"{folder}/x.csv").write_text("a\n1\n\n2\n")
        ...     row_location(f"{folder}/x.csv", 1)
        'line 4'
    """
    path = Path(path)
    if _is_npy(path):
        return f"index {index}"
    return f"line {_read_text(path, label)[2][index]}"


def check_output_suffix(path: str | Path | None, option: str = "--out") -> None:
    """Raises ``ValueError`` unless ``path`` is ``None`` (stdout) or ends in ``.csv``/``.npy``.

    Args:
        path: An output path, or ``None`` for stdout.
        option: How the message names the option.

    Raises:
        ValueError: If ``path`` has another suffix.

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

    Args:
        path: A ``.csv`` or ``.npy`` file, or ``None`` for stdout.
        values: An array of shape ``(N,)`` or ``(N, D)``.
        columns: A header row for text output.

    Raises:
        ValueError: If ``path`` does not end in ``.csv`` or ``.npy``, or cannot be written.

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


# A line holding nothing but spaces, tabs and commas, after the end of a line (`\r\n` too).
_BLANK_LINE = re.compile(rb"\n[ \t\r,]*(?=\n)")
_BLANK = b" \t\r\n,"


def _is_npy(path: Path) -> bool:
    return path.suffix.lower() == ".npy"


def _first_inner_blank_line(path: Path) -> int | None:
    """The number (from 1) of the first blank line between non-blank lines, or ``None``."""
    data = path.read_bytes().removeprefix(b"\xef\xbb\xbf")
    start = len(data) - len(data.lstrip(_BLANK))
    end = len(data.rstrip(_BLANK))
    match = _BLANK_LINE.search(data, start, end)
    return None if match is None else data.count(b"\n", 0, match.start()) + 2


def _read_npy(path: Path, label: str, mmap_mode: str | None = None) -> np.ndarray:
    """The checked array ``(N, D)``: float64 in memory, or as stored if memory-mapped."""
    with open(path, "rb") as file:
        is_npy = file.read(6) == b"\x93NUMPY"
    try:
        if not is_npy:
            raise ValueError("no .npy header")
        array = np.load(path, allow_pickle=False, mmap_mode=mmap_mode)
    except (ValueError, OSError, EOFError) as error:
        objects = "Object arrays" in str(error) or "Python objects" in str(error)
        reason = "it holds Python objects" if objects else "not a .npy array"
        raise ValueError(f"{label} {path} cannot be read ({reason})") from None
    if array.dtype.kind not in "iuf":
        raise ValueError(f"{label} {path} must hold real numbers, got dtype {array.dtype}")
    if array.ndim not in (1, 2):
        raise ValueError(f"{label} {path} must have shape (N, D) or (N,), got {array.shape}")
    if array.size == 0:
        raise ValueError(f"{label} {path} is empty (shape {array.shape})")
    if mmap_mode is not None:
        return array.reshape(len(array), -1)
    with np.errstate(over="ignore"):
        return array.astype(np.float64).reshape(len(array), -1)


def _release_pages(array: np.ndarray) -> None:
    """Drops the pages of a read-only memory map from the process (not from the page cache)."""
    mapping = getattr(array, "_mmap", None)
    if getattr(array, "mode", None) == "r" and hasattr(mapping, "madvise"):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            mapping.madvise(getattr(mmap, "MADV_DONTNEED", 4))


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
