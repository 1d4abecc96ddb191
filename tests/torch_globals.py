"""Save and restore the torch class attributes that importing zuko (also through sbi) patches.

zuko sets ``Distribution._validate_args = False`` and ``Distribution.arg_constraints = {}``,
adds ``Transform.call_and_ladj`` and renames ``_InverseTransform``, for the whole process. The
root ``conftest.py`` restores torch's state after collection and after every test, so that no
test runs under those switches unless it asks for them (``tests/test_zuko.py``).
"""

from __future__ import annotations

from torch.distributions import Distribution, Transform
from torch.distributions.transforms import _InverseTransform

_MISSING = object()
_PATCHED = [
    (Distribution, "_validate_args"),
    (Distribution, "arg_constraints"),
    (Transform, "call_and_ladj"),
]


def snapshot() -> list:
    """The current values of the patched attributes."""
    state = [(owner, name, owner.__dict__.get(name, _MISSING)) for owner, name in _PATCHED]
    return [*state, (_InverseTransform, "__name__", _InverseTransform.__name__)]


def restore(state: list) -> None:
    """Puts back the values of a :func:`snapshot`."""
    for owner, name, value in state:
        if value is not _MISSING:
            setattr(owner, name, value)
        elif name in owner.__dict__:
            delattr(owner, name)
