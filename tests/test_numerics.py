"""Extreme inputs, mixed dtypes and unsupported methods: a correct value or a clear error."""

from __future__ import annotations

import math

import pyro.distributions.transforms as T
import pytest
import torch
from torch.distributions import Normal
from torch.distributions.transforms import AffineTransform

from pyro_mixflow import DiagNormalMixture, GumbelSoftmaxMixture, MixtureBaseFlow
from pyro_mixflow.distributions import (
    AdditiveNormal,
    ClassifierWeightedMixture,
    IntegerShift,
    NoisyMixture,
    ScaleJitter,
)

INF = math.inf


def _params(dtype, scale=None, num_components=3, dim=2, batch_shape=()):
    """Parameters drawn in float64 (the same values in every dtype), then cast."""
    torch.manual_seed(0)
    shape = batch_shape + (num_components, dim)
    locs = torch.randn(shape, dtype=torch.float64)
    scales = torch.rand(shape, dtype=torch.float64) + 0.5
    if scale is not None:
        scales = torch.full(shape, scale, dtype=torch.float64)
    logits = torch.randn(batch_shape + (num_components,), dtype=torch.float64)
    return locs.to(dtype), scales.to(dtype), logits.to(dtype)


def _reference_log_joint(locs, scales, logits, value):
    """``log pi_k + log N(value; mu_k, sigma_k)`` with torch's ``Normal``, in float64."""
    normal = Normal(locs.double(), scales.double())
    log_normal = normal.log_prob(value.double().unsqueeze(-2)).sum(-1)
    return logits.double().log_softmax(-1) + log_normal


def _assert_matches(actual, expected):
    """Equal to the float64 reference rounded to ``actual``'s dtype: same infinities."""
    expected = expected.to(actual.dtype)
    assert not actual.isnan().any()
    assert torch.equal(actual.isneginf(), expected.isneginf())
    finite = expected.isfinite()
    torch.testing.assert_close(actual[finite], expected[finite], rtol=1e-5, atol=1e-5)


# name: (dtype, scale, value: absolute with the default scales, else an offset from the
# second component's mean; None: at that mean)
EXTREME_CASES = {
    "float32-x1e20": (torch.float32, None, [1e20, 0.0]),
    "float32-x-1e20": (torch.float32, None, [-1e20, 1e20]),
    "float32-x1e19": (torch.float32, None, [1e19, 1e19]),  # finite, below -1e37
    "float32-x3e38": (torch.float32, None, [3e38, -3e38]),
    "float32-xinf": (torch.float32, None, [INF, 0.0]),
    "float64-x1e200": (torch.float64, None, [1e200, 0.0]),
    "float64-x1e150": (torch.float64, None, [1e150, 0.0]),  # finite, -5e299
    "float64-xinf": (torch.float64, None, [-INF, 0.0]),
    "float32-scale1e-30-at-loc": (torch.float32, 1e-30, None),
    "float32-scale1e-30-off-loc": (torch.float32, 1e-30, [1.0, 0.0]),
    "float32-scale1e-19-at-loc": (torch.float32, 1e-19, None),
    "float64-scale1e-200-at-loc": (torch.float64, 1e-200, None),
    "float64-scale1e-200-off-loc": (torch.float64, 1e-200, [1e-190, 0.0]),
}


def _extreme_case(name):
    dtype, scale, offset = EXTREME_CASES[name]
    locs, scales, logits = _params(dtype, scale)
    if offset is None:
        return locs, scales, logits, locs[1].clone()
    offset = torch.tensor(offset, dtype=dtype)
    return locs, scales, logits, offset if scale is None else locs[1] + offset


@pytest.mark.parametrize("name", EXTREME_CASES)
@pytest.mark.parametrize("cls", [DiagNormalMixture, GumbelSoftmaxMixture])
def test_log_prob_at_extremes_matches_float64_reference(cls, name):
    locs, scales, logits, value = _extreme_case(name)
    actual = cls(locs, scales, logits).log_prob(value)
    assert actual.dtype == locs.dtype
    _assert_matches(actual, _reference_log_joint(locs, scales, logits, value).logsumexp(-1))


