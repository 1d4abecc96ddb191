r"""Classifier weighted mixture: location-scale components with weights from a classifier."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from pyro.distributions import TorchDistribution
from torch.distributions import Categorical, constraints

from pyro_mixflow.distributions._common import HALF_LOG_2PI, NoClosedFormMixin, check_locs_scales

__all__ = ["ClassifierWeightedMixture"]


class ClassifierWeightedMixture(NoClosedFormMixin, TorchDistribution):
    r"""Mixture whose weights are a classifier of the standardized point (CWM).

    With :math:`z_k = (x - \mu_k) / \sigma_k` and :math:`w = \operatorname{softmax}(f(z))`
    for a classifier :math:`f: \mathbb{R}^D \to \mathbb{R}^K`,

    .. math::

        p(x) = \sum_{k=1}^K w_k(z_k)\, \mathcal{N}(z_k; 0, I) \prod_{d=1}^D \sigma_{kd}^{-1}.

    It integrates to one because :math:`\sum_k w_k(z) = 1` for every :math:`z`: it is the
    marginal of the latent-variable model :math:`z \sim \mathcal{N}(0, I)`,
    :math:`k \mid z \sim \operatorname{Categorical}(w(z))`, :math:`x = \mu_k + \sigma_k z`,
    which is how :meth:`sample` draws. A constant classifier (logits :math:`\log \pi`) gives
    the ordinary mixture of diagonal Gaussians.

    The component index is discrete, so there is no ``rsample``. :meth:`rao_blackwell`
    marginalizes it instead: :math:`E[h(X)] = E_z[\sum_k w_k(z) h(\mu_k + \sigma_k z)]`, an
    unbiased estimate that is differentiable in every parameter.

    Cost in classifier outputs: ``log_prob`` evaluates :math:`f` at the :math:`K` points
    :math:`z_k` of each :math:`x`, :math:`K^2` outputs per point (inherent to the density);
    ``sample`` and :meth:`rao_blackwell` evaluate it once per draw, :math:`K` outputs. A
    reverse-KL objective :math:`\sum_k w_k [\log p(x_k) - \log \pi(x_k)]` also needs
    ``log_prob`` at the :math:`K` branch values, hence :math:`K^3` outputs per base draw
    (the authors' code pays the same); :meth:`rao_blackwell_log_prob` estimates that entropy
    part without bias, exactly up to an overlap term sampled from :math:`m` branches,
    :math:`mK^2` outputs per draw.

    Args:
        locs: Component locations :math:`\mu`, shape ``(*batch, K, D)``.
        scales: Component scales :math:`\sigma`, positive, broadcastable with ``locs``.
        classifier: An ``nn.Module`` or callable mapping ``(..., D)`` to ``(..., K)`` logits.
            It is always called on points of shape ``(..., *batch, D)``: the dimensions left
            of :math:`D` end with the batch shape, so a classifier that differs per batch
            element (a conditional one, bound to a context ``(*batch, C)``, as
            :class:`~pyro_mixflow.nn.CWM` builds it) broadcasts its own ``(*batch, ...)``
            tensors against them. It must be picklable for ``torch.save``.
        validate_args: Check parameters and values (torch's default when ``None``).

    Example:
        >>> classifier = torch.nn.Linear(2, 3)
        >>> d = ClassifierWeightedMixture(torch.randn(3, 2), torch.ones(3, 2), classifier)
        >>> x = d.sample((5,))
        >>> x.shape, d.log_prob(x).shape
        (torch.Size([5, 2]), torch.Size([5]))
        >>> values, log_weights = d.rao_blackwell((5,))
        >>> values.shape, log_weights.shape
        (torch.Size([5, 3, 2]), torch.Size([5, 3]))

    References:
        Classifier Weighted Mixture Models. E. Argouarc'h, F. Desbouvries, E. Barat,
        E. Kawasaki, T. Dautremer, 2023.
    """

    arg_constraints = {
        "locs": constraints.independent(constraints.real, 2),
        "scales": constraints.independent(constraints.positive, 2),
    }
    support = constraints.independent(constraints.real, 1)
    has_rsample = False

    def __init__(
        self,
        locs: torch.Tensor,
        scales: torch.Tensor,
        classifier: Callable[[torch.Tensor], torch.Tensor],
        *,
        validate_args: bool | None = None,
    ) -> None:
        param_shape = check_locs_scales(locs, scales)
        if not callable(classifier):
            raise TypeError(
                f"`classifier` must be an nn.Module or callable, got {type(classifier).__name__}"
            )
        self.locs = locs.expand(param_shape)
        self.scales = scales.expand(param_shape)
        self.classifier = classifier
        super().__init__(param_shape[:-2], param_shape[-1:], validate_args=validate_args)
        if self._validate_args:  # one point per batch element: a wrong output size fails now
            with torch.no_grad():
                self._logits(locs.new_zeros((1, *param_shape[:-2], param_shape[-1])))

    def expand(  # noqa: D102
        self,
        batch_shape: torch.Size | tuple[int, ...],
        _instance: ClassifierWeightedMixture | None = None,
    ) -> ClassifierWeightedMixture:
        new = self._get_checked_instance(ClassifierWeightedMixture, _instance)
        batch_shape = torch.Size(batch_shape)
        new.locs = self.locs.expand(batch_shape + self.locs.shape[-2:])
        new.scales = self.scales.expand(batch_shape + self.scales.shape[-2:])
        new.classifier = self.classifier
        super(ClassifierWeightedMixture, new).__init__(
            batch_shape, self.event_shape, validate_args=False
        )
        new._validate_args = self._validate_args
        return new

    @property
    def num_components(self) -> int:
        """The number of components :math:`K`."""
        return self.locs.shape[-2]

    def sample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        r"""Exact draws without a graph, by the latent-variable scheme.

        .. math:: z \sim \mathcal{N}(0, I), \quad k \sim \operatorname{Categorical}(w(z)),
                  \quad x = \mu_k + \sigma_k \odot z.

        Args:
            sample_shape: Leading sample shape.

        Returns:
            Tensor of shape ``(*sample_shape, *batch, D)``, not attached to any graph.

        Example:
            >>> d = ClassifierWeightedMixture(torch.zeros(2, 1), torch.ones(2, 1),
            ...                               torch.nn.Linear(1, 2))
            >>> d.sample((4,)).shape
            torch.Size([4, 1])
        """
        with torch.no_grad():
            z = self._base_sample(sample_shape)  # [*S, *B, D]
            logits = self._logits(z)  # [*S, *B, K]
            index = Categorical(logits=logits, validate_args=False).sample()  # [*S, *B]
            gather = index[..., None, None].expand(index.shape + (1,) + self.event_shape)
            loc = self.locs.expand(index.shape + self.locs.shape[-2:]).gather(-2, gather)
            scale = self.scales.expand(index.shape + self.scales.shape[-2:]).gather(-2, gather)
            return (loc + scale * z.unsqueeze(-2)).squeeze(-2)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        r"""Exact log-density.

        .. math:: \log p(x) = \operatorname{logsumexp}_k \Big[\log w_k(z_k)
                  + \log \mathcal{N}(z_k; 0, I) - \sum_d \log \sigma_{kd}\Big],
                  \qquad z_k = (x - \mu_k) / \sigma_k.

        The classifier is evaluated at ``K`` points per value (``K^2`` outputs).

        Args:
            value: Points, shape ``(*sample, *batch, D)`` or broadcastable to it.

        Returns:
            Tensor of shape ``(*sample, *batch)``.

        Example:
            >>> zero = torch.nn.Linear(1, 1)
            >>> _ = torch.nn.init.zeros_(zero.weight)
            >>> d = ClassifierWeightedMixture(torch.zeros(1, 1), torch.ones(1, 1), zero)
            >>> round(d.log_prob(torch.zeros(1)).exp().item(), 4)  # 1 / sqrt(2 pi)
            0.3989
        """
        if self._validate_args:
            self._validate_sample(value)
        diff = value.unsqueeze(-2) - self.locs  # [*S, *B, K, D]
        with torch.no_grad():  # components whose N(z_k; 0, I) underflows to 0
            far = (diff / self.scales).square().sum(-1) == math.inf  # [*S, *B, K]
        # The classifier sees 0 there, and no inf reaches it or the backward pass.
        z = diff.masked_fill(far.unsqueeze(-1), 0.0) / self.scales
        log_w = self._own_log_weights(z.to(self.locs.dtype))  # the classifier's dtype, as `locs`
        log_normal = (
            (-0.5 * z.square().sum(-1)).masked_fill(far, -math.inf)
            - self.scales.log().sum(-1)
            - self.event_shape[0] * HALF_LOG_2PI
        )  # [*S, *B, K]
        return (log_w + log_normal).logsumexp(-1)

    def rao_blackwell(
        self, sample_shape: torch.Size = torch.Size()
    ) -> tuple[torch.Tensor, torch.Tensor]:
        r"""All ``K`` branch values of one base draw, with their log-weights.

        .. math:: z \sim \mathcal{N}(0, I), \quad x_k = \mu_k + \sigma_k \odot z, \quad
                  \log w_k = \operatorname{log\_softmax}(f(z))_k,

        so that :math:`\sum_k w_k h(x_k)` is an unbiased estimate of :math:`E[h(X)]`
        (it is :math:`E[h(X) \mid z]`), differentiable in ``locs``, ``scales`` and the
        classifier's parameters. One classifier call per draw (``K`` outputs).

        Args:
            sample_shape: Leading sample shape.

        Returns:
            ``(values, log_weights)`` of shapes ``(*sample_shape, *batch, K, D)`` and
            ``(*sample_shape, *batch, K)``; ``log_weights.exp()`` sums to one over ``K``.

        Example:
            >>> d = ClassifierWeightedMixture(torch.zeros(2, 1), torch.ones(2, 1),
            ...                               torch.nn.Linear(1, 2))
            >>> values, log_weights = d.rao_blackwell((1000,))
            >>> mean = (log_weights.exp().unsqueeze(-1) * values).sum(-2).mean(0)
            >>> mean.shape
            torch.Size([1])
        """
        z = self._base_sample(sample_shape)  # [*S, *B, D]
        values = self.locs + self.scales * z.unsqueeze(-2)  # [*S, *B, K, D]
        log_weights = self._logits(z).log_softmax(-1)  # [*S, *B, K]
        return values, log_weights

    def rao_blackwell_log_prob(
        self,
        values: torch.Tensor,
        log_weights: torch.Tensor,
        *,
        num_branches: int = 2,
        stick_the_landing: bool = False,
    ) -> torch.Tensor:
        r"""Unbiased estimate of :math:`\sum_k w_k \log p(x_k)` from ``num_branches`` branches.

        The entropy part of a Rao-Blackwellized reverse KL,
        :math:`F = E_z[\sum_k w_k(z) \log p(x_k)]` with :math:`x_k = \mu_k + \sigma_k z`, costs
        :math:`K` ``log_prob`` calls (:math:`K^3` classifier outputs) per draw if computed
        exactly. Each :math:`L_k = \log p(x_k)` is a log-sum over components whose own term is
        free: component :math:`k` maps :math:`x_k` back to :math:`z`, so

        .. math::

            L_k = c_k + \delta_k, \qquad
            c_k = \ell_k + \log \mathcal N(z; 0, I) - \textstyle\sum_d \log \sigma_{kd},
            \qquad \delta_k = \log\Big(1 + \sum_{i \ne k}
                \frac{w_i(z_{ki})\, \mathcal N(z_{ki}; 0, I) / \prod_d \sigma_{id}}
                     {w_k(z)\, \mathcal N(z; 0, I) / \prod_d \sigma_{kd}}\Big) \ge 0,

        with :math:`\ell = \log w(z)` (``log_weights``) and :math:`z_{ki} = (x_k - \mu_i) /
        \sigma_i`. :math:`\sum_k w_k c_k` is computed exactly (no further classifier call);
        only the overlap term :math:`\sum_k w_k \delta_k`, which vanishes for separated
        components, is sampled: :math:`m` branches :math:`j_1, \dots, j_m \sim
        \operatorname{Categorical}(w(z))`, drawn independently with the weights held fixed,
        and with :math:`\bot` the stop-gradient,

        .. math::

            \hat F = \sum_k w_k c_k + \frac1m \sum_{i=1}^m \Big[\delta_{j_i}
                + (\ell_{j_i} - \bot \ell_{j_i})\, \bot\big(\delta_{j_i} - b_i\big)\Big],
            \qquad b_i = \frac{1}{m-1} \sum_{i' \ne i} \bot \delta_{j_{i'}}

        (:math:`b_i = 0` when :math:`m = 1`). It costs :math:`mK` classifier evaluations
        (:math:`mK^2` outputs) per draw.

        *Unbiased value.* :math:`\ell - \bot\ell = 0` and :math:`E_j[\delta_j] = \sum_k w_k
        \delta_k`, so :math:`E[\hat F] = \sum_k w_k (c_k + \delta_k) = \sum_k w_k L_k`.

        *Unbiased gradient.* :math:`\nabla(\ell_j - \bot\ell_j) = \nabla w_j / w_j`, and
        :math:`b_i` is independent of :math:`j_i` and carries no gradient, so

        .. math::

            E_{j_i}\Big[\nabla \delta_{j_i}
                + \frac{\nabla w_{j_i}}{w_{j_i}}(\delta_{j_i} - b_i)\Big]
            = \sum_k w_k \nabla \delta_k + \sum_k \nabla w_k\, \delta_k
              - E[b_i] \underbrace{\nabla \textstyle\sum_k w_k}_{= 0}
            = \nabla \sum_k w_k \delta_k,

        given :math:`z`: REINFORCE with a leave-one-out baseline over the branch index for the
        overlap term, everything else pathwise and exact.

        *Sticking the landing* (``stick_the_landing=True``): :math:`\nabla L_k` is the sum of
        a pathwise part (through :math:`x_k`) and :math:`\partial_\theta \log p_\theta(x)` at
        fixed :math:`x`, whose expectation :math:`\sum_k E_z[w_k(z)\, \partial_\theta \log
        p_\theta(x_k)] = E_{X \sim p}[\partial_\theta \log p_\theta(X)] = 0`: the score has
        mean zero. Dropping it (:math:`c_k` and :math:`L_j` at detached parameters, gradients
        through :math:`x_k` and the weights :math:`w_k` only; :math:`K` more classifier
        evaluations per draw) keeps the gradient unbiased over :math:`z` (no longer given
        :math:`z`). It needs an ``nn.Module`` classifier. The value is unchanged.

        Args:
            values: Branch values from :meth:`rao_blackwell`, ``(*sample, *batch, K, D)``,
                all ``K`` computed from one shared base draw :math:`z` per row.
            log_weights: Their log-weights, ``(*sample, *batch, K)``.
            num_branches: Branches :math:`m` drawn per row (2 or more for the baseline).
            stick_the_landing: Drop the zero-mean score term (see above).

        Returns:
            Tensor of shape ``(*sample, *batch)``: per row, an estimate whose value and gradient
            have the expectation of ``(log_weights.exp() * log p(values)).sum(-1)``'s.

        Example:
            >>> d = ClassifierWeightedMixture(torch.randn(4, 2), torch.ones(4, 2),
            ...                               torch.nn.Linear(2, 4))
            >>> values, log_weights = d.rao_blackwell((100,))
            >>> d.rao_blackwell_log_prob(values, log_weights).shape
            torch.Size([100])

        References:
            Sticking the Landing: Simple, Lower-Variance Gradient Estimators for Variational
            Inference. G. Roeder, Y. Wu, D. Duvenaud, 2017. arXiv:1703.09194.

            Buy 4 REINFORCE Samples, Get a Baseline for Free! W. Kool, H. van Hoof,
            M. Welling, 2019 (ICLR workshop on deep RL meets structured prediction).
        """
        num_components, dim = self.num_components, self.event_shape[0]
        if not isinstance(values, torch.Tensor) or not isinstance(log_weights, torch.Tensor):
            raise TypeError("`values` and `log_weights` must be torch.Tensors")
        if (
            values.dim() < 2 + len(self.batch_shape)
            or values.shape[-2:] != (num_components, dim)
            or log_weights.shape != values.shape[:-1]
        ):
            raise ValueError(
                f"`values` must have shape (*sample, *batch, {num_components}, {dim}) and "
                f"`log_weights` shape (*sample, *batch, {num_components}), got "
                f"{tuple(values.shape)} and {tuple(log_weights.shape)}"
            )
        if isinstance(num_branches, bool) or not isinstance(num_branches, int) or num_branches < 1:
            raise ValueError(f"`num_branches` must be a positive integer, got {num_branches!r}")
        target = self._detached() if stick_the_landing else self
        z = (values - target.locs) / target.scales  # [*S, *B, K, D], each row equal to z
        own_log_w = log_weights
        if stick_the_landing:  # the classifier at detached parameters, gradients through x_k
            own_log_w = target._own_log_weights(z)
        own = (
            own_log_w - 0.5 * z.square().sum(-1) - target.scales.log().sum(-1) - dim * HALF_LOG_2PI
        )  # [*S, *B, K]: c_k, the own-component term of log p(x_k)
        exact_part = (log_weights.exp() * own).sum(-1)  # [*S, *B]

        index = Categorical(logits=log_weights.detach(), validate_args=False).sample(
            (num_branches,)
        )  # [m, *S, *B]
        gather = index.unsqueeze(-1)  # [m, *S, *B, 1]
        x = (
            values.expand((num_branches,) + values.shape)
            .gather(-2, gather.unsqueeze(-1).expand(gather.shape + (dim,)))
            .squeeze(-2)
        )  # [m, *S, *B, D]
        log_w = log_weights.expand((num_branches,) + log_weights.shape).gather(-1, gather)
        own_j = own.expand((num_branches,) + own.shape).gather(-1, gather)
        overlap = target.log_prob(x) - own_j.squeeze(-1)  # [m, *S, *B]: delta_j >= 0
        if num_branches > 1:
            total = overlap.detach().sum(0)
            baseline = (total - overlap.detach()) / (num_branches - 1)  # leave-one-out
        else:
            baseline = torch.zeros_like(overlap)
        log_w = log_w.squeeze(-1)
        score = (log_w - log_w.detach()) * (overlap.detach() - baseline)
        return exact_part + (overlap + score).mean(0)

    def _detached(self) -> ClassifierWeightedMixture:
        """The same distribution with every parameter cut from the graph (same values)."""
        classifier = self.classifier
        if not isinstance(classifier, torch.nn.Module):
            raise TypeError(
                "`stick_the_landing=True` needs an nn.Module `classifier` (to detach its "
                f"parameters), got {type(classifier).__name__}"
            )
        params = {name: p.detach() for name, p in classifier.named_parameters()}
        buffers = dict(classifier.named_buffers())

        def detached(z: torch.Tensor) -> torch.Tensor:
            return torch.func.functional_call(classifier, {**params, **buffers}, (z,))

        new = ClassifierWeightedMixture.__new__(ClassifierWeightedMixture)
        new.locs, new.scales = self.locs.detach(), self.scales.detach()
        new.classifier = detached
        super(ClassifierWeightedMixture, new).__init__(
            self.batch_shape, self.event_shape, validate_args=False
        )
        return new

    def _base_sample(self, sample_shape: torch.Size) -> torch.Tensor:
        shape = self._extended_shape(sample_shape)
        return torch.randn(shape, dtype=self.locs.dtype, device=self.locs.device)

    def _own_log_weights(self, z: torch.Tensor) -> torch.Tensor:
        """``log w_k(z_k)`` ``(..., *batch, K)`` at component points ``z`` ``(..., *batch, K, D)``.

        The component axis moves to the front for the classifier call, so that the batch
        dimensions stay just left of :math:`D` (the classifier's contract).
        """
        logits = self._logits(z.movedim(-2, 0))  # [K, ..., *B, K]
        return logits.log_softmax(-1).movedim(0, -2).diagonal(dim1=-2, dim2=-1)  # [..., *B, K]

    def _logits(self, z: torch.Tensor) -> torch.Tensor:
        """Classifier logits ``(..., K)`` at points ``z`` ``(..., D)``, with the shape checked."""
        logits = self.classifier(z)
        expected = z.shape[:-1] + (self.num_components,)
        if not isinstance(logits, torch.Tensor) or logits.shape != expected:
            got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits)
            raise ValueError(
                f"`classifier` must map points of shape {tuple(z.shape)} to logits of shape "
                f"{tuple(expected)} (`num_components` = {self.num_components} = "
                f"`locs.shape[-2]`), got {got}"
            )
        return logits
