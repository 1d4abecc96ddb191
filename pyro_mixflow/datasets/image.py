r"""Piecewise-constant densities on the unit square drawn from grey-scale images."""

from __future__ import annotations

import math
import os
from importlib import resources

import numpy as np
import torch
from PIL import Image

from pyro_mixflow.datasets.density2d import Bounds, Density2D

__all__ = ["ImageDensity", "euler"]

# ITU-R BT.601 luma weights (as MATLAB's ``rgb2gray``).
_LUMA = (0.2989, 0.5870, 0.1140)


class ImageDensity(Density2D):
    r"""The density of a grey-scale image on the unit square, constant on each pixel.

    An image of :math:`H` rows and :math:`W` columns is mapped onto :math:`[0, 1]^2` with
    :math:`y` pointing up: pixel :math:`(i, j)` (row :math:`i` from the top) is the cell
    :math:`[j/W, (j+1)/W) \times (1 - (i+1)/H, 1 - i/H]`. With grey levels
    :math:`g_{ij} \in [0, 1]` (:math:`g = 0.2989 R + 0.5870 G + 0.1140 B` for colour images)
    and weights :math:`w = g` (bright is likely) or :math:`w = 1 - g` (``invert=True``: dark
    is likely), a draw picks pixel :math:`(i, j)` with probability
    :math:`\pi_{ij} = w_{ij} / \sum w` and a uniform point in its cell, so that

    .. math::

        p(x) = \pi_{ij(x)} \, H W \quad \text{on } [0, 1]^2, \qquad p(x) = 0 \text{ outside}

    exactly (``log_prob`` is :math:`-\infty` outside the square and on pixels of weight 0;
    points on the right and bottom edges belong to the last column and row). No density beats
    the truth on average: :math:`E_p[\log q] \le E_p[\log p]`, the
    :attr:`optimal_mean_log_prob`.

    Args:
        image: A path to an image file (read with Pillow), or a 2-D grey array or
            ``(H, W, 3)``/``(H, W, 4)`` RGB(A) array (numpy or torch; alpha is ignored):
            ``uint8`` (scaled by 1/255), ``uint16`` (by 1/65535), ``bool``, or floating
            with values in :math:`[0, 1]`.
        invert: Weight pixels by darkness :math:`1 - g` instead of brightness :math:`g`.
        name: The density's name.

    Attributes:
        probs: Pixel probabilities :math:`\pi`, float64, shape ``(H, W)`` (row 0 at the top).
        invert: Whether darkness carries the mass.

    Example:
        >>> d = ImageDensity(torch.tensor([[0.0, 1.0], [0.5, 0.5]]))  # bright top right
        >>> d.probs
        tensor([[0.0000, 0.5000],
                [0.2500, 0.2500]], dtype=torch.float64)
        >>> d.log_prob(torch.tensor([[0.75, 0.75], [0.25, 0.75]])).exp()  # 4 pixels
        tensor([2., 0.])
        >>> bool((d.sample(100) >= 0.5).all(-1).float().mean() > 0.3)
        True
    """

    def __init__(
        self,
        image: str | os.PathLike | np.ndarray | torch.Tensor,
        *,
        invert: bool = False,
        name: str = "image",
    ) -> None:
        grey = _read_grey(image)
        weights = 1.0 - grey if invert else grey
        total = weights.sum()
        if not total > 0:
            raise ValueError(
                f"the image has no mass: every pixel weight is 0 (`invert={invert}`, grey "
                f"levels in [{grey.min():.3g}, {grey.max():.3g}])"
            )
        self.name = name
        self.invert = invert
        self.probs = torch.from_numpy(weights / total)  # [H, W], float64

    @property
    def bounds(self) -> Bounds:
        """The unit square, which holds all the mass."""
        return ((0.0, 1.0), (0.0, 1.0))

    @property
    def shape(self) -> tuple[int, int]:
        """``(H, W)``, rows and columns of the image."""
        return tuple(self.probs.shape)

    def entropy(self) -> float:
        r"""Differential entropy :math:`h = -\sum_{ij} \pi_{ij} \log \pi_{ij} - \log(HW)`.

        Returns:
            The entropy in nats, a float.

        Example:
            >>> ImageDensity(torch.ones(4, 4)).entropy()  # uniform on the unit square
            0.0
        """
        probs = self.probs[self.probs > 0]
        return -float((probs * probs.log()).sum()) - math.log(self.probs.numel())

    @property
    def optimal_mean_log_prob(self) -> float:
        r"""The best possible mean log-density, :math:`E_p[\log p] = -h`, in nats.

        Equal to :math:`\sum_{ij} \pi_{ij} \log \pi_{ij} + \log(HW)`: minus the pixel
        distribution's entropy plus the log of the pixel count. A model :math:`q` scores
        :math:`E_p[\log q] = E_p[\log p] - \operatorname{KL}(p \,\|\, q)`, never more.
        """
        return -self.entropy()

    def _sample(
        self, num_samples: int, generator: torch.Generator | None, device: torch.device
    ) -> torch.Tensor:
        height, width = self.shape
        probs = self.probs.to(device).reshape(-1)
        if num_samples == 0:
            return torch.zeros(0, 2, dtype=torch.float64, device=device)
        index = torch.multinomial(probs, num_samples, replacement=True, generator=generator)
        row, col = index // width, index % width
        u = torch.rand(num_samples, 2, generator=generator, dtype=torch.float64, device=device)
        return torch.stack([(col + u[:, 0]) / width, 1 - (row + u[:, 1]) / height], dim=-1)

    def _log_prob(self, x: torch.Tensor) -> torch.Tensor:
        height, width = self.shape
        probs = self.probs.to(device=x.device, dtype=x.dtype)
        inside = ((x >= 0) & (x <= 1)).all(-1)
        col = (x[:, 0] * width).floor().clamp(0, width - 1).long()
        row = ((1 - x[:, 1]) * height).floor().clamp(0, height - 1).long()
        log_density = probs[row, col].log() + math.log(height * width)
        return torch.where(inside, log_density, -math.inf)


