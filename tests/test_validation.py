"""Bad input raises ``ValueError``/``TypeError`` naming the argument; import has no side effects."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from pyro_mixflow import DiagNormalMixture, GumbelSoftmaxMixture

CLASSES = [DiagNormalMixture, GumbelSoftmaxMixture]


@pytest.fixture(params=CLASSES, ids=lambda c: c.__name__)
def cls(request):
    return request.param


@pytest.mark.parametrize("bad", [0.0, -1.0])
def test_non_positive_scales(cls, bad):
    scales = torch.ones(3, 2)
    scales[1, 0] = bad
    with pytest.raises(ValueError, match=r"scales \(Tensor of shape \(3, 2\)\)"):
        cls(torch.zeros(3, 2), scales, torch.zeros(3), validate_args=True)


@pytest.mark.parametrize("name", ["locs", "scales", "logits"])
def test_nan_parameters(cls, name):
    params = {"locs": torch.zeros(3, 2), "scales": torch.ones(3, 2), "logits": torch.zeros(3)}
    params[name][0] = float("nan")
    with pytest.raises(ValueError, match=rf"parameter {name} \(Tensor of shape"):
        cls(params["locs"], params["scales"], params["logits"], validate_args=True)


def test_mismatched_number_of_components(cls):
    with pytest.raises(ValueError, match=r"`logits.shape\[-1\]` \(3\) does not match .* \(4\)"):
        cls(torch.zeros(4, 2), torch.ones(4, 2), torch.zeros(3))
    with pytest.raises(ValueError, match=r"`probs.shape\[-1\]` \(3\) does not match"):
        cls(torch.zeros(4, 2), torch.ones(4, 2), probs=torch.ones(3) / 3)


def test_logits_and_probs(cls):
    with pytest.raises(
        ValueError, match="Either `probs` or `logits` must be specified, but not both"
    ):
        cls(torch.zeros(2, 1), torch.ones(2, 1), torch.zeros(2), probs=torch.ones(2) / 2)
    with pytest.raises(ValueError, match="Either `probs` or `logits` must be specified"):
        cls(torch.zeros(2, 1), torch.ones(2, 1))


def test_bad_shapes(cls):
    with pytest.raises(ValueError, match=r"`locs` must have shape \(\*batch, K, D\), got \(3,\)"):
        cls(torch.zeros(3), torch.ones(3), torch.zeros(3))
    with pytest.raises(
        ValueError, match=r"`locs.shape` \(3, 2\) and `scales.shape` \(3, 4\) do not broadcast"
    ):
        cls(torch.zeros(3, 2), torch.ones(3, 4), torch.zeros(3))
    with pytest.raises(
        ValueError, match=r"batch shapes do not broadcast: locs/scales \(2,\), logits \(5,\)"
    ):
        cls(torch.zeros(2, 3, 1), torch.ones(2, 3, 1), torch.zeros(5, 3))


def test_bad_types(cls):
    with pytest.raises(TypeError, match=r"`locs` must be a torch\.Tensor, got list"):
        cls([[0.0]], torch.ones(1, 1), torch.zeros(1))
    with pytest.raises(
        TypeError, match=r"`scales` must have a floating-point dtype, got torch\.int64"
    ):
        cls(torch.zeros(1, 1), torch.ones(1, 1, dtype=torch.long), torch.zeros(1))
    with pytest.raises(
        TypeError, match=r"`logits.dtype` \(torch.float64\) differs from `locs.dtype`"
    ):
        cls(torch.zeros(1, 1), torch.ones(1, 1), torch.zeros(1, dtype=torch.float64))


def test_wrong_event_size_in_log_prob(cls):
    d = cls(torch.zeros(3, 2), torch.ones(3, 2), torch.zeros(3), validate_args=True)
    with pytest.raises(ValueError, match="event_shape"):
        d.log_prob(torch.zeros(5, 3))
    with pytest.raises(ValueError, match="event_shape"):
        d.log_responsibilities(torch.zeros(5, 3))


def test_validation_can_be_switched_off(cls):
    d = cls(torch.zeros(2, 1), -torch.ones(2, 1), torch.zeros(2), validate_args=False)
    assert d.batch_shape == ()


def test_import_changes_no_global_validation_state():
    code = """
import torch, pyro
import pyro.distributions.util, pyro.infer.util, pyro.poutine.util
from torch.distributions import Distribution
def state():
    return (Distribution._validate_args, pyro.distributions.util.is_validation_enabled(),
            pyro.infer.util.is_validation_enabled(), pyro.poutine.util.is_validation_enabled(),
            torch.is_grad_enabled(), torch.get_default_dtype(),
            torch.are_deterministic_algorithms_enabled())
before = state()
import pyro_mixflow
assert state() == before, (before, state())
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
