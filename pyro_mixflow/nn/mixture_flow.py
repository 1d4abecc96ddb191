r"""A trainable normalizing flow over a Gaussian-mixture base (lazy distribution)."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
from nflows.nn.nets import ResidualNet
from nflows.transforms import PiecewiseRationalQuadraticCouplingTransform
from pyro.distributions.transforms import Spline
from torch import nn
from torch.distributions.transforms import AffineTransform

from pyro_mixflow._checks import check_positive_int
from pyro_mixflow.distributions import MixtureBaseFlow
from pyro_mixflow.nn._base import DensityModel
from pyro_mixflow.nn._context import check_context, check_context_dim
from pyro_mixflow.nn.gmm import GMM
from pyro_mixflow.transforms import NflowsTransform, ZukoTransform

__all__ = ["MixtureFlow"]


class MixtureFlow(DensityModel):
    r"""Trainable flow :math:`x = m + s \odot g(z_0)`, :math:`z_0` from a trainable mixture.

    .. math::

        z_0 \sim \sum_k \pi_k \mathcal{N}(\mu_k, \operatorname{diag}\sigma_k^2), \quad
        g = g_L \circ \dots \circ g_1, \quad
        \log p(x) = \log p_0(z_0) - \sum_l \log|\det J_{g_l}| - \sum_d \log s_d.

    The :math:`g_l` are rational-quadratic spline couplings (Durkan et al. 2019, nflows) with
    alternating masks (an elementwise spline when ``input_dim == 1``), identity outside
    ``[-tail_bound, tail_bound]`` and started near the identity. :math:`(m, s)` is a fixed
    standardization (buffers) that :meth:`init_from_data` sets from the data, together with an
    EM fit of the base mixture to the standardized data: before training, the model is then the
    EM mixture, and training can only improve on it (with ``fit``'s best-state restore).

    With ``context_dim`` the flow is conditional, :math:`p(x \mid c)`: the base is a
    conditional :class:`GMM` (a mixture density network) and every spline's residual network
    also reads the context (nflows' ``context_features``; in 1-D the spline is an nflows
    coupling whose only input is the context). Both see the same standardized context
    :math:`\tilde c = (c - \text{loc}) / \text{scale}`, whose buffers live in the base
    (``base.context_standardizer``). ``model(context)`` with ``context`` of shape
    ``(*batch, C)`` returns a flow with ``batch_shape == context.shape[:-1]``. Each
    :math:`p(\cdot \mid c)` is a normalized mixture pushed through bijections, so it
    integrates to 1 for every :math:`c`. The output layers start at zero (the splines at the
    identity, the base network at the EM solution after :meth:`init_from_data`), so the
    untrained model is the EM mixture for every context.

    Args:
        input_dim: Dimension :math:`D` of the data.
        num_components: Components of the base mixture (50, as for every density model of
            :mod:`pyro_mixflow.nn`: see :class:`GMM`).
        num_transforms: Number :math:`L` of spline layers.
        hidden_dims: Hidden sizes of the residual networks that predict the splines (all
            equal: nflows' ``ResidualNet`` uses one width; its depth is ``len(hidden_dims)``).
        num_bins: Spline bins.
        tail_bound: Splines act on ``[-tail_bound, tail_bound]`` of the standardized space.
        estimator: The base mixture's ``rsample``: ``"exact"``, ``"gumbel_softmax"`` or
            ``"straight_through"`` (see :class:`GMM`).
        context_dim: Dimension :math:`C` of the context; ``None`` (default) for the
            unconditional flow. The conditional base network has the widths ``hidden_dims``.
        transforms: Which library builds the spline layers: ``"nflows"`` (default, as above)
            or ``"zuko"``: zuko's rational-quadratic splines on ``[-tail_bound, tail_bound]``
            (Durkan et al. 2019) in coupling form (``MaskedAutoregressiveTransform`` with
            ``passes=2``, halves swapped between layers, an elementwise spline in 1-D), MLPs
            of widths ``hidden_dims`` reading the standardized context, started at the
            identity (last layer zero) and used through
            :class:`~pyro_mixflow.transforms.ZukoTransform`. ``"zuko"`` imports zuko, which
            switches torch's argument validation off for the whole process (zuko's choice).
        autoregressive: With ``transforms="zuko"``, make each spline layer fully
            autoregressive (zuko's ``passes=None``, the layers of zuko's and sbi's
            ``zuko_nsf``: feature :math:`d` is transformed given features :math:`< d` in the
            layer's order, reversed between layers) instead of a coupling. ``log_prob``
            still costs one network call per layer; ``rsample`` costs :math:`D` (the inverse
            is solved feature by feature). Passing it with ``transforms="nflows"`` is a
            ``ValueError``.

    Example:
        >>> model = MixtureFlow(2, num_components=4, num_transforms=2, hidden_dims=(16, 16))
        >>> data = torch.randn(300, 2)
        >>> flow = model.init_from_data(data)()
        >>> flow.log_prob(data).shape, flow.rsample((5,)).shape
        (torch.Size([300]), torch.Size([5, 2]))
        >>> model = MixtureFlow(2, num_components=4, num_transforms=2, hidden_dims=(16, 16),
        ...                     context_dim=3)
        >>> context = torch.randn(300, 3)
        >>> flow = model.init_from_data(data, context)(context)
        >>> flow.batch_shape, flow.log_prob(data).shape, flow.rsample((5,)).shape
        (torch.Size([300]), torch.Size([300]), torch.Size([5, 300, 2]))

    References:
        Neural Spline Flows. C. Durkan, A. Bekasov, I. Murray, G. Papamakarios, 2019.
        arXiv:1906.04032.
    """

    def __init__(
        self,
        input_dim: int,
        num_components: int = 50,
        *,
        num_transforms: int = 4,
        hidden_dims: Sequence[int] = (64, 64),
        num_bins: int = 8,
        tail_bound: float = 4.0,
        estimator: str = "exact",
        context_dim: int | None = None,
        transforms: str = "nflows",
        autoregressive: bool = False,
    ) -> None:
        super().__init__()
        if transforms not in ("nflows", "zuko"):
            raise ValueError(f"`transforms` must be 'nflows' or 'zuko', got {transforms!r}")
        if autoregressive and transforms != "zuko":
            raise ValueError("`autoregressive=True` needs `transforms='zuko'`")
        self.transforms_library = transforms
        self.autoregressive = bool(autoregressive)
        check_positive_int("num_transforms", num_transforms)
        self.context_dim = check_context_dim(context_dim)
        check_positive_int("num_bins", num_bins)
        hidden_dims = tuple(hidden_dims)
        if not hidden_dims or len(set(hidden_dims)) != 1:
            raise ValueError(f"`hidden_dims` must be equal positive sizes, got {hidden_dims}")
        check_positive_int("hidden_dims[0]", hidden_dims[0])
        if context_dim is None:
            self.base = GMM(input_dim, num_components, estimator=estimator)
        else:
            self.base = GMM(
                input_dim,
                num_components,
                estimator=estimator,
                context_dim=context_dim,
                hidden_dims=hidden_dims,
            )
        layers = []
        for i in range(num_transforms):
            if transforms == "zuko":
                layers.append(
                    _zuko_spline(
                        input_dim,
                        context_dim,
                        hidden_dims,
                        num_bins,
                        tail_bound,
                        i,
                        autoregressive=self.autoregressive,
                    )
                )
                continue
            if input_dim == 1 and context_dim is None:
                layers.append(Spline(1, count_bins=num_bins, bound=tail_bound))
                continue
            # In 1-D (conditional only) every feature is transformed: the spline's network
            # reads the context alone.
            mask = (torch.arange(input_dim) + i) % 2 if input_dim > 1 else torch.ones(1)

            def net(
                in_features: int,
                out_features: int,
                width: int = hidden_dims[0],
                depth: int = len(hidden_dims),
            ) -> ResidualNet:
                return ResidualNet(
                    in_features,
                    out_features,
                    width,
                    context_features=context_dim,
                    num_blocks=depth,
                )

            spline = PiecewiseRationalQuadraticCouplingTransform(
                mask, net, num_bins=num_bins, tails="linear", tail_bound=tail_bound
            )
            _start_at_identity(spline, num_bins)
            layers.append(NflowsTransform(spline))
        self.transforms = nn.ModuleList(layers)
        self.register_buffer("shift", torch.zeros(input_dim))
        self.register_buffer("scale", torch.ones(input_dim))

    def forward(self, context: torch.Tensor | None = None) -> MixtureBaseFlow:
        """Returns the flow at the current parameters (given ``context`` if conditional).

        Args:
            context: ``None`` for an unconditional model; a floating-point tensor of shape
                ``(*batch, C)`` for a conditional one.

        Returns:
            A flow with ``batch_shape == context.shape[:-1]`` (``()`` when unconditional) and
            ``event_shape == (D,)``.
        """
        context = check_context("MixtureFlow", context, self.context_dim)
        standardization = AffineTransform(self.shift, self.scale, event_dim=1)
        if self.transforms_library == "zuko":
            standardized = None if context is None else self.base.standardized(context)
            base = self.base() if context is None else self.base(context)
            layers = [ZukoTransform(t, context=standardized) for t in self.transforms]
            return MixtureBaseFlow(base, [*layers, standardization])
        if context is None:
            return MixtureBaseFlow(self.base(), [*self.transforms, standardization])
        standardized = self.base.standardized(context)
        # Fresh adapters bound to this context (each caches its last pair of values).
        layers = [NflowsTransform(t.transform, context=standardized) for t in self.transforms]
        return MixtureBaseFlow(self.base(context), [*layers, standardization])

    @torch.no_grad()
    def init_from_data(
        self,
        data: torch.Tensor,
        context: torch.Tensor | None = None,
        *,
        max_iter: int = 200,
        seed: int = 0,
    ) -> MixtureFlow:
        """Sets the standardization from the data and fits the base mixture by EM.

        A conditional model also sets its context standardization from ``context`` (when
        given), its base network's last layer to weight 0 and bias at the EM solution, and its
        splines back to the identity: it is then the EM mixture for every context.

        Args:
            data: Tensor of shape ``(N, D)``.
            context: Tensor of shape ``(N, C)`` paired with ``data``, conditional models only;
                ``None`` leaves the context standardization as it is.
            max_iter: EM iterations.
            seed: Seed of EM's k-means initialization.

        Returns:
            ``self``, for chaining.
        """
        if self.context_dim is None and context is not None:
            raise ValueError("`MixtureFlow` is unconditional: `context` must be None")
        data = torch.as_tensor(data)
        if data.dim() != 2 or data.shape[-1] != self.base.input_dim:
            raise ValueError(
                f"`data` must have shape (N, {self.base.input_dim}), got {tuple(data.shape)}"
            )
        data = data.to(self.shift)
        self.shift.copy_(data.mean(0))
        self.scale.copy_(data.std(0).clamp(min=1e-6))
        standardized = (data - self.shift) / self.scale
        if self.context_dim is None:
            self.base.init_from_data(standardized, max_iter=max_iter, seed=seed)
            return self
        self.base.init_from_data(standardized, context, max_iter=max_iter, seed=seed)
        for layer in self.transforms:
            if self.transforms_library == "zuko":
                _start_zuko_at_identity(layer)
            else:
                _start_at_identity(layer.transform, layer.transform.num_bins)
        return self


@torch.no_grad()
def _start_at_identity(spline: PiecewiseRationalQuadraticCouplingTransform, num_bins: int) -> None:
    """Makes an nflows rational-quadratic coupling exactly the identity.

    Equal bin widths and heights put the knots on the diagonal; the knot derivatives are
    ``min_derivative + softplus(u)``, equal to 1 at ``u = log(exp(1 - min_derivative) - 1)``.
    nflows' own initialization leaves ``u`` near 0 (slopes 0.69), which bends every layer.
    """
    final = spline.transform_net.final_layer
    final.weight.zero_()
    bias = final.bias.view(-1, 3 * num_bins - 1)  # [transformed features, spline params]
    bias.zero_()
    bias[:, 2 * num_bins :] = math.log(math.expm1(1 - spline.min_derivative))


def _zuko_spline(
    input_dim: int,
    context_dim: int | None,
    hidden_dims: tuple[int, ...],
    num_bins: int,
    tail_bound: float,
    index: int,
    *,
    autoregressive: bool = False,
) -> nn.Module:
    """A zuko rational-quadratic spline coupling (layer ``index``), started at the identity.

    ``autoregressive``: a fully autoregressive layer (``passes=None``) instead of a coupling.

    Imports zuko, which switches torch's argument validation off for the process.
    """
    from zuko.flows import MaskedAutoregressiveTransform
    from zuko.transforms import MonotonicRQSTransform

    order = torch.arange(input_dim)
    layer = MaskedAutoregressiveTransform(
        input_dim,
        context_dim or 0,
        passes=None if autoregressive else 2,
        order=order.flip(0) if index % 2 else order,
        univariate=functools.partial(MonotonicRQSTransform, bound=tail_bound),
        shapes=[(num_bins,), (num_bins,), (num_bins - 1,)],
        hidden_features=hidden_dims,
    )
    _start_zuko_at_identity(layer)
    return layer


@torch.no_grad()
def _start_zuko_at_identity(layer: nn.Module) -> None:
    """Makes a zuko spline layer the identity: zero unconstrained widths, heights and slopes.

    zuko's ``MonotonicRQSTransform`` maps zero parameters to equal bins and unit knot slopes,
    the identity; zeroing the hyper-network's last layer (or, for an unconditional 1-D layer,
    its free parameters) gives zero parameters for every input.
    """
    hyper = getattr(layer, "hyper", None)
    parameters = layer.phi if hyper is None else hyper[-1].parameters()
    for p in parameters:
        p.zero_()
