r"""Draws, pathwise gradients and whitened densities of full-covariance mixtures (private)."""

from __future__ import annotations

import copy
import math
from typing import Any, TypeVar

import torch
from torch.autograd.function import once_differentiable
from torch.distributions import Categorical

from pyro_mixflow.distributions._common import (
    HALF_LOG_2PI,
    batched_rowwise_matmul,
    check_float_tensor,
    min_exponent,
    take_component,
)

__all__ = [
    "check_mixture_weights",
    "component_matvec",
    "diagonal_half_square",
    "implicit_mvn_mixture_rsample",
    "mixture_covariance",
    "mvn_mixture_sample",
    "promoted",
    "take_scaled_component",
    "whitened_half_square",
]

_SQRT_HALF = math.sqrt(0.5)

_Dist = TypeVar("_Dist", bound=torch.distributions.Distribution)

# Largest number of (sample, component, dimension) elements held at once in the backward pass;
# larger problems are processed in blocks of samples.
_BLOCK_ELEMENTS = 2**24

# Largest number of (point, component, row) residuals held at once by ``whitened_half_square``
# (forward and backward): about the L2 cache, so that a block is squared while still there.
_LOG_PROB_BLOCK_ELEMENTS = 2**18


def check_mixture_weights(
    logits: torch.Tensor | None,
    probs: torch.Tensor | None,
    locs: torch.Tensor,
    param_shape: torch.Size,
    shapes: str,
) -> tuple[torch.Size, dict[str, torch.Tensor]]:
    """Checks ``logits`` or ``probs`` against the component parameters of shape ``(*B, K, D)``.

    Returns the broadcast batch shape and ``{"logits": normalized}`` or ``{"probs": normalized}``
    expanded to ``(*batch, K)``. ``shapes`` names the other parameters' shapes for the errors.
    """
    if (logits is None) == (probs is None):
        raise ValueError("Either `probs` or `logits` must be specified, but not both.")
    name = "logits" if probs is None else "probs"
    weights = logits if probs is None else probs
    check_float_tensor(name, weights, locs)
    if weights.dim() < 1:
        raise ValueError(f"`{name}` must have shape (*batch, K), got ()")
    num_components = param_shape[-2]
    if weights.shape[-1] != num_components:
        raise ValueError(
            f"`{name}.shape[-1]` ({weights.shape[-1]}) does not match the number of components "
            f"`locs.shape[-2]` ({num_components}); shapes: {shapes}, {name} "
            f"{tuple(weights.shape)}"
        )
    try:
        batch_shape = torch.broadcast_shapes(param_shape[:-2], weights.shape[:-1])
    except RuntimeError:
        raise ValueError(
            f"batch shapes do not broadcast: component parameters {tuple(param_shape[:-2])}, "
            f"{name} {tuple(weights.shape[:-1])}"
        ) from None
    shape = batch_shape + (num_components,)
    if probs is None:
        return batch_shape, {"logits": (logits - logits.logsumexp(-1, keepdim=True)).expand(shape)}
    return batch_shape, {"probs": (probs / probs.sum(-1, keepdim=True)).expand(shape)}


def promoted(dist: _Dist, value: torch.Tensor) -> tuple[_Dist, torch.Tensor]:
    """``dist`` and ``value`` (expanded) in torch's promoted dtype, as ``Normal.log_prob``.

    A shallow copy of ``dist`` holds its floating-point tensors cast (differentiably) when the
    dtype changes.
    """
    dtype = torch.promote_types(value.dtype, dist.locs.dtype)
    x = value.to(dtype).expand(torch.broadcast_shapes(value.shape, dist._extended_shape()))
    if dtype == dist.locs.dtype:
        return dist, x
    new = copy.copy(dist)
    for name, tensor in dist.__dict__.items():
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
            setattr(new, name, tensor.to(dtype))
    return new, x


