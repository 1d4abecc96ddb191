r"""A normalizing flow over a mixture base, with torch, Pyro and nflows transforms."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pyro.distributions import TransformedDistribution
from torch.distributions import Distribution, Transform
from torch.distributions.utils import _sum_rightmost

from pyro_mixflow.transforms.nflows import NflowsTransform, is_nflows_transform

__all__ = ["MixtureBaseFlow"]


class MixtureBaseFlow(TransformedDistribution):
    r"""A normalizing flow :math:`x = g_L \circ \dots \circ g_1(z_0)` over a mixture base.

    .. math::

        z_0 \sim p_0 \ (\text{e.g. a } \texttt{DiagNormalMixture}), \qquad
        \log p(x) = \log p_0(z_0) - \sum_{l=1}^L
            \log\left|\det \frac{\partial g_l(z_{l-1})}{\partial z_{l-1}}\right|.

    ``log_prob`` is exact (an inverse pass through the transforms); ``rsample`` is pathwise
    through the base's ``rsample`` and the transforms, so gradients reach the base's
    parameters (means, scales and weights of a :class:`DiagNormalMixture`; zuko's
    mixture-based flows silently drop them). :meth:`rsample_and_log_prob` returns draws and
    their log-density from one forward pass, with no inverse: what a variational guide needs,
    and the only cheap route for transforms whose inverse is slow (autoregressive ones).

    With a :class:`GumbelSoftmaxMixture` base the draws are relaxed and the base's
    ``log_prob`` is the exact mixture's; see that class for which density goes with which
    sampler.

    Args:
        base: The base distribution, with ``rsample`` for pathwise sampling.
        transforms: torch/Pyro ``Transform``\ s (Pyro ``TransformModule``\ s included, such as
            ``pyro.distributions.transforms.spline_coupling``) or nflows transforms, which are
            wrapped in :class:`~pyro_mixflow.transforms.NflowsTransform` (nflows maps data to
            noise; the wrapper turns it round). Applied in order from the base to the data.
        validate_args: Check values (torch's default when ``None``).

    Example:
        >>> import pyro.distributions.transforms as T
        >>> from nflows.transforms import MaskedAffineAutoregressiveTransform
        >>> from pyro_mixflow import DiagNormalMixture
        >>> base = DiagNormalMixture(torch.randn(4, 2), torch.ones(4, 2), torch.zeros(4))
        >>> flow = MixtureBaseFlow(base, [T.spline_coupling(2),
        ...                               MaskedAffineAutoregressiveTransform(2, 8)])
        >>> x, log_q = flow.rsample_and_log_prob((5,))
        >>> torch.allclose(log_q, flow.log_prob(x), atol=1e-4)
        True
    """

    def __init__(
        self,
        base: Distribution,
        transforms: Transform | torch.nn.Module | Sequence[Transform | torch.nn.Module],
        *,
        validate_args: bool | None = None,
    ) -> None:
        if not isinstance(base, Distribution):
            raise TypeError(f"`base` must be a torch Distribution, got {type(base).__name__}")
        if isinstance(transforms, Transform) or is_nflows_transform(transforms):
            transforms = [transforms]
        if not isinstance(transforms, Sequence):
            name = type(transforms).__name__
            raise TypeError(f"`transforms` must be a transform or a list of them, got {name}")
        wrapped = []
        for i, t in enumerate(transforms):
            if is_nflows_transform(t):
                t = NflowsTransform(t)
            if not isinstance(t, Transform):
                raise TypeError(
                    f"`transforms[{i}]` must be a torch/Pyro Transform or an nflows transform, "
                    f"got {type(t).__name__}"
                )
            wrapped.append(t)
        super().__init__(base, wrapped, validate_args=validate_args)

    @property
    def has_rsample(self) -> bool:  # noqa: D102
        return self.base_dist.has_rsample

    def expand(self, batch_shape, _instance=None):  # noqa: D102
        new = self._get_checked_instance(MixtureBaseFlow, _instance)
        return super().expand(batch_shape, _instance=new)

    def rsample_and_log_prob(
        self, sample_shape: torch.Size = torch.Size()
    ) -> tuple[torch.Tensor, torch.Tensor]:
        r"""Draws :math:`x` and :math:`\log p(x)` from one forward pass.

        .. math:: \log p(x) = \log p_0(z_0) - \sum_l \log|\det J_{g_l}(z_{l-1})|,

        using each transform's log-determinant of the forward direction, which coupling,
        autoregressive and nflows transforms produce alongside the forward pass.

        Args:
            sample_shape: Leading sample shape.

        Returns:
            ``(value, log_prob)`` of shapes ``(*sample, *batch, *event)`` and
            ``(*sample, *batch)``.

        Example:
            >>> from torch.distributions.transforms import AffineTransform
            >>> from pyro_mixflow import DiagNormalMixture
            >>> base = DiagNormalMixture(torch.zeros(1, 1), torch.ones(1, 1), torch.zeros(1))
            >>> flow = MixtureBaseFlow(base, AffineTransform(0.0, 2.0))
            >>> x, log_q = flow.rsample_and_log_prob((3,))
            >>> torch.allclose(log_q, torch.distributions.Normal(0.0, 2.0).log_prob(x[:, 0]))
            True
        """
        z = self.base_dist.rsample(sample_shape)
        event_dim = len(self.base_dist.event_shape)
        log_prob = self.base_dist.log_prob(z)
        for transform in self.transforms:
            x = transform(z)
            event_dim += transform.codomain.event_dim - transform.domain.event_dim
            log_prob = log_prob - _sum_rightmost(
                transform.log_abs_det_jacobian(z, x), event_dim - transform.codomain.event_dim
            )
            z = x
        return z, log_prob
