r"""Our conditional models as density estimators of the ``sbi`` package (NPE and NLE).

``sbi.inference.NPE(prior, density_estimator=build_fn)`` calls ``build_fn(theta, x)`` once,
with the training rows of the simulations appended so far, and trains the
:class:`~sbi.neural_nets.estimators.ConditionalDensityEstimator` it returns by its own loop.
:func:`density_estimator` returns such a build function for :math:`q(\theta \mid x)`, and
:func:`likelihood_estimator` one for ``sbi.inference.NLE``, whose estimator is
:math:`q(x \mid \theta)`: an sbi user swaps one argument.

This module is the only one that imports ``sbi`` (the ``[sbi]`` extra):
``pip install "pyro-mixflow[sbi]"``. Importing ``sbi`` imports zuko, which switches torch's
argument validation off for the whole process (``Distribution._validate_args = False``);
``import pyro_mixflow`` alone never does.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor, nn

try:
    from sbi.neural_nets.estimators import ConditionalDensityEstimator
except ImportError as error:  # pragma: no cover - exercised without the extra
    raise ImportError(
        'pyro_mixflow.sbi needs the sbi package: pip install "pyro-mixflow[sbi]"'
    ) from error

from pyro_mixflow.nn import CWM, GMM, RAD, MixtureFlow

__all__ = [
    "MODELS",
    "NUM_COMPONENTS",
    "ConditionalModelEstimator",
    "density_estimator",
    "likelihood_estimator",
]

MODELS: dict[str, type[nn.Module]] = {
    "cwm": CWM,
    "gmm": GMM,
    "mixtureflow": MixtureFlow,
    "rad": RAD,
}
"""The models a build function can make, by the name its ``model`` argument takes."""

NUM_COMPONENTS = 10
r"""The mixture components of a build function's model when ``num_components`` is not given.

