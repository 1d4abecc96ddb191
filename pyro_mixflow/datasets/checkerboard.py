r"""The ``checkerboard`` benchmark: uniform on the dark squares of a 4 x 4 board."""

from __future__ import annotations

import math

import torch

from pyro_mixflow.datasets.density2d import Bounds, Density2D

__all__ = ["Checkerboard"]


class Checkerboard(Density2D):
    r"""Uniform density on 8 alternating squares of a 4 x 4 board on :math:`[-4, 4)^2`.

    The board is cut into squares :math:`Q_{ij} = [2i - 4, 2i - 2) \times [2j - 4, 2j - 2)`,
    :math:`i, j \in \{0, 1, 2, 3\}`; the density is uniform on those with :math:`i + j` even:

    .. math::

        p(x) = \frac{1}{32} \,\mathbb{1}\big[x \in [-4, 4)^2,\;
        \lfloor x_1 / 2 \rfloor + \lfloor x_2 / 2 \rfloor \text{ even}\big]

    (8 squares of area 4). The sampler is FFJORD's: :math:`u_1 \sim U[-2, 2)`,
    :math:`u_2 = U[0, 1) - 2 B + (\lfloor u_1 \rfloor \bmod 2)` with
    :math:`B \sim \operatorname{Bernoulli}(1/2)`, and :math:`x = 2u`. Squares are closed on
    the left and bottom, open on the right and top; ``log_prob`` is exact and :math:`-\infty`
    off the dark squares. ``bounds`` is the board itself (no mass outside).

    Example:
        >>> d = Checkerboard()
        >>> x = d.sample(1000, generator=torch.Generator().manual_seed(0))
        >>> bool(torch.isfinite(d.log_prob(x)).all()), d.bounds
        (True, ((-4.0, 4.0), (-4.0, 4.0)))

    References:
        FFJORD: Free-form Continuous Dynamics for Scalable Reversible Generative Models.
        W. Grathwohl, R. T. Q. Chen, J. Bettencourt, I. Sutskever, D. Duvenaud, 2019.
        arXiv:1810.01367.
    """

    name = "checkerboard"

    @property
    def bounds(self) -> Bounds:
        """The board :math:`[-4, 4]^2`, which holds all the mass."""
        return ((-4.0, 4.0), (-4.0, 4.0))

    def _sample(
        self, num_samples: int, generator: torch.Generator | None, device: torch.device
    ) -> torch.Tensor:
        kwargs = {"generator": generator, "dtype": torch.float64, "device": device}
        u1 = 4 * torch.rand(num_samples, **kwargs) - 2
        coin = torch.randint(2, (num_samples,), generator=generator, device=device)
        u2 = torch.rand(num_samples, **kwargs) - 2 * coin + torch.remainder(u1.floor(), 2)
        return 2 * torch.stack([u1, u2], dim=-1)

    def _log_prob(self, x: torch.Tensor) -> torch.Tensor:
        cells = torch.floor(x / 2)  # [N, 2], in {-2, -1, 0, 1} on the board
        on_board = ((x >= -4) & (x < 4)).all(-1)
        dark = torch.remainder(cells.sum(-1), 2) == 0
        inside = on_board & dark
        log_density = torch.full_like(x[:, 0], -math.log(32.0))
        return log_density.masked_fill(~inside, -math.inf)