def test_log_prob_at_tiny_scales_is_large_and_finite():
    locs, scales, logits = _params(torch.float32, 1e-30)
    actual = DiagNormalMixture(locs, scales, logits).log_prob(locs[1])
    assert 100 < actual.item() < 200  # log(1e60 / 2 pi) + log pi_1


@pytest.mark.parametrize(
    "name",
    [
        "float32-scale1e-30-at-loc",
        "float32-scale1e-19-at-loc",
        "float64-scale1e-200-at-loc",
        "float64-scale1e-200-off-loc",
    ],
)
def test_log_prob_gradient_is_finite_where_value_is(name):
    locs, scales, logits, value = _extreme_case(name)
    locs.requires_grad_()
    log_scales = scales.log().requires_grad_()
    logits.requires_grad_()
    value = value.detach().requires_grad_()
    out = DiagNormalMixture(locs, log_scales.exp(), logits).log_prob(value)
    assert out.isfinite()
    out.backward()
    for tensor in (locs, log_scales, logits, value):
        assert tensor.grad.isfinite().all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extreme_rows_leave_other_rows_and_gradients_unchanged(dtype):
    big = 1e20 if dtype == torch.float32 else 1e200
    locs, scales, logits = _params(dtype, batch_shape=(2,))
    leaves = [locs.requires_grad_(), scales.requires_grad_(), logits.requires_grad_()]
    value = torch.randn(5, 2, 2, dtype=dtype)
    extreme = value.clone()
    extreme[1, 0, 0] = big
    extreme[3, 1] = -INF

    plain = DiagNormalMixture(locs, scales, logits).log_prob(value)
    out = DiagNormalMixture(locs, scales, logits).log_prob(extreme)
    finite = out.isfinite()
    assert not finite[1, 0] and not finite[3, 1] and finite.sum() == 8
    assert out[1, 0] == -INF and out[3, 1] == -INF
    torch.testing.assert_close(out[finite], plain[finite])
    grads = torch.autograd.grad(out[finite].sum(), leaves)
    reference_grads = torch.autograd.grad(plain[finite].sum(), leaves)
    for grad, reference in zip(grads, reference_grads, strict=True):
        torch.testing.assert_close(grad, reference)
    expected = _reference_log_joint(locs.detach(), scales.detach(), logits.detach(), extreme)
    _assert_matches(out.detach(), expected.logsumexp(-1))


def test_log_prob_at_extremes_over_batch_dimensions():
    locs, scales, logits = _params(torch.float64, batch_shape=(2, 3))
    scales = scales.clone()
    scales[1, 2] = 1e-200  # every row of this batch element takes the direct route
    value = torch.randn(4, 2, 3, 2, dtype=torch.float64)
    value[0, 1, 2] = locs[1, 2, 0]
    value[2, 0, 1, 0] = 1e200
    actual = DiagNormalMixture(locs, scales, logits).log_prob(value)
    _assert_matches(actual, _reference_log_joint(locs, scales, logits, value).logsumexp(-1))
    assert actual[0, 1, 2] > 400


def test_log_prob_is_twice_differentiable():
    locs, scales, logits = _params(torch.float64)
    value = torch.randn(5, 2, dtype=torch.float64)

    def log_prob(locs, scales, logits):
        return DiagNormalMixture(locs, scales, logits).log_prob(value)

    inputs = tuple(t.requires_grad_() for t in (locs, scales, logits))
    assert torch.autograd.gradgradcheck(log_prob, inputs)


@pytest.mark.parametrize(
    "name", ["float32-x1e20", "float32-x3e38", "float32-scale1e-30-at-loc", "float64-x1e150"]
)
def test_log_responsibilities_at_extremes_match_float64_reference(name):
    locs, scales, logits, value = _extreme_case(name)
    actual = DiagNormalMixture(locs, scales, logits).log_responsibilities(value)
    expected = _reference_log_joint(locs, scales, logits, value).log_softmax(-1)
    _assert_matches(actual, expected)
    assert actual.exp().sum().item() == pytest.approx(1.0)