Not the density models' 50: an estimator of :math:`q(\theta \mid x)` makes every component's
weight, mean and scale a function of :math:`x`, learned from the 10^3 to 10^4 simulations of
a typical run, and 50 components over-fit them. On ``gaussian_mixture`` at 10^3 simulations
(``benchmarks/sbi.py``, observations 1-3) the mixture density network's C2ST was 0.611 with
10 components and 0.681 with 50 (sbi's ``mdn``, also 10 components: 0.680), and the mean
over the benchmark's six task and budget cells of :class:`~pyro_mixflow.nn.MixtureFlow` went
from 0.720 to 0.699. RAD has no mixture of components and ignores it.
"""

ZScore = Literal["independent", "structured", "none"] | None


class ConditionalModelEstimator(ConditionalDensityEstimator):
    r"""An sbi ``ConditionalDensityEstimator`` around a conditional model of :mod:`pyro_mixflow.nn`.

    The density of an ``input`` :math:`y` given a ``condition`` :math:`c` is the model's, read
    in the standardized input :math:`\tilde y = (y - m) / s` and at the context
    :math:`e(c)` (``embedding_net``),

    .. math:: \log q(y \mid c) = \log p_\text{model}(\tilde y \mid e(c)) - \sum_d \log s_d,

    and ``sample`` draws :math:`\tilde y` from the model and returns :math:`m + s \tilde y`.
    Shapes follow sbi: ``input`` ``(sample_dim, batch_dim, D)`` or ``(batch_dim, D)``,
    ``condition`` ``(batch_dim, *condition_shape)`` or ``(sample_dim, batch_dim,
    *condition_shape)``; batch dimensions broadcast. The model is called once per call, on the
    contexts ``(batch_dim, C)`` (or ``(sample_dim, batch_dim, C)``), and its distribution
    (``batch_shape`` the contexts', ``event_shape (D,)``) scores all samples at once.

    Args:
        net: A conditional model of :mod:`pyro_mixflow.nn` (built with ``context_dim``).
        input_shape: ``(D,)``.
        condition_shape: Shape of one condition (before the embedding net).
        embedding_net: Maps conditions ``(N, *condition_shape)`` to contexts ``(N, C)``;
            identity when ``None``.
        input_loc: :math:`m`, shape ``(D,)`` (0 when ``None``).
        input_scale: :math:`s`, shape ``(D,)``, positive (1 when ``None``).

    Attributes:
        input_loc: Buffer :math:`m`, shape ``(D,)``.
        input_scale: Buffer :math:`s`, shape ``(D,)``.

    Example:
        >>> theta, x = torch.randn(200, 2), torch.randn(200, 3)
        >>> estimator = density_estimator("gmm", num_components=3)(theta, x)
        >>> estimator.log_prob(theta[None, :5], x[:5]).shape
        torch.Size([1, 5])
        >>> estimator.sample((10,), x[:4]).shape
        torch.Size([10, 4, 2])
    """

    input_loc: Tensor
    input_scale: Tensor

    def __init__(
        self,
        net: nn.Module,
        input_shape: torch.Size,
        condition_shape: torch.Size,
        *,
        embedding_net: nn.Module | None = None,
        input_loc: Tensor | None = None,
        input_scale: Tensor | None = None,
    ) -> None:
        super().__init__(net, torch.Size(input_shape), torch.Size(condition_shape))
        if len(self.input_shape) != 1:
            raise ValueError(f"`input_shape` must be (D,), got {tuple(self.input_shape)}")
        (dim,) = self.input_shape
        self._embedding_net = nn.Identity() if embedding_net is None else embedding_net
        loc = torch.zeros(dim) if input_loc is None else torch.as_tensor(input_loc)
        scale = torch.ones(dim) if input_scale is None else torch.as_tensor(input_scale)
        if loc.shape != (dim,) or scale.shape != (dim,):
            raise ValueError(
                f"`input_loc` and `input_scale` must have shape ({dim},), got "
                f"{tuple(loc.shape)} and {tuple(scale.shape)}"
            )
        if not bool((scale > 0).all()):
            raise ValueError("`input_scale` must be positive")
        self.register_buffer("input_loc", loc.clone())
        self.register_buffer("input_scale", scale.clone())

    @property
    def embedding_net(self) -> nn.Module:
        """The map from conditions ``(N, *condition_shape)`` to the model's contexts ``(N, C)``."""
        return self._embedding_net

    def log_prob(self, input: Tensor, condition: Tensor, **kwargs: Any) -> Tensor:
        r"""Returns :math:`\log q(\text{input} \mid \text{condition})`.

        Args:
            input: ``(sample_dim, batch_dim, D)``, or ``(batch_dim, D)`` read as
                ``sample_dim == 1``.
            condition: ``(batch_dim, *condition_shape)`` or ``(sample_dim, batch_dim,
                *condition_shape)``; its batch dimensions broadcast against the input's.
            **kwargs: Accepted for sbi's signature; unused.

        Returns:
            Log densities of shape ``(sample_dim, batch_dim)``.
        """
        self._check_input_shape(input)
        self._check_condition_shape(condition)
        if input.dim() < 3:  # no sample dimension: one draw per batch element
            input = input.reshape(1, -1, *self.input_shape)
        context = self._context(condition)  # [B, C] or [S, B, C]
        context_batch = context.shape[:-1]
        batch = torch.broadcast_shapes(input.shape[-1 - len(context_batch) : -1], context_batch)
        distribution = self.net(context.expand(*batch, context.shape[-1]))
        standardized = (input - self.input_loc) / self.input_scale  # [S, B, D]
        return distribution.log_prob(standardized) - self.input_scale.log().sum()  # [S, B]

    def loss(self, input: Tensor, condition: Tensor, **kwargs: Any) -> Tensor:
        """Returns the negative log density of each pair, shape ``(batch_dim,)``.

        Args:
            input: ``(batch_dim, D)``.
            condition: ``(batch_dim, *condition_shape)``.
            **kwargs: Accepted for sbi's signature; unused.
        """
        return -self.log_prob(input.unsqueeze(0), condition)[0]

    def sample(self, sample_shape: torch.Size, condition: Tensor, **kwargs: Any) -> Tensor:
        """Draws inputs given each condition.

        Args:
            sample_shape: Leading shape of the draws.
            condition: ``(batch_dim, *condition_shape)``.
            **kwargs: Accepted for sbi's signature; unused.

        Returns:
            Draws of shape ``(*sample_shape, batch_dim, D)``, detached.
        """
        self._check_condition_shape(condition)
        with torch.no_grad():
            draws = self.net(self._context(condition)).sample(torch.Size(sample_shape))
        return self.input_loc + self.input_scale * draws  # [*S, B, D]

    def sample_and_log_prob(
        self, sample_shape: torch.Size, condition: Tensor, **kwargs: Any
    ) -> tuple[Tensor, Tensor]:
        """Draws inputs and returns them with their log densities, from one model call.

        Args:
            sample_shape: Leading shape of the draws.
            condition: ``(batch_dim, *condition_shape)``.
            **kwargs: Accepted for sbi's signature; unused.

        Returns:
            Draws ``(*sample_shape, batch_dim, D)`` and log densities
            ``(*sample_shape, batch_dim)``.
        """
        self._check_condition_shape(condition)
        distribution = self.net(self._context(condition))
        with torch.no_grad():
            draws = distribution.sample(torch.Size(sample_shape))  # [*S, B, D]
        log_prob = distribution.log_prob(draws) - self.input_scale.log().sum()
        return self.input_loc + self.input_scale * draws, log_prob

    def _context(self, condition: Tensor) -> Tensor:
        """The model's context ``(*lead, C)`` of conditions ``(*lead, *condition_shape)``."""
        lead = condition.shape[: condition.dim() - len(self.condition_shape)]
        embedded = self._embedding_net(condition.reshape(-1, *self.condition_shape))
        return embedded.reshape(*lead, embedded.shape[-1])


def density_estimator(
    model: str = "mixtureflow",
    *,
    z_score_theta: ZScore = "independent",
    z_score_x: ZScore = "independent",
    embedding_net: nn.Module | None = None,
    **model_kwargs: Any,
) -> Callable[[Tensor, Tensor], ConditionalModelEstimator]:
    r"""A build function for ``sbi.inference.NPE(prior, density_estimator=...)``.

    The counterpart of sbi's ``posterior_nn(model=...)``: the estimator is
    :math:`q(\theta \mid x)`, one of our conditional models with ``input_dim`` the dimension
    of :math:`\theta` and ``context_dim`` that of :math:`x` (after ``embedding_net``). sbi
    calls the build function with the training rows of all simulations appended so far
    (``theta`` ``(N, D)``, ``x`` ``(N, *x_shape)``, the validation rows left out); from them it
    sets the z-scoring and starts the model with ``init_from_data`` (the EM fit of the
    :math:`\theta` rows, so that before training :math:`q(\theta \mid x)` is that mixture for
    every :math:`x`). The posterior sbi builds only calls ``sample`` and ``log_prob``; its
    rejection of draws outside a bounded prior and its leakage correction of ``log_prob``
    work as with sbi's own estimators.

    Args:
        model: ``"gmm"`` (a mixture density network), ``"mixtureflow"``, ``"cwm"`` or
            ``"rad"``: :class:`~pyro_mixflow.nn.GMM`, :class:`~pyro_mixflow.nn.MixtureFlow`,
            :class:`~pyro_mixflow.nn.CWM` or :class:`~pyro_mixflow.nn.RAD`.
        z_score_theta: ``"independent"`` (default) standardizes each coordinate of
            :math:`\theta` by the rows' mean and standard deviation (the log density includes
            the Jacobian); ``"structured"`` by one mean and standard deviation of all
            entries; ``"none"`` or ``None`` not at all. (sbi's
            ``"transform_to_unconstrained"`` is not supported.)
        z_score_x: The same options for :math:`x`. ``"independent"`` without an embedding net
            is the model's own context standardization (``init_from_data`` sets it); with
            one, or ``"structured"``, a fixed standardization of :math:`x` before the
            embedding net, as in sbi.
        embedding_net: A module mapping :math:`x` ``(N, *x_shape)`` to features ``(N, C)``,
            trained with the model; ``None`` for :math:`x` itself (then ``(N, C)``).
        **model_kwargs: The model's own arguments, such as ``num_components`` (here
            :data:`NUM_COMPONENTS`, 10, unless given) or ``hidden_dims`` (not ``input_dim``
            or ``context_dim``: they are read from the simulations).

    Returns:
        ``build_fn(theta, x) -> ConditionalModelEstimator``.

    Example:
        >>> from sbi.inference import NPE
        >>> from torch.distributions import Independent, Normal
        >>> prior = Independent(Normal(torch.zeros(2), torch.ones(2)), 1)
        >>> theta = prior.sample((500,))
        >>> x = theta + 0.5 * torch.randn_like(theta)
        >>> npe = NPE(prior, density_estimator=density_estimator("gmm", num_components=2),
        ...           show_progress_bars=False)
        >>> import warnings
        >>> with warnings.catch_warnings():  # sbi warns that 2 epochs is too few
        ...     warnings.simplefilter("ignore")
        ...     _ = npe.append_simulations(theta, x).train(max_num_epochs=2)
        >>> npe.build_posterior().sample((100,), x=torch.zeros(2)).shape
        torch.Size([100, 2])
    """
    return _factory(
        "density_estimator", model, z_score_theta, z_score_x, embedding_net, model_kwargs
    )


def likelihood_estimator(
    model: str = "mixtureflow",
    *,
    z_score_theta: ZScore = "independent",
    z_score_x: ZScore = "independent",
    embedding_net: nn.Module | None = None,
    **model_kwargs: Any,
) -> Callable[[Tensor, Tensor], ConditionalModelEstimator]:
    r"""A build function for ``sbi.inference.NLE(prior, density_estimator=...)``.

    The counterpart of sbi's ``likelihood_nn(model=...)``: sbi calls it, as for NPE, with
    ``(theta, x)``, but the estimator is :math:`q(x \mid \theta)`: ``input_dim`` is the
    dimension of :math:`x` (``(N, D)``: NLE takes no embedding of :math:`x`) and the condition
    is :math:`\theta`, through ``embedding_net`` if given. Everything else is as in
    :func:`density_estimator`, whose arguments it takes (``z_score_x`` now standardizes the
    input, ``z_score_theta`` the condition).

    Returns:
        ``build_fn(theta, x) -> ConditionalModelEstimator``.
    """
    return _factory(
        "likelihood_estimator",
        model,
        z_score_x,
        z_score_theta,
        embedding_net,
        model_kwargs,
        likelihood=True,
    )


def _factory(
    name: str,
    model: str,
    z_score_input: ZScore,
    z_score_condition: ZScore,
    embedding_net: nn.Module | None,
    model_kwargs: dict[str, Any],
    *,
    likelihood: bool = False,
) -> Callable[[Tensor, Tensor], ConditionalModelEstimator]:
    """Checks the arguments and returns the build function (``likelihood``: roles swapped)."""
    if model not in MODELS:
        raise ValueError(f"`model` must be one of {sorted(MODELS)}, got {model!r}")
    input_name, condition_name = ("x", "theta") if likelihood else ("theta", "x")
    input_flag = _structured(f"z_score_{input_name}", z_score_input)
    condition_flag = _structured(f"z_score_{condition_name}", z_score_condition)
    taken = sorted({"input_dim", "context_dim"} & set(model_kwargs))
    if taken:
        raise TypeError(f"{name}() sets {' and '.join(taken)} from the simulations: drop it")
    if embedding_net is not None and not isinstance(embedding_net, nn.Module):
        raise TypeError(
            f"`embedding_net` must be an nn.Module or None, got {type(embedding_net).__name__}"
        )
    model_class = MODELS[model]
    if "num_components" in inspect.signature(model_class).parameters:
        model_kwargs = {"num_components": NUM_COMPONENTS, **model_kwargs}

    def build_fn(batch_theta: Tensor, batch_x: Tensor) -> ConditionalModelEstimator:
        inputs, conditions = (batch_x, batch_theta) if likelihood else (batch_theta, batch_x)
        if inputs.dim() != 2:
            raise ValueError(
                f"`{input_name}` must have shape (N, D) for a {model!r} estimator, got "
                f"{tuple(inputs.shape)}"
            )
        if len(conditions) != len(inputs):
            raise ValueError(
                f"`theta` and `x` must have one row per simulation, got {len(batch_theta)} "
                f"and {len(batch_x)} rows"
            )
        loc, scale = _moments(inputs, input_flag)
        net = embedding_net
        own_standardization = condition_flag is False and embedding_net is None
        if condition_flag is not None and not own_standardization:
            standardize = _Standardize(*_moments(conditions, condition_flag))
            net = nn.Sequential(standardize, nn.Identity() if net is None else net)
        with torch.no_grad():
            contexts = conditions if net is None else net(conditions)
        if contexts.dim() != 2:
            raise ValueError(
                f"the model's contexts must have shape (N, C): `{condition_name}` has shape "
                f"{tuple(conditions.shape)} and the embedding net gives {tuple(contexts.shape)}"
            )
        density = model_class(inputs.shape[-1], context_dim=contexts.shape[-1], **model_kwargs)
        density.init_from_data(
            (inputs - loc) / scale, contexts.detach() if own_standardization else None
        )
        return ConditionalModelEstimator(
            density,
            inputs.shape[1:],
            conditions.shape[1:],
            embedding_net=net,
            input_loc=loc,
            input_scale=scale,
        )

    return build_fn


class _Standardize(nn.Module):
    r"""The fixed map :math:`c \mapsto (c - \text{loc}) / \text{scale}` (buffers)."""

    loc: Tensor
    scale: Tensor

    def __init__(self, loc: Tensor, scale: Tensor) -> None:
        super().__init__()
        self.register_buffer("loc", loc.clone())
        self.register_buffer("scale", scale.clone())

    def forward(self, condition: Tensor) -> Tensor:
        """Returns the standardized condition, same shape."""
        return (condition - self.loc) / self.scale


def _structured(name: str, z_score: ZScore) -> bool | None:
    """``None`` (no z-scoring), ``False`` (independent) or ``True`` (structured)."""
    options = {None: None, "none": None, "independent": False, "structured": True}
    if not isinstance(z_score, str | None) or z_score not in options:
        raise ValueError(
            f"`{name}` must be 'independent', 'structured', 'none' or None, got {z_score!r}"
        )
    return options[z_score]


def _moments(rows: Tensor, structured: bool | None) -> tuple[Tensor, Tensor]:
    """Location and scale of ``rows`` ``(N, *shape)``, shape ``shape``; constant parts get 1."""
    shape = rows.shape[1:]
    if structured is None:
        return torch.zeros(shape), torch.ones(shape)
    if not bool(torch.isfinite(rows).all()):
        raise ValueError("the simulations hold NaN or inf: remove those rows before training")
    if structured:
        loc, std = rows.mean().expand(shape), rows.std().expand(shape)
    else:
        loc, std = rows.mean(0), rows.std(0) if len(rows) > 1 else torch.zeros(shape)
    return loc.clone(), torch.where(std > 1e-6, std, torch.ones_like(std))
