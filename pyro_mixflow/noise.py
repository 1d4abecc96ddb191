r"""Error processes of :class:`~pyro_mixflow.distributions.NoisyMixture`: per-component models."""

from __future__ import annotations

import torch

__all__ = ["AdditiveNormal", "IntegerShift", "ScaleJitter"]


class ScaleJitter:
    r"""Jittered component scale :math:`\sigma_k + |e_k Z|`, :math:`Z \sim \mathcal{N}(0, 1)`.

    A draw of component :math:`k` is :math:`\mu_k + (\sigma_k + |e_k Z_d|)\,\varepsilon_d` with
    one independent :math:`Z_d` per dimension. The density has no closed form; ``log_prob``
    integrates over the half-normal :math:`|Z|` by Gauss quadrature.

    Args:
        scale: :math:`e \ge 0`, broadcastable to ``(*batch, K, D)``; shape ``(K, 1)`` gives one
            value per component shared by the dimensions.

    Example:
        >>> ScaleJitter(torch.tensor([[0.1], [0.2]])).scale.shape
        torch.Size([2, 1])
    """

    def __init__(self, scale: torch.Tensor | float) -> None:
        self.scale = _non_negative("scale", "ScaleJitter", scale)

    def __repr__(self) -> str:
        return f"ScaleJitter(scale: {tuple(self.scale.shape)})"


class AdditiveNormal:
    r"""Additive Gaussian error :math:`x = y + \eta`, :math:`\eta \sim \mathcal{N}(m_k, s_k^2)`.

    Exact: component :math:`k` becomes :math:`\mathcal{N}(\mu_k + m_k, \sigma_k^2 + s_k^2)`.

    Args:
        loc: Error means :math:`m`, broadcastable to ``(*batch, K, D)``.
        scale: Error standard deviations :math:`s \ge 0`, broadcastable to ``(*batch, K, D)``.

    Example:
        >>> AdditiveNormal(0.0, torch.tensor([[0.1], [0.2]])).scale.shape
        torch.Size([2, 1])
    """

    def __init__(self, loc: torch.Tensor | float, scale: torch.Tensor | float) -> None:
        self.scale = _non_negative("scale", "AdditiveNormal", scale)
        self.loc = _as_float("loc", "AdditiveNormal", loc, self.scale)

    def __repr__(self) -> str:
        return f"AdditiveNormal(loc: {tuple(self.loc.shape)}, scale: {tuple(self.scale.shape)})"


class IntegerShift:
    r"""Discrete shift :math:`x = y + \lfloor U \rfloor`, :math:`U \sim \mathcal{U}[l_k, h_k)`.

    With integers :math:`l < h` the shift is uniform on :math:`\{l, \dots, h - 1\}` (each integer's
    preimage :math:`[c, c + 1)` has length 1 out of :math:`h - l`), so the density is the finite
    sum :math:`\frac{1}{h - l} \sum_{c=l}^{h-1} p(x - c)`.

    Args:
        low: Integers :math:`l`, broadcastable to ``(*batch, K, D)``.
        high: Integers :math:`h > l`, broadcastable to ``(*batch, K, D)``.

    Example:
        >>> IntegerShift(-2, 3).high - IntegerShift(-2, 3).low
        tensor(5)
    """

    def __init__(self, low: torch.Tensor | int, high: torch.Tensor | int) -> None:
        self.low = _integers("low", low)
        self.high = _integers("high", high)
        try:
            torch.broadcast_shapes(self.low.shape, self.high.shape)
        except RuntimeError:
            raise ValueError(
                f"IntegerShift: `low.shape` {tuple(self.low.shape)} and `high.shape` "
                f"{tuple(self.high.shape)} do not broadcast"
            ) from None
        if not bool((self.low < self.high).all()):
            raise ValueError(
                f"IntegerShift: `low` must be < `high` everywhere, got low={self.low.tolist()}, "
                f"high={self.high.tolist()}"
            )

    def __repr__(self) -> str:
        return f"IntegerShift(low: {tuple(self.low.shape)}, high: {tuple(self.high.shape)})"


def _as_float(
    name: str, owner: str, value: object, reference: torch.Tensor | None = None
) -> torch.Tensor:
    if isinstance(value, bool) or not isinstance(value, torch.Tensor | float | int):
        raise TypeError(f"{owner}: `{name}` must be a tensor or a number, got {type(value)}")
    if isinstance(value, torch.Tensor):
        if not value.is_floating_point():
            raise TypeError(f"{owner}: `{name}` must be floating point, got {value.dtype}")
        return value
    if reference is not None:
        return torch.tensor(float(value), dtype=reference.dtype, device=reference.device)
    return torch.tensor(float(value), dtype=torch.get_default_dtype())


def _non_negative(name: str, owner: str, value: object) -> torch.Tensor:
    value = _as_float(name, owner, value)
    if not bool(torch.isfinite(value).all()) or bool((value < 0).any()):
        raise ValueError(
            f"{owner}: `{name}` must be finite and >= 0, got min {value.min().item():g} "
            f"(shape {tuple(value.shape)})"
        )
    return value


def _integers(name: str, value: object) -> torch.Tensor:
    if isinstance(value, bool):
        raise TypeError(f"IntegerShift: `{name}` must be integers, got bool")
    if isinstance(value, int):
        return torch.tensor(value)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"IntegerShift: `{name}` must be an int or a tensor, got {type(value)}")
    if value.dtype == torch.bool or value.is_complex():
        raise TypeError(f"IntegerShift: `{name}` must be integers, got dtype {value.dtype}")
    if value.is_floating_point():
        if not bool((torch.isfinite(value) & (value == value.round())).all()):
            raise ValueError(f"IntegerShift: `{name}` must be integer-valued, got {value}")
    return value.long()
