r"""The rows ``fit`` trains on: in memory, memory-mapped or read from a ``Dataset`` (private).

:class:`Pairs` holds rows in memory with their context rows; :class:`LazyPairs` reads them
batch by batch from a memory-mapped array or a map-style ``Dataset``; :func:`read_pairs`
checks what ``fit`` was given and returns one or the other; :func:`split_validation` and
:func:`held_out` draw the validation split.
"""

from __future__ import annotations

import contextlib
import dataclasses
import mmap
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.distributions import Distribution
from torch.utils.data import DataLoader, Dataset

__all__ = [
    "CHECK_ROWS",
    "LazyPairs",
    "Pairs",
    "held_out",
    "index_dtype",
    "is_conditional",
    "read_pairs",
    "split_validation",
]

CHECK_ROWS = 65536  # rows per chunk of the finiteness check of a memory-mapped array


@dataclass(frozen=True)
class Pairs:
    """Data rows with their context rows (``context`` is ``None`` for an unconditional model).

    What :func:`fit` batches and splits: row ``i`` of ``rows`` goes with row ``i`` of
    ``context``.

    Attributes:
        rows: Data rows, ``(N, D)`` or ``(N,)``.
        context: Context rows ``(N, C)`` of a conditional model, or ``None``.

    Example:
        >>> pairs = Pairs(torch.zeros(4, 2), torch.arange(4.0).unsqueeze(-1))
        >>> len(pairs), pairs.take(slice(1, 3)).context.flatten().tolist()
        (4, [1.0, 2.0])
    """

    rows: torch.Tensor
    context: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def take(self, index: torch.Tensor | slice) -> Pairs:
        """The pairs at ``index``."""
        return Pairs(self.rows[index], None if self.context is None else self.context[index])

    def to(self, device: torch.device) -> Pairs:
        """The pairs on ``device``."""
        context = None if self.context is None else self.context.to(device)
        return Pairs(self.rows.to(device), context)

    def distribution(self, model: nn.Module) -> Distribution:
        """``model()``, or ``model(context)`` for a conditional model."""
        return model() if self.context is None else model(self.context)


@dataclass(frozen=True)
class LazyPairs:
    """Pairs read on demand, for data that stays on disk: a memory map or a ``Dataset``.

    ``read(indices)`` returns the CPU pairs at increasing source indices (int64 array), rows
    of the source's shape; ``index`` holds the source rows of a split (``None``: all of them).
    """

    read: Callable[[np.ndarray], Pairs]
    size: int  # rows of the source
    row_shape: tuple[int, ...]
    conditional: bool
    index: torch.Tensor | None = None
    device: torch.device | str = "cpu"

    def __len__(self) -> int:
        return self.size if self.index is None else len(self.index)

    def subset(self, index: torch.Tensor) -> LazyPairs:
        """The rows at ``index``, still unread."""
        return dataclasses.replace(self, index=index if self.index is None else self.index[index])

    def to(self, device: torch.device) -> LazyPairs:
        """The same rows, read onto ``device``."""
        return dataclasses.replace(self, device=torch.device(device))

    def take(self, index: torch.Tensor | slice) -> Pairs:
        """The pairs at ``index``, on ``device``, in the order asked.

        They are read in increasing source order: the file's order, for locality.
        """
        if isinstance(index, slice):
            positions = range(*index.indices(len(self)))
            if self.index is None:
                source = torch.arange(positions.start, positions.stop, positions.step)
            else:
                source = self.index[index]
        else:
            index = index.cpu()
            source = index if self.index is None else self.index[index]
        ordered, order = torch.sort(source)
        pairs = self.read(ordered.numpy())
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(len(order))
        rows = pairs.rows[inverse].reshape(len(order), *self.row_shape).to(self.device)
        context = None if pairs.context is None else pairs.context[inverse].to(self.device)
        return Pairs(rows, context)


