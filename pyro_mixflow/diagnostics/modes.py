r"""Where the draws of a guide fall: the share of draws nearest to each of a set of modes."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from pyro_mixflow.diagnostics._sampling import draw_guide

__all__ = ["ModeShares", "mode_shares"]


@dataclass(frozen=True, repr=False)
class ModeShares:
    r"""Share of guide draws nearest to each mode, raw and importance-weighted.

    With :math:`m(z)` the mode nearest to :math:`z` (Euclidean distance of the flattened
    latents) and :math:`\bar w_n = w_n / \sum_j w_j` the self-normalized importance weights,

    .. math::

        s_m = \frac1N \sum_n \mathbb 1[m(z_n) = m], \qquad
        \tilde s_m = \sum_n \bar w_n \, \mathbb 1[m(z_n) = m].

    :math:`s` is what the guide does; :math:`\tilde s` estimates the posterior mass near each
    mode **among the modes the guide visits** — reweighting cannot recover a mode without draws
    (it gets :math:`\tilde s_m = 0`). Compare :math:`s` across restarts, or with known mode
    masses: restarts that put their draws on different modes show a multimodal posterior that
    each of them misrepresents.

    Attributes:
        shares: ``(M,)`` :math:`s`.
        weighted_shares: ``(M,)`` :math:`\tilde s`.
        shares_se: ``(M,)`` binomial standard errors :math:`\sqrt{s_m (1 - s_m) / N}` of
            :math:`s`.
        num_samples: :math:`N`.
        nearest: ``(N,)`` index of the nearest mode of each draw (excluded from ``repr``, ``==``).

    Example:
        >>> draws = torch.tensor([[-1.0], [-2.0], [3.0], [-1.5]])
        >>> result = ModeShares.from_draws(draws, torch.tensor([[-2.0], [2.0]]))
        >>> result.shares.tolist()
        [0.75, 0.25]
    """

    shares: torch.Tensor
    weighted_shares: torch.Tensor
    shares_se: torch.Tensor
    num_samples: int
    nearest: torch.Tensor = field(compare=False)

    @classmethod
    def from_draws(
        cls,
        draws: torch.Tensor,
        modes: torch.Tensor,
        log_weights: torch.Tensor | None = None,
    ) -> ModeShares:
        """Shares of precomputed draws.

        Args:
            draws: ``(N, D)`` draws (flattened latents).
            modes: ``(M, D)`` mode locations.
            log_weights: ``(N,)`` log importance weights, or ``None`` for equal weights.

        Returns:
            The shares.

        Example:
            >>> draws = torch.tensor([[0.0], [1.0]])
            >>> result = ModeShares.from_draws(draws, draws, torch.tensor([0.0, 1.0]).log())
            >>> result.weighted_shares.tolist()
            [0.0, 1.0]
        """
        if draws.dim() != 2 or modes.dim() != 2 or draws.shape[-1] != modes.shape[-1]:
            raise ValueError(
                f"`draws` (N, D) and `modes` (M, D) must be matrices with the same D, got "
                f"shapes {tuple(draws.shape)} and {tuple(modes.shape)}"
            )
        num_samples, num_modes = draws.shape[0], modes.shape[0]
        if log_weights is None:
            log_weights = draws.new_zeros(num_samples)
        if log_weights.shape != (num_samples,):
            raise ValueError(
                f"`log_weights.shape` {tuple(log_weights.shape)} does not match the "
                f"{num_samples} draws"
            )
        modes = modes.to(draws)
        nearest = torch.cdist(draws, modes).argmin(-1)  # [N]
        one_hot = torch.nn.functional.one_hot(nearest, num_modes).to(draws)  # [N, M]
        shares = one_hot.mean(0)
        weights = torch.softmax(log_weights.to(draws), 0)
        return cls(
            shares=shares,
            weighted_shares=weights @ one_hot,
            shares_se=(shares * (1 - shares) / num_samples).sqrt(),
            num_samples=num_samples,
            nearest=nearest,
        )

    def __repr__(self) -> str:
        rows = [f"{type(self).__name__}(num_samples={self.num_samples},"]
        rows.append(f"{'mode':>6}  {'share':>7}  {'± se':>6}  {'weighted':>8}")
        columns = (self.shares.tolist(), self.shares_se.tolist(), self.weighted_shares.tolist())
        for m, (s, se, ws) in enumerate(zip(*columns, strict=True)):
            rows.append(f"{m:>6}  {s:>7.3f}  {se:>6.3f}  {ws:>8.3f}")
        return "\n".join(rows) + ")"


def mode_shares(
    model: Callable,
    guide: Callable,
    *args: Any,
    modes: torch.Tensor,
    sites: Sequence[str] | None = None,
    num_samples: int = 1000,
    max_plate_nesting: int | None = None,
    chunk_size: int | None = None,
    **kwargs: Any,
) -> ModeShares:
    r"""Share of ``guide``'s draws nearest to each of ``modes`` (see :class:`ModeShares`).

    The latents of ``sites`` (constrained space, model order) are flattened and concatenated
    into one vector per draw. The modes may be known, or taken from the restarts themselves
    (e.g. the mean of each restart's draws): restarts whose draws fall on different modes
    disagree about the posterior, whatever their Pareto :math:`\hat k`.

    Args:
        model: Pyro model.
        guide: Pyro guide for ``model``.
        *args: positional arguments of the model and guide.
        modes: ``(M, D)`` mode locations, ``D`` the total size of ``sites``.
        sites: the latent sites to use; ``None`` takes every latent sample site.
        num_samples: number of guide draws.
        max_plate_nesting: bound on nested ``pyro.plate`` contexts; ``None`` guesses it.
        chunk_size: draws per vectorized pass (bounds memory); ``None`` draws all at once.
        **kwargs: keyword arguments of the model and guide.

    Returns:
        The shares.

    Example:
        >>> import pyro
        >>> import pyro.distributions as dist
        >>> two_modes = dist.MixtureSameFamily(
        ...     dist.Categorical(probs=torch.tensor([0.3, 0.7])),
        ...     dist.Normal(torch.tensor([-4.0, 4.0]), 1.0),
        ... )
        >>> def model():
        ...     pyro.sample("z", two_modes)
        >>> def left_mode():
        ...     pyro.sample("z", dist.Normal(-4.0, 1.1))
        >>> modes = torch.tensor([[-4.0], [4.0]])
        >>> mode_shares(model, left_mode, modes=modes).shares.tolist()  # the truth: 0.3, 0.7
        [1.0, 0.0]
    """
    draws = draw_guide(
        model,
        guide,
        args,
        kwargs,
        num_samples=num_samples,
        max_plate_nesting=max_plate_nesting,
        chunk_size=chunk_size,
    )
    if sites is None:
        sites = [name for name in draws.latents if name not in draws.deterministic]
    unknown = [name for name in sites if name not in draws.latents]
    if unknown:
        raise ValueError(
            f"`sites` {unknown} are not latent sites of the model; it has {list(draws.latents)}"
        )
    flat = torch.cat([draws.latents[name].reshape(num_samples, -1) for name in sites], -1)
    if modes.dim() != 2 or modes.shape[-1] != flat.shape[-1]:
        raise ValueError(
            f"`modes` must have shape (M, {flat.shape[-1]}) (the flattened sites {list(sites)}), "
            f"got {tuple(modes.shape)}"
        )
    return ModeShares.from_draws(flat, modes, draws.log_weights)
