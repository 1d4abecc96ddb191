r"""A trainable real-and-discrete flow (lazy distribution) over standardized data."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.distributions.transforms import AffineTransform

from pyro_mixflow._checks import check_positive_int
from pyro_mixflow.distributions.rad_flow import RADFlow
from pyro_mixflow.nn._base import DensityModel
from pyro_mixflow.nn._context import (
    ContextStandardizer,
    check_context,
    check_context_dim,
    check_context_rows,
)
from pyro_mixflow.transforms.rad import RADCoupling

__all__ = ["RAD"]


class RAD(DensityModel):
    r"""Trainable RAD flow :math:`x = m + s \odot y`, :math:`y` from a stack of RAD layers.

    .. math::

        \log p(x) = \log p_Y\big((x - m) / s\big) - \sum_d \log s_d, \qquad
        p_Y = \texttt{RADFlow}([R_1, \dots, R_L]) \text{ over } \mathcal{N}(0, I),

    with :math:`R_l` :class:`~pyro_mixflow.transforms.RADCoupling` layers (this project's
    folding coupling design) whose folded coordinates alternate. :math:`(m, s)` is a fixed
    standardization (buffers) that :meth:`init_from_data` sets to the data's mean and standard
    deviation, so that ``bound`` (in standard deviations) covers the data. Calling the module
    returns a fresh :class:`~pyro_mixflow.distributions.RADFlow`, trainable with
    :func:`pyro_mixflow.fit`.

    The default of 2 pieces per fold (a mirror fold) is the setting that trained best at the
    2-D density benchmark's budget (3,000 Adam steps): more pieces fold unrelated parts of the
    data onto each other, which the later layers and the gating must then untangle, and
    training often stalls (with 8 pieces the KL on the checkerboard was 0.25 to 0.63
    against 0.08 with 2; on the rings 0.7 to 0.9 against 0.05). By default the first and the
    last layer do not fold (one piece: a spline coupling) when there are three layers or
    more: the folds then act on data that one coupling has already straightened and leave a
    coupling after them to shape the result. The networks are residual (two blocks 48 wide,
    as nflows' ``ResidualNet``; 67,600 parameters, against the benchmark's nflows spline
    flow's 73,052).

    Over five seeds of the benchmark (``benchmarks/results/density-seeds.md``) the default
    gets KL 0.056 ± 0.007 on the checkerboard, 0.020 ± 0.004 on the rings and 0.066 ± 0.002
    on the Euler image (nflows' spline flow: 0.074, 0.169 and 0.062). Plain MLPs of two
    layers 96 wide (77,968 parameters, the earlier default) gave 0.075 ± 0.014 on the
    checkerboard and the same on the other two; 64 wide, 0.091 ± 0.014 on the checkerboard.
    Ablations of the 64-wide MLP stack over three seeds (same file):
    without folds the rings' KL is 0.07 instead of 0.02 while the image's is unchanged, so
    the image's gap to the spline flow is the couplings', not the folds'. Six layers (the
    middle two folding) matched the 96-wide MLPs on the checkerboard (0.075) but not on the
    rings (0.023 to 0.093); folding in every layer, or folds on 4 standard deviations, were
    worse on all three.

    **Conditional** (``context_dim=C``): ``model(context)`` for a context of shape
    ``(*batch, C)`` returns the flow of batch shape ``*batch``. The standardized context
    :math:`\tilde c` (buffers of ``context_standardizer``, set by :meth:`init_from_data`) is
    concatenated to :math:`x_a` at the input of every layer's coupling network (piece widths
    and elementwise splines) and gating network (see
    :class:`~pyro_mixflow.transforms.RADCoupling`). The final map :math:`x = m + s \odot y`
    stays the fixed data standardization (it has no learnable parameters; the layers'
    conditional splines already move and scale the data per context). For a fixed :math:`c`
    every layer is an unconditional RAD layer, so :math:`\log p(x \mid c)` is exact and
    integrates to one for every context. The networks' last layers start at zero, so the
    untrained model is the same flow for every context.

    Args:
        input_dim: Dimension :math:`D` of the data.
        num_layers: Number :math:`L` of RAD layers.
        num_pieces: Pieces of each fold, or one number per layer (from the base side; 1: no
            fold).
        fold_ends: With one ``num_pieces`` for all layers, fold in the first and the last
            layer too (by default they do not fold when ``num_layers >= 3``).
        hidden_dims: Hidden widths of each layer's networks (equal, with ``"residual"``:
            ``(w,) * n`` is ``n`` residual blocks of width ``w``).
        network: ``"residual"`` or ``"mlp"`` (see :class:`~pyro_mixflow.transforms.RADCoupling`).
        bound: Half-width of the folded interval, in standard deviations of the data.
        elementwise: Each layer's elementwise map, ``"spline"``, ``"affine"`` or ``"none"``.
        num_bins: Bins of the elementwise splines.
        context_dim: Dimension :math:`C` of the context (``None``: unconditional).

    Example:
        >>> model = RAD(2, num_layers=2, num_pieces=3, hidden_dims=(8,))
        >>> data = torch.randn(300, 2)
        >>> flow = model.init_from_data(data)()
        >>> flow.log_prob(data).shape, flow.rsample((5,)).shape
        (torch.Size([300]), torch.Size([5, 2]))
        >>> conditional = RAD(2, num_layers=2, hidden_dims=(8,), context_dim=1)
        >>> context = torch.randn(300, 1)
        >>> flow = conditional.init_from_data(data, context)(context)
        >>> flow.batch_shape, flow.log_prob(data).shape, flow.sample((5,)).shape
        (torch.Size([300]), torch.Size([300]), torch.Size([5, 300, 2]))

    References:
        A RAD approach to deep mixture models. L. Dinh, J. Sohl-Dickstein, R. Pascanu,
        H. Larochelle, 2019. arXiv:1903.07714.
    """

    def __init__(
        self,
        input_dim: int,
        *,
        num_layers: int = 4,
        num_pieces: int | Sequence[int] = 2,
        fold_ends: bool = False,
        hidden_dims: Sequence[int] = (48, 48),
        network: str = "residual",
        bound: float = 3.0,
        elementwise: str = "spline",
        num_bins: int = 8,
        context_dim: int | None = None,
    ) -> None:
        super().__init__()
        check_positive_int("input_dim", input_dim)
        check_positive_int("num_layers", num_layers)
        self.input_dim = input_dim
        self.context_dim = check_context_dim(context_dim)
        self.num_pieces = _pieces_per_layer(num_pieces, num_layers, fold_ends)
        self.layers = nn.ModuleList(
            RADCoupling(
                input_dim,
                num_pieces=self.num_pieces[i],
                hidden_dims=hidden_dims,
                network=network,
                bound=bound,
                parity=i % 2,
                elementwise=elementwise,
                num_bins=num_bins,
                context_dim=context_dim,
            )
            for i in range(num_layers)
        )
        if context_dim is not None:
            self.context_standardizer = ContextStandardizer(context_dim)
        self.register_buffer("shift", torch.zeros(input_dim))
        self.register_buffer("scale", torch.ones(input_dim))

    def forward(self, context: torch.Tensor | None = None) -> RADFlow:
        """Returns the flow at the current parameters (at ``context`` if conditional).

        Args:
            context: ``None`` for an unconditional model; else a floating-point tensor of
                shape ``(*batch, C)``, and the flow has batch shape ``*batch``.

        Returns:
            A :class:`~pyro_mixflow.distributions.RADFlow`.
        """
        context = check_context("RAD", context, self.context_dim)
        standardization = AffineTransform(self.shift, self.scale, event_dim=1)
        if context is None:
            return RADFlow([*self.layers, standardization])
        context = self.context_standardizer(context.to(self.shift.dtype))
        return RADFlow([*self.layers, standardization], context=context)

    @torch.no_grad()
    def init_from_data(
        self, data: torch.Tensor, context: torch.Tensor | None = None, *, seed: int = 0
    ) -> RAD:
        """Sets the standardization to the data's mean and standard deviation.

        A conditional model given ``context`` also sets its context standardization to the
        context rows' mean and standard deviation.

        Args:
            data: Tensor or array of shape ``(N, D)``.
            context: The context rows ``(N, C)`` of a conditional model (optional; without
                it the context standardization is left as it is).
            seed: Unused (the layers need no data-dependent start); kept for the common
                ``init_from_data(data, seed=...)`` call of the trainable models.

        Returns:
            ``self``, for chaining.
        """
        data = torch.as_tensor(data)
        if data.dim() != 2 or data.shape[-1] != self.input_dim:
            raise ValueError(
                f"`data` must have shape (N, {self.input_dim}), got {tuple(data.shape)}"
            )
        if context is not None:
            context = check_context_rows("RAD", data, context, self.context_dim)
            self.context_standardizer.fit(context)
        data = data.to(self.shift)
        self.shift.copy_(data.mean(0))
        scale = data.std(0).clamp(min=1e-6) if len(data) > 1 else torch.ones_like(self.shift)
        self.scale.copy_(scale)
        return self


def _pieces_per_layer(
    num_pieces: int | Sequence[int], num_layers: int, fold_ends: bool
) -> tuple[int, ...]:
    """Each layer's number of pieces, from the base side."""
    if isinstance(num_pieces, Sequence) and not isinstance(num_pieces, str):
        pieces = tuple(num_pieces)
        if len(pieces) != num_layers:
            raise ValueError(
                f"`num_pieces` must have one entry per layer ({num_layers}), got {len(pieces)}"
            )
        for k in pieces:
            check_positive_int("num_pieces[i]", k)
        return pieces
    check_positive_int("num_pieces", num_pieces)
    pieces = [num_pieces] * num_layers
    if not fold_ends and num_layers >= 3:
        pieces[0] = pieces[-1] = 1
    return tuple(pieces)
