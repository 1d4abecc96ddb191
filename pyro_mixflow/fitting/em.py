r"""Expectation-maximization fits of Gaussian mixtures (scikit-learn), the start of our models."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["em_diagonal", "em_factor_parameters", "em_full", "em_parameters"]


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
    num_components, _ = _check_like(data, like)
    means, variances, weights = em_diagonal(data, num_components, max_iter=max_iter, seed=seed)

    def tensor(array: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(array, dtype=like.dtype, device=like.device)

    return tensor(means), 0.5 * tensor(variances).log(), tensor(weights).log()


def em_factor_parameters(
    data: torch.Tensor | np.ndarray,
    like: torch.Tensor,
    *,
    covariance: str = "diag",
    rank: int = 0,
    max_iter: int = 200,
    seed: int = 0,
    min_variance: float = 1e-3,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""EM fit as ``(locs, log_scales, factor, log_weights)``, the parameters of a mixture
    with ``"diag"``, ``"full"`` or ``"lowrank"`` components.

    The covariance :math:`\Sigma_k` of each component is written as in
    :class:`~pyro_mixflow.nn.GMM`:

    * ``"diag"``: :func:`em_diagonal`; ``factor`` is empty, shape ``(K, 0)``.
    * ``"full"``: :func:`em_full`, then :math:`\Sigma_k = L_k L_k^\top` (Cholesky) and
      :math:`L_k = \operatorname{diag}(\sigma_k) U_k` with :math:`U_k` unit lower-triangular:
      ``log_scales`` :math:`= \log \operatorname{diag} L_k`, ``factor`` the :math:`D(D-1)/2`
      strictly lower entries of :math:`U_k` (row by row). Exact.
    * ``"lowrank"``: from :func:`em_full`'s :math:`\Sigma_k = V \Lambda V^\top` (eigenvalues
      decreasing), the probabilistic-PCA approximation with the top ``rank`` eigenvectors,
      :math:`A_k = V_r (\Lambda_r - \bar\lambda I)^{1/2}`, :math:`\bar\lambda` the mean of the
      other eigenvalues (0 when ``rank == D``); the diagonal
      :math:`d_k = \operatorname{diag}(\Sigma_k - A_k A_k^\top)`, floored at ``min_variance``
      times :math:`\operatorname{diag}\Sigma_k`, so that the marginal variances are EM's
      unless floored. Then :math:`\sigma_k = d_k^{1/2}` and ``factor`` the :math:`D r`
      entries of :math:`W_k = \operatorname{diag}(\sigma_k)^{-1} A_k` (row by row), in the
      parameterization :math:`\Sigma_k \approx \operatorname{diag}(\sigma_k)(W_k W_k^\top + I)
      \operatorname{diag}(\sigma_k)`.

    Args:
        data: Array or tensor ``(N, D)``.
        like: A ``(K, D)`` tensor whose shape, dtype and device the results follow.
        covariance: ``"diag"``, ``"full"`` or ``"lowrank"``.
        rank: The rank :math:`r` of ``"lowrank"`` (``1 <= rank <= D``; unused otherwise).
        max_iter: EM iterations.
        seed: Seed of the k-means initialization of EM.
        min_variance: Relative floor of the low-rank diagonal.

    Returns:
        ``locs (K, D)``, ``log_scales (K, D)``, ``factor (K, F)``, ``log_weights (K,)``.

    Example:
        >>> x = torch.randn(300, 3) @ torch.tensor([[1.0, 0.5, 0.0], [0.0, 1.0, 0.5],
        ...                                         [0.0, 0.0, 1.0]])
        >>> locs, log_scales, factor, log_weights = em_factor_parameters(
        ...     x, torch.zeros(2, 3), covariance="lowrank", rank=1)
        >>> factor.shape, log_weights.exp().sum().round(decimals=4)
        (torch.Size([2, 3]), tensor(1.))
    """  # noqa: D205
    num_components, dim = _check_like(data, like)

    def tensor(array: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(array, dtype=like.dtype, device=like.device)

    if covariance == "diag":
        locs, log_scales, log_weights = em_parameters(data, like, max_iter=max_iter, seed=seed)
        return locs, log_scales, like.new_zeros(num_components, 0), log_weights
    if covariance not in ("full", "lowrank"):
        raise ValueError(f"`covariance` must be 'diag', 'full' or 'lowrank', got {covariance!r}")
    means, covariances, weights = em_full(data, num_components, max_iter=max_iter, seed=seed)
    sigma = torch.as_tensor(covariances)  # [K, D, D], float64
    if covariance == "full":
        tril = torch.linalg.cholesky(sigma)
        diagonal = tril.diagonal(dim1=-2, dim2=-1)  # [K, D]
        unit = tril / diagonal.unsqueeze(-1)
        rows, cols = torch.tril_indices(dim, dim, -1)
        log_scales, factor = diagonal.log(), unit[..., rows, cols]
    else:
        if not 1 <= rank <= dim:
            raise ValueError(f"`rank` must be in [1, {dim}], got {rank!r}")
        eigenvalues, vectors = torch.linalg.eigh(sigma)  # increasing
        eigenvalues, vectors = eigenvalues.flip(-1), vectors.flip(-1)
        rest = eigenvalues[..., rank:]
        noise = rest.mean(-1, keepdim=True) if rank < dim else eigenvalues.new_zeros(1)
        top = (eigenvalues[..., :rank] - noise).clamp(min=0).sqrt()  # [K, r]
        low = vectors[..., :rank] * top.unsqueeze(-2)  # A_k, [K, D, r]
        marginal = sigma.diagonal(dim1=-2, dim2=-1)  # [K, D]
        residual = (marginal - low.square().sum(-1)).clamp(min=min_variance * marginal)
        scales = residual.sqrt()
        log_scales, factor = scales.log(), (low / scales.unsqueeze(-1)).flatten(-2)
    return tensor(means), tensor(log_scales), tensor(factor), tensor(weights).log()


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
    return _em(data, num_components, "diag", max_iter, seed)


def em_full(
    data: torch.Tensor | np.ndarray, num_components: int, *, max_iter: int = 200, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r"""EM fit of a full-covariance Gaussian mixture:
    ``(means (K, D), covariances (K, D, D), weights (K,))``.

    Uses scikit-learn's ``GaussianMixture(covariance_type="full")`` (k-means initialization,
    ``reg_covar=1e-6``) on float64 data.

    Example:
        >>> means, covariances, weights = em_full(torch.randn(200, 2), 2)
        >>> means.shape, covariances.shape, float(weights.sum())
        ((2, 2), (2, 2, 2), 1.0)
    """  # noqa: D205
    return _em(data, num_components, "full", max_iter, seed)


def _check_like(data: torch.Tensor | np.ndarray, like: torch.Tensor) -> tuple[int, int]:
    """``(K, D)`` of ``like``, after checking that ``data`` has ``D`` columns."""
    num_components, dim = like.shape
    if data.shape[-1] != dim:
        raise ValueError(f"`data.shape[-1]` ({data.shape[-1]}) does not match `input_dim` ({dim})")
    return num_components, dim


def _em(
    data: torch.Tensor | np.ndarray,
    num_components: int,
    covariance_type: str,
    max_iter: int,
    seed: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's ``GaussianMixture`` on float64 data, after checking it."""
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
        num_components, covariance_type=covariance_type, max_iter=max_iter, random_state=seed
    ).fit(x)
    return em.means_, em.covariances_, em.weights_
