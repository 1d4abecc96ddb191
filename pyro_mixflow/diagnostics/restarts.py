r"""Compare independently trained guides (restarts) by their log-evidence to catch missed modes."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pyro_mixflow._checks import check_integer
from pyro_mixflow.diagnostics._sampling import check_distinct_parameters
from pyro_mixflow.diagnostics.importance import ImportanceDiagnostics, importance_diagnostics
from pyro_mixflow.infer._auto_mixture import reference_draws

__all__ = ["RestartComparison", "compare_restarts"]


@dataclass(frozen=True, repr=False)
class RestartComparison:
    r"""Log-evidence gaps between restarts: which guides miss posterior mass, and how much.

    A guide :math:`q_r` whose draws cover a region :math:`A_r` of the posterior gives an
    importance-sampled log-evidence that converges to :math:`\log Z + \log P(A_r \mid x)`.
    The gap to the best restart :math:`b`,

    .. math::

        \Delta_r = \log \hat Z_b - \log \hat Z_r \approx \log \frac{P(A_b \mid x)}{P(A_r \mid x)},
        \qquad \mathrm{se}(\Delta_r) = \sqrt{\mathrm{se}_b^2 + \mathrm{se}_r^2},

    estimates the log of the ratio of the masses that restarts :math:`b` and :math:`r` cover.
    As :math:`P(A_b \mid x) \le 1`, restart :math:`r` misses at least
    :math:`1 - e^{-\Delta_r}` of the posterior mass (up to estimation error; the bound is tight
    when the best restart covers all of it). A restart is flagged when
    :math:`\Delta_r > z \, \mathrm{se}(\Delta_r)` and :math:`\Delta_r >` ``min_gap``. This
    catches a guide on one of several modes, which Pareto :math:`\hat k` and ESS cannot (they
    look only where the guide samples). It is relative: restarts that all miss the same mode
    agree, and the best restart may miss mass too. Restarts from one deterministic start
    (Pyro's ``init_to_median`` on a symmetric prior, or the origin under a flat prior) often
    do: add the *reference* (``reference_samples`` in :func:`compare_restarts`), an importance
    sampler of the model from broad draws that no training steered, as one more row.

    Attributes:
        diagnostics: one :class:`ImportanceDiagnostics` per restart.
        best: index of the restart with the largest :math:`\log \hat Z`.
        gaps: :math:`\Delta_r \ge 0` per restart (``0`` for the best).
        gap_ses: :math:`\mathrm{se}(\Delta_r)` per restart (``0`` for the best).
        missed_mass: :math:`1 - e^{-\Delta_r}` per restart: a lower bound on the share of the
            posterior mass that restart :math:`r` misses.
        flagged: whether restart :math:`r` misses mass that the best restart covers.
        unreliable: whether :math:`\hat k` of restart :math:`r` is above its threshold, so its
            :math:`\log \hat Z` and standard error are not to be trusted.
        z_threshold: :math:`z`.
        min_gap: the smallest gap (in nats) worth flagging.
        reference: whether the last row is the reference importance sampler rather than a
            guide (see :func:`compare_restarts`).

    Example:
        >>> log_w = torch.zeros(100, dtype=torch.float64)
        >>> on_all_modes = ImportanceDiagnostics.from_log_weights(log_w)
        >>> on_one_mode = ImportanceDiagnostics.from_log_weights(log_w + torch.tensor(0.4).log())
        >>> result = RestartComparison.from_diagnostics([on_all_modes, on_one_mode])
        >>> result.flagged, round(result.missed_mass[1], 2)
        ((False, True), 0.6)
    """

    diagnostics: tuple[ImportanceDiagnostics, ...]
    best: int
    gaps: tuple[float, ...]
    gap_ses: tuple[float, ...]
    missed_mass: tuple[float, ...]
    flagged: tuple[bool, ...]
    unreliable: tuple[bool, ...]
    z_threshold: float
    min_gap: float
    reference: bool = False

    @classmethod
    def from_diagnostics(
        cls,
        diagnostics: Sequence[ImportanceDiagnostics],
        *,
        z_threshold: float = 4.0,
        min_gap: float = 0.05,
        reference: bool = False,
    ) -> RestartComparison:
        """Compare restarts from their importance diagnostics.

        Args:
            diagnostics: one :class:`ImportanceDiagnostics` per restart, at least two.
            z_threshold: gaps above this many standard errors are significant.
            min_gap: gaps below this (in nats; ``0.05`` is a 5 % mass difference) are ignored.
            reference: the last diagnostics are the reference importance sampler's.

        Returns:
            The comparison.

        Example:
            >>> same = ImportanceDiagnostics.from_log_weights(torch.randn(100, dtype=torch.float64))
            >>> RestartComparison.from_diagnostics([same, same]).ok
            True
        """
        diagnostics = tuple(diagnostics)
        if len(diagnostics) < 2:
            raise ValueError(f"compare at least 2 restarts, got {len(diagnostics)}")
        if not all(isinstance(d, ImportanceDiagnostics) for d in diagnostics):
            raise TypeError("`diagnostics` must hold `ImportanceDiagnostics` instances")
        if not z_threshold > 0 or not min_gap >= 0:
            raise ValueError(
                f"`z_threshold` must be > 0 and `min_gap` >= 0, got {z_threshold}, {min_gap}"
            )
        log_z = [d.log_evidence for d in diagnostics]
        best = max(range(len(log_z)), key=log_z.__getitem__)
        best_se = diagnostics[best].log_evidence_se
        gaps, ses, missed, flagged = [], [], [], []
        for r, d in enumerate(diagnostics):
            gap = log_z[best] - d.log_evidence
            se = 0.0 if r == best else math.hypot(best_se, d.log_evidence_se)
            gaps.append(gap)
            ses.append(se)
            missed.append(-math.expm1(-gap))
            flagged.append(gap > z_threshold * se and gap > min_gap)
        if reference:  # the reference is no guide: below a guide, it is just a noisy estimate
            flagged[-1] = False
        return cls(
            diagnostics=diagnostics,
            best=best,
            gaps=tuple(gaps),
            gap_ses=tuple(ses),
            missed_mass=tuple(missed),
            flagged=tuple(flagged),
            unreliable=tuple(not d.reliable for d in diagnostics),
            z_threshold=z_threshold,
            min_gap=min_gap,
            reference=reference,
        )

    @property
    def labels(self) -> tuple[str, ...]:
        """Row names: the restarts' indices, and ``"reference"`` for the reference row."""
        labels = [str(r) for r in range(len(self.diagnostics))]
        if self.reference:
            labels[-1] = "reference"
        return tuple(labels)

    @property
    def ok(self) -> bool:
        r"""No restart is flagged and every guide's :math:`\hat k` is below its threshold."""
        guides = self.unreliable[:-1] if self.reference else self.unreliable
        return not any(self.flagged) and not any(guides)

    @property
    def message(self) -> str:
        """What the comparison says, and what to do about it."""
        lines = []
        labels = self.labels
        flagged = [r for r, f in enumerate(self.flagged) if f]
        if flagged:
            worst = max(flagged, key=lambda r: self.gaps[r])
            ratio = self.gaps[worst] / self.gap_ses[worst] if self.gap_ses[worst] else math.inf
            best = "the reference" if labels[self.best] == "reference" else f"restart {self.best}"
            if labels[self.best] == "reference":
                why = (
                    "Broad draws that no training steered found posterior mass that it does "
                    "not cover: it sits on part of the posterior (e.g. one of several modes); "
                    "Pareto k and ESS cannot see this. Use"
                )
            else:
                why = (
                    "The restarts found different parts of the posterior, so it has several "
                    "modes (or some restarts stopped in poor optima); Pareto k and ESS cannot "
                    "see this. The best restart may miss modes too: use"
                )
            lines.append(
                f"Restart(s) {_join([labels[r] for r in flagged])} reach a log-evidence below "
                f"{best} by up to {self.gaps[worst]:.3g} nats ({ratio:.0f} standard errors): "
                f"{labels[worst]} misses at least about {100 * self.missed_mass[worst]:.0f}% of "
                f"the posterior mass. {why} a multimodal guide (e.g. a mixture autoguide), "
                "more restarts, and check again."
            )
        unreliable = [r for r, u in enumerate(self.unreliable) if u]
        notes = []
        if self.reference and unreliable and unreliable[-1] == len(self.diagnostics) - 1:
            unreliable.pop()
            notes.append(
                f"The reference's importance weights are heavy-tailed (Pareto k = "
                f"{self.diagnostics[-1].pareto_k:.2f}): its log-evidence is noisy, so the check "
                f"against it is weak (it can miss mass, rarely invent it); more "
                f"`reference_samples` sharpen it."
            )
        if unreliable:
            ks = ", ".join(f"{self.diagnostics[r].pareto_k:.2f}" for r in unreliable)
            lines.append(
                f"Restart(s) {_join([labels[r] for r in unreliable])} have Pareto k = {ks}, above "
                f"{self.diagnostics[unreliable[0]].pareto_k_threshold:.2f}: their importance "
                f"weights are heavy-tailed, so their log-evidence and its standard error are "
                f"unreliable (the gaps above may be off); improve those guides or draw more."
            )
        if not lines:
            lines.append(
                f"All {len(self.diagnostics)} restarts agree on the log-evidence (within "
                f"{self.z_threshold:g} standard errors or {self.min_gap:g} nats) and have small "
                f"Pareto k. This supports, but does not prove, that no restart misses posterior "
                f"mass: restarts that all miss the same mode agree too."
            )
        return "\n".join(lines + notes)

    def __repr__(self) -> str:
        header = (
            f"{'restart':>7}  {'log Z':>10}  {'± se':>7}  {'gap':>7}  {'gap/se':>7}  "
            f"{'missed':>6}  {'k_hat':>6}  {'ESS %':>6}  verdict"
        )
        rows = [f"{type(self).__name__}(", header]
        for r, d in enumerate(self.diagnostics):
            ratio = f"{self.gaps[r] / self.gap_ses[r]:>7.1f}" if self.gap_ses[r] > 0 else "-"
            label = self.labels[r] if len(self.labels[r]) <= 7 else "ref"
            verdict = "best" if r == self.best else ("MISSES MASS" if self.flagged[r] else "ok")
            if self.unreliable[r]:
                verdict += ", k_hat too large"
            rows.append(
                f"{label:>7}  {d.log_evidence:>10.4f}  {d.log_evidence_se:>7.4f}  "
                f"{self.gaps[r]:>7.4f}  {ratio:>7}  {100 * self.missed_mass[r]:>5.1f}%  "
                f"{d.pareto_k:>6.2f}  {100 * d.ess_fraction:>6.1f}  {verdict}"
            )
        rows.append(self.message)
        return "\n".join(rows) + ")"


def compare_restarts(
    model: Callable,
    guides: Sequence[Callable | ImportanceDiagnostics],
    *args: Any,
    num_samples: int = 1000,
    max_plate_nesting: int | None = None,
    chunk_size: int | None = None,
    z_threshold: float = 4.0,
    min_gap: float = 0.05,
    reference_samples: int = 0,
    **kwargs: Any,
) -> RestartComparison:
    r"""Compare the log-evidence of independently trained guides to find missed posterior mass.

    Train the same guide family from several random initializations (restarts), then call this.
    Each guide's :math:`\log \hat Z` (see :func:`importance_diagnostics`) estimates
    :math:`\log Z` plus the log of the posterior mass that the guide covers, so a restart below
    the best by many standard errors misses mass — typically a mode — that the best restart
    found (see :class:`RestartComparison` for the math). This is the check that catches a
    guide sitting on one of several modes, which Pareto :math:`\hat k` and the ESS cannot.

    **The reference.** Restarts that all miss the same mode agree, and restarts from one
    deterministic start (the origin under a flat prior, the median of a symmetric prior) often
    do. With ``reference_samples = M > 0`` one more row joins the comparison: importance
    sampling of the model from :math:`M` draws of its prior, with every site whose prior cannot
    be sampled (``ImproperUniform``) drawn from a broad scale mixture of centred Gaussians
    (scales 1/4 to 64 in unconstrained units), weighted by :math:`p(x, z) / r(z)`. No training
    steered these draws, so its :math:`\log \hat Z` estimates the log-evidence of the whole
    posterior wherever the reference reaches it; a guide far below it misses mass, and then one
    guide suffices. Cost: :math:`M` model runs, one at a time. The reference's estimate is
    noisy when the posterior is much narrower than the prior (or the reference) in many
    dimensions: its standard error is then large and its :math:`\hat k` flags it, so that it
    flags nothing rather than something false. On the flat-prior four-mode target (modes of
    mass 0.4/0.3/0.2/0.1, tests/test_diagnostics.py), 4,000 reference draws flag a Gaussian
    guide on one mode at a gap of about 0.9 nats.

    Autoguides of one class share their parameters through Pyro's global param store; build,
    train and compare restarts under ``pyro.settings.context(module_local_params=True)`` so that
    each keeps its own (this function refuses guides that share them).

    Args:
        model: Pyro model.
        guides: trained guides for ``model`` (at least two), or their precomputed
            :class:`ImportanceDiagnostics`.
        *args: positional arguments of the model and guides.
        num_samples: guide draws per restart.
        max_plate_nesting: bound on nested ``pyro.plate`` contexts; ``None`` guesses it.
        chunk_size: draws per vectorized pass (bounds memory); ``None`` draws all at once.
        z_threshold: gaps above this many standard errors are significant.
        min_gap: gaps below this (in nats) are ignored.
        reference_samples: draws of the reference importance sampler (0: none); with a
            reference, one guide is enough.
        **kwargs: keyword arguments of the model and guides.

    Returns:
        The comparison; ``print`` it for a table and advice, or read ``.flagged`` / ``.ok``.

    Example:
        >>> import pyro
        >>> import pyro.distributions as dist
        >>> two_modes = dist.MixtureSameFamily(  # equal modes at -4 and 4
        ...     dist.Categorical(logits=torch.zeros(2)), dist.Normal(torch.tensor([-4.0, 4.0]), 1.0)
        ... )
        >>> def model():
        ...     pyro.sample("z", two_modes)
        >>> def both_modes():
        ...     pyro.sample("z", two_modes)
        >>> def left_mode():
        ...     pyro.sample("z", dist.Normal(-4.0, 1.1))
        >>> result = compare_restarts(model, [both_modes, left_mode])
        >>> result.diagnostics[1].pareto_k < 0.1  # k-hat alone sees nothing wrong
        True
        >>> result.flagged, round(result.missed_mass[1], 2)
        ((False, True), 0.5)
    """
    guides = list(guides)
    reference_samples = check_integer("reference_samples", reference_samples)
    if reference_samples < 0 or reference_samples == 1:
        raise ValueError(
            f"`reference_samples` must be 0 (no reference) or at least 2, got {reference_samples}"
        )
    fewest = 1 if reference_samples else 2
    if len(guides) < fewest:
        raise ValueError(
            f"`guides` must hold at least {fewest} restart(s), got {len(guides)}"
            + ("" if reference_samples else " (or add the reference: `reference_samples`)")
        )
    check_distinct_parameters(guides, "guides")
    diagnostics = [
        g
        if isinstance(g, ImportanceDiagnostics)
        else importance_diagnostics(
            model,
            g,
            *args,
            num_samples=num_samples,
            max_plate_nesting=max_plate_nesting,
            chunk_size=chunk_size,
            **kwargs,
        )
        for g in guides
    ]
    if reference_samples:
        log_weights = reference_draws(model, reference_samples, args, kwargs)[1]
        diagnostics.append(ImportanceDiagnostics.from_log_weights(log_weights))
    return RestartComparison.from_diagnostics(
        diagnostics,
        z_threshold=z_threshold,
        min_gap=min_gap,
        reference=bool(reference_samples),
    )


def _join(indices: list[int]) -> str:
    return ", ".join(str(i) for i in indices)
