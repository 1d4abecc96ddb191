r"""Helpers shared by the distributions of this package (private)."""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = [
    "HALF_LOG_2PI",
    "NoClosedFormMixin",
    "batched_rowwise_matmul",
    "check_float_tensor",
    "check_locs_scales",
    "clamped_exp_",
    "expected_branch_log_prob",
    "logsumexp",
    "logsumexp_above",
    "min_exponent",
    "take_component",
]

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


class NoClosedFormMixin:
    """``entropy``, ``cdf`` and ``icdf`` for multivariate distributions without closed forms.

    torch's base class raises a bare ``NotImplementedError``; these say why and what to use
    instead. Put the mixin first among the bases so that it overrides torch's methods.
    ``cdf`` and ``icdf`` defer to the next base for ``event_shape ()`` (a flow over a
    univariate base).
    """

    def entropy(self) -> torch.Tensor:
        """Not available in closed form.

        Raises:
            NotImplementedError: Always, naming the Monte-Carlo estimate to use instead.
        """
        raise NotImplementedError(
            f"{type(self).__name__} has no closed-form entropy; estimate it with "
            "-log_prob(sample((n,))).mean(0)"
        )

    def cdf(self, value: torch.Tensor) -> torch.Tensor:
        """Defined only for ``event_shape ()``.

        Args:
            value: Points.

        Returns:
            The next base's ``cdf`` when ``event_shape`` is ``()``.

        Raises:
            NotImplementedError: For a multivariate ``event_shape``.
        """
        if not self.event_shape:
            return super().cdf(value)
        raise NotImplementedError(
            f"{type(self).__name__} is multivariate (event_shape {tuple(self.event_shape)}) and "
            "cdf is defined only for event_shape (); estimate P(X <= x) by counting sample() draws"
        )

    def icdf(self, value: torch.Tensor) -> torch.Tensor:
        """Defined only for ``event_shape ()``.

        Args:
            value: Probabilities.

        Returns:
            The next base's ``icdf`` when ``event_shape`` is ``()``.

        Raises:
            NotImplementedError: For a multivariate ``event_shape``.
        """
        if not self.event_shape:
            return super().icdf(value)
        raise NotImplementedError(
            f"{type(self).__name__} is multivariate (event_shape {tuple(self.event_shape)}) and "
            "icdf is defined only for event_shape (); draw with sample() or rsample() instead"
        )


def expected_branch_log_prob(
    dist: torch.distributions.Distribution, values: torch.Tensor, log_weights: torch.Tensor
) -> torch.Tensor:
    """``sum_k w_k log p(x_k)``, with the branch axis moved out of the batch dimensions."""
    log_prob = dist.log_prob(values.movedim(-2, 0)).movedim(0, -1)  # [*S, *B, K]
    return (log_weights.exp() * log_prob).sum(-1)


def check_locs_scales(locs: object, scales: object) -> torch.Size:
    """Checks ``locs`` and ``scales`` of shape ``(*batch, K, D)``; returns their broadcast shape."""
    for name, t in (("locs", locs), ("scales", scales)):
        check_float_tensor(name, t, locs)
        if t.dim() < 2:
            raise ValueError(f"`{name}` must have shape (*batch, K, D), got {tuple(t.shape)}")
    try:
        return torch.broadcast_shapes(locs.shape, scales.shape)
    except RuntimeError:
        raise ValueError(
            f"`locs.shape` {tuple(locs.shape)} and `scales.shape` {tuple(scales.shape)} "
            "do not broadcast"
        ) from None


def check_float_tensor(name: str, value: object, reference: object) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"`{name}` must have a floating-point dtype, got {value.dtype}")
    if isinstance(reference, torch.Tensor) and value.dtype != reference.dtype:
        raise TypeError(
            f"`{name}.dtype` ({value.dtype}) differs from `locs.dtype` ({reference.dtype})"
        )
    if isinstance(reference, torch.Tensor) and value.device != reference.device:
        raise ValueError(f"`{name}` is on {value.device} but `locs` is on {reference.device}")


