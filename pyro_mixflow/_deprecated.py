r"""Old import paths that keep working for one release, with a ``DeprecationWarning`` (private)."""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable

__all__ = ["moved"]


def moved(old_module: str, new_module: str, names: tuple[str, ...]) -> Callable[[str], object]:
    """Returns a module ``__getattr__`` that serves ``names`` from ``new_module`` with a warning.

    Args:
        old_module: The deprecated module's dotted name, for the message.
        new_module: Where the names live now.
        names: The names the old module offered.

    Returns:
        A function to assign to the old module's ``__getattr__`` (PEP 562).

    Example:
        >>> getter = moved("old.place", "pyro_mixflow.fitting", ("fit",))
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     fit = getter("fit")
        >>> fit.__module__, caught[0].category.__name__
        ('pyro_mixflow.fitting.training', 'DeprecationWarning')
    """

    def __getattr__(name: str) -> object:
        if name not in names:
            raise AttributeError(f"module {old_module!r} has no attribute {name!r}")
        warnings.warn(
            f"`{old_module}.{name}` moved to `{new_module}.{name}`; the old path will be "
            "removed in the next release",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(new_module), name)

    return __getattr__
