"""Trainable models: EM initialization, identity start of the flow, gradients, bad input."""

from __future__ import annotations

import inspect
import io

import numpy as np
import pytest
import torch
from sklearn.mixture import GaussianMixture

from pyro_mixflow import DiagNormalMixture, GumbelSoftmaxMixture, MixtureBaseFlow
from pyro_mixflow.io import load_model, save_model
from pyro_mixflow.nn import CWM, GMM, MixtureFlow


def _data(n=600, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[-4.0, 0.0], [3.0, 3.0], [2.0, -3.0]], dtype=dtype)
    index = torch.randint(0, 3, (n,), generator=g)
    return centres[index] + 0.7 * torch.randn(n, 2, generator=g, dtype=dtype)


def test_gmm_em_initialization_equals_scikit_learn():
    x = _data()
    model = GMM(2, num_components=3).double().init_from_data(x, seed=1)
    em = GaussianMixture(3, covariance_type="diag", max_iter=200, random_state=1).fit(x.numpy())
    expected = torch.from_numpy(em.score_samples(x.numpy()))
    with torch.no_grad():
        torch.testing.assert_close(model().log_prob(x), expected)


@pytest.mark.parametrize(
    "estimator,cls",
    [
        ("exact", DiagNormalMixture),
        ("gumbel_softmax", GumbelSoftmaxMixture),
        ("straight_through", GumbelSoftmaxMixture),
    ],
)
def test_gmm_returns_a_fresh_distribution(estimator, cls):
    model = GMM(3, 4, estimator=estimator)
    d = model()
    assert type(d) is cls and d.event_shape == (3,) and d.num_components == 4
    torch.sin(d.rsample((16,))).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert model() is not d


def test_gmm_components_do_not_start_on_top_of_each_other():
    locs = GMM(2, 8).locs.detach()
    distances = torch.cdist(locs, locs) + torch.eye(8)
    assert distances.min() > 1e-3


def test_mixture_flow_starts_as_the_em_mixture():
    """With identity splines, the flow's density is the EM mixture of the standardized data."""
    x = _data()
    model = MixtureFlow(2, num_components=3, num_transforms=2, hidden_dims=(16, 16)).double()
    model.init_from_data(x, seed=1)
    z = (x - x.mean(0)) / x.std(0)
    em = GaussianMixture(3, covariance_type="diag", max_iter=200, random_state=1).fit(z.numpy())
    expected = torch.from_numpy(em.score_samples(z.numpy())) - x.std(0).log().sum()
    with torch.no_grad():
        torch.testing.assert_close(model().log_prob(x), expected)