def test_log_responsibilities_beyond_float64_raise():
    locs, scales, logits = _params(torch.float64)
    d = DiagNormalMixture(locs, scales, logits)
    with pytest.raises(ValueError, match="`value` is so far from every component"):
        d.log_responsibilities(torch.tensor([[0.0, 0.0], [1e200, 0.0]], dtype=torch.float64))


def test_house_logsumexp_of_all_minus_inf_is_minus_inf():
    # NoisyMixture combines components with the house logsumexp; a row of -inf summed to
    # log(K * tiny), a finite value, before.
    locs, scales, logits = _params(torch.float32)
    d = NoisyMixture(DiagNormalMixture(locs, scales, logits), AdditiveNormal(0.0, 0.1))
    assert d.log_prob(torch.tensor([1e20, 0.0])).item() == -INF


NOISE_MODELS = {
    "none": [],
    "additive-shift": [AdditiveNormal(0.0, 0.1), IntegerShift(-1, 2)],
    "jitter": [ScaleJitter(0.2)],
}


@pytest.mark.parametrize("noise", NOISE_MODELS)
@pytest.mark.parametrize("value", [[1e20, 0.0], [INF, 0.0], [3e38, -3e38]])
def test_noisy_mixture_far_values_are_minus_inf(noise, value):
    locs, scales, logits = _params(torch.float32)
    d = NoisyMixture(DiagNormalMixture(locs, scales, logits), NOISE_MODELS[noise])
    assert d.log_prob(torch.tensor(value)).item() == -INF


def test_noisy_mixture_at_tiny_scales_matches_float64_reference():
    locs, scales, logits = _params(torch.float32, 1e-30)
    d = NoisyMixture(DiagNormalMixture(locs, scales, logits))
    for value in (locs[1], locs[1] + 1):
        expected = _reference_log_joint(locs, scales, logits, value).logsumexp(-1)
        _assert_matches(d.log_prob(value), expected)


@pytest.mark.parametrize("value", [[1e20, 0.0], [INF, 0.0], [3e38, -3e38]])
@pytest.mark.parametrize("scale", [None, 1e-30])
def test_classifier_weighted_mixture_far_values_are_minus_inf(value, scale):
    locs, scales, _ = _params(torch.float32, scale)
    d = ClassifierWeightedMixture(locs, scales, torch.nn.Linear(2, 3))
    assert d.log_prob(torch.tensor(value)).item() == -INF


def test_classifier_weighted_mixture_at_tiny_scales_is_finite_with_finite_gradients():
    locs, scales, _ = _params(torch.float32, 1e-30)
    locs.requires_grad_()
    classifier = torch.nn.Linear(2, 3)
    out = ClassifierWeightedMixture(locs, scales, classifier).log_prob(locs[1].detach())
    assert out.isfinite() and out.item() > 100
    out.backward()
    for tensor in (locs, *classifier.parameters()):
        assert tensor.grad.isfinite().all()


@pytest.mark.parametrize(
    ("value", "transform"),
    [
        *[(v, "affine") for v in ([1e20, 0.0], [INF, 0.0], [3e38, -3e38])],
        # pyro's spline maps inf back to NaN, which the base's validation rejects.
        *[(v, "spline") for v in ([1e20, 0.0], [3e38, -3e38])],
    ],
)
def test_mixture_base_flow_far_values_are_minus_inf(value, transform):
    locs, scales, logits = _params(torch.float32)
    t = AffineTransform(0.0, 2.0, event_dim=1) if transform == "affine" else T.spline_coupling(2)
    flow = MixtureBaseFlow(DiagNormalMixture(locs, scales, logits), t)
    assert flow.log_prob(torch.tensor(value)).item() == -INF


