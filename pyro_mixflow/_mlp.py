r"""The multilayer perceptron used by the classifiers, conditioners and guides."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

from torch import nn

__all__ = ["mlp"]


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
