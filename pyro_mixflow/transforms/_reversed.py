r"""A flow library's data-to-noise transform turned round into a base-to-data torch transform."""

from __future__ import annotations

import torch
from pyro.distributions.torch_transform import TransformModule

__all__ = ["ReversedFlowTransform"]


class ReversedFlowTransform(TransformModule):
    r"""Base of the nflows and zuko adapters: a library transform :math:`T` (data to noise,
    :math:`z = T(x)`) as the torch transform :math:`x = T^{-1}(z)` (base to data).

    Subclasses give both passes with their log-determinants. The log-determinant computed
    alongside each pass is cached with its pair ``(z, x)``, so that ``log_abs_det_jacobian``
    right after a call costs nothing; otherwise it is recomputed from the noise direction:

    .. math:: \log\left|\det \frac{\partial x}{\partial z}\right|
              = -\log\left|\det \frac{\partial T}{\partial x}\right|(x).
    """  # noqa: D205

    bijective = True

    def __init__(self) -> None:
        super().__init__(cache_size=1)
        self._cached_log_det: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def _to_noise(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(T(x), log|det dT/dx|)``, the log-determinant of shape ``x.shape[:-1]``."""
        raise NotImplementedError

    def _to_data(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(T^{-1}(z), log|det dT^{-1}/dz|)``, the log-determinant of shape ``z.shape[:-1]``."""
        raise NotImplementedError

    def _call(self, z: torch.Tensor) -> torch.Tensor:
        x, log_det = self._to_data(z)
        self._cached_log_det = (z, x, log_det)
        return x

    def _inverse(self, x: torch.Tensor) -> torch.Tensor:
        z, log_det = self._to_noise(x)
        self._cached_log_det = (z, x, -log_det)
        return z

    def log_abs_det_jacobian(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        r"""Returns :math:`\log|\det \partial x / \partial z|`, shape ``z.shape[:-1]``."""
        cached = self._cached_log_det
        if cached is not None and cached[0] is z and cached[1] is x:
            return cached[2]
        _, log_det = self._to_noise(x)
        return -log_det
