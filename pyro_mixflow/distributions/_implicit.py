r"""Exact pathwise gradients of mixture-of-diagonal-Gaussian samples (private)."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch.autograd.function import once_differentiable

from pyro_mixflow.distributions._common import HALF_LOG_2PI, min_exponent

__all__ = ["implicit_mixture_rsample"]

_SQRT_HALF = math.sqrt(0.5)

# Largest number of (draw, component, dimension) elements handled at once in the backward pass:
# larger problems are processed in blocks of samples. The recursion stores one
# (draw, component) tensor per dimension for the draws that have not collapsed (all of them at
# worst: about 130 MB in float32 at this size).
_BLOCK_ELEMENTS = 2**25
# The recursion runs on groups of rows storing at most this many values of U (16 MiB in
# float32): small enough for the allocator to reuse the memory from one group to the next.
_GROUP_ELEMENTS = 2**22
# The collapse certificate works on blocks of this many dimensions, and only from this many.
_CERTIFICATE_DIMS = 8
_MIN_CERTIFIED_DIMS = 32
# eta = _TOLERANCE * eps(dtype), the certified relative error (see `implicit_mixture_rsample`).
_TOLERANCE = 2.0**-16


def implicit_mixture_rsample(
    locs: torch.Tensor, scales: torch.Tensor, logits: torch.Tensor, value: torch.Tensor
) -> torch.Tensor:
    r"""Attaches exact pathwise gradients to exact mixture draws.

    ``value`` holds draws of the mixture :math:`q(z) = \sum_k \pi_k \prod_d
    \mathcal{N}(z_d; \mu_{kd}, \sigma_{kd})` made without a graph. The returned tensor equals
    ``value``; its backward pass is an unbiased pathwise gradient built from two velocity
    fields, each an exact solution of the continuity equation
    :math:`\partial_\theta q + \nabla_z \cdot (q\, v_\theta) = 0`:

    * locations and scales: each component moves its own mass,
      :math:`v_{\mu_{kd}} = r_k(z)\, e_d` and
      :math:`v_{\sigma_{kd}} = r_k(z)\, \tfrac{z_d - \mu_{kd}}{\sigma_{kd}}\, e_d` with
      responsibilities :math:`r_k(z) = \pi_k q_k(z) / q(z)`;
    * logits: implicit reparameterization (Figurnov et al., 2018) through the distributional
      transform :math:`F_d(z_d \mid z_{<d}) = \sum_k w_k^{(d)}(z_{<d})\,
      \Phi\big((z_d - \mu_{kd}) / \sigma_{kd}\big)`, :math:`w^{(d)} \propto \exp L^{(d)}`,
      :math:`L_k^{(d)} = \log\pi_k + \sum_{j<d} \log \mathcal{N}(z_j; \mu_{kj}, \sigma_{kj})`.
      The velocity :math:`v = \partial z / \partial \log\pi` solves
      :math:`q_d v_d = U_d - \sum_{j<d} J_{dj} v_j` with :math:`U_d = w^{(d)} (\Phi_{\cdot d}
      - F_d)`, :math:`q_d = q(z_d \mid z_{<d})` and :math:`J_{dj} = \sum_k U_{dk} s_{kj}`,
      :math:`s_{kj} = (\mu_{kj} - z_j) / \sigma_{kj}^2`; the backward pass solves the transposed
      triangular system, a :math:`D`-step recursion on a :math:`K`-vector per draw.

    **Skipping collapsed draws.** After a few dimensions most draws are claimed by one
    component :math:`r` and :math:`U_d` is negligible from then on. For each draw a certificate
    finds a dimension :math:`d^*` such that, for every :math:`e \ge d^*`,

    .. math::

        R_e = \sum_{k \ne r} \exp\big(L_k^{(e)} - L_r^{(e+1)}\big)
        \le \frac{\eta}{1 + \beta}, \qquad
        \beta \ge \max_{k, k'} \sum_j |s_{kj} - s_{k'j}|,

    and the recursion sets :math:`U_e = 0` for :math:`e \ge d^*`: it runs over the first
    :math:`d^*` dimensions of each draw only. Since :math:`J` is triangular the velocities
    :math:`v_{<d^*}` are unchanged, and the logits gradient of the draw changes by exactly
    :math:`\sum_{e \ge d^*} g_e v_e`. From :math:`|U_{em}| / q_e \le \exp(L_m^{(e)} -
    L_r^{(e+1)})` (:math:`m \ne r`), :math:`|U_{er}| / q_e \le R_e` and, with
    :math:`\sum_k U_{ek} = 0`, :math:`|J_{ej}| / q_e \le \sum_{k \ne r} \exp(L_k^{(e)} -
    L_r^{(e+1)}) |s_{kj} - s_{rj}|`, induction over :math:`e` gives
    :math:`\|v_e\|_\infty \le \eta \max(1, V)` with :math:`V = \max_{j<d^*}
    \|v_j\|_\infty`, so that

    .. math::

        \big\|\Delta \nabla_{\log\pi}\big\|_\infty \le \eta \max(1, V) \sum_{e \ge d^*} |g_e|

    per draw: a relative error :math:`\eta` against the draw's own scale
    :math:`V \|g\|_1`. Draws with :math:`d^* < D` also take one-hot responsibilities
    :math:`r_k = [k = r]`, certified by :math:`\sum_{k \ne r} \exp(L_k^{(D)} - L_r^{(D)}) \le
    \eta / (1 + \gamma)`, :math:`\gamma \ge \max_{kd} |z_d - \mu_{kd}| / \sigma_{kd}`, which
    changes the ``locs`` and ``scales`` gradients by at most :math:`2 \eta |g_d|`. Here
    :math:`\eta = 2^{-16}` times the dtype's machine epsilon, far below its resolution.

    The certificate costs one matrix product and :math:`O(ND)` work: :math:`L^{(e_b)}` at
    block starts :math:`e_b` (every 8 dimensions up to 32, then blocks half as long as their
    start) by the expansion :math:`[z^2, z, 1]`, with a bound on its rounding error added;
    :math:`r = \arg\max_k L_k^{(D)}` with an exact, direct :math:`L_r^{(e)}`; and
    :math:`L_k^{(e)} \le L_k^{(e_b)} + \max_{e' \le e} \sum_{e_b \le j < e'} (-\log
    \sigma_{kj} - \tfrac12 \log 2\pi)` inside block :math:`b`, the sum over :math:`k \ne r`
    bounded by :math:`K - 1` times the largest term. It runs from 32 dimensions; below, and for
    draws whose components stay entangled (coincident components), :math:`d^* = D`: the
    dense recursion, exact.

    Args:
        locs: Component means, ``(*batch, K, D)``.
        scales: Component standard deviations, ``(*batch, K, D)``.
        logits: Normalized log weights, ``(*batch, K)``.
        value: Detached draws, ``(*sample, *batch, D)``.

    Returns:
        ``value`` with a gradient function reaching ``locs``, ``scales`` and ``logits``.
    """
    return _ImplicitMixtureSample.apply(locs, scales, logits, value)


class _ImplicitMixtureSample(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        locs: torch.Tensor,
        scales: torch.Tensor,
        logits: torch.Tensor,
        value: torch.Tensor,
    ) -> torch.Tensor:
        ctx.save_for_backward(locs, scales, logits, value)
        return value.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        locs, scales, logits, value = ctx.saved_tensors
        num_components, dim = locs.shape[-2:]
        num_batch = math.prod(locs.shape[:-2])
        params = _Params.of(
            locs.reshape(num_batch, num_components, dim),
            scales.reshape(num_batch, num_components, dim),
            logits.reshape(num_batch, num_components),
        )
        # Rows run over (sample, batch) pairs, the batch index fastest: row i has batch i % B.
        z = value.reshape(-1, dim)  # [R, D]
        g = grad.reshape(-1, dim)  # [R, D]
        grad_locs = torch.zeros_like(params.mu)  # [B, K, D]
        grad_scales = torch.zeros_like(params.mu)
        grad_logits = torch.zeros_like(params.log_pi)  # [B, K]
        rows = num_batch * max(1, _BLOCK_ELEMENTS // (num_batch * num_components * dim))
        for start in range(0, z.shape[0], rows):
            _accumulate_block(
                z[start : start + rows],
                g[start : start + rows],
                params,
                grad_locs,
                grad_scales,
                grad_logits,
            )
        need_locs, need_scales, need_logits = ctx.needs_input_grad[:3]
        return (
            grad_locs.reshape(locs.shape) if need_locs else None,
            grad_scales.reshape(scales.shape) if need_scales else None,
            grad_logits.reshape(logits.shape) if need_logits else None,
            None,
        )


class _Params(NamedTuple):
    """Mixture parameters ``[B, K, D]`` and the per-dimension tables ``[D, B, K]`` of the passes."""

    mu: torch.Tensor
    sigma: torch.Tensor
    log_pi: torch.Tensor
    t_shift: torch.Tensor  # t = t_shift + z t_scale = -(z - mu) / (sigma sqrt 2)
    t_scale: torch.Tensor
    log_norm: torch.Tensor  # -log sigma - log sqrt(2 pi)
    s_shift: torch.Tensor  # s = s_shift + z s_scale = (mu - z) / sigma^2, the score
    s_scale: torch.Tensor

    @staticmethod
    def of(mu: torch.Tensor, sigma: torch.Tensor, log_pi: torch.Tensor) -> _Params:
        """Builds the tables from ``mu``, ``sigma`` ``[B, K, D]`` and ``log_pi`` ``[B, K]``."""
        inv_sigma = sigma.reciprocal()
        inv_var = inv_sigma.square()

        def by_dim(t: torch.Tensor) -> torch.Tensor:
            return t.permute(2, 0, 1).contiguous()

        return _Params(
            mu=mu,
            sigma=sigma,
            log_pi=log_pi,
            t_shift=by_dim(mu * inv_sigma * _SQRT_HALF),
            t_scale=by_dim(inv_sigma * -_SQRT_HALF),
            log_norm=by_dim(-sigma.log() - HALF_LOG_2PI),
            s_shift=by_dim(mu * inv_var),
            s_scale=by_dim(-inv_var),
        )


def _accumulate_block(
    z: torch.Tensor,
    g: torch.Tensor,
    params: _Params,
    grad_locs: torch.Tensor,
    grad_scales: torch.Tensor,
    grad_logits: torch.Tensor,
) -> None:
    """Adds the vector-Jacobian products of one block of rows ``[R, D]`` to the gradients."""
    num_rows, dim = z.shape
    num_batch, num_components = params.log_pi.shape
    batch = torch.arange(num_rows, device=z.device) % num_batch  # [R]
    eta = _TOLERANCE * torch.finfo(z.dtype).eps
    collapse, top = _collapse_dims(z, batch, params, eta)  # [R], [R]
    # Rows by decreasing d*: the rows still running at dimension e are a prefix.
    order = torch.argsort(collapse, descending=True, stable=True)
    collapse, batch = collapse[order], batch[order]
    z, g = z.index_select(0, order), g.index_select(0, order)
    num_dense = int((collapse == dim).sum())  # responsibilities from the recursion
    if num_dense < num_rows:
        _add_one_hot(z[num_dense:], g[num_dense:], batch[num_dense:], top[order[num_dense:]],
                     params, grad_locs, grad_scales)  # fmt: skip
    # Groups of rows whose recursion stores at most _GROUP_ELEMENTS values of U (one row at
    # least): rows are independent.
    stored = (collapse * num_components).cumsum(0)  # [R]
    start = 0
    while start < num_rows and int(collapse[start]) > 0:
        before = int(stored[start - 1]) if start else 0
        limit = torch.tensor(before + _GROUP_ELEMENTS, device=z.device)
        stop = max(start + 1, int(torch.searchsorted(stored, limit, right=True)))
        steps = torch.arange(int(collapse[start]), device=z.device).unsqueeze(-1)
        counts = (collapse[start:stop] > steps).sum(-1).tolist()  # rows running at each e
        _recursion(z[start:stop], g[start:stop], batch[start:stop], counts,
                   min(stop, num_dense) - min(start, num_dense), params,
                   grad_locs, grad_scales, grad_logits)  # fmt: skip
        start = stop


def _add_one_hot(
    z: torch.Tensor,
    g: torch.Tensor,
    batch: torch.Tensor,
    top: torch.Tensor,
    params: _Params,
    grad_locs: torch.Tensor,
    grad_scales: torch.Tensor,
) -> None:
    """``locs`` and ``scales`` gradients of rows whose responsibilities are one-hot on ``top``."""
    dim = z.shape[-1]
    flat = batch * params.mu.shape[1] + top  # [M]
    mu = params.mu.reshape(-1, dim).index_select(0, flat)  # [M, D]
    sigma = params.sigma.reshape(-1, dim).index_select(0, flat)
    grad_locs.view(-1, dim).index_add_(0, flat, g)
    grad_scales.view(-1, dim).index_add_(0, flat, (z - mu).div_(sigma).mul_(g))


def _recursion(
    z: torch.Tensor,
    g: torch.Tensor,
    batch: torch.Tensor,
    counts: list[int],
    num_dense: int,
    params: _Params,
    grad_locs: torch.Tensor,
    grad_scales: torch.Tensor,
    grad_logits: torch.Tensor,
) -> None:
    r"""The two recursions over dimensions, on the rows still running at each dimension.

    Forward: the conditional weights :math:`w^{(e)}`, the conditional CDF :math:`F_e`, its
    logits-derivative :math:`U_e = w^{(e)} (\Phi_{\cdot e} - F_e)` and the conditional
    density :math:`q_e`. Backward: :math:`\lambda` solving :math:`(\partial F / \partial z)^\top
    \lambda = g`, carrying :math:`C = \sum_{e' > e} \lambda_{e'} U_{e'}`; the logits gradient is
    :math:`-\sum_n C`. The first ``num_dense`` rows run to the end and also give the
    ``locs`` and ``scales`` gradients with their exact responsibilities :math:`w^{(D)}`.
    """
    num_rows, dim = z.shape
    num_batch, num_components = params.log_pi.shape
    zt, gt = z.T.contiguous(), g.T.contiguous()  # [D, R]

    def rows(table: torch.Tensor, count: int) -> torch.Tensor:
        """A ``[B, K]`` table for the first ``count`` rows (broadcast when ``B = 1``)."""
        return table if num_batch == 1 else table.index_select(0, batch[:count])

    lowest = min_exponent(z.dtype)
    # erfc underflows (slowly, through subnormals) above this: Phi is clamped at its tiny value.
    erfc_max = math.floor(math.sqrt(-math.log(torch.finfo(z.dtype).tiny)))
    starts = [0]
    for count in counts:
        starts.append(starts[-1] + count)
    cdf_grad = z.new_empty(starts[-1] * num_components)  # 2U of every step, ragged
    log_evidence = z.new_zeros(len(counts) + 1, num_rows)  # log q(z_<e), [E + 1, R]
    log_joint = rows(params.log_pi, num_rows).expand(num_rows, -1).clone()  # [R, K]
    w = log_joint.exp()
    scratch, products = torch.empty_like(w), torch.empty_like(w)
    for e, count in enumerate(counts):
        t = torch.addcmul(rows(params.t_shift[e], count), zt[e, :count, None],
                          rows(params.t_scale[e], count), out=scratch[:count])  # fmt: skip
        joint = log_joint[:count]
        joint.addcmul_(t, t, value=-1.0).add_(rows(params.log_norm[e], count))  # L^(e + 1)
        phi = t.clamp_(max=erfc_max).erfc_()  # 2 Phi, [c, K]
        weights = w[:count]
        u = cdf_grad[starts[e] * num_components : starts[e + 1] * num_components]
        u = torch.mul(weights, phi, out=u.view(count, num_components))
        torch.sub(phi, u.sum(-1, keepdim=True), out=u).mul_(weights)  # w (2 Phi - 2 F)
        top = joint.amax(-1, keepdim=True)
        torch.sub(joint, top, out=weights).clamp_(min=lowest).exp_()
        total = weights.sum(-1, keepdim=True)
        weights.div_(total)
        torch.add(total.log_().squeeze(-1), top.squeeze(-1), out=log_evidence[e + 1, :count])
    inv_cond = (log_evidence[:-1] - log_evidence[1:]).exp_()  # 1 / q_e, [E, R]
    resp = w[:num_dense]  # [Rd, K], w^(D)
    if num_dense:
        sum_sg = z.new_zeros(dim, num_batch, num_components)
    carry = torch.zeros_like(w)  # 2C
    for e in reversed(range(len(counts))):
        count = counts[e]
        s = torch.addcmul(rows(params.s_shift[e], count), zt[e, :count, None],
                          rows(params.s_scale[e], count), out=scratch[:count])  # fmt: skip
        if num_dense:  # sum_n r_nk s_nke g_ne
            ge = gt[e, :num_dense]
            rs = torch.mul(resp, s[:num_dense], out=products[:num_dense])
            if num_batch == 1:
                sum_sg[e, 0] += ge @ rs
            else:
                sum_sg[e].index_add_(0, batch[:num_dense], rs.mul_(ge.unsqueeze(-1)))
        # lambda_e = (g_e - sum_k s_ke C_k) / q_e
        lam = s.mul_(carry[:count]).sum(-1).mul_(-0.5).add_(gt[e, :count])
        lam.mul_(inv_cond[e, :count])
        u = cdf_grad[starts[e] * num_components : starts[e + 1] * num_components]
        carry[:count].addcmul_(lam.unsqueeze(-1), u.view(count, num_components))
    if num_batch == 1:
        grad_logits[0] -= 0.5 * carry.sum(0)
    else:
        grad_logits.index_add_(0, batch, carry, alpha=-0.5)
    if num_dense:  # sum_n r g (z - mu) / sigma = -sigma sum_n r s g
        if num_batch == 1:
            grad_locs[0] += resp.T @ g[:num_dense]
        else:
            grad_locs.view(num_batch, -1).index_add_(
                0, batch[:num_dense], (resp.unsqueeze(-1) * g[:num_dense].unsqueeze(-2)).flatten(1)
            )
        grad_scales -= params.sigma * sum_sg.permute(1, 2, 0)


def _collapse_dims(
    z: torch.Tensor, batch: torch.Tensor, params: _Params, eta: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    r"""Certified collapse dimension :math:`d^*` and leading component :math:`r` of each row.

    See :func:`implicit_mixture_rsample` for the conditions; :math:`r` is the argmax of the
    (expanded) :math:`L^{(D)}`. Returns ``d* = D`` everywhere (and no leading component) below
    ``_MIN_CERTIFIED_DIMS`` dimensions.
    """
    num_rows, dim = z.shape
    num_batch, num_components = params.log_pi.shape
    full = torch.full((num_rows,), dim, dtype=torch.long, device=z.device)
    if dim < _MIN_CERTIFIED_DIMS or num_rows == 0:
        return full, None
    bounds = _block_bounds(dim)
    num_blocks = len(bounds) - 1
    mu, sigma, log_pi = params.mu, params.sigma, params.log_pi
    shape = (-1, num_batch)  # rows as [S, B]

    def rows(table: torch.Tensor) -> torch.Tensor:
        """A per-batch table ``[B, ...]`` for every row (broadcast when ``B = 1``)."""
        return table if num_batch == 1 else table.index_select(0, batch)

    inv_var = sigma.pow(-2)
    log_sigma = sigma.log()
    max_log_density = -log_sigma - HALF_LOG_2PI  # [B, K, D]
    quad = -0.5 * inv_var
    lin = mu * inv_var
    const = max_log_density - 0.5 * mu.square() * inv_var
    # L^(e_b) at every block start by the expansion, z^2 and z against -1/(2 sigma^2) and
    # mu / sigma^2 plus a constant: two products per block.
    z_square = z.square()  # [R, D]
    joint = z.new_empty(num_blocks + 1, num_rows, num_components)  # [nb + 1, R, K]
    joint[0].unflatten(0, shape).copy_(log_pi)
    for b in range(num_blocks):
        lo, hi = bounds[b], bounds[b + 1]
        block_const = const[..., lo:hi].sum(-1)  # [B, K]
        if num_batch == 1:
            out = torch.addmm(joint[b], z_square[:, lo:hi], quad[0, :, lo:hi].T, out=joint[b + 1])
            out.addmm_(z[:, lo:hi], lin[0, :, lo:hi].T).add_(block_const)
        else:
            step = torch.baddbmm(
                block_const.unsqueeze(1),
                z_square[:, lo:hi].unflatten(0, shape).transpose(0, 1),
                quad[..., lo:hi].transpose(1, 2),
            ).baddbmm_(
                z[:, lo:hi].unflatten(0, shape).transpose(0, 1), lin[..., lo:hi].transpose(1, 2)
            )  # [B, S, K]
            torch.add(joint[b], step.transpose(0, 1).flatten(0, 1), out=joint[b + 1])
    # The leading component r (argmax of L^(D)) and its exact L_r^(e) for every e, directly.
    top = joint[-1].argmax(-1)  # [R]
    flat = batch * num_components + top
    log_density_r = z - mu.reshape(-1, dim).index_select(0, flat)  # [R, D]
    log_density_r.div_(sigma.reshape(-1, dim).index_select(0, flat)).square_().mul_(-0.5)
    log_density_r += max_log_density.reshape(-1, dim).index_select(0, flat)
    log_joint_r = log_density_r.cumsum(-1).add_(log_pi.flatten().index_select(0, flat)[:, None])
    # Runner-up bound per block start: L_k^(e) <= L_k^(e_b) + bonus_kb for e in block b (the
    # density of N_kj is at most exp(max_log_density_kj)); then the maximum over k != r.
    for b in range(num_blocks):
        density = max_log_density[..., bounds[b] : bounds[b + 1]]
        bonus = (density.cumsum(-1) - density).amax(-1).clamp_(min=0)  # [B, K]
        if bool((bonus > 0).any()):
            joint[b].unflatten(0, shape).add_(bonus)
    column = (torch.arange(num_rows, device=z.device) * num_components).add_(top)
    column = column + torch.arange(0, joint.numel(), num_rows * num_components).unsqueeze(-1)
    runner_up = joint.flatten().index_fill_(0, column.flatten(), -math.inf).view_as(joint)
    runner_up = runner_up.amax(-1)  # [nb + 1, R]

    # Rounding: the expansion's terms and those of L_r in absolute value, bounded over
    # components, summed up to each block's end (products with the indicator of j < e_{b+1});
    # |log pi| once.
    def per_batch_matmul(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """``x [R, D]`` times ``m [B, D, c]``, row i taking batch element i % B: ``[R, c]``."""
        return (x.unflatten(0, shape).transpose(0, 1) @ m).transpose(0, 1).flatten(0, 1)

    ends = torch.tensor(bounds[1:], device=z.device)
    upto = (torch.arange(dim, device=z.device).unsqueeze(-1) < ends).to(z.dtype)  # [D, nb]
    abs_z = z.abs()
    scale = (
        per_batch_matmul(z_square, quad.abs().amax(1).unsqueeze(-1) * upto)
        + per_batch_matmul(abs_z, lin.abs().amax(1).unsqueeze(-1) * upto)
        + rows(const.abs().amax(1) @ upto)
        + log_density_r.abs_() @ upto
        + rows(log_pi.masked_fill(~log_pi.isfinite(), 0.0).abs().amax(-1, True))
    ).T  # [nb, R]
    margin = 4 * torch.finfo(z.dtype).eps * (2 * ends + num_blocks + 2).unsqueeze(-1) * scale
    # beta >= max_{k,k'} sum_j |s_kj - s_k'j| and gamma >= max_kd |z_d - mu_kd| / sigma_kd.
    beta = per_batch_matmul(abs_z, inv_var.amax(1).unsqueeze(-1)).squeeze(-1)
    beta = 2 * (beta + rows((mu.abs() * inv_var).amax(1).sum(-1)))
    gamma = abs_z.amax(-1, True) + rows(mu.abs().amax(-1).amax(-1, True))
    gamma = gamma.mul_(rows(sigma.amin(-1).amin(-1, True)).reciprocal()).squeeze(-1)
    log_eta = math.log(eta) - math.log(max(num_components - 1, 1))
    last_failed = torch.full_like(full, -1)
    for b in range(num_blocks):  # block b certifies every e in [e_b, e_{b+1})
        lo, hi = bounds[b], bounds[b + 1]
        lowest_r = log_joint_r[:, lo:hi].amin(-1)  # min_e L_r^(e + 1)
        excess = runner_up[b] + margin[b] - lowest_r
        last_failed.masked_fill_(excess > log_eta - beta.log1p(), b)
    excess = runner_up[-1] + margin[-1] - log_joint_r[:, -1]
    one_hot = excess <= log_eta - gamma.log1p()
    collapse = torch.tensor(bounds, device=z.device)[last_failed + 1]
    return torch.where(one_hot, collapse, full), top


def _block_bounds(dim: int) -> list[int]:
    """Block starts of the certificate: every 8 dimensions up to 32, then half the start."""
    bounds = [0]
    while bounds[-1] < dim:
        width = max(_CERTIFICATE_DIMS, bounds[-1] // 2 // _CERTIFICATE_DIMS * _CERTIFICATE_DIMS)
        bounds.append(min(dim, bounds[-1] + width))
    return bounds
