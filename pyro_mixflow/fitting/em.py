r"""Expectation-maximization fits of Gaussian mixtures (scikit-learn), the start of our models."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["em_diagonal", "em_parameters"]


def em_parameters(
    data: torch.Tensor | np.ndarray, like: torch.Tensor, *, max_iter: int = 200, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""EM fit of a diagonal mixture as ``(locs, log_scales, log_weights)`` tensors.

    Shaped, typed and placed like ``like``, the ``(K, D)`` means of a model; see
    :func:`em_diagonal`.

    Example:
        >>> locs, log_scales, log_weights = em_parameters(torch.randn(200, 2), torch.zeros(3, 2))
        >>> locs.shape, log_scales.shape, log_weights.shape
        (torch.Size([3, 2]), torch.Size([3, 2]), torch.Size([3]))
    """
    num_components, dim = like.shape
    if data.shape[-1] != dim:
        raise ValueError(f"`data.shape[-1]` ({data.shape[-1]}) does not match `input_dim` ({dim})")
    means, variances, weights = em_diagonal(data, num_components, max_iter=max_iter, seed=seed)

    def tensor(array: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(array, dtype=like.dtype, device=like.device)

    return tensor(means), 0.5 * tensor(variances).log(), tensor(weights).log()


def em_diagonal(
    data: torch.Tensor | np.ndarray, num_components: int, *, max_iter: int = 200, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r"""EM fit of a diagonal Gaussian mixture: ``(means (K, D), variances (K, D), weights (K,))``.

    Uses scikit-learn's ``GaussianMixture(covariance_type="diag")`` (k-means initialization,
    ``reg_covar=1e-6``) on float64 data.

    Example:
        >>> means, variances, weights = em_diagonal(torch.randn(200, 2), 2)
        >>> means.shape, variances.shape, float(weights.sum())
        ((2, 2), (2, 2), 1.0)
    """
    from sklearn.mixture import GaussianMixture

    x = data.detach().cpu().double().numpy() if isinstance(data, torch.Tensor) else np.asarray(data)
    if x.ndim != 2:
        raise ValueError(f"`data` must have shape (N, D), got {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("`data` contains NaN or infinite values")
    if x.shape[0] < num_components:
        raise ValueError(
            f"EM needs at least `num_components` ({num_components}) rows, got {x.shape[0]}"
        )
    em = GaussianMixture(
        num_components, covariance_type="diag", max_iter=max_iter, random_state=seed
    ).fit(x)
    return em.means_, em.covariances_, em.weights_
