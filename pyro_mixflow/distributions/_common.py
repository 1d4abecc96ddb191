r"""Helpers shared by the distributions of this package (private)."""

from __future__ import annotations

import math

import torch

__all__ = [
    "HALF_LOG_2PI",
    "batched_rowwise_matmul",
    "check_float_tensor",
    "check_locs_scales",
    "clamped_exp_",
    "expected_branch_log_prob",
    "logsumexp",
    "min_exponent",
    "take_component",
]

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def expected_branch_log_prob(
    dist: torch.distributions.Distribution, values: torch.Tensor, log_weights: torch.Tensor
) -> torch.Tensor:
    """``sum_k w_k log p(x_k)``, with the branch axis moved out of the batch dimensions."""
    log_prob = dist.log_prob(values.movedim(-2, 0)).movedim(0, -1)  # [*S, *B, K]
    return (log_weights.exp() * log_prob).sum(-1)


def check_locs_scales(locs, scales) -> torch.Size:
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


def check_float_tensor(name: str, value, reference: torch.Tensor) -> None:
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

    Terms more than ``-log(tiny)`` below the maximum are counted as ``tiny`` instead of their
    true (subnormal or zero) value: a relative change below ``K * tiny`` of the sum, far under
    the dtype's resolution. On x86 CPUs ``exp`` of such inputs is an order of magnitude slower
    than of ordinary ones, and mixtures with separated components produce them for most terms.
    The backward pass keeps only the input and the result (twice differentiable).
    """
    return _LogSumExp.apply(x)


class _LogSumExp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        top = x.amax(-1, keepdim=True)
        top = top.masked_fill(~torch.isfinite(top), 0.0)
        out = clamped_exp_(x - top).sum(-1).log_() + top.squeeze(-1)
        ctx.save_for_backward(x, out)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, out = ctx.saved_tensors
        if torch.is_grad_enabled():  # differentiating the backward itself: no in-place ops
            weights = (x - out.unsqueeze(-1)).clamp(min=min_exponent(x.dtype)).exp()
            return grad.unsqueeze(-1) * weights
        return clamped_exp_(x - out.unsqueeze(-1)).mul_(grad.unsqueeze(-1))


def clamped_exp_(x: torch.Tensor) -> torch.Tensor:
    """``exp`` of a temporary, in place, with arguments below ``log(tiny)`` raised to it."""
    return x.clamp_(min=min_exponent(x.dtype)).exp_()


def min_exponent(dtype: torch.dtype) -> float:
    return math.ceil(math.log(torch.finfo(dtype).tiny))
