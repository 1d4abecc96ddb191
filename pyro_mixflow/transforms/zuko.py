r"""Interoperability with zuko: its lazy transforms in our flows, our mixtures as its base.

Nothing here imports zuko. Importing zuko switches torch's argument validation off for the
whole process (``zuko.distributions`` sets ``Distribution._validate_args = False`` and
``Distribution.arg_constraints = {}`` at import), so :mod:`pyro_mixflow` leaves that choice to
the user: a zuko object can exist only once its user has imported zuko, and it is recognized
through ``sys.modules``.
"""

from __future__ import annotations

import sys

import torch
from torch.distributions import Distribution, Transform

from pyro_mixflow.transforms._reversed import ReversedFlowTransform

__all__ = ["ZukoBase", "ZukoTransform", "is_zuko_flow", "is_zuko_lazy_transform"]


def is_zuko_lazy_transform(obj: object) -> bool:
    """Whether ``obj`` is a zuko ``LazyTransform``, without importing zuko.

    A lazy transform is a module whose call with a context returns a transform.

    Example:
        >>> is_zuko_lazy_transform(torch.nn.Identity())
        False
    """
    return _is_instance(obj, "LazyTransform")


def is_zuko_flow(obj: object) -> bool:
    """Whether ``obj`` is a zuko ``Flow`` (``zuko.flows.NSF``, ``MAF``, ...), without importing it.

    Example:
        >>> is_zuko_flow(torch.nn.Identity())
        False
    """
    return _is_instance(obj, "Flow")


class ZukoTransform(ReversedFlowTransform):
    r"""A zuko lazy transform, bound to a context, as a torch ``Transform`` from base to data.

    zuko's flows map data to noise, :math:`z = f(x \mid c)`, with
    :math:`p(x \mid c) = p_0(f(x \mid c))\,|\det \partial f / \partial x|`. Flows in
    ``torch.distributions`` map the base sample forward to the data, so this adapter's forward
    is :math:`f^{-1}(\cdot \mid c)` and its inverse is :math:`f(\cdot \mid c)`:

    .. math:: x = f^{-1}(z \mid c), \qquad
              \log\left|\det \frac{\partial x}{\partial z}\right|
              = -\log\left|\det \frac{\partial f}{\partial x}\right|(x \mid c).

    ``log_prob`` thus runs zuko's fast direction (one pass of a masked autoregressive
    transform) and ``rsample`` zuko's sampling direction, as in zuko's own flows. The
    log-determinant that zuko computes alongside each pass (``call_and_ladj``) is cached with
    the pair ``(z, x)``, so ``log_abs_det_jacobian`` right after a call costs nothing. The lazy
    transform is called with the context at every pass, so the bound transform always reads the
    current parameters; zuko broadcasts a context of shape ``(*batch, C)`` against values of
    shape ``(*sample, *batch, D)``. As an ``nn.Module`` it registers the lazy transform's
    parameters.

    Args:
        transform: A zuko ``LazyTransform`` (such as
            ``zuko.flows.MaskedAutoregressiveTransform`` or the ``transform`` of a zuko flow).
        context: Optional context of shape ``(*batch, C)`` for a conditional lazy transform;
            ``None`` for an unconditional one.
    """

    def __init__(self, transform: torch.nn.Module, *, context: torch.Tensor | None = None) -> None:
        if not is_zuko_lazy_transform(transform):
            name = type(transform).__name__
            raise TypeError(f"`transform` must be a zuko LazyTransform, got {name}")
        super().__init__()
        self.transform = transform
        self.context = context
        bound = transform(context)
        self.domain, self.codomain = bound.codomain, bound.domain

    def bound(self) -> Transform:
        r"""The transform :math:`f(\cdot \mid c)` (data to noise) at the current parameters."""
        return self.transform(self.context)

    def _to_noise(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.bound().call_and_ladj(x)

    def _to_data(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.bound().inv.call_and_ladj(z)


class ZukoBase(torch.nn.Module):
    r"""A torch distribution, or a model returning one, as the lazy base of a zuko flow.

    ``zuko.flows.Flow(transforms, base=ZukoBase(model))`` builds :math:`p(x \mid c)` on our
    mixture: ``flow(c).log_prob`` is exact, and ``flow(c).rsample()`` is pathwise through the
    mixture's ``rsample`` (zuko samples its base with ``rsample`` when the base has one), so
    gradients reach the mixture's parameters. zuko's own ``GMM`` base is a ``Mixture`` with
    ``has_rsample = False`` that samples under ``torch.no_grad()``: its draws carry no gradient
    to any of its parameters.

    Calling it with a context ``c`` of shape ``(*batch, C)`` returns ``model(c)`` for a
    conditional model (one whose ``context_dim`` is set, such as
    ``pyro_mixflow.nn.GMM(D, K, context_dim=C)``) and ``model()`` for an unconditional one
    (zuko's ``Flow`` then expands it to the context's batch shape); a distribution is returned
    as it is. It has zuko's ``LazyDistribution`` interface (``forward(c=None)``) without
    subclassing it, so that nothing here imports zuko.

    Args:
        base: A ``torch.distributions.Distribution`` with event shape ``(D,)``, or an
            ``nn.Module`` whose call returns one (registered, so its parameters train with the
            flow).

    Example:
        >>> from pyro_mixflow.nn import GMM
        >>> base = ZukoBase(GMM(2, num_components=3, context_dim=4, hidden_dims=(8,)))
        >>> base(torch.randn(5, 4)).batch_shape
        torch.Size([5])
    """

    def __init__(self, base: Distribution | torch.nn.Module) -> None:
        super().__init__()
        if not isinstance(base, Distribution | torch.nn.Module):
            raise TypeError(
                f"`base` must be a torch Distribution or an nn.Module, got {type(base).__name__}"
            )
        self.base = base

    def forward(self, c: torch.Tensor | None = None) -> Distribution:
        r"""Returns the base distribution given the context ``c`` (ignored if unconditional).

        Args:
            c: ``None``, or a context of shape ``(*batch, C)``.

        Returns:
            The distribution :math:`p_0(z \mid c)`.
        """
        if isinstance(self.base, Distribution):
            return self.base
        if c is None or getattr(self.base, "context_dim", None) is None:
            return self.base()
        return self.base(c)


def _is_instance(obj: object, name: str) -> bool:
    """``isinstance(obj, zuko.lazy.<name>)`` if zuko is imported, else ``False``."""
    lazy = sys.modules.get("zuko.lazy")
    cls = getattr(lazy, name, None)
    if cls is None:  # zuko < 1.2 kept the lazy classes in ``zuko.flows.core``
        cls = getattr(sys.modules.get("zuko.flows.core"), name, None)
    return cls is not None and isinstance(obj, cls)