def take_scaled_component(
    matrix: torch.Tensor, index: torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    """``matrix[..., index, :, :] @ noise`` per point, no ``N x D x D`` tensor if ``K <= D``.

    ``matrix`` has shape ``(*B, K, D, M)``, ``index`` ``(*S, *B)`` and ``noise`` ``(*S, *B, M)``;
    the result is ``(*S, *B, D)``. Every component's product is formed (``N x K x D``) and the
    drawn one kept; with more components than dimensions the drawn matrices are gathered instead.
    """
    batch_shape = matrix.shape[:-3]
    num_components, dim, num_cols = matrix.shape[-3:]
    if num_components <= dim:
        flat = matrix.reshape(batch_shape + (num_components * dim, num_cols))
        every = batched_rowwise_matmul(noise, flat)  # [*S, *B, K * D]
        every = every.reshape(index.shape + (num_components, dim))
        pick = index[..., None, None].expand(index.shape + (1, dim))
        return every.gather(-2, pick).squeeze(-2)
    rows = take_component(matrix.reshape(batch_shape + (num_components, dim * num_cols)), index)
    return (rows.reshape(index.shape + (dim, num_cols)) @ noise.unsqueeze(-1)).squeeze(-1)


def mvn_mixture_sample(
    locs: torch.Tensor,
    scale_tril: torch.Tensor,
    logits: torch.Tensor,
    sample_shape: torch.Size,
) -> torch.Tensor:
    r"""Exact draws without a graph: :math:`k \sim \pi`, :math:`x = \mu_k + L_k \varepsilon`.

    Args:
        locs: Component means, ``(*batch, K, D)``.
        scale_tril: Component Cholesky factors, ``(*batch, K, D, D)``.
        logits: Log weights, ``(*batch, K)``.
        sample_shape: Leading sample shape.

    Returns:
        Tensor of shape ``(*sample_shape, *batch, D)``, not attached to any graph.
    """
    with torch.no_grad():
        index = Categorical(logits=logits, validate_args=False).sample(sample_shape)
        noise = torch.randn(
            index.shape + locs.shape[-1:], dtype=locs.dtype, device=locs.device
        )  # [*S, *B, D]
        return take_component(locs, index) + take_scaled_component(scale_tril, index, noise)


def component_matvec(matrix: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """``matrix[..., k, :, :] @ vectors[..., k, :]`` for ``(*B, K, D, M)`` and ``(*S, *B, K, M)``.

    The sample dimensions become the columns of one product per component, so that ``matrix``
    is never repeated over them. Differentiable.
    """
    lead = vectors.dim() - matrix.dim() + 1
    sample_shape = vectors.shape[:lead]
    columns = vectors.reshape((-1,) + vectors.shape[lead:]).movedim(0, -1)  # [*B, K, M, S]
    out = matrix @ columns  # [*B, K, D, S]
    return out.movedim(-1, 0).reshape(sample_shape + out.shape[:-1])


def mixture_covariance(
    probs: torch.Tensor, locs: torch.Tensor, component_covariance: torch.Tensor
) -> torch.Tensor:
    r"""The mixture's covariance :math:`\sum_k \pi_k (\Sigma_k + (\mu_k - m)(\mu_k - m)^\top)`.

    Args:
        probs: Weights, ``(*batch, K)``.
        locs: Component means, ``(*batch, K, D)``.
        component_covariance: ``(*batch, K, D, D)``.

    Returns:
        Tensor of shape ``(*batch, D, D)``.
    """
    w = probs.unsqueeze(-1)  # [*B, K, 1]
    centred = locs - (w * locs).sum(-2, keepdim=True)  # [*B, K, D]
    spread = (w * centred).mT @ centred  # [*B, D, D]
    return (w.unsqueeze(-1) * component_covariance).sum(-3) + spread


def whitened_half_square(
    x: torch.Tensor, weight: torch.Tensor, shift: torch.Tensor
) -> torch.Tensor:
    r"""``0.5 * ||weight_k @ x - shift_k||^2`` for every point and component, in blocks of points.

    .. math:: q_k(x) = \tfrac12 \|W_k x - c_k\|^2

    ``x`` has shape ``(*S, *B, D)``, ``weight`` ``(*B, K, M, D)`` and ``shift`` ``(*B, K, M)``;
    the result is ``(*S, *B, K)``. The residuals of a block of ``n`` points come from one
    batched matrix product :math:`(K M, D + 1) \times (D + 1, n)` (the shift as a last column),
    with ``n`` sized so that a block holds at most ``_LOG_PROB_BLOCK_ELEMENTS`` residuals, and are
    dropped once squared; the backward pass recomputes them block by block (two more products
    per block). No ``N x K x M`` tensor is ever held: the memory is that of the inputs, the
    ``N x K`` result and one block. Twice differentiable.
    """
    batch_shape = weight.shape[:-3]
    num_components, rows, dim = weight.shape[-3:]
    num_batch = math.prod(batch_shape)
    x = x.expand(x.shape[: x.dim() - len(batch_shape) - 1] + batch_shape + (dim,))
    sample_shape = x.shape[: x.dim() - len(batch_shape) - 1]
    points = x.reshape(-1, num_batch, dim).permute(1, 2, 0)  # [B, D, N]
    points = torch.cat([points, torch.ones_like(points[:, :1])], dim=1)  # [B, D + 1, N]
    affine = torch.cat([weight, -shift.unsqueeze(-1)], dim=-1)  # [*B, K, M, D + 1]
    affine = affine.reshape(num_batch, num_components * rows, dim + 1)
    block = max(1, _LOG_PROB_BLOCK_ELEMENTS // (num_batch * num_components * rows))
    out = _WhitenedHalfSquare.apply(points, affine, num_components, block)  # [B, K, N]
    return out.permute(2, 0, 1).reshape(sample_shape + batch_shape + (num_components,))


class _WhitenedHalfSquare(torch.autograd.Function):
    """``0.5 * ||A_k p_n||^2``, ``[B, K, N]``, block by block of ``block`` points.

    ``points`` is ``[B, D + 1, N]`` and ``affine`` ``[B, K * M, D + 1]``. Only the inputs are
    saved: a second backward pass (``retain_graph=True``) needs nothing more.
    """

    @staticmethod
    def forward(
        ctx: Any, points: torch.Tensor, affine: torch.Tensor, num_components: int, block: int
    ) -> torch.Tensor:
        ctx.save_for_backward(points, affine)
        ctx.num_components, ctx.block = num_components, block
        num_batch, num_points = points.shape[0], points.shape[-1]
        out = points.new_empty(num_batch, num_components, num_points)  # [B, K, N]
        buffer = _BlockBuffer(affine, num_points, block)
        for start in range(0, num_points, block):
            residual = buffer.residual(affine, points[..., start : start + block])  # [B, K*M, n]
            # A sum over the middle axis: vectorized along the points, fast for any M.
            squares = residual.unflatten(1, (num_components, -1)).square_()  # [B, K, M, n]
            torch.sum(squares, 2, out=out[..., start : start + block])
        return out.mul_(0.5)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        points, affine = ctx.saved_tensors
        need_points, need_affine = ctx.needs_input_grad[:2]
        shape = (grad.shape[0], ctx.num_components, -1, grad.shape[-1])
        if torch.is_grad_enabled():  # differentiating the backward itself: at once, with a graph
            # d q_k / d residual_k = residual_k
            grad_res = (torch.bmm(affine, points).view(shape) * grad.unsqueeze(2)).flatten(1, 2)
            return (
                affine.mT @ grad_res if need_points else None,
                grad_res @ points.mT if need_affine else None,
                None,
                None,
            )
        grad_points = torch.empty_like(points) if need_points else None
        grad_affine = torch.zeros_like(affine) if need_affine else None
        buffer = _BlockBuffer(affine, points.shape[-1], ctx.block)
        for start in range(0, points.shape[-1], ctx.block):
            stop = start + ctx.block
            block_points = points[..., start:stop]  # [B, D + 1, n]
            grad_res = buffer.residual(affine, block_points).unflatten(1, (ctx.num_components, -1))
            grad_res = grad_res.mul_(grad[..., start:stop].unsqueeze(2)).flatten(1, 2)
            if grad_points is not None:
                torch.bmm(affine.mT, grad_res, out=grad_points[..., start:stop])
            if grad_affine is not None:
                grad_affine.baddbmm_(grad_res, block_points.mT)
        return grad_points, grad_affine, None, None


def diagonal_half_square(
    x: torch.Tensor, locs: torch.Tensor, precision: torch.Tensor
) -> torch.Tensor:
    r"""``0.5 * sum_d precision_kd (x_d - locs_kd)^2`` for every point and component, in blocks.

    .. math:: q_k(x) = \tfrac12 \sum_d p_{kd} (x_d - \mu_{kd})^2

    ``x`` has shape ``(*S, *B, D)``, ``locs`` and ``precision`` ``(*B, K, D)``; the result is
    ``(*S, *B, K)``. The differences are formed directly (no expansion, so no cancellation far
    from the components) for a block of points at a time, at most ``_LOG_PROB_BLOCK_ELEMENTS``
    of them, and recomputed by the backward pass: no ``N x K x D`` tensor is ever held. Twice
    differentiable.
    """
    batch_shape = locs.shape[:-2]
    num_components, dim = locs.shape[-2:]
    num_batch = math.prod(batch_shape)
    x = x.expand(x.shape[: x.dim() - len(batch_shape) - 1] + batch_shape + (dim,))
    sample_shape = x.shape[: x.dim() - len(batch_shape) - 1]
    points = x.reshape(-1, num_batch, dim).permute(1, 2, 0)  # [B, D, N]
    flat_locs = locs.reshape(num_batch, num_components, dim)
    flat_precision = precision.reshape(num_batch, num_components, dim)
    block = max(1, _LOG_PROB_BLOCK_ELEMENTS // (num_batch * num_components * dim))
    out = _DiagonalHalfSquare.apply(points, flat_locs, flat_precision, block)  # [B, K, N]
    return out.permute(2, 0, 1).reshape(sample_shape + batch_shape + (num_components,))


class _DiagonalHalfSquare(torch.autograd.Function):
    """``0.5 * sum_d p_kd (x_dn - mu_kd)^2``, ``[B, K, N]``, block by block of ``block`` points.

    ``points`` is ``[B, D, N]``, ``locs`` and ``precision`` ``[B, K, D]``. Only the inputs are
    saved; each block's differences ``[B, K, D, n]`` live in one reused buffer.
    """

    @staticmethod
    def forward(
        ctx: Any, points: torch.Tensor, locs: torch.Tensor, precision: torch.Tensor, block: int
    ) -> torch.Tensor:
        ctx.save_for_backward(points, locs, precision)
        ctx.block = block
        num_points = points.shape[-1]
        out = points.new_empty(locs.shape[:2] + (num_points,))  # [B, K, N]
        buffer = _DifferenceBuffer(locs, num_points, block)
        for start in range(0, num_points, block):
            diff = buffer.difference(points[..., start : start + block], locs)  # [B, K, D, n]
            squares = diff.square_().mul_(precision.unsqueeze(-1))
            torch.sum(squares, 2, out=out[..., start : start + block])
        return out.mul_(0.5)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        points, locs, precision = ctx.saved_tensors
        need_points, need_locs, need_precision = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # differentiating the backward itself: at once, with a graph
            diff = points.unsqueeze(1) - locs.unsqueeze(-1)  # [B, K, D, N]
            weighted = diff * grad.unsqueeze(2)  # g (x - mu)
            slope = weighted * precision.unsqueeze(-1)  # g p (x - mu)
            return (
                slope.sum(1) if need_points else None,
                -slope.sum(-1) if need_locs else None,
                0.5 * (weighted * diff).sum(-1) if need_precision else None,
                None,
            )
        grad_points = torch.empty_like(points) if need_points else None
        grad_locs = torch.zeros_like(locs) if need_locs else None
        grad_precision = torch.zeros_like(locs) if need_precision else None
        buffer = _DifferenceBuffer(locs, points.shape[-1], ctx.block)
        scratch = torch.empty_like(buffer.storage)
        for start in range(0, points.shape[-1], ctx.block):
            stop = start + ctx.block
            diff = buffer.difference(points[..., start:stop], locs)  # [B, K, D, n]
            weighted = scratch[: diff.numel()].view(diff.shape)
            torch.mul(diff, grad[..., start:stop].unsqueeze(2), out=weighted)  # g (x - mu)
            if grad_precision is not None:
                grad_precision += diff.mul_(weighted).sum(-1).mul_(0.5)  # [B, K, D]
            slope = weighted.mul_(precision.unsqueeze(-1))  # g p (x - mu)
            if grad_points is not None:
                torch.sum(slope, 1, out=grad_points[..., start:stop])
            if grad_locs is not None:
                grad_locs -= slope.sum(-1)
        return grad_points, grad_locs, grad_precision, None


class _DifferenceBuffer:
    """One block's differences ``x - mu``, allocated once and reused by every block."""

    def __init__(self, locs: torch.Tensor, num_points: int, block: int) -> None:
        self.storage = locs.new_empty(locs.numel() * min(block, num_points))

    def difference(self, block_points: torch.Tensor, locs: torch.Tensor) -> torch.Tensor:
        """``block_points - locs`` per component, ``[B, K, D, n]``, written into the buffer."""
        shape = locs.shape + block_points.shape[-1:]
        out = self.storage[: math.prod(shape)].view(shape)
        return torch.sub(block_points.unsqueeze(1), locs.unsqueeze(-1), out=out)


class _BlockBuffer:
    """One block's residuals, allocated once and reused by every block of a pass."""

    def __init__(self, affine: torch.Tensor, num_points: int, block: int) -> None:
        self.storage = affine.new_empty(affine.shape[0] * affine.shape[1] * min(block, num_points))

    def residual(self, affine: torch.Tensor, block_points: torch.Tensor) -> torch.Tensor:
        """``affine @ block_points``, ``[B, K * M, n]``, written into the buffer."""
        shape = (affine.shape[0], affine.shape[1], block_points.shape[-1])
        out = self.storage[: math.prod(shape)].view(shape)
        return torch.bmm(affine, block_points, out=out)


def implicit_mvn_mixture_rsample(
    locs: torch.Tensor, scale_tril: torch.Tensor, logits: torch.Tensor, value: torch.Tensor
) -> torch.Tensor:
    r"""Attaches exact pathwise gradients to exact draws of a full-covariance Gaussian mixture.

    ``value`` holds draws of :math:`q(z) = \sum_k \pi_k \mathcal{N}(z; \mu_k, L_k L_k^\top)`
    made without a graph. The returned tensor equals ``value``; its backward pass is an
    unbiased pathwise gradient built from velocity fields that solve the continuity equation
    :math:`\partial_\theta q + \nabla_z \cdot (q\, v_\theta) = 0`:

    * ``locs`` and ``scale_tril``: each component moves its own mass, :math:`v_\theta = r_k(z)\,
      \partial_\theta (\mu_k + L_k \varepsilon_k)` at :math:`\varepsilon_k = L_k^{-1}(z - \mu_k)`,
      with responsibilities :math:`r_k(z) = \pi_k q_k(z) / q(z)`;
    * ``logits``: implicit reparameterization (Graves, 2016; Figurnov et al., 2018) through the
      sequential conditional CDFs :math:`F_d(z_d \mid z_{<d}) = \sum_k w_{kd}(z_{<d})\,
      \Phi(\varepsilon_{kd})` with :math:`w_{kd} \propto \pi_k \prod_{j<d}
      \mathcal{N}(\varepsilon_{kj}; 0, 1) / L_{kjj}`: :math:`\partial z / \partial \pi
      = -J^{-1} \partial F / \partial \pi` with :math:`J = \partial F / \partial z` lower
      triangular. The backward pass needs only :math:`J^{-\top} g`, a :math:`D`-step
      recursion that carries one :math:`K`-vector and one :math:`D`-vector per draw:
      :math:`O(N K D^2)` time, :math:`O(N K D)` memory, no :math:`D \times D` matrix per draw.

    Args:
        locs: Component means, ``(*batch, K, D)``.
        scale_tril: Component Cholesky factors, ``(*batch, K, D, D)``.
        logits: Log weights, ``(*batch, K)``.
        value: Detached draws, ``(*sample, *batch, D)``.

    Returns:
        ``value`` with a gradient function reaching ``locs``, ``scale_tril`` and ``logits``.
    """
    return _ImplicitMVNMixtureSample.apply(locs, scale_tril, logits, value)


class _ImplicitMVNMixtureSample(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        locs: torch.Tensor,
        scale_tril: torch.Tensor,
        logits: torch.Tensor,
        value: torch.Tensor,
    ) -> torch.Tensor:
        ctx.save_for_backward(locs, scale_tril, logits, value)
        return value.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        locs, scale_tril, logits, value = ctx.saved_tensors
        batch_shape = locs.shape[:-2]
        num_components, dim = locs.shape[-2:]
        num_batch = math.prod(batch_shape)
        # Batch-major layout [B, ..., N]: the draws run along the contiguous last axis, so that
        # every step of the recursions below works on whole rows.
        z = value.reshape(-1, num_batch, dim).permute(1, 2, 0)  # [B, D, N]
        g = grad.reshape(-1, num_batch, dim).permute(1, 2, 0)  # [B, D, N]
        mu = locs.reshape(num_batch, num_components, dim)  # [B, K, D]
        tril = scale_tril.reshape(num_batch, num_components, dim, dim)  # [B, K, D, D]
        log_pi = logits.reshape(num_batch, num_components).log_softmax(-1)  # [B, K]
        eye = torch.eye(dim, dtype=tril.dtype, device=tril.device)
        inverse = torch.linalg.solve_triangular(tril, eye, upper=False)  # [B, K, D, D]
        centre = mu.mean(1, keepdim=True)  # [B, 1, D], for less cancellation in the whitening
        shift = (inverse @ (mu - centre).unsqueeze(-1)).squeeze(-1)  # [B, K, D]
        flat_inverse = inverse.reshape(num_batch, num_components * dim, dim)

        grad_locs = torch.zeros_like(mu)
        grad_tril = torch.zeros_like(tril)
        grad_logits = torch.zeros_like(log_pi)
        block = max(1, _BLOCK_ELEMENTS // (num_batch * num_components * dim))
        for start in range(0, z.shape[-1], block):
            points = z[..., start : start + block] - centre.mT  # [B, D, n]
            whitened = torch.bmm(flat_inverse, points)  # [B, K * D, n]
            eps = whitened.view(num_batch, num_components, dim, -1) - shift.unsqueeze(-1)
            _accumulate_block(
                eps.permute(2, 0, 1, 3).contiguous(),  # [D, B, K, n], one slice per step
                g[..., start : start + block].contiguous(),
                tril,
                inverse,
                log_pi,
                grad_locs,
                grad_tril,
                grad_logits,
            )

        need_locs, need_tril, need_logits = ctx.needs_input_grad[:3]
        return (
            grad_locs.reshape(locs.shape) if need_locs else None,
            grad_tril.tril_().reshape(scale_tril.shape) if need_tril else None,
            grad_logits.reshape(logits.shape) if need_logits else None,
            None,
        )


def _accumulate_block(
    eps: torch.Tensor,
    g: torch.Tensor,
    tril: torch.Tensor,
    inverse: torch.Tensor,
    log_pi: torch.Tensor,
    grad_locs: torch.Tensor,
    grad_tril: torch.Tensor,
    grad_logits: torch.Tensor,
) -> None:
    r"""Adds one block of draws' vector-Jacobian products to the three gradients.

    ``eps`` holds the whitened draws :math:`\varepsilon_k = L_k^{-1}(z - \mu_k)`,
    ``[D, B, K, n]``, and ``g`` the upstream gradient, ``[B, D, n]``.

    Forward over dimensions: the conditional weights :math:`w_{\cdot d}`, the logits-derivative
    of the conditional CDF :math:`U_d = w_{\cdot d} (\Phi_{\cdot d} - F_d)`, the conditional
    density :math:`q_d = q(z_d \mid z_{<d})` and :math:`w_{\cdot, d+1} L_{\cdot dd}
    = w_{\cdot d} \varphi_{\cdot d} / q_d`. Backward over dimensions: :math:`\lambda` solving
    :math:`J^\top \lambda = g` with

    .. math:: J_{ed} = \sum_k U_{ek} s_{ked} + \sum_k w_{ke} \varphi_{ke} A_{k,ed}, \quad
              s_{ked} = -\sum_{d \le j < e} \varepsilon_{kj} A_{k,jd}, \quad A_k = L_k^{-1},

    carrying :math:`C_k = \sum_{e > d} \lambda_e U_{ek}` and the running products
    :math:`R_d = \sum_k \sum_{j > d} A_{k,jd} (\lambda_j w_{kj} \varphi_{kj}
    - \varepsilon_{kj} C_{kj})`. The logits gradient is :math:`-\sum_n C`.
    """
    num_dims = eps.shape[0]
    diag = tril.diagonal(dim1=-2, dim2=-1).permute(2, 0, 1).unsqueeze(-1)  # [D, B, K, 1]
    inv_diag = inverse.diagonal(dim1=-2, dim2=-1).permute(2, 0, 1).unsqueeze(-1)  # [D, B, K, 1]
    log_norm = -diag.log() - HALF_LOG_2PI  # [D, B, K, 1]
    lowest = min_exponent(eps.dtype)
    log_joint = log_pi.unsqueeze(-1).expand(eps.shape[1:]).clone()  # [B, K, n]
    w = log_joint.exp()  # conditional weights w_{.d}, normalized
    log_evidence = torch.zeros_like(log_joint[:, :1])  # log q(z_<d), [B, 1, n]
    cdf_grad = torch.empty_like(eps)  # U_d / q_d, [D, B, K, n]
    next_weight = torch.empty_like(eps)  # w_{., d+1} L_{.dd}, [D, B, K, n]
    for d in range(num_dims):
        std = eps[d]  # [B, K, n]
        cdf = torch.special.erfc(std * -_SQRT_HALF).mul_(0.5)
        cdf.sub_((w * cdf).sum(1, keepdim=True))
        torch.mul(w, cdf, out=cdf_grad[d])
        # Bayes update of the weights with dimension d, sharing one exp with the evidence.
        log_joint.add_(log_norm[d]).addcmul_(std, std, value=-0.5)
        top = log_joint.amax(1, keepdim=True)
        w = (log_joint - top).clamp_(min=lowest).exp_()
        total = w.sum(1, keepdim=True)
        w.div_(total)
        next_evidence = total.log_().add_(top)  # [B, 1, n]
        cdf_grad[d].mul_(torch.exp(log_evidence - next_evidence))
        torch.mul(w, diag[d], out=next_weight[d])
        log_evidence = next_evidence
    resp = w  # [B, K, n]
    grad_locs += torch.bmm(resp, g.mT)
    weighted = resp.unsqueeze(2) * g.unsqueeze(1)  # [B, K, D, n]
    grad_tril += weighted @ eps.permute(1, 2, 3, 0)  # [B, K, D, D]
    del weighted
    carry = torch.zeros_like(resp)  # C, [B, K, n]
    running = torch.zeros_like(g)  # R, [B, D, n]
    for d in reversed(range(num_dims)):
        gamma = eps[d] * carry  # [B, K, n]
        # lambda_d q_d = g_d - sum_{e > d} J_ed lambda_e
        rest = running[:, d : d + 1] - (gamma * inv_diag[d]).sum(1, keepdim=True)  # [B, 1, n]
        scaled_lam = g[:, d : d + 1] - rest  # [B, 1, n]
        if d > 0:
            coef = torch.addcmul(gamma.neg_(), scaled_lam, next_weight[d])  # [B, K, n]
            running[:, :d] += torch.bmm(inverse[:, :, d, :d].mT, coef)
        carry.addcmul_(scaled_lam, cdf_grad[d])
    grad_logits -= carry.sum(-1)