def euler(*, invert: bool = False) -> ImageDensity:
    r"""The portrait of Leonhard Euler (``"euler"``) as an :class:`ImageDensity`.

    A 197 x 256 (width x height) RGB JPEG, the image behind the 2-D density experiment of
    *Classifier Weighted Mixtures*; see ``pyro_mixflow/datasets/data/README.md`` for its
    source. Bright pixels carry the mass (``invert=False``, as in that experiment); the best
    possible mean log-density is about 0.2245 nats.

    Args:
        invert: Weight pixels by darkness instead.

    Returns:
        The density, named ``"euler"``.

    Example:
        >>> d = euler()
        >>> d.shape, round(d.optimal_mean_log_prob, 4)
        ((256, 197), 0.2245)

    References:
        Classifier Weighted Mixtures. E. Argouarch et al. Code and image:
        https://github.com/ElouanARGOUARCH/Classifier-Weighted-Mixtures
        (``experiments/Euler/euler.jpg``).
    """
    source = resources.files("pyro_mixflow.datasets").joinpath("data").joinpath("euler.jpg")
    with resources.as_file(source) as path:
        return ImageDensity(path, invert=invert, name="euler")


def _read_grey(image: str | os.PathLike | np.ndarray | torch.Tensor) -> np.ndarray:
    """Grey levels in ``[0, 1]``, float64, shape ``(H, W)``."""
    if isinstance(image, str | os.PathLike):
        with Image.open(image) as img:
            keep = img.mode in ("L", "RGB", "F") or img.mode.startswith("I;16")
            array = np.asarray(img if keep else img.convert("RGB"))
    elif isinstance(image, torch.Tensor):
        array = image.detach().cpu().numpy()
    elif isinstance(image, np.ndarray):
        array = image
    else:
        raise TypeError(
            f"`image` must be a path, a numpy array or a torch.Tensor, got {type(image).__name__}"
        )
    if array.size == 0:
        raise ValueError(f"`image` is empty: shape {tuple(array.shape)}")
    if array.ndim == 3 and array.shape[-1] in (3, 4):
        dtype = array.dtype
        array = np.tensordot(array[..., :3].astype(np.float64), _LUMA, axes=([-1], [0]))
        array = _scale(array, dtype)
    elif array.ndim == 2:
        array = _scale(array.astype(np.float64), array.dtype)
    else:
        raise ValueError(
            f"`image` must have shape (H, W), (H, W, 3) or (H, W, 4), got {tuple(array.shape)}"
        )
    return array


def _scale(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Maps values of an array of type ``dtype`` to ``[0, 1]``."""
    if dtype == np.bool_:
        return values
    if dtype.kind == "u" and dtype.itemsize <= 2:
        return values / np.iinfo(dtype).max
    if not np.issubdtype(dtype, np.floating):
        raise TypeError(
            f"`image` must have dtype uint8, uint16, bool or a floating dtype in [0, 1], "
            f"got {dtype}"
        )
    if not np.isfinite(values).all() or values.min() < 0 or values.max() > 1:
        raise ValueError(
            "a floating `image` must lie in [0, 1], got values in "
            f"[{np.nanmin(values):.3g}, {np.nanmax(values):.3g}]"
        )
    return values
