r"""Argument checks shared by the models, layers and guides."""

from __future__ import annotations

__all__ = ["check_positive_int"]


def check_positive_int(name: str, value: object) -> None:
    """Raises ``ValueError`` naming ``name`` unless ``value`` is an ``int`` of at least 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}")
