r"""The base class of the trainable models: each one remembers its constructor's arguments."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

__all__ = ["DensityModel"]


class DensityModel(nn.Module):
    r"""A trainable model that remembers the arguments it was built with.

    The ``__init__`` of every subclass is wrapped so that the outermost constructor call records
    its bound arguments, defaults applied, in :attr:`init_arguments` (a subclass's
    ``super().__init__(...)`` records nothing more). :func:`pyro_mixflow.io.save_model` stores
    them, so that a saved model rebuilds with the same architecture.

    Example:
        >>> class Scale(DensityModel):
        ...     def __init__(self, input_dim: int, scale: float = 2.0) -> None:
        ...         super().__init__()
        ...         self.log_scale = torch.nn.Parameter(torch.full((input_dim,), scale).log())
        >>> Scale(3).init_arguments
        {'input_dim': 3, 'scale': 2.0}
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:
            cls.__init__ = _recording(cls.__init__)

    @property
    def init_arguments(self) -> dict[str, Any]:
        """The outermost constructor's arguments by name, defaults applied (a new dict)."""
        return dict(self.__dict__.get("_init_arguments") or {})


def _recording(init: Callable[..., None]) -> Callable[..., None]:
    """Wraps ``init`` to record its arguments when it is the outermost constructor call."""
    signature = inspect.signature(init)

    @functools.wraps(init)
    def __init__(self: DensityModel, *args: Any, **kwargs: Any) -> None:
        if "_init_arguments" in self.__dict__:  # called by a subclass's constructor
            init(self, *args, **kwargs)
            return
        try:
            bound = signature.bind(self, *args, **kwargs)
        except TypeError:  # let Python's own message say what is wrong
            init(self, *args, **kwargs)
            return
        bound.apply_defaults()
        object.__setattr__(self, "_init_arguments", None)  # mark: the outermost call runs
        init(self, *args, **kwargs)
        arguments = {}
        for name, value in list(bound.arguments.items())[1:]:  # without `self`
            kind = signature.parameters[name].kind
            if kind is inspect.Parameter.VAR_KEYWORD:
                arguments.update(value)
            else:
                arguments[name] = value
        object.__setattr__(self, "_init_arguments", arguments)

    return __init__
