"""The estimator vocabulary shared by the models and the guides (pyro_mixflow._estimators)."""

from __future__ import annotations

import pytest
import torch

from pyro_mixflow import DiagNormalMixture, GumbelSoftmaxMixture
from pyro_mixflow._estimators import ESTIMATORS, check_estimator, estimator_mixture
from pyro_mixflow.infer import AutoGaussianMixture, AutoMixtureBaseFlow
from pyro_mixflow.nn import GMM, MixtureFlow

CHOICES = "'exact', 'gumbel_softmax', 'straight_through'"


def test_the_vocabulary():
    assert ESTIMATORS == ("exact", "gumbel_softmax", "straight_through")
    for name in ESTIMATORS:
        assert check_estimator(name, 1) == (name, 1.0)


@pytest.mark.parametrize("estimator", ["gumbel-softmax", "reinforce", "", None, 1])
def test_unknown_estimators_are_named_with_the_choices(estimator):
    match = rf"^`estimator` must be one of {CHOICES}, got {estimator!r}$"
    with pytest.raises(ValueError, match=match):
        check_estimator(estimator, 0.5)


@pytest.mark.parametrize("temperature", [0, -1.0, float("inf"), float("nan"), True, "1"])
def test_the_temperature_must_be_a_positive_number(temperature):
    with pytest.raises(ValueError, match=r"^`temperature` must be a positive number, got "):
        check_estimator("exact", temperature)


@pytest.mark.parametrize(
    "build",
    [
        lambda estimator: GMM(2, estimator=estimator),
        lambda estimator: MixtureFlow(2, estimator=estimator),
        lambda estimator: AutoGaussianMixture(lambda: None, estimator=estimator),
        lambda estimator: AutoMixtureBaseFlow(lambda: None, estimator=estimator),
    ],
    ids=["GMM", "MixtureFlow", "AutoGaussianMixture", "AutoMixtureBaseFlow"],
)
def test_every_class_with_an_estimator_speaks_the_one_vocabulary(build):
    with pytest.raises(ValueError, match=rf"^`estimator` must be one of {CHOICES}, got 'score'$"):
        build("score")
    for name in ESTIMATORS:
        model = build(name)
        assert getattr(model, "base", model).estimator == name  # MixtureFlow: its base's


def test_the_old_spelling_warns_and_maps_to_gumbel_softmax():
    match = r"^`estimator='gumbel'` is deprecated .*; use 'gumbel_softmax'$"
    with pytest.warns(DeprecationWarning, match=match):
        assert check_estimator("gumbel", 0.5) == ("gumbel_softmax", 0.5)


@pytest.mark.parametrize(
    ("estimator", "cls", "straight_through"),
    [
        ("exact", DiagNormalMixture, None),
        ("gumbel_softmax", GumbelSoftmaxMixture, False),
        ("straight_through", GumbelSoftmaxMixture, True),
    ],
)
def test_estimator_mixture_builds_the_estimators_distribution(estimator, cls, straight_through):
    locs = torch.randn(3, 2, requires_grad=True)
    scales, logits = torch.ones(3, 2), torch.randn(3)
    d = estimator_mixture(locs, scales, logits, estimator, 0.3)
    assert type(d) is cls
    if straight_through is not None:
        assert d.straight_through is straight_through and d.temperature == 0.3
    x = torch.randn(5, 2)
    torch.testing.assert_close(d.log_prob(x), DiagNormalMixture(locs, scales, logits).log_prob(x))
    assert d.rsample((4,)).requires_grad


def test_estimator_mixture_rejects_an_unchecked_name():
    with pytest.raises(ValueError, match="`estimator` must be one of"):
        estimator_mixture(torch.zeros(2, 1), torch.ones(2, 1), torch.zeros(2), "score", 0.5)


@pytest.mark.parametrize(
    "build",
    [
        lambda: GMM(2, estimator="gumbel"),
        lambda: MixtureFlow(2, num_transforms=1, estimator="gumbel"),
        lambda: AutoMixtureBaseFlow(lambda: None, estimator="gumbel"),
    ],
    ids=["GMM", "MixtureFlow", "AutoMixtureBaseFlow"],
)
def test_the_deprecation_points_at_the_users_line(build):
    """Python shows a DeprecationWarning by default only where the user's code is blamed."""
    with pytest.warns(DeprecationWarning, match="`estimator='gumbel'` is deprecated") as record:
        build()
    assert [warning.filename for warning in record] == [__file__]
