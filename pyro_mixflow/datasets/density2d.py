r"""The common interface of the 2-D benchmark densities: a sampler and a log-density."""

from __future__ import annotations

import abc

import torch

__all__ = ["Bounds", "Density2D"]

Bounds = tuple[tuple[float, float], tuple[float, float]]


class Density2D(abc.ABC):
    r"""A density on :math:`\mathbb{R}^2` with an exact sampler and its log-density.

    Subclasses define the generative process in ``_sample`` and the density in ``_log_prob``;
    both work in float64. The public methods handle dtypes, devices, shapes and memory:

    * :meth:`sample` draws in float64 on the requested device and returns ``dtype``;
    * :meth:`log_prob` evaluates in float64, in chunks of ``_chunk_size`` points, and returns
      the dtype of its input. It returns values only (no autograd graph): some densities are
      computed by root finding, where a graph would give wrong gradients.

    Attributes:
        name: The name :func:`~pyro_mixflow.datasets.load` knows the density by.
        has_exact_log_prob: ``True`` when :meth:`log_prob` is the density of :meth:`sample`
            in closed form or up to a stated quadrature error far below float64 sampling
            noise (see each class).

    Example:
        >>> from pyro_mixflow.datasets import load
        >>> density = load("8gaussians")
        >>> x = density.sample(5, generator=torch.Generator().manual_seed(0))
        >>> x.shape, density.log_prob(x).shape, density.has_exact_log_prob
        (torch.Size([5, 2]), torch.Size([5]), True)
    """

    name: str = ""
    has_exact_log_prob: bool = True
    _chunk_size: int = 2**16

    @property
    @abc.abstractmethod
    def bounds(self) -> Bounds:
        r"""``((xmin, xmax), (ymin, ymax))``: a box holding all but a stated tiny mass."""

    def sample(
        self,
        num_samples: int,
        *,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        r"""Independent draws of the generative process.

        Args:
            num_samples: Number of draws :math:`N \ge 0`.
            generator: Source of randomness; the same seed gives the same draws. Torch's
                global generator when ``None``.
            dtype: Floating dtype of the result (the draws are made in float64).
            device: Device of the result; defaults to the generator's device, else the CPU.

        Returns:
            Tensor of shape ``(N, 2)``.

        Example:
            >>> from pyro_mixflow.datasets import load
            >>> g = torch.Generator().manual_seed(1)
            >>> load("rings").sample(3, generator=g, dtype=torch.float64).dtype
            torch.float64
        """
        if isinstance(num_samples, bool) or not isinstance(num_samples, int):
            raise TypeError(f"`num_samples` must be an int, got {type(num_samples).__name__}")
        if num_samples < 0:
            raise ValueError(f"`num_samples` must be non-negative, got {num_samples}")
        if not dtype.is_floating_point:
            raise TypeError(f"`dtype` must be a floating dtype, got {dtype}")
        if device is None:
            device = generator.device if generator is not None else torch.device("cpu")
        with torch.no_grad():
            return self._sample(num_samples, generator, torch.device(device)).to(dtype)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        r"""Log-density :math:`\log p(x)` at points ``value``.

        Args:
            value: Points, shape ``(*batch, 2)``, floating dtype.

        Returns:
            Tensor of shape ``(*batch,)`` in the dtype of ``value``, without a graph.

        Example:
            >>> from pyro_mixflow.datasets import load
            >>> load("checkerboard").log_prob(torch.tensor([[1.0, 1.0], [1.0, -1.0]])).exp()
            tensor([0.0312, 0.0000])
        """
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"`value` must be a torch.Tensor, got {type(value).__name__}")
        if not value.is_floating_point():
            raise TypeError(f"`value` must have a floating dtype, got {value.dtype}")
        if value.dim() < 1 or value.shape[-1] != 2:
            raise ValueError(f"`value` must have shape (*batch, 2), got {tuple(value.shape)}")
        with torch.no_grad():
            flat = value.detach().reshape(-1, 2).to(torch.float64)
            if flat.shape[0] == 0:
                out = flat.new_zeros(0)
            else:
                out = torch.cat([self._log_prob(c) for c in flat.split(self._chunk_size)])
        return out.reshape(value.shape[:-1]).to(value.dtype)

    def prob(self, value: torch.Tensor) -> torch.Tensor:
        r"""Density :math:`p(x) = \exp \log p(x)`; see :meth:`log_prob`.

        Args:
            value: Points, shape ``(*batch, 2)``.

        Returns:
            Tensor of shape ``(*batch,)``.

        Example:
            >>> from pyro_mixflow.datasets import load
            >>> load("checkerboard").prob(torch.zeros(2)) * 32  # 8 squares of area 4
            tensor(1.)
        """
        return self.log_prob(value).exp()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"

    @abc.abstractmethod
    def _sample(
        self, num_samples: int, generator: torch.Generator | None, device: torch.device
    ) -> torch.Tensor:
        """Returns ``num_samples`` float64 draws on ``device``, shape ``(N, 2)``."""

    @abc.abstractmethod
    def _log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Returns the float64 log-density of float64 points ``x`` of shape ``(N, 2)``."""
