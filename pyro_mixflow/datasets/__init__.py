r"""2-D benchmark densities of the flow literature, with exact samplers and log-densities.

The FFJORD-style toy densities (``8gaussians``, ``25gaussians``, ``checkerboard``, ``rings``,
``2spirals``, ``pinwheel``, ``moons``) and piecewise-constant image densities (``euler``),
behind one interface, :class:`Density2D`: ``sample``, ``log_prob``, ``bounds``.
:func:`kl_divergence` scores a model against any of them.

Example:
    >>> from pyro_mixflow.datasets import NAMES, kl_divergence, load
    >>> truth = load("rings")
    >>> x = truth.sample(256, generator=torch.Generator().manual_seed(0))
    >>> truth.log_prob(x).shape
    torch.Size([256])
"""

from pyro_mixflow.datasets.catalog import NAMES, load
from pyro_mixflow.datasets.checkerboard import Checkerboard
from pyro_mixflow.datasets.density2d import Bounds, Density2D
from pyro_mixflow.datasets.divergence import kl_divergence
from pyro_mixflow.datasets.gaussian_mixtures import EightGaussians, TwentyFiveGaussians
from pyro_mixflow.datasets.image import ImageDensity, euler
from pyro_mixflow.datasets.moons import TwoMoons
from pyro_mixflow.datasets.pinwheel import Pinwheel
from pyro_mixflow.datasets.rings import Rings
from pyro_mixflow.datasets.spirals import TwoSpirals

__all__ = [
    "NAMES",
    "Bounds",
    "Checkerboard",
    "Density2D",
    "EightGaussians",
    "ImageDensity",
    "Pinwheel",
    "Rings",
    "TwentyFiveGaussians",
    "TwoMoons",
    "TwoSpirals",
    "euler",
    "kl_divergence",
    "load",
]