def test_mixture_base_flow_over_tiny_scales_is_finite_at_the_mean():
    locs, scales, logits = _params(torch.float32, 1e-30)
    flow = MixtureBaseFlow(DiagNormalMixture(locs, scales, logits), AffineTransform(0.0, 2.0))
    expected = _reference_log_joint(locs, scales, logits, locs[1]).logsumexp(-1) - 2 * math.log(2)
    _assert_matches(flow.log_prob(2 * locs[1]), expected)


def _mixed_dtype_distributions(dtype):
    locs, scales, logits = _params(dtype)
    mixture = DiagNormalMixture(locs, scales, logits)
    return {
        "DiagNormalMixture": mixture,
        "GumbelSoftmaxMixture": GumbelSoftmaxMixture(locs, scales, logits, temperature=0.5),
        "NoisyMixture": NoisyMixture(mixture, [AdditiveNormal(0.0, 0.1), ScaleJitter(0.2)]),
        "ClassifierWeightedMixture": ClassifierWeightedMixture(
            locs, scales, torch.nn.Linear(2, 3).to(dtype)
        ),
        "MixtureBaseFlow": MixtureBaseFlow(mixture, AffineTransform(1.0, 2.0, event_dim=1)),
    }


@pytest.mark.parametrize("name", list(_mixed_dtype_distributions(torch.float32)))
@pytest.mark.parametrize(
    ("param_dtype", "value_dtype"),
    [(torch.float32, torch.float64), (torch.float64, torch.float32), (torch.float32, torch.int64)],
)
def test_log_prob_promotes_dtypes_like_torch(name, param_dtype, value_dtype):
    value = torch.tensor([[0.5, -1.0], [2.0, 1.0]]).to(value_dtype)
    loc = torch.zeros(2, dtype=param_dtype)  # not 0-d, which promotes as a scalar would
    expected_dtype = Normal(loc, 1.0).log_prob(value).dtype
    d = _mixed_dtype_distributions(param_dtype)[name]
    actual = d.log_prob(value)
    assert actual.dtype == expected_dtype
    # The same value as the distribution built in the promoted dtype (up to its classifier).
    torch.manual_seed(0)
    same = _mixed_dtype_distributions(expected_dtype)[name]
    if name == "ClassifierWeightedMixture":
        same.classifier = d.classifier.to(expected_dtype)
    tol = 1e-5 if torch.float32 in (param_dtype, value_dtype) else 1e-12
    torch.testing.assert_close(actual, same.log_prob(value.to(expected_dtype)), rtol=tol, atol=tol)


def test_log_responsibilities_promote_dtypes_like_torch():
    locs, scales, logits = _params(torch.float32)
    value = torch.tensor([0.5, -1.0], dtype=torch.float64)
    actual = DiagNormalMixture(locs, scales, logits).log_responsibilities(value)
    assert actual.dtype == torch.float64
    expected = _reference_log_joint(locs, scales, logits, value).log_softmax(-1)
    torch.testing.assert_close(actual, expected)


def test_mixed_dtype_gradients_reach_float32_parameters():
    locs, scales, logits = _params(torch.float32)
    locs.requires_grad_()
    DiagNormalMixture(locs, scales, logits).log_prob(torch.zeros(2, dtype=torch.float64)).backward()
    assert locs.grad.dtype == torch.float32 and locs.grad.isfinite().all()


def test_entropy_says_how_to_estimate_it(example):
    _, d = example()
    with pytest.raises(NotImplementedError, match=r"has no closed-form entropy; estimate it with"):
        d.entropy()


@pytest.mark.parametrize("method", ["cdf", "icdf"])
def test_cdf_and_icdf_say_they_need_a_univariate_event(example, method):
    _, d = example()
    with pytest.raises(
        NotImplementedError, match=rf"is multivariate .* {method} is defined only for event_shape"
    ):
        getattr(d, method)(torch.zeros(d.event_shape, dtype=torch.float64))


def test_flow_over_a_univariate_base_keeps_torch_cdf():
    flow = MixtureBaseFlow(Normal(0.0, 1.0), AffineTransform(1.0, 2.0))
    torch.testing.assert_close(flow.cdf(torch.tensor(1.0)), torch.tensor(0.5))
