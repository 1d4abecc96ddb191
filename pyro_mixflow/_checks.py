r"""Argument checks shared by the models, layers, guides and fitting routines (private)."""

from __future__ import annotations

import math
import numbers

__all__ = ["check_integer", "check_non_negative_float", "check_positive_int"]


def check_positive_int(name: str, value: object) -> int:
    """Returns ``value`` as an ``int``; ``ValueError`` naming ``name`` unless it is one >= 1."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}")
    return int(value)


def check_integer(name: str, value: object) -> int:
    """Returns ``value`` as an ``int``; ``TypeError`` naming ``name`` unless it is an integer."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be an integer, got {type(value).__name__}")
    return int(value)


def check_non_negative_float(name: str, value: object, *, positive: bool = False) -> float:
    """Returns ``value`` as a finite ``float`` >= 0 (> 0 if ``positive``), else raises.

    ``TypeError`` if it is not a real number, ``ValueError`` if it is out of range; both name
    ``name``.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        kind = "positive" if positive else "non-negative"
        raise ValueError(f"`{name}` must be a finite {kind} number, got {value}")
    return value