def split_validation(
    rows: torch.Tensor, fraction: float, *, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Splits ``rows`` at random into training and validation rows, as :func:`fit` does.

    :math:`n_{val} = \max(1, \operatorname{round}(f N))` rows, chosen by one random permutation
    (``torch.randperm`` with ``generator``), are held out; the rest keep their permuted order.
    :func:`fit` with ``validation=f`` and ``seed=s`` holds out the same rows as this function
    with ``generator=torch.Generator().manual_seed(s)``.

    Args:
        rows: A tensor whose first dimension indexes the rows, ``N >= 2``.
        fraction: The held-out fraction :math:`f`, in :math:`(0, 1)`.
        generator: Random generator of the permutation; ``None`` uses torch's global one.

    Returns:
        ``(train, validation)``: ``N - n_val`` and ``n_val`` rows.

    Raises:
        ValueError: If ``fraction`` is not in :math:`(0, 1)` or leaves no training rows.

    Example:
        >>> rows = torch.arange(10.0).unsqueeze(-1)
        >>> train, val = split_validation(rows, 0.2, generator=torch.Generator().manual_seed(0))
        >>> train.shape, val.shape
        (torch.Size([8, 1]), torch.Size([2, 1]))
    """
    order, num_val = held_out(len(rows), fraction, generator)
    order = order.to(rows.device)
    return rows[order[num_val:]], rows[order[:num_val]]


def held_out(
    num_rows: int,
    fraction: Any,
    generator: torch.Generator | None,
    dtype: torch.dtype = torch.int64,
) -> tuple[torch.Tensor, int]:
    """The permutation of :func:`split_validation` and its number of held-out rows."""
    if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real):
        raise TypeError(f"`fraction` must be a number, got {type(fraction).__name__}")
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"`fraction` must be in (0, 1), got {fraction}")
    num_val = max(1, round(fraction * num_rows))
    if num_val >= num_rows:
        raise ValueError(
            f"`validation={fraction}` leaves no training rows out of {num_rows} row(s)"
        )
    return torch.randperm(num_rows, generator=generator, device="cpu", dtype=dtype), num_val


def index_dtype(num_rows: int) -> torch.dtype:
    """int32 indices for fewer than :math:`2^{31}` rows (half the memory of int64)."""
    return torch.int32 if num_rows < 2**31 else torch.int64


def read_pairs(
    name: str, data: Any, context_name: str, context: Any, dtype: torch.dtype
) -> Pairs | LazyPairs:
    """In-memory :class:`Pairs`, or :class:`LazyPairs` for a memory map or a ``Dataset``."""
    if isinstance(data, DataLoader):
        raise TypeError(
            f"`{name}` is a DataLoader; give its dataset (`loader.dataset`): fit draws its own "
            "mini-batches of `batch_size` rows, splits and shuffles them by index"
        )
    if isinstance(data, Dataset):
        if context is not None:
            raise ValueError(
                f"`{context_name}` goes with tensor or array `{name}`; the items of a Dataset "
                "carry their own context: (x, context) pairs"
            )
        return _dataset_pairs(name, data, dtype)
    if isinstance(data, np.memmap):
        return _memmap_pairs(name, data, context_name, context, dtype)
    return _with_context(name, data, context_name, context, dtype)


def _with_context(
    name: str, data: Any, context_name: str, context: Any, dtype: torch.dtype
) -> Pairs:
    """Checked rows and context rows (``(N,)`` context rows become ``(N, 1)``), paired."""
    rows = _as_rows(name, data, dtype)
    if context is None:
        return Pairs(rows)
    context_rows = _as_rows(context_name, context, dtype)
    if context_rows.dim() == 1:
        context_rows = context_rows.unsqueeze(-1)
    if len(context_rows) != len(rows):
        raise ValueError(
            f"`{context_name}` has {len(context_rows)} row(s) but `{name}` has {len(rows)}; "
            "give one context row per data row"
        )
    return Pairs(rows, context_rows)


def is_conditional(pairs: Pairs | LazyPairs) -> bool:
    return pairs.conditional if isinstance(pairs, LazyPairs) else pairs.context is not None


def _as_rows(name: str, data: Any, dtype: torch.dtype) -> torch.Tensor:
    """Converts ``data`` to a CPU tensor of ``dtype`` with 1 or 2 dims and finite values."""
    if isinstance(data, torch.Tensor):
        source = data.detach()
        if source.dtype == torch.bool or source.is_complex():
            raise TypeError(f"`{name}` must hold real numbers, got dtype {source.dtype}")
        x = source.to(device="cpu", dtype=dtype, copy=True)
    elif isinstance(data, np.ndarray):
        source = data
        if source.dtype.kind not in "iuf":
            raise TypeError(f"`{name}` must hold real numbers, got dtype {source.dtype}")
        np_dtype = np.float32 if dtype == torch.float32 else np.float64
        with np.errstate(over="ignore"):  # overflow is reported below, with the row
            x = torch.from_numpy(np.array(source, dtype=np_dtype)).to(dtype)
    else:
        raise TypeError(
            f"`{name}` must be a torch.Tensor or numpy.ndarray, got {type(data).__name__} "
            "(convert it with numpy.asarray; data larger than memory can be a memory-mapped "
            "array or a torch.utils.data.Dataset)"
        )
    if x.dim() not in (1, 2):
        raise ValueError(f"`{name}` must have shape (N, D) or (N,), got {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"`{name}` is empty (shape {tuple(x.shape)})")
    bad = (~torch.isfinite(x).reshape(len(x), -1).all(-1)).nonzero().flatten()
    if len(bad):
        raise ValueError(_non_finite_message(name, len(bad), int(bad[0]), source, dtype))
    return x


def _non_finite_message(
    name: str, count: int, first: int, source: torch.Tensor | np.ndarray, dtype: torch.dtype
) -> str:
    """Says how many rows are not finite in ``dtype`` and which is first (NaN or overflow)."""
    row = source[first]
    if isinstance(row, torch.Tensor):
        finite = bool(torch.isfinite(row).all())
    else:
        finite = bool(np.isfinite(row).all())
    hint = f"; its values overflow {dtype}" if finite else ""
    return (
        f"`{name}` has {count} row(s) with NaN or infinite values (first: row {first}"
        f"{hint}); remove or impute them"
    )


def _memmap_pairs(
    name: str, data: np.memmap, context_name: str, context: Any, dtype: torch.dtype
) -> LazyPairs:
    """A memory-mapped array (checked chunk by chunk) and its context rows, read per batch."""
    _check_mapped(name, data, dtype)
    context_rows: np.ndarray | torch.Tensor | None = None
    if context is not None:
        if isinstance(context, np.memmap):
            _check_mapped(context_name, context, dtype)
            context_rows = context.reshape(len(context), -1)
        else:
            context_rows = _as_rows(context_name, context, dtype)
            if context_rows.dim() == 1:
                context_rows = context_rows.unsqueeze(-1)
        if len(context_rows) != len(data):
            raise ValueError(
                f"`{context_name}` has {len(context_rows)} row(s) but `{name}` has "
                f"{len(data)}; give one context row per data row"
            )

    def read(indices: np.ndarray) -> Pairs:
        rows = _array_to_tensor(data[indices], dtype)
        if context_rows is None:
            return Pairs(rows)
        if isinstance(context_rows, torch.Tensor):
            return Pairs(rows, context_rows[torch.from_numpy(indices)])
        return Pairs(rows, _array_to_tensor(context_rows[indices], dtype))

    return LazyPairs(read, len(data), tuple(data.shape[1:]), context is not None)


def _check_mapped(name: str, array: np.ndarray, dtype: torch.dtype) -> None:
    """The checks of :func:`_as_rows` on an array read in chunks of ``CHECK_ROWS`` rows."""
    if array.dtype.kind not in "iuf":
        raise TypeError(f"`{name}` must hold real numbers, got dtype {array.dtype}")
    if array.ndim not in (1, 2):
        raise ValueError(f"`{name}` must have shape (N, D) or (N,), got {tuple(array.shape)}")
    if array.size == 0:
        raise ValueError(f"`{name}` is empty (shape {tuple(array.shape)})")
    count, first = 0, -1
    for start in range(0, len(array), CHECK_ROWS):
        chunk = _array_to_tensor(array[start : start + CHECK_ROWS], dtype)
        bad = (~torch.isfinite(chunk).reshape(len(chunk), -1).all(-1)).nonzero().flatten()
        if len(bad) and first < 0:
            first = start + int(bad[0])
        count += len(bad)
    if count:
        raise ValueError(_non_finite_message(name, count, first, array, dtype))
    _release_pages(array)


def _release_pages(array: np.ndarray) -> None:
    """Drops the pages of a read-only memory map from the process (not from the page cache).

    After a pass over the whole file they would count as resident memory until the kernel
    reclaims them; they are read again, from the cache, when a batch needs them.
    """
    mapping = getattr(array, "_mmap", None)
    if getattr(array, "mode", None) == "r" and hasattr(mapping, "madvise"):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            mapping.madvise(getattr(mmap, "MADV_DONTNEED", 4))


def _array_to_tensor(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """A copy of ``array`` as a tensor of ``dtype`` (overflow becomes infinity, reported later)."""
    np_dtype = np.float32 if dtype == torch.float32 else np.float64
    with np.errstate(over="ignore"):
        return torch.from_numpy(np.array(array, dtype=np_dtype)).to(dtype)


def _dataset_pairs(name: str, dataset: Dataset, dtype: torch.dtype) -> LazyPairs:
    """A map-style ``Dataset`` of rows or ``(row, context)`` pairs, read per batch.

    Items are read with ``__getitems__`` when the dataset has it (torch's batched protocol),
    else one by one; each batch is checked as it is read.
    """
    try:
        size = len(dataset)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(
            f"`{name}` must be a map-style Dataset with a length (`__len__`), got "
            f"{type(dataset).__name__}"
        ) from None
    if size == 0:
        raise ValueError(f"`{name}` is empty (a Dataset of 0 items)")
    first = dataset[0]
    conditional = isinstance(first, tuple | list)
    if conditional and len(first) != 2:
        raise ValueError(
            f"`{name}` items must be rows or (row, context) pairs; item 0 has {len(first)} parts"
        )

    def read(indices: np.ndarray) -> Pairs:
        fetch = getattr(dataset, "__getitems__", None)
        positions = indices.tolist()
        items = fetch(positions) if fetch is not None else [dataset[i] for i in positions]
        return _stack_items(name, items, positions, dtype, conditional=conditional)

    probe = _stack_items(name, [first], [0], dtype, conditional=conditional)
    return LazyPairs(read, size, tuple(probe.rows.shape[1:]), conditional)


def _stack_items(
    name: str, items: list[Any], positions: list[int], dtype: torch.dtype, *, conditional: bool
) -> Pairs:
    """The rows (and context rows) of a ``Dataset``'s items, stacked and checked."""
    rows, context = [], []
    for position, item in zip(positions, items, strict=True):
        if conditional:
            if not isinstance(item, tuple | list) or len(item) != 2:
                raise ValueError(
                    f"`{name}` item {position} is not a (row, context) pair, but item 0 is"
                )
            rows.append(_item_tensor(name, item[0], position, dtype, "row"))
            context.append(_item_tensor(name, item[1], position, dtype, "context").reshape(-1))
        else:
            if isinstance(item, tuple | list):
                raise ValueError(f"`{name}` item {position} is a pair, but item 0 is a row")
            rows.append(_item_tensor(name, item, position, dtype, "row"))
    batch = Pairs(_stack(name, rows, positions), _stack(name, context, positions))
    for part, values in (("", batch.rows), (" context", batch.context)):
        if values is None:
            continue
        bad = (~torch.isfinite(values).reshape(len(values), -1).all(-1)).nonzero().flatten()
        if len(bad):
            raise ValueError(
                f"`{name}` item {positions[int(bad[0])]} has NaN or infinite{part} values; "
                "remove or impute it (a Dataset is checked batch by batch as it is read)"
            )
    return batch


def _item_tensor(
    name: str, value: Any, position: int, dtype: torch.dtype, part: str
) -> torch.Tensor:
    """One item's row (or context row) as a tensor of ``dtype``, ``()`` or ``(D,)``."""
    if isinstance(value, torch.Tensor):
        tensor, kind = value.detach(), str(value.dtype)
        real = not (tensor.dtype == torch.bool or tensor.is_complex())
    else:
        array = np.asarray(value)
        kind, real = str(array.dtype), array.dtype.kind in "iuf"
        tensor = torch.as_tensor(array) if real else None
    if not real:
        raise TypeError(f"`{name}` must hold real numbers, got dtype {kind} (item {position})")
    if tensor.dim() > 1:
        raise ValueError(
            f"`{name}` item {position} has a {part} of shape {tuple(tensor.shape)}; items must "
            "be rows of shape (D,) or scalars"
        )
    return tensor.to(device="cpu", dtype=dtype)


def _stack(name: str, tensors: list[torch.Tensor], positions: list[int]) -> torch.Tensor | None:
    """``torch.stack``, with an error naming the first item whose shape differs."""
    if not tensors:
        return None
    shape = tensors[0].shape
    for position, tensor in zip(positions, tensors, strict=True):
        if tensor.shape != shape:
            raise ValueError(
                f"`{name}` item {position} has shape {tuple(tensor.shape)} but item "
                f"{positions[0]} has {tuple(shape)}; all items must have the same shape"
            )
    return torch.stack(tensors)