def batched_rowwise_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``out[..., k] = sum_m x[..., m] * weight[..., k, m]`` with batch dims shared.

    ``x`` has shape ``(*S, *B, M)`` and ``weight`` ``(*B, K, M)``. The sample dims ``*S`` become
    the rows of one matrix product per batch element, so ``weight`` is never repeated over them.
    """
    batch_shape = weight.shape[:-2]
    num_out, num_in = weight.shape[-2:]
    if not batch_shape:
        return x @ weight.T
    x = x.expand(x.shape[: x.dim() - len(batch_shape) - 1] + batch_shape + (num_in,))
    sample_shape = x.shape[: x.dim() - len(batch_shape) - 1]
    num_batch = math.prod(batch_shape)
    rows = x.reshape(-1, num_batch, num_in).transpose(0, 1)  # [B, S, M]
    out = torch.bmm(rows, weight.reshape(num_batch, num_out, num_in).transpose(1, 2))
    return out.transpose(0, 1).reshape(sample_shape + batch_shape + (num_out,))


def take_component(params: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Selects ``params[..., index, :]`` per point: ``(*B, K, D)``, ``(*S, *B)`` -> ``(*S, *B, D)``.

    Flat indexing keeps the backward pass an ``index_add`` into ``(*B, K, D)`` rather than a
    scatter into a tensor with the sample dimensions.
    """
    batch_shape = params.shape[:-2]
    num_components, dim = params.shape[-2:]
    offsets = torch.arange(math.prod(batch_shape), device=index.device).reshape(batch_shape)
    flat = (index + offsets * num_components).reshape(-1)
    return params.reshape(-1, dim)[flat].reshape(index.shape + (dim,))


def logsumexp(x: torch.Tensor) -> torch.Tensor:
    """``torch.logsumexp`` over the last dimension, without the slow path for far-off terms.

    Terms more than ``-min_exponent`` below the maximum are counted as ``exp(min_exponent)``
    (about ``tiny · 2^24``) instead of their true (tiny, subnormal or zero) value: a relative
    change below ``K · tiny · 2^24`` of the sum, far under the dtype's resolution. On x86
    CPUs ``exp`` of such inputs is an order of magnitude slower than of ordinary ones, and
    mixtures with separated components produce them for most terms.
    The backward pass keeps only the input and the result (twice differentiable).
    """
    return _LogSumExp.apply(x)


def logsumexp_above(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``log sum_k exp(x_k - x_index)`` over the last dimension, for ``index`` the argmax.

    The same terms as :func:`logsumexp` less the leading one, without ever adding and then
    subtracting it: the result (in ``[0, log K]``) keeps its full relative precision when the
    leading term is huge. ``index`` has shape ``(..., 1)``; rows whose leading term is not
    finite give NaN. Twice differentiable.
    """
    return _LogSumExpAbove.apply(x, index)


class _LogSumExpAbove(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        out = clamped_exp_(x - x.gather(-1, index)).sum(-1).log_()
        ctx.save_for_backward(x, index, out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        x, index, out = ctx.saved_tensors
        grad = grad.unsqueeze(-1)
        if torch.is_grad_enabled():  # differentiating the backward itself: no in-place ops
            shifted = x - x.gather(-1, index) - out.unsqueeze(-1)
            weights = shifted.clamp(min=min_exponent(x.dtype)).exp()
            return grad * weights.scatter_add(-1, index, -torch.ones_like(grad)), None
        weights = clamped_exp_((x - x.gather(-1, index)).sub_(out.unsqueeze(-1)))
        return weights.scatter_add_(-1, index, -torch.ones_like(grad)).mul_(grad), None


class _LogSumExp(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        top = x.amax(-1, keepdim=True)
        shift = top.masked_fill(~torch.isfinite(top), 0.0)
        out = clamped_exp_(x - shift).sum(-1).log_() + shift.squeeze(-1)
        # A row of -inf sums to zero, not to K * tiny (the clamp above).
        out.masked_fill_(top.squeeze(-1) == -math.inf, -math.inf)
        ctx.save_for_backward(x, out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        x, out = ctx.saved_tensors
        if torch.is_grad_enabled():  # differentiating the backward itself: no in-place ops
            weights = (x - out.unsqueeze(-1)).clamp(min=min_exponent(x.dtype)).exp()
            return grad.unsqueeze(-1) * weights
        return clamped_exp_(x - out.unsqueeze(-1)).mul_(grad.unsqueeze(-1))


def clamped_exp_(x: torch.Tensor) -> torch.Tensor:
    """``exp`` of a temporary, in place, with arguments below :func:`min_exponent` raised to it."""
    return x.clamp_(min=min_exponent(x.dtype)).exp_()


def min_exponent(dtype: torch.dtype) -> float:
    """The smallest exponent whose ``exp`` the house ``logsumexp`` computes: ``log(tiny · 2^24)``.

    Far-off terms count as ``exp`` of it (about 2e-31 in float32), a relative change of the
    sum below ``K · 2e-31``, far under the dtype's resolution. The margin of ``2^24`` above
    ``tiny`` keeps their gradients normal floats once scaled by a mean over up to ``2^24``
    rows: subnormal gradients made the backward pass of a mixture density network 2 to 3
    times slower on x86 CPUs without flush-to-zero.
    """
    return math.ceil(math.log(torch.finfo(dtype).tiny) + 24 * math.log(2))
