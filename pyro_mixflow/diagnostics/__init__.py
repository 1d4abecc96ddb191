r"""Diagnostics of Pyro guides against their models: PSIS, log-evidence, restarts, ArviZ draws.

Importance weights :math:`w = p(x, z) / q(z)` of guide draws give Pareto :math:`\hat k`, an
effective sample size and an estimate of the log-evidence (:func:`importance_diagnostics`).
They cannot see modes that the guide never visits: :func:`compare_restarts` compares the
log-evidence of independently trained guides, which does, and :func:`mode_shares` counts where
a guide's draws fall. :func:`to_inference_data` hands guide draws to ArviZ (``az.summary``,
``az.plot_pair``).
"""

from pyro_mixflow.diagnostics.importance import ImportanceDiagnostics, importance_diagnostics
from pyro_mixflow.diagnostics.inference_data import to_inference_data
from pyro_mixflow.diagnostics.modes import ModeShares, mode_shares
from pyro_mixflow.diagnostics.restarts import RestartComparison, compare_restarts

__all__ = [
    "ImportanceDiagnostics",
    "ModeShares",
    "RestartComparison",
    "compare_restarts",
    "importance_diagnostics",
    "mode_shares",
    "to_inference_data",
]
