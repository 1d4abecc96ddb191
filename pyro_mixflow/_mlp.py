r"""The multilayer perceptron used by the classifiers, conditioners and guides."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch
from torch import nn

__all__ = ["mlp", "residual_mlp"]


def mlp(
    widths: Sequence[int], activation: Callable[[], nn.Module], *, zero_last: bool = False
) -> nn.Sequential:
    """``Linear`` layers of the given widths with ``activation()`` between them.

    With ``zero_last`` the last layer starts at weight 0 and bias 0 (a constant output).
    """
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        if i > 0:
            layers.append(activation())
        layers.append(nn.Linear(a, b))
    if zero_last:
        nn.init.zeros_(layers[-1].weight)
        nn.init.zeros_(layers[-1].bias)
    return nn.Sequential(*layers)


def residual_mlp(
    in_features: int,
    out_features: int,
    width: int,
    num_blocks: int,
    activation: Callable[[], nn.Module],
    *,
    zero_last: bool = False,
) -> nn.Sequential:
    r"""``Linear(in, width)``, residual blocks, ``activation()``, ``Linear(width, out)``.

    A block maps :math:`h \mapsto h + W_2\,a(W_1\,a(h))` (the design of nflows'
    ``ResidualNet``, without batch norm or dropout). With ``zero_last`` the last layer starts
    at weight 0 and bias 0 (a constant output); it is always the ``Sequential``'s last entry.
    """
    layers: list[nn.Module] = [nn.Linear(in_features, width)]
    layers += [_ResidualBlock(width, activation) for _ in range(num_blocks)]
    layers += [activation(), nn.Linear(width, out_features)]
    if zero_last:
        nn.init.zeros_(layers[-1].weight)
        nn.init.zeros_(layers[-1].bias)
    return nn.Sequential(*layers)


class _ResidualBlock(nn.Module):
    def __init__(self, width: int, activation: Callable[[], nn.Module]) -> None:
        super().__init__()
        self.branch = nn.Sequential(
            activation(), nn.Linear(width, width), activation(), nn.Linear(width, width)
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.branch(h)
