r"""Interoperability with nflows: its transforms in torch flows, our mixtures as its base."""

from __future__ import annotations

from collections.abc import Callable

import torch
from nflows.distributions import Distribution as _NflowsDistribution
from nflows.transforms import Transform as _NflowsTransformBase
from torch.distributions import Distribution, constraints

from pyro_mixflow.transforms._reversed import ReversedFlowTransform

__all__ = ["NflowsBase", "NflowsTransform", "is_nflows_transform"]


def is_nflows_transform(obj: object) -> bool:
    """Whether ``obj`` is an ``nflows.transforms.Transform``.

    Example:
        >>> from nflows.transforms import ReversePermutation
        >>> is_nflows_transform(ReversePermutation(2)), is_nflows_transform(torch.nn.Identity())
        (True, False)
    """
    return isinstance(obj, _NflowsTransformBase)


class NflowsTransform(ReversedFlowTransform):
    r"""An nflows transform as a torch/Pyro ``Transform`` from the base space to the data space.

    nflows transforms map data to noise, :math:`u = T(x)`, and return
    :math:`\log|\det \partial T / \partial x|`. Flows in ``torch.distributions`` map the base
    sample forward to the data, so this adapter's forward is nflows' ``inverse`` and its inverse
    is nflows' ``forward``:

    .. math:: y = T^{-1}(x), \qquad
              \log\left|\det \frac{\partial y}{\partial x}\right| = \text{logabsdet of } T^{-1}.

    Inputs of any batch shape ``(..., D)`` are flattened to ``(N, D)`` for nflows and reshaped
    back. A ``context`` of shape ``(*batch, C)`` (for conditional transforms, such as couplings
    whose networks take ``context_features``) is broadcast against the inputs' batch shape
    (values ``(*sample, *batch, D)``) and flattened alongside, so that row :math:`n` of the
    values meets row :math:`n` of the context. The log-determinant that nflows computes
    alongside each pass is cached with the pair ``(x, y)``, so ``log_abs_det_jacobian`` right
    after a call costs nothing. As an ``nn.Module`` it registers the nflows transform's
    parameters.

    What works on torch 2.x (nflows 0.14, checked in the tests): coupling transforms (affine,
    rational-quadratic), masked autoregressive transforms, permutations, ``LULinear`` (which
    warns about torch's deprecated ``triangular_solve``), ``SVDLinear``, ``ActNorm`` (which
    initializes itself from the first batch it sees in the data direction: call ``log_prob``
    on data once before sampling). What does
    not: ``NaiveLinear``'s inverse calls the removed ``torch.solve``; ``BatchNorm`` has no
    inverse in training mode; autoregressive inverses are sequential (slow in the data
    direction used by ``rsample``).

    Args:
        transform: An ``nflows.transforms.Transform`` acting on vectors of size ``D``.
        context: Optional context of shape ``(*batch, C)`` passed to nflows at every call,
            broadcast against the inputs' batch shape.

    Example:
        >>> from nflows.transforms import MaskedAffineAutoregressiveTransform
        >>> t = NflowsTransform(MaskedAffineAutoregressiveTransform(features=2, hidden_features=8))
        >>> x = torch.randn(5, 3, 2)
        >>> y = t(x)
        >>> torch.allclose(t.inv(y), x, atol=1e-5), t.log_abs_det_jacobian(x, y).shape
        (True, torch.Size([5, 3]))
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector

    def __init__(self, transform: torch.nn.Module, *, context: torch.Tensor | None = None) -> None:
        if not is_nflows_transform(transform):
            name = type(transform).__name__
            raise TypeError(f"`transform` must be an nflows.transforms.Transform, got {name}")
        super().__init__()
        self.transform = transform
        self.context = context

    def _to_noise(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._run(self.transform, x)

    def _to_data(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._run(self.transform.inverse, z)

    def _run(self, fn: Callable, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        context = self.context
        if context is None:
            batch_shape = value.shape[:-1]
        else:
            batch_shape = _broadcast_batch(value, context)
            value = value.expand(batch_shape + value.shape[-1:])
            context = context.expand(batch_shape + context.shape[-1:]).reshape(
                -1, context.shape[-1]
            )
        out, log_det = fn(value.reshape(-1, value.shape[-1]), context=context)
        return out.reshape(batch_shape + out.shape[-1:]), log_det.reshape(batch_shape)


class NflowsBase(_NflowsDistribution):
    r"""A torch distribution (or a module returning one) as an nflows base distribution.

    Lets ``nflows.flows.Flow(transform, NflowsBase(...))`` use a pyro_mixflow mixture as its
    base: ``log_prob`` is the distribution's, ``sample`` its ``rsample`` when it has one (so a
    flow's samples carry gradients to the base parameters), ``sample_and_log_prob`` both in one
    pass. When ``base`` is an ``nn.Module`` (such as :class:`pyro_mixflow.nn.GMM`), it is
    called at every use and its parameters train with the flow.

    Args:
        base: A ``torch.distributions.Distribution`` with event shape ``(D,)`` and empty batch
            shape, or an ``nn.Module`` whose call returns one.

    Example:
        >>> from nflows.flows import Flow
        >>> from nflows.transforms import ReversePermutation
        >>> from pyro_mixflow import DiagNormalMixture
        >>> base = DiagNormalMixture(torch.randn(3, 2), torch.ones(3, 2), torch.zeros(3))
        >>> flow = Flow(ReversePermutation(2), NflowsBase(base))
        >>> flow.log_prob(torch.randn(4, 2)).shape, flow.sample(5).shape
        (torch.Size([4]), torch.Size([5, 2]))
    """

    def __init__(self, base: Distribution | torch.nn.Module) -> None:
        super().__init__()
        if not isinstance(base, Distribution | torch.nn.Module):
            raise TypeError(
                f"`base` must be a torch Distribution or an nn.Module, got {type(base).__name__}"
            )
        self.base = base

    def distribution(self) -> Distribution:
        """The base distribution at the current parameters."""
        return self.base() if isinstance(self.base, torch.nn.Module) else self.base

    def _log_prob(self, inputs: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        return self.distribution().log_prob(inputs)

    def _sample(self, num_samples: int, context: torch.Tensor | None) -> torch.Tensor:
        d = self.distribution()
        return d.rsample((num_samples,)) if d.has_rsample else d.sample((num_samples,))

    def _sample_and_log_prob(
        self, num_samples: int, context: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.distribution()
        x = d.rsample((num_samples,)) if d.has_rsample else d.sample((num_samples,))
        return x, d.log_prob(x)

    def _mean(self, context: torch.Tensor | None) -> torch.Tensor:
        return self.distribution().mean


def _broadcast_batch(value: torch.Tensor, context: torch.Tensor) -> torch.Size:
    """The broadcast of the batch shapes of ``value (..., D)`` and ``context (..., C)``."""
    try:
        return torch.broadcast_shapes(value.shape[:-1], context.shape[:-1])
    except RuntimeError:
        raise ValueError(
            f"`context` of shape {tuple(context.shape)} does not broadcast against values of "
            f"shape {tuple(value.shape)}: expected (*batch, C) for values (*sample, *batch, D)"
        ) from None
