r"""The RAD coupling layer: a piecewise-linear fold with a gating network (our design)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.distributions import Categorical
from torch.nn import functional as F

from pyro_mixflow._checks import check_positive_int
from pyro_mixflow._mlp import mlp, residual_mlp
from pyro_mixflow.transforms._spline import rational_quadratic

__all__ = ["RADCoupling"]

_ELEMENTWISE = ("spline", "affine", "none")
NETWORKS = ("residual", "mlp")
_MIN_DERIVATIVE = 1e-3
_MAX_LOG_END_DERIVATIVE = 6.0  # end slopes up to e^6 (inverse stays accurate to ~1e-8)
# Output scales of the two networks (a per-network step size under Adam). The widths and
# splines take the network's output as it is: a scale of 0.1 (an earlier default) slowed
# their learning tenfold and cost a factor 1.2 to 2.3 in KL on the 2-D density benchmark.
_CONDITIONER_SCALE = 1.0
# The gating is a flat direction of the likelihood: its network's output is scaled up.
# (Scales 1, 5 and 15 gave KL 0.18, 0.08 to 0.18 and 0.08 to 0.12 on the checkerboard.)
_GATE_SCALE = 15.0
# The power m of the gating's damping 1 - (u / B)^(2 m) (continuous=True): the gating is free
# away from the fold lines and steep near them. m = 1 (an earlier default) damped it over the
# whole interval and blurred every edge that a fold line draws (KL 0.108 against 0.077-0.082
# for m = 4 on the benchmark's checkerboard, with 2 pieces).
_EDGE_POWER = 4


class RADCoupling(nn.Module):
    r"""A real-and-discrete coupling layer: fold, gate, then an elementwise map.

    This layer is **this project's own design**: the RAD paper (Dinh et al. 2019) describes
    piecewise invertible layers and a gating network, but its exact layer is not public.

    The coordinates are split into conditioning ones :math:`x_a` (left unchanged) and folded
    ones :math:`x_b` (coordinates ``i`` with ``i % 2 == parity``; with ``input_dim == 1`` the
    only coordinate is folded and :math:`x_a` is empty). In the data-to-latent direction, each
    coordinate :math:`x_{b,j}` goes through

    1. **a fold**: edges :math:`-B = e_0 < e_1 < \dots < e_K = B` (widths
       :math:`w_k = e_k - e_{k-1}` predicted from :math:`x_a`) cut :math:`[-B, B]` into
       :math:`K` pieces; piece :math:`k` (counted from 0) maps its interval linearly onto the
       whole of :math:`[-B, B]`, increasing for even :math:`k` and decreasing for odd
       :math:`k` (a continuous zig-zag), with :math:`|\text{slope}| = 2B / w_k`. Outside
       :math:`[-B, B]` the fold is the identity (one more piece, :math:`k = K`);
    2. **a gating term**: :math:`\log p(k_j \mid u, x_a)`, where :math:`u` is the folded
       vector. The gating puts mass only on pieces whose image contains :math:`u_j`: the
       :math:`K` inner pieces when :math:`|u_j| \le B`, the outside piece alone otherwise.
       Inside, its logits are :math:`\log w_k + \rho(u_j)\, \phi_j(x_a, u, c_k, k)` with
       :math:`c_k = (x_{b,1}^{(k)}(u_1), \dots)` the points of piece :math:`k` that fold to
       :math:`u` and :math:`\phi` a network (its last layer starts at zero, where the gating
       is :math:`w_k / 2B`, the probability of piece :math:`k` under a uniform :math:`x_b`)
       and :math:`\rho(u) = 1 - (u / B)^{8}` (``continuous=True``: free away from the ends,
       steep near them) or 1;
    3. **an elementwise map** :math:`z_j = h_j(u_j; x_a)`: a rational-quadratic spline on
       :math:`[-B, B]` (Durkan et al. 2019, identity outside) whose slopes at :math:`\pm B`
       are learned like the inner ones (as logarithms, at most :math:`e^6`), an affine map,
       or nothing. The spline's inverse (used by :meth:`inverse`) is solved in float64, so
       that draws keep following the density at the steep splines that long fits reach.
       (Every fold line folds to :math:`u_j = \pm B`, and the splines and the folds of all
       layers map :math:`\pm B` to :math:`\pm B`: with those slopes pinned to 1,
       as with nflows' linear tails, the density on every fold line is pinned to the
       latent's where that coordinate is :math:`\pm B`, about :math:`\varphi(3)` for a
       standard normal: a valley along each fold line.)
       With ``"spline"`` a second spline :math:`g_j(\cdot; x_a)` also acts *before* the fold
       (the fold and the pieces then live in its output). The two splines start as the map
       that makes a standard normal truncated to :math:`[-B, B]` uniform there and its
       inverse (exact at the knots, end slopes included); with the started gating
       (:math:`w_k / 2B`) a uniform stays uniform through the fold, so the untrained layer
       nearly preserves a standard normal: a stack starts close to :math:`\mathcal{N}(0, I)`
       instead of a folded, many-bumped density.

    With :math:`k(x)` the pieces that :math:`x` falls in,

    .. math::

        \log p(x) = \log p_Z(z) + \sum_j \Big[\log p(k_j(x) \mid u, x_a)
            + \log\Big|\frac{\partial u_j}{\partial x_{b,j}}\Big|
            + \log\Big|\frac{\partial z_j}{\partial u_j}\Big|\Big]

    (plus :math:`\log|g_j'|` with the spline before the fold).

    It integrates to one for every latent density :math:`p_Z`: the pieces that fold onto
    :math:`u` share its mass through the gating, which sums to one over exactly those pieces
    (the mask). Sampling inverts the layer: :math:`u = h^{-1}(z)`, then draw
    :math:`k_j \sim p(\cdot \mid u, x_a)` and take the point of piece :math:`k_j` that folds
    to :math:`u_j`.

    With ``continuous=True`` (the default) the gating is :math:`w_k / 2B` where pieces meet
    (:math:`u_j = \pm B`), which makes the density continuous in :math:`x`: edges are then
    steep rather than sharp (:math:`\rho` falls from 1 to 0 mostly within :math:`B / 8` of
    the ends, about a sixteenth of a piece's width on either side of a fold line). With
    ``continuous=False`` the density may jump where pieces meet (sharp edges), but the
    pathwise gradient of a log-likelihood then misses the terms from data points crossing the
    moving piece boundaries: the gradient of the piece widths is biased, and
    maximum-likelihood training stalls in our experiments. A steeper damping
    (:math:`1 - (u / B)^{32}`) comes close to that: it doubled the benchmark checkerboard's KL.

    **Conditional** (``context_dim=C``): every method takes a ``context`` of shape
    ``(*batch, C)``, broadcast against the points' ``(..., *batch)``, and both networks read it
    next to :math:`x_a`: the widths and elementwise maps are functions of :math:`(x_a, c)` and
    the gating of :math:`(x_a, c, u, c_k, k)`. For a fixed :math:`c` the layer is an
    unconditional one (the argument above holds for each :math:`c`), so the density
    integrates to one for every context. The networks' last layers start at zero, so the
    untrained layer does not depend on the context. (The context is taken as it is:
    :class:`~pyro_mixflow.nn.RAD` standardizes it first.)

    Args:
        input_dim: Dimension :math:`D` of the points.
        num_pieces: Number :math:`K` of pieces of the fold (1: no fold; the layer is then a
            spline coupling, with no gating network).
        hidden_dims: Hidden widths of the two networks (widths and elementwise map from
            :math:`x_a`; gating from :math:`(x_a, u, c_k, k)`). With ``network="residual"``
            they must be equal: ``(w,) * n`` is ``n`` residual blocks of width ``w``.
        network: ``"residual"`` (a linear layer to the width, residual blocks
            :math:`h \mapsto h + W_2\,a(W_1\,a(h))`, the output layer; nflows'
            ``ResidualNet`` design) or ``"mlp"`` (plain layers). SiLU activations.
        bound: Half-width :math:`B` of the folded interval.
        parity: Which coordinates are folded (``i % 2 == parity``); alternate it in a stack.
        elementwise: ``"spline"``, ``"affine"`` or ``"none"``.
        num_bins: Bins of the elementwise spline.
        min_width: Smallest piece width as a fraction of :math:`2B / K` (bounds the slopes).
        continuous: Damp the gating network by :math:`\rho(u)` (a continuous density).
        context_dim: Dimension :math:`C` of the context (``None``: unconditional).

    Example:
        >>> layer = RADCoupling(2, num_pieces=3, hidden_dims=(8,))
        >>> x = torch.randn(5, 2)
        >>> z, log_weight = layer(x)
        >>> torch.allclose(layer.inverse(z, pieces=layer.piece_index(x)), x, atol=1e-5)
        True
        >>> layer.inverse(z).shape  # pieces drawn from the gating
        torch.Size([5, 2])

    References:
        A RAD approach to deep mixture models. L. Dinh, J. Sohl-Dickstein, R. Pascanu,
        H. Larochelle, 2019. arXiv:1903.07714.

        Neural Spline Flows. C. Durkan, A. Bekasov, I. Murray, G. Papamakarios, 2019.
        arXiv:1906.04032.
    """

    def __init__(
        self,
        input_dim: int,
        *,
        num_pieces: int = 2,
        hidden_dims: Sequence[int] = (64, 64),
        network: str = "residual",
        bound: float = 3.0,
        parity: int = 0,
        elementwise: str = "spline",
        num_bins: int = 8,
        min_width: float = 0.01,
        continuous: bool = True,
        context_dim: int | None = None,
    ) -> None:
        super().__init__()
        check_positive_int("input_dim", input_dim)
        check_positive_int("num_pieces", num_pieces)
        check_positive_int("num_bins", num_bins)
        hidden_dims = tuple(hidden_dims)
        for width in hidden_dims:
            check_positive_int("hidden_dims[i]", width)
        if network not in NETWORKS:
            raise ValueError(f"`network` must be one of {NETWORKS}, got {network!r}")
        if network == "residual" and len(set(hidden_dims)) != 1:
            raise ValueError(
                f"`hidden_dims` must be equal sizes with network='residual', got {hidden_dims}"
            )
        if isinstance(bound, bool) or not isinstance(bound, int | float) or not bound > 0:
            raise ValueError(f"`bound` must be a positive number, got {bound!r}")
        if parity not in (0, 1):
            raise ValueError(f"`parity` must be 0 or 1, got {parity!r}")
        if elementwise not in _ELEMENTWISE:
            raise ValueError(f"`elementwise` must be one of {_ELEMENTWISE}, got {elementwise!r}")
        if not 0 <= min_width < 1:
            raise ValueError(f"`min_width` must be in [0, 1), got {min_width!r}")
        if context_dim is not None:
            check_positive_int("context_dim", context_dim)
        self.context_dim = context_dim
        self.input_dim, self.num_pieces, self.bound = input_dim, num_pieces, float(bound)
        self.elementwise, self.num_bins, self.min_width = elementwise, num_bins, min_width
        self.continuous = bool(continuous)
        folded = [i for i in range(input_dim) if i % 2 == parity or input_dim == 1]
        kept = [i for i in range(input_dim) if i not in folded]
        self.register_buffer("folded", torch.tensor(folded, dtype=torch.long), persistent=False)
        self.register_buffer("kept", torch.tensor(kept, dtype=torch.long), persistent=False)
        d_a, d_b = len(kept), len(folded)
        per_coordinate = {"spline": 2 * (3 * num_bins + 1), "affine": 2, "none": 0}[elementwise]
        self._map_size = per_coordinate
        d_c = context_dim or 0  # the context is read next to x_a
        self.conditioner = _Conditioner(
            d_a + d_c, d_b * (num_pieces + per_coordinate), hidden_dims, network, _CONDITIONER_SCALE
        )
        if elementwise == "spline":
            bias = self.conditioner.last_bias().view(d_b, num_pieces + per_coordinate)
            with torch.no_grad():
                splines = _uniformizing_splines(num_bins, self.bound).to(bias)
                bias[:, num_pieces:] = splines / _CONDITIONER_SCALE
        self.gate = None  # with one piece the fold is the identity map and there is no choice
        if num_pieces > 1:
            gate_inputs = d_a + d_c + 2 * d_b + num_pieces
            self.gate = _Conditioner(gate_inputs, d_b, hidden_dims, network, _GATE_SCALE)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        r"""Data to latent: the latent point and the layer's log-weight.

        Args:
            x: Points of shape ``(..., D)``.
            context: The context ``(*batch, C)`` of a conditional layer (else ``None``).

        Returns:
            ``(z, log_weight)`` of shapes ``(..., D)`` and ``(...)``, with
            ``log_weight`` :math:`= \sum_j [\log p(k_j \mid u, x_a) + \log|\partial z_j /
            \partial x_{b,j}|]`.
        """
        x, features = self._inputs("x", x, context)
        x_a, x_b = x[..., self.kept], x[..., self.folded]
        edges, log_widths, params = self._conditioning(features)
        x_b, log_det_pre = self._elementwise(x_b, params, inverse=False, pre=True)
        pieces = self._piece_index(x_b, edges)  # [..., d_b], K = outside
        inside = pieces < self.num_pieces
        k = pieces.clamp(max=self.num_pieces - 1).unsqueeze(-1)
        left = edges[..., :-1].gather(-1, k).squeeze(-1)
        log_width = log_widths.gather(-1, k).squeeze(-1)
        t = (x_b - left) * (-log_width).exp()  # position in the piece, in [0, 1]
        even = k.squeeze(-1) % 2 == 0
        t = torch.where(even, t, 1 - t)
        u = torch.where(inside, (self.bound * (2 * t - 1)).clamp(-self.bound, self.bound), x_b)
        log_gate = self._log_gating(u, features, edges, log_widths)  # [..., d_b, K + 1]
        log_weight = self._fold_log_weight(pieces, log_gate, log_widths)
        z, log_det = self._elementwise(u, params, inverse=False)
        return self._merge(x_a, z, x), (log_det_pre + log_weight + log_det).sum(-1)

    def inverse(
        self,
        z: torch.Tensor,
        context: torch.Tensor | None = None,
        *,
        pieces: torch.Tensor | None = None,
        straight_through: bool = False,
    ) -> torch.Tensor:
        r"""Latent to data: draws each folded coordinate's piece from the gating, or takes it.

        .. math:: u = h^{-1}(z; x_a), \quad k_j \sim p(\cdot \mid u, x_a), \quad
                  x_{b,j} = x_{b,j}^{(k_j)}(u_j).

        With ``straight_through=True`` the value is the same exact draw, and the gradient of
        :math:`x_{b,j}` also flows into the gating probabilities as if it were
        :math:`\sum_k p(k \mid u, x_a)\, x_{b,j}^{(k)}(u_j)` (a biased estimate).

        Args:
            z: Latent points of shape ``(..., D)``.
            context: The context ``(*batch, C)`` of a conditional layer (else ``None``).
            pieces: Optional piece indices ``(..., d_b)`` (``K`` for outside), e.g. from
                :meth:`piece_index`; drawn from the gating when ``None``.
            straight_through: Add the straight-through gating gradient.

        Returns:
            Points of shape ``(..., D)``.
        """
        return self.inverse_and_log_weight(
            z, context, pieces=pieces, straight_through=straight_through
        )[0]

    def inverse_and_log_weight(
        self,
        z: torch.Tensor,
        context: torch.Tensor | None = None,
        *,
        pieces: torch.Tensor | None = None,
        straight_through: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        r"""Latent to data, with the log-weight of the path taken (as :meth:`forward` gives it).

        The log-weight is read along the sampling path, with the pieces drawn:
        :math:`\sum_j [\log p(k_j \mid u, x_a) + \log|\partial z_j / \partial x_{b,j}|]`.
        At steep splines a float32 draw can land, by rounding, a hair across a fold line
        from the piece it was drawn in; :meth:`forward` then reads the neighbouring piece's
        path, while this weight stays that of the draw. (In our Pyro SVI runs such draws,
        2 to 3 in 1,000, gave log-densities off by hundreds of nats, and the optimizer
        learned to exploit them.)

        Args:
            z: Latent points of shape ``(..., D)``.
            context: The context ``(*batch, C)`` of a conditional layer (else ``None``).
            pieces: Optional piece indices ``(..., d_b)``, as in :meth:`inverse`.
            straight_through: Add the straight-through gating gradient.

        Returns:
            ``(x, log_weight)`` of shapes ``(..., D)`` and ``(...)``.

        Example:
            >>> layer = RADCoupling(2, hidden_dims=(8,))
            >>> x, log_weight = layer.inverse_and_log_weight(torch.randn(4, 2))
            >>> torch.allclose(layer(x)[1], log_weight, atol=1e-4)
            True
        """
        z, features = self._inputs("z", z, context)
        x_a, z_b = z[..., self.kept], z[..., self.folded]
        edges, log_widths, params = self._conditioning(features)
        u, minus_log_det = self._elementwise(z_b, params, inverse=True)
        candidates = self._candidates(u, edges, log_widths)  # [..., d_b, K]
        log_gate = self._log_gating(u, features, edges, log_widths, candidates)  # [..., d_b, K + 1]
        if pieces is None:
            pieces = Categorical(logits=log_gate.detach(), validate_args=False).sample()
        elif pieces.shape != u.shape:
            got = tuple(pieces.shape)
            raise ValueError(f"`pieces` must have shape {tuple(u.shape)}, got {got}")
        choices = torch.cat([candidates, u.unsqueeze(-1)], -1)  # [..., d_b, K + 1]
        one_hot = F.one_hot(pieces, self.num_pieces + 1).to(u.dtype)
        if straight_through:
            probs = log_gate.exp()
            one_hot = one_hot + probs - probs.detach()
        x_b = (one_hot * choices).sum(-1)
        x_b, minus_log_det_pre = self._elementwise(x_b, params, inverse=True, pre=True)
        log_weight = self._fold_log_weight(pieces, log_gate, log_widths)
        log_weight = log_weight - minus_log_det - minus_log_det_pre
        return self._merge(x_a, x_b, z), log_weight.sum(-1)

    def piece_index(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        r"""The piece that each folded coordinate of ``x`` falls in.

        Args:
            x: Points of shape ``(..., D)``.
            context: The context ``(*batch, C)`` of a conditional layer (else ``None``).

        Returns:
            Long tensor ``(..., d_b)``: ``0 .. K - 1`` inside :math:`[-B, B]`, ``K`` outside.
        """
        x, features = self._inputs("x", x, context)
        edges, _, params = self._conditioning(features)
        x_b, _ = self._elementwise(x[..., self.folded], params, inverse=False, pre=True)
        return self._piece_index(x_b, edges)

    def gating_log_probs(
        self, x_a: torch.Tensor, u: torch.Tensor, context: torch.Tensor | None = None
    ) -> torch.Tensor:
        r"""The masked gating :math:`\log p(k_j \mid u, x_a)` of every piece.

        Args:
            x_a: Conditioning coordinates ``(..., D - d_b)``.
            u: Folded coordinates ``(..., d_b)`` (before the elementwise map).
            context: The context ``(*batch, C)`` of a conditional layer (else ``None``).

        Returns:
            Tensor ``(..., d_b, K + 1)``: the last entry is the outside piece; impossible
            pieces (inner ones when :math:`|u_j| > B`, the outside one otherwise) get
            :math:`-\infty`; each row sums to one in probability.
        """
        features = self._features(x_a, self._checked_context(context))
        edges, log_widths, _ = self._conditioning(features)
        return self._log_gating(u, features, edges, log_widths)

    def extra_repr(self) -> str:  # noqa: D102
        return (
            f"input_dim={self.input_dim}, num_pieces={self.num_pieces}, bound={self.bound}, "
            f"folded={self.folded.tolist()}, elementwise={self.elementwise!r}"
            + ("" if self.context_dim is None else f", context_dim={self.context_dim}")
        )

    def _check_points(self, name: str, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[-1] != self.input_dim:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"`{name}` must have shape (..., {self.input_dim}), got {shape}")

    def _checked_context(self, context: torch.Tensor | None) -> torch.Tensor | None:
        if self.context_dim is None:
            if context is not None:
                raise ValueError("`RADCoupling` is unconditional: `context` must be None")
            return None
        if not isinstance(context, torch.Tensor) or context.dim() == 0:
            got = tuple(context.shape) if isinstance(context, torch.Tensor) else context
            raise ValueError(
                f"`RADCoupling` is conditional (context_dim={self.context_dim}): `context` must "
                f"have shape (*batch, {self.context_dim}), got {got!r}"
            )
        if context.shape[-1] != self.context_dim:
            raise ValueError(
                f"`context.shape[-1]` must equal `context_dim` ({self.context_dim}): `context` "
                f"has shape {tuple(context.shape)}"
            )
        return context

    def _inputs(
        self, name: str, x: torch.Tensor, context: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The points, broadcast against the context's batch, and the networks' features."""
        self._check_points(name, x)
        context = self._checked_context(context)
        if context is not None:
            batch = torch.broadcast_shapes(x.shape[:-1], context.shape[:-1])
            x = x.expand(*batch, self.input_dim)
        return x, self._features(x[..., self.kept], context)

    @staticmethod
    def _features(x_a: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        """``x_a``, or ``(x_a, context)`` concatenated (broadcast): the networks' input."""
        if context is None:
            return x_a
        batch = torch.broadcast_shapes(x_a.shape[:-1], context.shape[:-1])
        context = context.to(x_a.dtype).expand(*batch, context.shape[-1])
        return torch.cat([x_a.expand(*batch, x_a.shape[-1]), context], -1)

    def _conditioning(
        self, features: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Edges ``(..., d_b, K + 1)``, log-widths ``(..., d_b, K)``, map params.

        ``features`` is :math:`x_a`, or :math:`(x_a, c)` for a conditional layer.
        """
        d_b, num_pieces = len(self.folded), self.num_pieces
        out = self.conditioner(features).unflatten(-1, (d_b, num_pieces + self._map_size))
        unit = out[..., :num_pieces].softmax(-1)
        unit = (1 - self.min_width) * unit + self.min_width / num_pieces
        widths = 2 * self.bound * unit  # [..., d_b, K]
        edges = F.pad(widths.cumsum(-1), (1, 0)) - self.bound
        edges = torch.cat([edges[..., :-1], torch.full_like(edges[..., -1:], self.bound)], -1)
        return edges, widths.log(), out[..., num_pieces:]

    def _piece_index(self, x_b: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
        inner = (x_b.unsqueeze(-1) >= edges[..., 1:-1]).sum(-1)  # [..., d_b] in 0 .. K - 1
        outside = x_b.abs() > self.bound
        return torch.where(outside, torch.full_like(inner, self.num_pieces), inner)

    def _candidates(
        self, u: torch.Tensor, edges: torch.Tensor, log_widths: torch.Tensor
    ) -> torch.Tensor:
        """The point of each piece that folds to ``u``: ``(..., d_b, K)``."""
        t = ((u.clamp(-self.bound, self.bound) + self.bound) / (2 * self.bound)).unsqueeze(-1)
        k = torch.arange(self.num_pieces, device=u.device)
        t = torch.where(k % 2 == 0, t, 1 - t)
        return edges[..., :-1] + log_widths.exp() * t

    def _fold_log_weight(
        self, pieces: torch.Tensor, log_gate: torch.Tensor, log_widths: torch.Tensor
    ) -> torch.Tensor:
        """``log p(k | u, x_a) + log|du / dx_b|`` of the pieces taken: ``(..., d_b)``."""
        inside = pieces < self.num_pieces
        k = pieces.clamp(max=self.num_pieces - 1).unsqueeze(-1)
        log_slope = math.log(2 * self.bound) - log_widths.gather(-1, k).squeeze(-1)
        log_slope = torch.where(inside, log_slope, torch.zeros_like(log_slope))
        return log_gate.gather(-1, pieces.unsqueeze(-1)).squeeze(-1) + log_slope

    def _log_gating(
        self,
        u: torch.Tensor,
        features: torch.Tensor,
        edges: torch.Tensor,
        log_widths: torch.Tensor,
        candidates: torch.Tensor | None = None,
    ) -> torch.Tensor:
        logits = log_widths
        if self.gate is not None:  # (one piece: nothing to choose)
            logits = logits + self._free_gating(u, features, edges, log_widths, candidates)
        inside = (u.abs() <= self.bound).unsqueeze(-1)
        inner = torch.where(inside, logits.log_softmax(-1), -math.inf)
        outer = torch.where(inside, -math.inf, 0.0).to(u.dtype)
        return torch.cat([inner, outer], -1)

    def _free_gating(
        self,
        u: torch.Tensor,
        features: torch.Tensor,
        edges: torch.Tensor,
        log_widths: torch.Tensor,
        candidates: torch.Tensor | None,
    ) -> torch.Tensor:
        """The gating network's term (damped by ``rho(u)``), ``(..., d_b, K)``."""
        num_pieces = self.num_pieces
        if candidates is None:
            candidates = self._candidates(u, edges, log_widths)
        batch = torch.broadcast_shapes(u.shape[:-1], features.shape[:-1])
        eye = torch.eye(num_pieces, dtype=u.dtype, device=u.device)
        inputs = torch.cat(
            [
                features.unsqueeze(-2).expand(*batch, num_pieces, features.shape[-1]),
                u.unsqueeze(-2).expand(*batch, num_pieces, u.shape[-1]),
                candidates.transpose(-1, -2).expand(*batch, num_pieces, u.shape[-1]),
                eye.expand(*batch, num_pieces, num_pieces),
            ],
            -1,
        )  # [..., K, d_a (+ C) + 2 d_b + K]
        free = self.gate(inputs).transpose(-1, -2)  # [..., d_b, K]
        if self.continuous:  # no gating preference where pieces meet (u = ±B)
            edge = (u.clamp(-self.bound, self.bound) / self.bound).square() ** _EDGE_POWER
            free = free * (1 - edge).unsqueeze(-1)
        return free

    def _elementwise(
        self, u: torch.Tensor, params: torch.Tensor, *, inverse: bool, pre: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The map after the fold (``pre=False``) or, for splines, the one before it."""
        if self.elementwise == "none" or (pre and self.elementwise != "spline"):
            return u, torch.zeros_like(u)
        if self.elementwise == "affine":
            shift, log_scale = params.unbind(-1)
            if inverse:
                return (u - shift) * (-log_scale).exp(), -log_scale.expand_as(u)
            return shift + log_scale.exp() * u, log_scale.expand_as(u)
        bins, bound = self.num_bins, self.bound
        size = 3 * bins + 1
        params = params[..., :size] if pre else params[..., size:]
        shape = torch.broadcast_shapes(u.shape, params.shape[:-1])
        params, u = params.expand(*shape, size), u.expand(shape)
        raw = params[..., 2 * bins :]  # slopes at knots 0 .. bins: the two ends as logarithms
        ends = raw[..., [0, -1]].clamp(max=_MAX_LOG_END_DERIVATIVE).exp().clamp(min=_MIN_DERIVATIVE)
        inner = _MIN_DERIVATIVE + F.softplus(raw[..., 1:-1])
        derivatives = torch.cat([ends[..., :1], inner, ends[..., 1:]], -1)
        out, log_det = rational_quadratic(
            u,
            params[..., :bins],
            params[..., bins : 2 * bins],
            derivatives,
            bound=bound,
            inverse=inverse,
        )
        inside = u.abs() <= bound  # identity outside [-B, B]
        return torch.where(inside, out, u), torch.where(inside, log_det, torch.zeros_like(u))

    def _merge(self, x_a: torch.Tensor, x_b: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        shape = torch.broadcast_shapes(x_a.shape[:-1], x_b.shape[:-1]) + like.shape[-1:]
        out = like.new_empty(shape, dtype=x_b.dtype)
        out[..., self.kept] = x_a.expand(*shape[:-1], x_a.shape[-1])
        out[..., self.folded] = x_b.expand(*shape[:-1], x_b.shape[-1])
        return out


class _Conditioner(nn.Module):
    """A network ``(..., in) -> (..., out)`` whose last layer starts at zero, times ``scale``.

    With no input features it is a free vector.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        hidden_dims: tuple[int, ...],
        network: str,
        scale: float,
    ) -> None:
        super().__init__()
        self.in_features, self.scale = in_features, scale
        if in_features == 0:
            self.bias = nn.Parameter(torch.zeros(out_features))
        elif network == "residual":
            width, blocks = hidden_dims[0], len(hidden_dims)
            self.net = residual_mlp(
                in_features, out_features, width, blocks, nn.SiLU, zero_last=True
            )
        else:
            self.net = mlp((in_features, *hidden_dims, out_features), nn.SiLU, zero_last=True)

    def last_bias(self) -> torch.Tensor:
        return self.bias if self.in_features == 0 else self.net[-1].bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_features == 0:
            return self.scale * self.bias.expand(*x.shape[:-1], self.bias.shape[0])
        return self.scale * self.net(x)


def _uniformizing_splines(num_bins: int, bound: float) -> torch.Tensor:
    """Spline parameters of the map that makes a truncated normal uniform, and of its inverse.

    Returns the raw parameters ``[2 * (3 * num_bins + 1)]`` that :meth:`RADCoupling._elementwise`
    reads (bin widths, bin heights, then the derivatives at the ``num_bins + 1`` knots: nflows'
    softplus parameterization inside, logarithms at the two ends): the map of a normal
    truncated to ``[-bound, bound]`` onto the uniform there (exact at the knots, slopes
    included), then its inverse.
    """
    normal = torch.distributions.Normal(0.0, 1.0)
    knots = torch.linspace(-bound, bound, num_bins + 1, dtype=torch.float64)
    cdf = normal.cdf(knots)
    mass = cdf[-1] - cdf[0]
    steps = (cdf.diff() / mass).log()  # bin heights as a fraction of the range
    slopes = 2 * bound * normal.log_prob(knots).exp() / mass
    flat = torch.zeros(num_bins, dtype=torch.float64)

    def raw(derivative: torch.Tensor) -> torch.Tensor:  # min_derivative + softplus(raw) inside
        inner = _inverse_softplus(derivative[1:-1] - _MIN_DERIVATIVE)
        return torch.cat([derivative[:1].log(), inner, derivative[-1:].log()])

    forward = torch.cat([flat, steps, raw(slopes)])
    inverse = torch.cat([steps, flat, raw(1 / slopes)])
    return torch.cat([forward, inverse])


def _inverse_softplus(y: torch.Tensor) -> torch.Tensor:
    """``x`` with ``softplus(x) = y`` for ``y > 0`` (tiny ``y`` are raised to 1e-30)."""
    y = y.clamp(min=1e-30)
    return y + torch.log(-torch.expm1(-y))
