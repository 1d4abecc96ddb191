r"""A normalizing flow over a mixture base, with torch, Pyro, nflows and zuko transforms."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pyro.distributions import TransformedDistribution
from torch.distributions import Distribution, Transform
from torch.distributions.utils import _sum_rightmost

from pyro_mixflow.distributions._common import NoClosedFormMixin, expected_branch_log_prob
from pyro_mixflow.transforms.nflows import NflowsTransform, is_nflows_transform
from pyro_mixflow.transforms.zuko import ZukoTransform, is_zuko_flow, is_zuko_lazy_transform

__all__ = ["MixtureBaseFlow"]


class MixtureBaseFlow(NoClosedFormMixin, TransformedDistribution):
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
            zuko's transforms (``zuko.transforms.*``) are torch ``Transform``\ s and are used
            as they are, from base to data. zuko's lazy transforms (``zuko.lazy.LazyTransform``
            modules, such as ``zuko.flows.MaskedAutoregressiveTransform``) and zuko flows
            (``zuko.flows.NSF(...)``, whose ``transform`` is taken and whose base is replaced by
            ``base``) follow zuko's convention, data to noise: they are bound to ``context`` and
            turned round by :class:`~pyro_mixflow.transforms.ZukoTransform`, so that
            ``MixtureBaseFlow(base, flow, context=c)`` is zuko's ``flow(c)`` with the base
            ``base``.
        context: Context of shape ``(*batch, C)`` for the zuko lazy transforms and flows among
            ``transforms`` (``None`` for unconditional ones); it has no effect on other
            transforms (bind nflows ones with ``NflowsTransform(t, context=c)``). The base is
            expanded to the broadcast of its batch shape and ``context.shape[:-1]``.
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
        context: torch.Tensor | None = None,
        validate_args: bool | None = None,
    ) -> None:
        if not isinstance(base, Distribution):
            raise TypeError(f"`base` must be a torch Distribution, got {type(base).__name__}")
        if _is_single_transform(transforms):
            transforms = [transforms]
        if not isinstance(transforms, Sequence):
            name = type(transforms).__name__
            raise TypeError(f"`transforms` must be a transform or a list of them, got {name}")
        if context is not None:
            base = _expand_to_context(base, context)
        wrapped = []
        for i, t in enumerate(transforms):
            if is_nflows_transform(t):
                t = NflowsTransform(t)
            elif is_zuko_flow(t):
                t = ZukoTransform(t.transform, context=context)
            elif is_zuko_lazy_transform(t):
                t = ZukoTransform(t, context=context)
            if not isinstance(t, Transform):
                raise TypeError(
                    f"`transforms[{i}]` must be a torch/Pyro Transform, an nflows transform or a "
                    f"zuko lazy transform or flow, got {type(t).__name__}"
                )
            wrapped.append(t)
        super().__init__(base, wrapped, validate_args=validate_args)

    @property
    def has_rsample(self) -> bool:  # noqa: D102
        return self.base_dist.has_rsample

    def expand(  # noqa: D102
        self, batch_shape: torch.Size | tuple[int, ...], _instance: MixtureBaseFlow | None = None
    ) -> MixtureBaseFlow:
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
        return self._push_forward(z, self.base_dist.log_prob(z))

    def rao_blackwell(
        self, sample_shape: torch.Size = torch.Size()
    ) -> tuple[torch.Tensor, torch.Tensor]:
        r"""The base's branch values pushed through the flow, with the base's log-weights.

        .. math:: x_k = g(z_k), \quad (z_k, \ell_k) \text{ from the base's }
                  \texttt{rao\_blackwell}, \qquad E[h(X)] = E\Big[\sum_k e^{\ell_k} h(x_k)\Big].

        The log-densities :math:`\log p(x_k)` come out of the same forward pass and are kept
        for :meth:`rao_blackwell_log_prob`, so no inverse pass is needed.

        Args:
            sample_shape: Leading sample shape.

        Returns:
            ``(values, log_weights)`` of shapes ``(*sample_shape, *batch, K, D)`` and
            ``(*sample_shape, *batch, K)``.

        Example:
            >>> from torch.distributions.transforms import AffineTransform
            >>> from pyro_mixflow import DiagNormalMixture
            >>> base = DiagNormalMixture(torch.zeros(3, 2), torch.ones(3, 2), torch.zeros(3))
            >>> flow = MixtureBaseFlow(base, AffineTransform(1.0, 2.0))
            >>> values, log_weights = flow.rao_blackwell((4,))
            >>> values.shape, log_weights.shape
            (torch.Size([4, 3, 2]), torch.Size([4, 3]))
        """
        if not hasattr(self.base_dist, "rao_blackwell"):
            raise TypeError(f"the base {type(self.base_dist).__name__} has no `rao_blackwell`")
        z, log_weights = self.base_dist.rao_blackwell(sample_shape)  # [*S, *B, K, D], [*S, *B, K]
        base_log_prob = self.base_dist.log_prob(z.movedim(-2, 0))  # [K, *S, *B]
        values, log_prob = self._push_forward(z.movedim(-2, 0), base_log_prob)
        values, log_prob = values.movedim(0, -2), log_prob.movedim(0, -1)
        self._rao_blackwell_cache = (values, log_prob)
        return values, log_weights

    def rao_blackwell_log_prob(
        self, values: torch.Tensor, log_weights: torch.Tensor
    ) -> torch.Tensor:
        r"""The exact :math:`\sum_k w_k \log p(x_k)` for the output of :meth:`rao_blackwell`.

        .. math:: \sum_{k=1}^K e^{\ell_k} \log p(x_k).

        For the very ``values`` tensor that :meth:`rao_blackwell` returned last, the
        log-densities of its forward pass are reused; other values go through ``log_prob``.

        Args:
            values: Branch values, shape ``(*sample, *batch, K, D)``.
            log_weights: Their log-weights, shape ``(*sample, *batch, K)``.

        Returns:
            Tensor of shape ``(*sample, *batch)``.

        Example:
            >>> from torch.distributions.transforms import AffineTransform
            >>> from pyro_mixflow import DiagNormalMixture
            >>> base = DiagNormalMixture(torch.zeros(3, 2), torch.ones(3, 2), torch.zeros(3))
            >>> flow = MixtureBaseFlow(base, AffineTransform(1.0, 2.0))
            >>> values, log_weights = flow.rao_blackwell((4,))
            >>> fresh = flow.rao_blackwell_log_prob(values.clone(), log_weights)
            >>> torch.allclose(flow.rao_blackwell_log_prob(values, log_weights), fresh)
            True
        """
        cached = getattr(self, "_rao_blackwell_cache", None)
        if cached is None or cached[0] is not values:
            return expected_branch_log_prob(self, values, log_weights)
        return (log_weights.exp() * cached[1]).sum(-1)

    def _push_forward(
        self, z: torch.Tensor, log_prob: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Applies the transforms to base values ``z``, updating their log-density."""
        event_dim = len(self.base_dist.event_shape)
        for transform in self.transforms:
            x = transform(z)
            event_dim += transform.codomain.event_dim - transform.domain.event_dim
            log_prob = log_prob - _sum_rightmost(
                transform.log_abs_det_jacobian(z, x), event_dim - transform.codomain.event_dim
            )
            z = x
        return z, log_prob


def _is_single_transform(obj: object) -> bool:
    """Whether ``obj`` is one transform of any accepted kind (rather than a list of them)."""
    return (
        isinstance(obj, Transform)
        or is_nflows_transform(obj)
        or is_zuko_lazy_transform(obj)
        or is_zuko_flow(obj)
    )


def _expand_to_context(base: Distribution, context: torch.Tensor) -> Distribution:
    """``base`` expanded to the broadcast of its batch shape and ``context.shape[:-1]``."""
    if not isinstance(context, torch.Tensor):
        raise TypeError(f"`context` must be a torch.Tensor, got {type(context).__name__}")
    if context.dim() < 1:
        raise ValueError("`context` must have shape (*batch, C), got a 0-d tensor")
    try:
        batch_shape = torch.broadcast_shapes(base.batch_shape, context.shape[:-1])
    except RuntimeError:
        raise ValueError(
            f"`context.shape[:-1]` {tuple(context.shape[:-1])} does not broadcast against the "
            f"base's batch shape {tuple(base.batch_shape)}"
        ) from None
    return base if batch_shape == base.batch_shape else base.expand(batch_shape)
