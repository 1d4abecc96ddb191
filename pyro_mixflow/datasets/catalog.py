r"""Look-up of the 2-D benchmark densities by name."""

from __future__ import annotations

from collections.abc import Callable

from pyro_mixflow.datasets.checkerboard import Checkerboard
from pyro_mixflow.datasets.density2d import Density2D
from pyro_mixflow.datasets.gaussian_mixtures import EightGaussians, TwentyFiveGaussians
from pyro_mixflow.datasets.image import euler
from pyro_mixflow.datasets.moons import TwoMoons
from pyro_mixflow.datasets.pinwheel import Pinwheel
from pyro_mixflow.datasets.rings import Rings
from pyro_mixflow.datasets.spirals import TwoSpirals

__all__ = ["NAMES", "load"]

_FACTORIES: dict[str, Callable[[], Density2D]] = {
    "8gaussians": EightGaussians,
    "25gaussians": TwentyFiveGaussians,
    "checkerboard": Checkerboard,
    "rings": Rings,
    "2spirals": TwoSpirals,
    "pinwheel": Pinwheel,
    "moons": TwoMoons,
    "euler": euler,
}

#: Names :func:`load` accepts: the FFJORD-style toy densities, then the Euler image.
NAMES: tuple[str, ...] = tuple(_FACTORIES)


def load(name: str) -> Density2D:
    r"""The benchmark density called ``name``.

    Args:
        name: One of :data:`NAMES`: ``"8gaussians"``, ``"25gaussians"``, ``"checkerboard"``,
            ``"rings"``, ``"2spirals"``, ``"pinwheel"``, ``"moons"``, ``"euler"``.

    Returns:
        A new :class:`Density2D` (the image is read from the package data on each call).

    Raises:
        ValueError: For an unknown name; the message lists the valid ones.

    Example:
        >>> load("moons")
        TwoMoons(name='moons')
        >>> load("spirals")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: unknown density 'spirals'; valid names: '8gaussians', ..., 'euler'
    """
    try:
        factory = _FACTORIES[name]
    except (KeyError, TypeError):
        valid = ", ".join(repr(n) for n in NAMES)
        raise ValueError(f"unknown density {name!r}; valid names: {valid}") from None
    return factory()
