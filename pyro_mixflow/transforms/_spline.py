r"""A monotone rational-quadratic spline on ``[-B, B]`` with an accurate inverse (private)."""

from __future__ import annotations

import torch

__all__ = ["rational_quadratic"]

MIN_BIN = 1e-3  # smallest bin width and height, as a fraction of the range (nflows' default)


def rational_quadratic(
    x: torch.Tensor,
    widths: torch.Tensor,
    heights: torch.Tensor,
    derivatives: torch.Tensor,
    *,
    bound: float,
    inverse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The rational-quadratic spline of Durkan et al. (2019) on ``[-B, B]``, or its inverse.

    Bin widths and heights are ``MIN_BIN + (1 - n MIN_BIN) softmax(...)`` of the range
    :math:`2B`, the knot slopes :math:`\delta_0, \dots, \delta_n` are given (positive). In
    bin :math:`k`, with :math:`\theta \in [0, 1]` the position in the bin, :math:`s_k` its
    height over its width and :math:`y_k` its bottom,

    .. math::

        y = y_k + h_k \frac{s_k \theta^2 + \delta_k \theta (1 - \theta)}
                      {s_k + (\delta_k + \delta_{k + 1} - 2 s_k)\, \theta (1 - \theta)}.

    The inverse solves that quadratic in :math:`\theta` with the cancellation-free root
    :math:`2c / (-b - \sqrt{b^2 - 4ac})` **in float64** (the discriminant clamped at zero,
    :math:`\theta` clamped to the bin), and casts back: in float32, nflows' inverse loses
    accuracy (or fails its ``discriminant >= 0`` assertion) at the steep, nearly flat
    splines that long variational fits reach, and the draws then stop following the density.
    Points outside ``[-B, B]`` are clamped to it (the caller keeps them as they are).

    Args:
        x: Inputs (outputs of the spline when ``inverse``), any shape ``S``.
        widths: Unnormalized bin widths ``S + (n,)``.
        heights: Unnormalized bin heights ``S + (n,)``.
        derivatives: Positive slopes at the ``n + 1`` knots ``S + (n + 1,)``.
        bound: Half-width :math:`B` of the square ``[-B, B]^2``.
        inverse: Invert the spline.

    Returns:
        ``(y, log_abs_det)``, each of shape ``S``: the log of :math:`|dy/dx|` at the input
        (minus that of the forward map at the output when ``inverse``).

    Example:
        >>> w, h, d = torch.randn(3, 4), torch.randn(3, 4), torch.rand(3, 5) + 0.5
        >>> x = torch.tensor([-2.0, 0.3, 2.9])
        >>> y, log_det = rational_quadratic(x, w, h, d, bound=3.0)
        >>> x_back, minus_log_det = rational_quadratic(y, w, h, d, bound=3.0, inverse=True)
        >>> bool(torch.allclose(x_back, x, atol=1e-5) and torch.allclose(log_det, -minus_log_det))
        True
    """
    dtype = x.dtype
    if inverse:  # the quadratic's root in float64; the gradient flows through the casts
        x, widths, heights = x.double(), widths.double(), heights.double()
        derivatives = derivatives.double()
    x = x.clamp(-bound, bound)
    x_knots, x_widths = _knots(widths, bound)
    y_knots, y_heights = _knots(heights, bound)
    knots = y_knots if inverse else x_knots
    k = (x.unsqueeze(-1) >= knots[..., 1:-1]).sum(-1, keepdim=True)  # bin index, 0 .. n - 1
    x_k, w_k = x_knots.gather(-1, k).squeeze(-1), x_widths.gather(-1, k).squeeze(-1)
    y_k, h_k = y_knots.gather(-1, k).squeeze(-1), y_heights.gather(-1, k).squeeze(-1)
    d_0 = derivatives.gather(-1, k).squeeze(-1)
    d_1 = derivatives.gather(-1, k + 1).squeeze(-1)
    s = h_k / w_k
    curve = d_0 + d_1 - 2 * s
    if inverse:
        dy = x - y_k
        a = h_k * (s - d_0) + dy * curve
        b = h_k * d_0 - dy * curve
        c = -s * dy
        root = (b.square() - 4 * a * c).clamp(min=0).sqrt()
        theta = (2 * c / (-b - root)).nan_to_num(0.0).clamp(0, 1)
        out = x_k + theta * w_k
    else:
        theta = (x - x_k) / w_k
    mix = theta * (1 - theta)
    denominator = s + curve * mix
    slope = s.square() * (d_1 * theta.square() + 2 * s * mix + d_0 * (1 - theta).square())
    log_det = slope.log() - 2 * denominator.log()
    if inverse:
        return out.to(dtype), (-log_det).to(dtype)
    return y_k + h_k * (s * theta.square() + d_0 * mix) / denominator, log_det


def _knots(unnormalized: torch.Tensor, bound: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Knot positions ``(..., n + 1)`` from ``-B`` to ``B`` exactly, and the bin sizes."""
    n = unnormalized.shape[-1]
    fraction = MIN_BIN + (1 - MIN_BIN * n) * unnormalized.softmax(-1)
    inner = fraction[..., :-1].cumsum(-1) * (2 * bound) - bound
    ends = torch.full_like(fraction[..., :1], bound)
    knots = torch.cat([-ends, inner, ends], -1)
    return knots, knots.diff()
