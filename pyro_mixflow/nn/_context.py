r"""Building blocks shared by the conditional models: context checks, standardization, MLPs.

Every model of :mod:`pyro_mixflow.nn` built with ``context_dim=C`` follows one contract:

* ``model(context)`` with ``context`` of shape ``(*batch, C)`` returns a distribution with
  ``batch_shape == context.shape[:-1]`` and ``event_shape == (D,)``; :func:`check_context`
  validates the argument with one-line errors that name it;
* a :class:`ContextStandardizer` (buffers ``loc`` and ``scale``, saved with the state dict)
  maps the context to :math:`(c - \text{loc}) / \text{scale}` before any network;
  ``init_from_data(data, context)`` sets it from the context rows with
  :meth:`ContextStandardizer.fit`;
* the networks that read the context end in a layer that starts at weight 0
  (:func:`context_mlp`, :func:`start_output_at`), with the bias at the unconditional EM
  solution, so that the untrained model is the EM mixture for every context.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from pyro_mixflow._checks import check_positive_int
from pyro_mixflow._mlp import mlp

__all__ = [
    "ContextStandardizer",
    "check_context",
    "check_context_dim",
    "check_context_rows",
    "check_hidden_dims",
    "context_mlp",
    "start_output_at",
]


def check_context_dim(context_dim: int | None) -> int | None:
    """Validates a constructor's ``context_dim``: ``None`` or a positive ``int``.

    Example:
        >>> check_context_dim(3), check_context_dim(None)
        (3, None)
    """
    if context_dim is not None:
        check_positive_int("context_dim", context_dim)
    return context_dim


def check_hidden_dims(hidden_dims: Sequence[int], name: str = "hidden_dims") -> tuple[int, ...]:
    """Validates a sequence of hidden widths (possibly empty) and returns it as a tuple.

    Example:
        >>> check_hidden_dims([8, 8])
        (8, 8)
    """
    if isinstance(hidden_dims, int | str) or not isinstance(hidden_dims, Sequence):
        raise TypeError(f"`{name}` must be a sequence of positive ints, got {hidden_dims!r}")
    for i, width in enumerate(hidden_dims):
        check_positive_int(f"{name}[{i}]", width)
    return tuple(hidden_dims)


def check_context(
    model_name: str, context: torch.Tensor | None, context_dim: int | None
) -> torch.Tensor | None:
    """Validates the ``context`` a model is called with.

    Args:
        model_name: The class name used in the messages, such as ``"GMM"``.
        context: What the caller passed.
        context_dim: The model's ``context_dim`` (``None`` for an unconditional model).

    Returns:
        ``context`` unchanged (``None`` for an unconditional model).

    Raises:
        ValueError: An unconditional model given a context, a conditional one given none, or
            a context whose last dimension is not ``context_dim`` (shapes printed).
        TypeError: A context that is not a floating-point tensor.

    Example:
        >>> check_context("GMM", torch.zeros(4, 3), 3).shape
        torch.Size([4, 3])
        >>> check_context("GMM", None, 3)
        Traceback (most recent call last):
        ...
        ValueError: `GMM` is conditional (context_dim=3): call it with a context of shape (*batch, 3)
    """  # noqa: E501
    if context_dim is None:
        if context is not None:
            raise ValueError(f"`{model_name}` is unconditional: `context` must be None")
        return None
    if context is None:
        raise ValueError(
            f"`{model_name}` is conditional (context_dim={context_dim}): "
            f"call it with a context of shape (*batch, {context_dim})"
        )
    if not isinstance(context, torch.Tensor):
        raise TypeError(
            f"`context` must be a floating-point torch.Tensor, got {type(context).__name__}"
        )
    if not context.is_floating_point():
        raise TypeError(f"`context` must be a floating-point tensor, got dtype {context.dtype}")
    if context.dim() == 0 or context.shape[-1] != context_dim:
        raise ValueError(
            f"`context.shape[-1]` must equal `context_dim` ({context_dim}): `context` has shape "
            f"{tuple(context.shape)}, expected (*batch, {context_dim})"
        )
    return context


class ContextStandardizer(nn.Module):
    r"""The fixed affine map :math:`c \mapsto (c - \text{loc}) / \text{scale}` of a context.

    ``loc`` and ``scale`` are buffers of shape ``(C,)``, 0 and 1 when built (the identity), set
    from the context rows by :meth:`fit` and saved with the state dict.

    Args:
        context_dim: Dimension :math:`C` of the context.

    Example:
        >>> standardizer = ContextStandardizer(2).fit(torch.tensor([[0.0, 1.0], [2.0, 1.0]]))
        >>> standardizer.loc, standardizer.scale
        (tensor([1., 1.]), tensor([1.4142, 1.0000]))
    """

    loc: torch.Tensor
    scale: torch.Tensor

    def __init__(self, context_dim: int) -> None:
        super().__init__()
        check_positive_int("context_dim", context_dim)
        self.context_dim = context_dim
        self.register_buffer("loc", torch.zeros(context_dim))
        self.register_buffer("scale", torch.ones(context_dim))

    @torch.no_grad()
    def fit(self, context: torch.Tensor, *, min_scale: float = 1e-6) -> ContextStandardizer:
        """Sets ``loc`` to the rows' mean and ``scale`` to their standard deviation.

        A column whose standard deviation is at most ``min_scale`` (a constant column, or a
        single row) keeps scale 1, so that it is only centred.

        Args:
            context: Tensor of shape ``(N, C)``, finite.
            min_scale: The floor below which a column is treated as constant.

        Returns:
            ``self``, for chaining.
        """
        context = torch.as_tensor(context)
        if context.dim() != 2 or context.shape[-1] != self.context_dim or len(context) == 0:
            raise ValueError(
                f"`context` must have shape (N, {self.context_dim}) with N >= 1, "
                f"got {tuple(context.shape)}"
            )
        if not bool(torch.isfinite(context).all()):
            raise ValueError("`context` must be finite (it holds NaN or inf)")
        context = context.to(self.loc)
        std = context.std(0) if len(context) > 1 else torch.zeros_like(self.scale)
        self.loc.copy_(context.mean(0))
        self.scale.copy_(torch.where(std > min_scale, std, torch.ones_like(std)))
        return self

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        """Returns the standardized context, same shape ``(*batch, C)``."""
        return (context - self.loc) / self.scale


def check_context_rows(
    model_name: str, data: torch.Tensor, context: object, context_dim: int | None
) -> torch.Tensor:
    """Validates the context rows paired with ``data`` in ``init_from_data``.

    Args:
        model_name: The class name used in the messages, such as ``"CWM"``.
        data: The data rows, ``(N, D)``.
        context: The context rows (a tensor or anything ``torch.as_tensor`` takes).
        context_dim: The model's ``context_dim``.

    Returns:
        ``context`` as a tensor of shape ``(N, C)``.

    Raises:
        ValueError: An unconditional model, or context rows that are not ``(N, C)``.

    Example:
        >>> check_context_rows("CWM", torch.zeros(5, 2), torch.zeros(5, 3), 3).shape
        torch.Size([5, 3])
    """
    context = check_context(model_name, torch.as_tensor(context), context_dim)
    if context.dim() != 2 or len(context) != len(data):
        raise ValueError(
            f"`context` must have shape ({len(data)}, {context_dim}), one row per "
            f"row of `data`, got {tuple(context.shape)}"
        )
    return context


def context_mlp(
    context_dim: int,
    hidden_dims: Sequence[int],
    bias: torch.Tensor,
    *,
    activation: Callable[[], nn.Module] = nn.ELU,
) -> nn.Sequential:
    """An MLP ``[C, *hidden_dims, len(bias)]`` whose last layer starts at weight 0 and ``bias``.

    Its output is then the constant ``bias`` for every context until training moves it.

    Args:
        context_dim: Input width :math:`C`.
        hidden_dims: Hidden widths (may be empty: an affine map of the context).
        bias: Initial bias of the last layer, shape ``(out_features,)``.
        activation: Activation module class between layers.

    Example:
        >>> net = context_mlp(3, (8,), torch.tensor([1.0, -1.0]))
        >>> net(torch.randn(5, 3))[0]
        tensor([ 1., -1.], grad_fn=<SelectBackward0>)
    """
    bias = torch.as_tensor(bias)
    if bias.dim() != 1:
        raise ValueError(f"`bias` must be a vector, got shape {tuple(bias.shape)}")
    net = mlp((context_dim, *hidden_dims, len(bias)), activation)
    start_output_at(net, bias)
    return net


@torch.no_grad()
def start_output_at(net: nn.Sequential, bias: torch.Tensor) -> None:
    """Sets the last ``Linear`` of ``net`` to weight 0 and the given bias (a constant output).

    Example:
        >>> net = context_mlp(2, (4,), torch.zeros(3))
        >>> start_output_at(net, torch.arange(3.0))
        >>> net(torch.randn(2))
        tensor([0., 1., 2.], grad_fn=<ViewBackward0>)
    """
    last = net[-1]
    if not isinstance(last, nn.Linear):
        raise TypeError(f"the last layer of `net` must be an nn.Linear, got {type(last).__name__}")
    bias = torch.as_tensor(bias)
    if bias.shape != last.bias.shape:
        raise ValueError(
            f"`bias.shape` {tuple(bias.shape)} does not match the last layer's "
            f"{tuple(last.bias.shape)}"
        )
    last.weight.zero_()
    last.bias.copy_(bias)
