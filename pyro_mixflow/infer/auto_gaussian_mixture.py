r"""A Gaussian mixture as a Pyro autoguide: diagonal, full or low-rank components."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Unpack

import torch
from pyro.distributions import constraints
from pyro.nn import PyroParam
from torch.distributions import Distribution, Normal

from pyro_mixflow._covariance import Covariance
from pyro_mixflow._estimators import check_estimator
from pyro_mixflow.infer._auto_mixture import AutoMixture, InitKwargs

__all__ = ["AutoGaussianMixture"]


class AutoGaussianMixture(AutoMixture):
    r"""A guide that is a mixture of Gaussians over all unconstrained latents.

    .. math:: q(u) = \sum_{k=1}^K \pi_k\, \mathcal{N}(u; \mu_k, \Sigma_k), \qquad x = T(u),

    with :math:`T` the bijections to the model's latent supports (``biject_to``). With
    ``covariance="diag"`` (default), :math:`\Sigma_k = \operatorname{diag}\sigma_k^2`: the
    ``K``-component generalization of Pyro's :class:`~pyro.infer.autoguide.AutoDiagonalNormal`.
    With ``"full"``, :math:`\Sigma_k = L_k L_k^\top`, :math:`L_k = \operatorname{diag}(\sigma_k)
    U_k` with :math:`U_k` unit lower-triangular (parameter ``factor``: its strictly lower
    entries), that of :class:`~pyro.infer.autoguide.AutoMultivariateNormal`; with
    ``"lowrank"``, :math:`\Sigma_k = \operatorname{diag}(\sigma_k)(W_k W_k^\top + I)
    \operatorname{diag}(\sigma_k)`, :math:`W_k \in \mathbb{R}^{D \times r}`, that of
    :class:`~pyro.infer.autoguide.AutoLowRankMultivariateNormal`. Full and low-rank components
    (:class:`~pyro_mixflow.MultivariateNormalMixture`,
    :class:`~pyro_mixflow.LowRankMultivariateNormalMixture`) have exact draws with exact
    pathwise gradients, so they take ``estimator="exact"`` only. For a correlated posterior
    (regression coefficients), one full-covariance component does what many diagonal ones
    tiling a tilted ellipse cannot. How the weights :math:`\pi` get their gradient:

    ========================  =====================================================  ==========
    how                        sampler and gradient                                   bias
    ========================  =====================================================  ==========
    ``estimator="exact"``      exact draws, implicit reparameterization               none
    ``"gumbel_softmax"``       relaxed draws at ``temperature``                       yes
    ``"straight_through"``     exact draws, relaxed gradient                          yes
    loss ``RaoBlackwellELBO``  index summed out; one draw per component               none
    ========================  =====================================================  ==========

    With Pyro's ``Trace_ELBO`` the guide's ``rsample`` is used (first three rows). The
    Rao-Blackwellized ELBO (:class:`~pyro_mixflow.infer.RaoBlackwellELBO`) is chosen by the
    loss and works with any ``estimator``; its gradient has the least variance for separated
    components, at ``K`` model evaluations per particle.

    Initialization breaks the symmetry between components (identical components would
    receive identical gradients forever) and starts them where the posterior mass is likely
    to be. From :math:`N = \max(1000, 20K)` prior draws :math:`u_i` (unconstrained) with
    log-likelihoods :math:`\ell_i` (observed sites and ``pyro.factor`` terms), weighted by
    :math:`e^{\beta \ell_i}` with the largest :math:`\beta \le 1` that keeps an effective
    sample size of ``init_ess`` :math:`\cdot N`, a diagonal mixture is fitted by EM; its means
    :math:`c_k`, weights, and standard deviations times :math:`\sqrt\beta` (tempering widens
    a Gaussian posterior by :math:`1/\sqrt\beta`) start the guide, the means pulled towards
    the model's initial point :math:`u_0` (``init_loc_fn``) as
    :math:`\mu_k = u_0 + s\,(c_k - u_0)` with :math:`s` = ``init_spread``. EM components that
    explain fewer than 5 distinct draws (single far draws of a heavy-tailed prior: such a
    component would start with a tiny scale and no weight) are replaced by splitting the
    heaviest ones. A prior-only model has :math:`\beta = 1` (EM on prior draws).
    Initialization costs ``N`` runs of the model.

    The start is diagonal for every ``covariance`` (:math:`U_k = I`; :math:`W_k` small random,
    entries :math:`\mathcal{N}(0, 0.1^2/r)`, with :math:`\sigma_k` shrunk so that the marginal
    standard deviations are the fit's): the ~``init_ess`` :math:`\cdot N` effective draws are
    too few to estimate ``K`` full :math:`D \times D` covariances, and the gradient of the ELBO
    in the off-diagonal entries does not vanish there (in :math:`W_k` it does at 0, hence small
    random).

    Sites whose prior cannot be sampled (an improper ``ImproperUniform`` with the whole target
    in a ``pyro.factor``, as energy functions and unnormalized densities are written) are
    drawn instead from a broad reference in unconstrained space, a scale mixture of centred
    Gaussians with standard deviations 1/4, 1, 4, 16 and 64, and their weights become
    importance weights of the unnormalized target (its density over the reference's); the
    rest is as above, at the same ``N`` model runs. On the four separated modes of
    ``benchmarks/svi.py`` written with a flat prior, the shares ended at 0.389 / 0.310 /
    0.201 / 0.101 (truth 0.4 / 0.3 / 0.2 / 0.1) and the log Z error at 0.00 (seed 0, 8
    components, ``RaoBlackwellELBO``, 3000 Adam steps).

    Why: components started over the prior must travel to a posterior much narrower than the
    prior, often along ridges where the likelihood is flat, while the first to arrive takes
    all the weight. On the 6-mode label-switching posterior of ``benchmarks/svi.py``,
    components started at k-means centres of prior draws found 0 of 6 modes, this start at
    least 5 of 6 (3 of 3 seeds); on Neal's funnel, dropping the single-draw components took
    the ELBO − log Z from −0.90 to −0.21 (Pyro's ``AutoIAFNormal``: −0.48; 3 seeds).

    Sixteen components by default, for every mixture guide (this one,
    :class:`AutoMixtureBaseFlow` and :class:`AutoClassifierWeightedMixture`): on the 2-D target
    with four separated modes, 16 and 8 components both find every mode at the right share on
    3 of 3 seeds, but the 6-mode posterior needs more than 8 (0 of 3 seeds with 8, for this
    guide and for :class:`AutoClassifierWeightedMixture`). Fewer than the density models of
    :mod:`pyro_mixflow.nn` (50): with :class:`~pyro_mixflow.infer.RaoBlackwellELBO` each
    component costs a model evaluation per step.

    Args:
        model: A Pyro model with continuous latent sites.
        num_components: Number of components :math:`K`.
        covariance: The components' covariance: ``"diag"`` (default), ``"full"`` or
            ``"lowrank"`` (above). Full and low-rank components need ``estimator="exact"``.
        rank: The rank :math:`r` of ``covariance="lowrank"``, at most the latent dimension
            :math:`D` (checked at the first call); ``None`` (default) takes
            :math:`\max(1, \operatorname{round}(\sqrt D))`, as Pyro's
            ``AutoLowRankMultivariateNormal``. Passing it with another covariance is a
            ``ValueError``.
        estimator: ``"exact"``, ``"gumbel_softmax"`` or ``"straight_through"`` (the table
            above).
        temperature: Temperature of the two relaxed estimators.
        **init_options: How the guide starts, keyword-only, the same for every mixture guide
            (:class:`AutoMixtureBaseFlow` and :class:`AutoClassifierWeightedMixture` take them
            too) and validated once, when the guide is built:

            * ``init_loc_fn`` (``init_to_median_or_origin``): per-site initialization of the
              model's point :math:`u_0` (Pyro's ``init_to_*`` functions); the default is
              Pyro's ``init_to_median``, or the origin of unconstrained space for sites that
              cannot be sampled (``ImproperUniform``), where Pyro's raise.
            * ``init_scale`` (``None``): initial scale of every component (unconstrained
              space); ``None``: the scales of the tempered EM fit.
            * ``init_spread`` (``1.0``): how far the components start from :math:`u_0`, as a
              fraction of the distance to the means of the tempered EM fit.
            * ``init_ess`` (``0.1``): effective sample size, as a fraction of the draws, that
              sets the tempering :math:`\beta` of the initial fit. Smaller: draws nearer the
              posterior, fewer of them. The :math:`\sqrt\beta` shrinking of the scales
              assumes that the likelihood dominates the prior at :math:`\beta`; keep this
              well below 1 (with ``init_ess`` near 1, :math:`\beta` is near 0 and the scales
              start tiny).
            * ``init_method`` (``"tempered"``): how the start explores the posterior.
              ``"tempered"`` is the importance-weighted start above (``N`` model runs).
              ``"annealed"`` carries the ``N`` reference draws along a tempering ladder from
              the prior (or the broad reference) to the posterior with Langevin moves, as in
              annealed importance sampling, and fits EM to where they end, unweighted (the
              mixture weights are then learned): it finds modes that no prior draw comes near,
              at the cost of 6 vectorized model runs (with gradients) of ``N`` particles per
              stage of the ladder (5 to 10 stages on the targets of ``benchmarks/svi.py``,
              more for a posterior far narrower than the prior); the model must broadcast over
              a plate to the left of its own, as for
              :class:`~pyro_mixflow.infer.RaoBlackwellELBO`. On a 40-mode Gaussian mixture in
              50 dimensions (means uniform in :math:`[-40, 40]^{50}`, prior
              :math:`\mathcal N(0, 40^2 I)`, K = 64), the tempered start put components near
              none of the modes and Adam could not bring them there in 3000 steps (0 of 40
              modes); the annealed start put a component within 3 of 39 modes, and 300 steps
              later 38 of 40 modes had their share within ±0.02 (log Z error -0.02; 40 of
              40 after 3000 steps on 3 of 3 seeds, ``benchmarks/sampler_targets.py``). Not the
              default: the EM fit is unweighted, and on Neal's funnel and Many Well it
              started the guide worse than the tempered start.
            * ``quantile_samples`` (``10000``): draws of the Monte Carlo :meth:`median` and
              :meth:`quantiles` of the guides without closed-form quantiles (this guide's are
              exact and do not use it).

    Example:
        >>> import pyro, pyro.distributions as dist
        >>> from pyro.infer import SVI, Trace_ELBO
        >>> from pyro_mixflow.infer import RaoBlackwellELBO
        >>> def model():
        ...     pyro.sample("scale", dist.LogNormal(0.0, 1.0))
        >>> guide = AutoGaussianMixture(model, num_components=3)
        >>> svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO())
        >>> isinstance(svi.step(), float)
        True
        >>> guide.median()["scale"].shape
        torch.Size([])
        >>> def model2():
        ...     pyro.sample("x", dist.MultivariateNormal(torch.zeros(2),
        ...                  torch.tensor([[1.0, 0.9], [0.9, 1.0]])))
        >>> pyro.clear_param_store()
        >>> guide = AutoGaussianMixture(model2, num_components=2, covariance="full")
        >>> svi = SVI(model2, guide, pyro.optim.Adam({"lr": 0.01}), RaoBlackwellELBO())
        >>> isinstance(svi.step(), float)
        True
        >>> type(guide.get_posterior()).__name__
        'MultivariateNormalMixture'

    References:
        Categorical Reparameterization with Gumbel-Softmax. E. Jang, S. Gu, B. Poole, 2017
        (arXiv:1611.01144). Implicit Reparameterization Gradients. M. Figurnov,
        S. Mohamed, A. Mnih, 2018 (arXiv:1805.08498).
    """

    def __init__(
        self,
        model: Callable[..., Any],
        num_components: int = 16,
        *,
        covariance: str = "diag",
        rank: int | None = None,
        estimator: str = "exact",
        temperature: float = 0.5,
        **init_options: Unpack[InitKwargs],
    ) -> None:
        self.estimator, self.temperature = check_estimator(estimator, temperature)
        self._covariance = Covariance.of(covariance, rank, self.estimator)
        self.covariance, self.rank = covariance, rank
        super().__init__(model, num_components, **init_options)

    def _setup_prototype(self, *args: Any, **kwargs: Any) -> None:
        super()._setup_prototype(*args, **kwargs)
        self.logits = PyroParam(self._init_log_weights, constraints.real)
        if self.covariance == "diag":
            return
        spec, dim = self._covariance, self.latent_dim
        with torch.no_grad():
            factor = spec.initial_factor(self.num_components, dim).to(self.locs)  # [K, F]
            # keep the start's marginal standard deviations (low rank: W W^T adds to them)
            inflation = spec.marginal_scales(torch.ones_like(self.scales), factor)
            scales = self.scales / inflation
        self.scales = PyroParam(scales, constraints.softplus_positive)
        self.factor = PyroParam(factor, constraints.real)

    def get_posterior(self, *args: Any, **kwargs: Any) -> Distribution:
        """The mixture over the unconstrained latent vector (a fresh distribution)."""
        factor = None if self.covariance == "diag" else self.factor
        return self._covariance.mixture(
            self.locs, self.scales, self.logits, factor, self.estimator, self.temperature
        )

    def _marginal_quantiles(self, probs: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        r"""Exact coordinate-wise quantiles of the mixture, by bisection on its CDF.

        The marginal of coordinate :math:`d` is the 1-D mixture of
        :math:`\mathcal{N}(\mu_{kd}, \Sigma_{k,dd})`, whatever the covariance.
        """
        factor = None if self.covariance == "diag" else self.factor.detach()
        locs = self.locs.detach()  # [K, D]
        scales = self._covariance.marginal_scales(self.scales.detach(), factor)  # [K, D]
        weights = self.logits.detach().softmax(-1).unsqueeze(-1)  # [K, 1]
        lower = (locs - 40 * scales).min(0).values.expand(len(probs), -1)  # [Q, D]
        upper = (locs + 40 * scales).max(0).values.expand(len(probs), -1)
        target = probs.to(locs).unsqueeze(-1)  # [Q, 1]
        component = Normal(locs, scales)
        for _ in range(100):
            middle = (lower + upper) / 2
            cdf = (weights * component.cdf(middle.unsqueeze(-2))).sum(-2)  # [Q, D]
            below = cdf < target
            lower = torch.where(below, middle, lower)
            upper = torch.where(below, upper, middle)
        return (lower + upper) / 2