def test_mixture_flow_gradients_reach_base_and_splines():
    model = MixtureFlow(2, num_components=3, num_transforms=2, hidden_dims=(8, 8))
    model.init_from_data(_data(dtype=torch.float32))
    flow = model()
    assert isinstance(flow, MixtureBaseFlow)
    x, log_q = flow.rsample_and_log_prob((32,))
    (torch.sin(x).sum() + log_q.sum()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
    for name in ("base.locs", "base.log_scales", "base.logits"):
        assert dict(model.named_parameters())[name].grad.abs().amax() > 0, name


def test_one_dimensional_mixture_flow():
    model = MixtureFlow(1, num_components=2, num_transforms=2)
    x = (
        torch.from_numpy(
            np.r_[
                np.random.default_rng(0).normal(-2, 1, 200),
                np.random.default_rng(1).normal(2, 1, 200),
            ]
        )
        .float()
        .unsqueeze(-1)
    )
    flow = model.init_from_data(x)()
    assert flow.log_prob(x).shape == (400,)


def test_state_dict_round_trip():
    model = MixtureFlow(2, num_components=3, num_transforms=2, hidden_dims=(8, 8))
    model.init_from_data(_data(dtype=torch.float32))
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    clone = MixtureFlow(2, num_components=3, num_transforms=2, hidden_dims=(8, 8))
    clone.load_state_dict(torch.load(buffer))
    x = _data(10, torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(clone().log_prob(x), model().log_prob(x))


def test_bad_arguments():
    with pytest.raises(ValueError, match="`input_dim` must be a positive integer"):
        GMM(0)
    with pytest.raises(ValueError, match="`num_components` must be a positive integer"):
        GMM(2, 2.5)
    with pytest.raises(ValueError, match="`estimator` must be"):
        GMM(2, estimator="reinforce")
    with pytest.raises(ValueError, match="unconditional"):
        GMM(2)(torch.zeros(1))
    with pytest.raises(
        ValueError, match=r"`data.shape\[-1\]` \(3\) does not match `input_dim` \(2\)"
    ):
        GMM(2).init_from_data(torch.zeros(10, 3))
    with pytest.raises(ValueError, match="NaN or infinite"):
        GMM(2).init_from_data(torch.full((10, 2), float("nan")))
    with pytest.raises(ValueError, match="at least `num_components`"):
        GMM(2, 8).init_from_data(torch.zeros(3, 2))
    with pytest.raises(ValueError, match="`hidden_dims` must be equal positive sizes"):
        MixtureFlow(2, hidden_dims=(8, 16))
    with pytest.raises(ValueError, match=r"`data` must have shape \(N, 2\)"):
        MixtureFlow(2).init_from_data(torch.zeros(5, 3))


def test_gmm_old_estimator_spelling_warns_and_means_gumbel_softmax():
    with pytest.warns(
        DeprecationWarning, match=r"`estimator='gumbel'` is deprecated.*'gumbel_softmax'"
    ):
        model = GMM(2, 3, estimator="gumbel")
    assert model.estimator == "gumbel_softmax"
    d = model()
    assert type(d) is GumbelSoftmaxMixture and not d.straight_through
    with pytest.warns(DeprecationWarning, match="`estimator='gumbel'` is deprecated"):
        flow = MixtureFlow(2, num_components=3, num_transforms=1, estimator="gumbel")
    assert flow.base.estimator == "gumbel_softmax"


def test_model_file_with_the_old_estimator_spelling_still_loads(tmp_path):
    """Files saved by the command line hold ``estimator`` as a constructor argument."""
    model = GMM(2, num_components=2, estimator="gumbel_softmax")
    save_model(model, tmp_path / "old.pt")
    payload = torch.load(tmp_path / "old.pt", weights_only=True)
    assert payload["kwargs"]["estimator"] == "gumbel_softmax"
    payload["kwargs"]["estimator"] = "gumbel"  # as files saved before the rename hold it
    torch.save(payload, tmp_path / "old.pt")
    with pytest.warns(DeprecationWarning, match="`estimator='gumbel'` is deprecated"):
        loaded = load_model(tmp_path / "old.pt")
    assert loaded.estimator == "gumbel_softmax"
    x = torch.randn(4, 2)
    with torch.no_grad():
        torch.testing.assert_close(loaded().log_prob(x), model().log_prob(x))


def test_gmm_validates_the_temperature():
    with pytest.raises(ValueError, match=r"^`temperature` must be a positive number, got 0$"):
        GMM(2, estimator="gumbel_softmax", temperature=0)


@pytest.mark.parametrize(
    ("cls", "defaults"),
    [
        (GMM, {"num_components": 50, "estimator": "exact", "temperature": 0.5}),
        (MixtureFlow, {"num_components": 50, "estimator": "exact"}),
        (CWM, {"num_components": 50, "hidden_dims": (64, 64), "activation": torch.nn.Tanh}),
    ],
)
def test_density_model_defaults_are_the_documented_ones(cls, defaults):
    """50 components (the density benchmark's), CWM's classifier as the benchmark measured it."""
    parameters = inspect.signature(cls).parameters
    assert {name: parameters[name].default for name in defaults} == defaults
    assert "50" in _arg_doc(cls, "num_components")


def _arg_doc(cls, name):
    """The text of argument ``name`` in the ``Args:`` section of ``cls``'s docstring."""
    lines = inspect.getdoc(cls).splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith(f"{name}:"))
    indent = len(lines[start]) - len(lines[start].lstrip())
    entry = [lines[start]]
    for line in lines[start + 1 :]:
        if not line.strip() or len(line) - len(line.lstrip()) <= indent:
            break
        entry.append(line)
    return " ".join(entry)
