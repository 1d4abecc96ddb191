r"""Extreme deconvolution: a latent Gaussian mixture fitted to data with known Gaussian errors."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import numpy as np
import torch

from pyro_mixflow._checks import check_positive_int
from pyro_mixflow.distributions.diag_normal_mixture import DiagNormalMixture

__all__ = ["DeconvolutionResult", "deconvolve"]


@dataclass
class DeconvolutionResult:
    """What :func:`deconvolve` returns besides the mixture.

    Attributes:
        mixture: The fitted latent :class:`DiagNormalMixture` (batch shape ``()``).
        log_likelihood: Mean log-likelihood of the observations after each iteration
            (non-decreasing: every EM step increases it).
        converged: Whether the relative change fell below ``tol`` before ``max_iter``.
    """

    mixture: DiagNormalMixture
    log_likelihood: list[float] = field(default_factory=list)
    converged: bool = False


def deconvolve(
    data: torch.Tensor | np.ndarray,
    errors: torch.Tensor | np.ndarray | float,
    num_components: int,
    *,
    max_iter: int = 1000,
    tol: float = 1e-9,
    seed: int = 0,
    min_scale: float = 0.0,
) -> DeconvolutionResult:
    r"""Fits the latent diagonal Gaussian mixture of data observed with known Gaussian errors.

    The model is :math:`x_n = y_n + s_n \odot \xi_n`, :math:`y_n \sim \sum_k \pi_k
    \mathcal{N}(\mu_k, \operatorname{diag} \sigma_k^2)`, :math:`\xi_n \sim \mathcal{N}(0, I)`,
    with the error scales :math:`s_n` known per point; the likelihood of a point is that of
    :class:`~pyro_mixflow.distributions.NoisyMixture` ``.with_errors(errors)``: component
    variances :math:`T_{nk} = \sigma_k^2 + s_n^2`. Extreme-deconvolution EM (Bovy et al.,
    2011), restricted to diagonal covariances, where every step is closed form:

    .. math::

        r_{nk} \propto \pi_k \mathcal{N}(x_n; \mu_k, T_{nk}), \quad
        b_{nk} = \mu_k + \frac{\sigma_k^2}{T_{nk}} (x_n - \mu_k), \quad
        B_{nk} = \frac{\sigma_k^2 s_n^2}{T_{nk}},

        \pi_k = \frac1N \sum_n r_{nk}, \quad
        \mu_k = \frac{\sum_n r_{nk} b_{nk}}{\sum_n r_{nk}}, \quad
        \sigma_k^2 = \frac{\sum_n r_{nk} [(b_{nk} - \mu_k)^2 + B_{nk}]}{\sum_n r_{nk}},

        \text{(per dimension; } b, B \text{ are the posterior mean and variance of } y_n
        \text{ given } x_n \text{ and } k).

    The expected complete-data log-likelihood separates over dimensions, so this is exact EM
    for diagonal components. With ``errors = 0`` it is ordinary EM for a Gaussian mixture.
    Initialization: k-means++ centres from ``seed``, the data's deconvolved variance, equal
    weights. Computations run in float64.

    Args:
        data: Observations, shape ``(N, D)`` (or ``(N,)`` for ``D = 1``).
        errors: Their error standard deviations :math:`s_n \ge 0`, shape of ``data``, or one
            number for all.
        num_components: :math:`K`.
        max_iter: Most EM iterations.
        tol: Stop when the mean log-likelihood changes by less than ``tol`` (relative).
        seed: Seed of the initialization.
        min_scale: Floor on :math:`\sigma_k` (0 allows a component to collapse onto points
            with zero error).

    Returns:
        A :class:`DeconvolutionResult` holding the mixture (dtype of ``data`` if a float tensor,
        else float64) and the log-likelihood trace.

    Example:
        >>> y = torch.cat([torch.randn(2000) * 0.3 - 2, torch.randn(2000) * 0.3 + 2])
        >>> s = torch.rand(4000) + 0.5  # known errors, larger than the latent scales
        >>> fit = deconvolve(y + s * torch.randn(4000), s, 2)
        >>> fit.converged, fit.mixture.scales.flatten().sort().values.round(decimals=1)
        (True, tensor([0.3000, 0.3000]))
        >>> naive = deconvolve(y + s * torch.randn(4000), 0.0, 2)  # plain EM: scales about 1.1
        >>> naive.mixture.scales.flatten().sort().values.round(decimals=1)
        tensor([1.1000, 1.1000])

    References:
        Extreme deconvolution: Inferring complete distribution functions from noisy,
        heterogeneous and incomplete observations. J. Bovy, D. W. Hogg, S. T. Roweis, 2011.
        arXiv:0905.2979.
    """
    x, out_dtype = _as_rows("data", data)
    if isinstance(errors, numbers.Real) and not isinstance(errors, bool):
        s = torch.full_like(x, float(errors))
    else:
        s, _ = _as_rows("errors", errors)
        if s.shape != x.shape:
            raise ValueError(
                f"`errors` must have the shape of `data` {tuple(x.shape)}, got {tuple(s.shape)}"
            )
    if bool((s < 0).any()):
        raise ValueError(f"`errors` must be >= 0, got min {s.min().item():g}")
    k = check_positive_int("num_components", num_components)
    max_iter = check_positive_int("max_iter", max_iter)
    if k > len(x):
        raise ValueError(f"`num_components` ({k}) exceeds the number of rows ({len(x)})")
    if not (isinstance(min_scale, numbers.Real) and min_scale >= 0):
        raise ValueError(f"`min_scale` must be a number >= 0, got {min_scale!r}")

    generator = torch.Generator().manual_seed(int(seed))
    noise_var = s.square()  # [N, D]
    locs = _kmeans_pp(x, k, generator)  # [K, D]
    latent_var = (x.var(0) - noise_var.mean(0)).clamp(min=1e-6 * x.var(0).clamp(min=1e-300))
    variances = latent_var.expand(k, -1).clone()  # [K, D]
    log_pi = torch.full((k,), -math.log(k), dtype=x.dtype)
    floor = float(min_scale) ** 2
    trace: list[float] = []
    converged = False
    for _ in range(max_iter):
        total = variances + noise_var.unsqueeze(1)  # [N, K, D]
        centred = x.unsqueeze(1) - locs  # [N, K, D]
        log_joint = log_pi - 0.5 * (
            centred.square() / total + total.log() + math.log(2 * math.pi)
        ).sum(-1)  # [N, K]
        log_norm = log_joint.logsumexp(-1)  # [N]
        trace.append(log_norm.mean().item())
        resp = (log_joint - log_norm.unsqueeze(-1)).exp()  # [N, K]
        gain = variances / total  # [N, K, D]
        post_mean = locs + gain * centred  # [N, K, D]
        post_var = gain * noise_var.unsqueeze(1)  # [N, K, D]
        counts = resp.sum(0).clamp(min=1e-300)  # [K]
        weights = resp.unsqueeze(-1) / counts.unsqueeze(-1)  # [N, K, 1]
        locs = (weights * post_mean).sum(0)
        variances = (weights * ((post_mean - locs).square() + post_var)).sum(0).clamp(min=floor)
        variances = variances.clamp(min=1e-300)
        log_pi = (counts / len(x)).log()
        if len(trace) > 1 and abs(trace[-1] - trace[-2]) <= tol * max(1.0, abs(trace[-1])):
            converged = True
            break
    mixture = DiagNormalMixture(
        locs.to(out_dtype), variances.sqrt().to(out_dtype), log_pi.to(out_dtype)
    )
    return DeconvolutionResult(mixture, trace, converged)


def _kmeans_pp(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii, 2007): centres far apart, chosen from rows."""
    first = int(torch.randint(len(x), (1,), generator=generator))
    centres = [x[first]]
    dist = (x - x[first]).square().sum(-1)
    for _ in range(1, k):
        if float(dist.sum()) <= 0:
            index = int(torch.randint(len(x), (1,), generator=generator))
        else:
            index = int(torch.multinomial(dist / dist.sum(), 1, generator=generator))
        centres.append(x[index])
        dist = torch.minimum(dist, (x - x[index]).square().sum(-1))
    return torch.stack(centres)


def _as_rows(name: str, value: object) -> tuple[torch.Tensor, torch.dtype]:
    """``value`` as a finite float64 ``(N, D)`` tensor, and the dtype to return results in."""
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "iuf":
            raise TypeError(f"`{name}` must hold real numbers, got dtype {value.dtype}")
        value = torch.from_numpy(np.asarray(value, dtype=np.float64))
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor or numpy.ndarray, got {type(value)}")
    out_dtype = value.dtype if value.is_floating_point() else torch.float64
    x = value.detach().to(device="cpu", dtype=torch.float64)
    if x.dim() == 1:
        x = x.unsqueeze(-1)
    if x.dim() != 2 or len(x) == 0:
        raise ValueError(f"`{name}` must have shape (N, D) or (N,), got {tuple(value.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"`{name}` has NaN or infinite values")
    return x, out_dtype
