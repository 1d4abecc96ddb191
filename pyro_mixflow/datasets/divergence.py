r"""Monte-Carlo Kullback–Leibler divergence from a benchmark density to a model."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from pyro_mixflow.datasets.density2d import Density2D

__all__ = ["kl_divergence"]


def kl_divergence(
    density: Density2D,
    model_log_prob: Callable[[torch.Tensor], torch.Tensor],
    *,
    num_samples: int = 100_000,
    batch_size: int = 10_000,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> tuple[float, float]:
    r"""Monte-Carlo estimate of :math:`\operatorname{KL}(p \,\|\, q)` and its standard error.

    With :math:`x_n \sim p` (``density``) and :math:`d_n = \log p(x_n) - \log q(x_n)`,

    .. math::

        \operatorname{KL}(p \,\|\, q) = E_p[\log p(x) - \log q(x)] \approx
        \bar d = \frac{1}{N} \sum_{n=1}^N d_n, \qquad
        \operatorname{se} = \sqrt{\frac{1}{N(N-1)} \sum_{n=1}^N (d_n - \bar d)^2}.

    The estimate is unbiased; it can be negative by sampling error, and it is 0 with standard
    error 0 when :math:`q = p`. Equivalently :math:`E_p[\log q] = E_p[\log p] - \operatorname{KL}`:
    the model's expected log-likelihood falls short of the truth's by the KL. The draws are made
    and scored in batches of ``batch_size`` under ``torch.no_grad()``; the differences are
    accumulated in float64.

    Args:
        density: The truth :math:`p`; needs an exact ``log_prob``.
        model_log_prob: :math:`\log q`, mapping points of shape ``(B, 2)`` (dtype ``dtype``,
            on ``device``) to log-densities of shape ``(B,)``.
        num_samples: Number of draws :math:`N \ge 2`.
        batch_size: Draws scored at once.
        generator: Source of randomness for the draws (reproducible estimates).
        dtype: Dtype of the points given to ``model_log_prob``.
        device: Device of those points; defaults to the generator's device, else the CPU.

    Returns:
        ``(estimate, standard_error)`` in nats, as floats (``inf`` where the model gives a draw
        zero density).

    Example:
        >>> from pyro_mixflow.datasets import load
        >>> truth = load("8gaussians")
        >>> kl, se = kl_divergence(truth, truth.log_prob, num_samples=1000)
        >>> kl, se
        (0.0, 0.0)
        >>> wide = torch.distributions.MultivariateNormal(torch.zeros(2), 9 * torch.eye(2))
        >>> kl, se = kl_divergence(truth, wide.log_prob, num_samples=1000)
        >>> kl > 5 * se
        True
    """
    if not density.has_exact_log_prob:
        raise ValueError(f"`density` ({density.name!r}) has no exact `log_prob`")
    for name, value, least in (("num_samples", num_samples, 2), ("batch_size", batch_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"`{name}` must be an int >= {least}, got {value!r}")
    differences = []
    with torch.no_grad():
        remaining = num_samples
        while remaining > 0:
            size = min(batch_size, remaining)
            x = density.sample(size, generator=generator, dtype=dtype, device=device)
            log_q = model_log_prob(x)
            if log_q.shape != (size,):
                raise ValueError(
                    f"`model_log_prob` must map points of shape {tuple(x.shape)} to shape "
                    f"({size},), got {tuple(log_q.shape)}"
                )
            differences.append(density.log_prob(x).double() - log_q.double())
            remaining -= size
    d = torch.cat(differences)
    estimate = float(d.mean())
    if not math.isfinite(estimate):
        return estimate, math.nan
    return estimate, float(d.std() / math.sqrt(num_samples))
