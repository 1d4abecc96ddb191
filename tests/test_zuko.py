"""zuko both ways: its (lazy) transforms in our flows, our mixtures as the base of its flows.

Importing zuko patches torch globally (``Distribution._validate_args = False``,
``Distribution.arg_constraints = {}``, ``Transform.call_and_ladj``, the name of
``_InverseTransform``). This module imports it with torch's state saved and restored at once,
and an autouse fixture puts zuko's state back only for the length of each test here, so no
other test runs under zuko's switches.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import pyro_mixflow
from pyro_mixflow import DiagNormalMixture, GumbelSoftmaxMixture, MixtureBaseFlow
from pyro_mixflow.io import load_model, save_model
from pyro_mixflow.nn import GMM, MixtureFlow
from pyro_mixflow.transforms import ZukoBase, ZukoTransform, is_zuko_flow, is_zuko_lazy_transform
from tests.torch_globals import restore, snapshot

_TORCH_STATE = snapshot()
try:
    zuko = pytest.importorskip("zuko")
    _ZUKO_STATE = snapshot()
finally:
    restore(_TORCH_STATE)


@pytest.fixture(autouse=True)
def _zuko_globals() -> Iterator[None]:
    """zuko's global switches during each test here (zuko's own classes need them)."""
    before = snapshot()
    restore(_ZUKO_STATE)
    yield
    restore(before)


def _mixture(cls: type = DiagNormalMixture, requires_grad: bool = False) -> tuple[list, object]:
    locs = torch.tensor([[-2.0, 0.5], [1.0, -1.0], [2.5, 2.0]], dtype=torch.float64)
    log_scales = torch.tensor([[0.5, 0.8], [1.0, 0.4], [0.7, 0.7]], dtype=torch.float64).log()
    logits = torch.tensor([0.2, -0.3, 0.1], dtype=torch.float64)
    params = [p.requires_grad_(requires_grad) for p in (locs, log_scales, logits)]
    return params, cls(params[0], params[1].exp(), params[2])


def _nsf(context: int = 0, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return zuko.flows.NSF(2, context, bins=6, transforms=2, hidden_features=(16, 16)).double()


CASES = {
    "unconditional": (0, None),
    "conditional": (3, (4,)),
    "conditional-2d-batch": (3, (2, 3)),
}


@pytest.mark.parametrize("cls", [DiagNormalMixture, GumbelSoftmaxMixture])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_log_prob_is_the_change_of_variables(cls, case):
    context_dim, batch = CASES[case]
    _, base = _mixture(cls)
    nsf = _nsf(context_dim)
    context = None if batch is None else torch.randn(*batch, context_dim, dtype=torch.float64)
    flow = MixtureBaseFlow(base, nsf.transform, context=context)
    assert flow.batch_shape == (() if batch is None else batch)
    x = 2 * torch.randn(5, *flow.batch_shape, 2, dtype=torch.float64)
    z, ladj = nsf.transform(context).call_and_ladj(x)  # zuko: data -> noise
    expected = base.log_prob(z) + ladj
    torch.testing.assert_close(flow.log_prob(x), expected)
    # zuko's own flow on our base, and a zuko flow passed whole (its base is replaced).
    torch.testing.assert_close(
        zuko.lazy.Flow(nsf.transform, ZukoBase(base))(context).log_prob(x), expected
    )
    torch.testing.assert_close(MixtureBaseFlow(base, nsf, context=context).log_prob(x), expected)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_rsample_and_log_prob(case):
    context_dim, batch = CASES[case]
    params, base = _mixture(requires_grad=True)
    nsf = _nsf(context_dim)
    context = None if batch is None else torch.randn(*batch, context_dim, dtype=torch.float64)
    flow = MixtureBaseFlow(base, nsf, context=context)
    x, log_q = flow.rsample_and_log_prob((7,))
    assert x.shape == (7, *flow.batch_shape, 2) and log_q.shape == (7, *flow.batch_shape)
    torch.testing.assert_close(log_q, flow.log_prob(x.detach().clone()))
    assert flow.rsample((2,)).shape == (2, *flow.batch_shape, 2)
    assert not flow.sample().requires_grad
    (torch.sin(x).sum() + log_q.sum()).backward()
    for name, p in [("locs", params[0]), ("log_scales", params[1]), ("logits", params[2])]:
        assert p.grad is not None and p.grad.abs().amax() > 0, name
    assert all(p.grad is not None and p.grad.abs().amax() > 0 for p in nsf.parameters())


def test_zuko_transforms_are_torch_transforms():
    """A (non-lazy) zuko transform goes from base to data, as any torch transform does."""
    _, base = _mixture()
    shift = torch.tensor([0.5, -1.0], dtype=torch.float64)
    scale = torch.tensor([2.0, 0.5], dtype=torch.float64)
    t = zuko.transforms.MonotonicAffineTransform(shift, scale.log())
    flow = MixtureBaseFlow(base, t)  # elementwise: Pyro's TransformedDistribution sums it
    x = torch.randn(6, 2, dtype=torch.float64)
    z = (x - shift) / t.scale
    expected = base.log_prob(z) - t.scale.log().sum(-1)
    torch.testing.assert_close(flow.log_prob(x), expected)


def test_density_integrates_to_one_on_a_grid():
    _, base = _mixture()
    nsf = _nsf(3)
    context = torch.randn(2, 3, dtype=torch.float64)
    flow = MixtureBaseFlow(base, nsf, context=context)
    side = torch.linspace(-9.0, 9.0, 301, dtype=torch.float64)
    grid = torch.cartesian_prod(side, side)  # [N, 2]
    cell = (side[1] - side[0]) ** 2
    with torch.no_grad():
        mass = flow.log_prob(grid.unsqueeze(1)).exp().sum(0) * cell  # [2] contexts
    torch.testing.assert_close(mass, torch.ones(2, dtype=torch.float64), atol=5e-3, rtol=0)


@pytest.mark.parametrize("conditional", [False, True], ids=["unconditional", "conditional"])
def test_our_gmm_as_the_base_of_a_zuko_flow(conditional):
    torch.manual_seed(0)
    context_dim = 3 if conditional else 0
    gmm = GMM(2, 3, context_dim=context_dim or None, hidden_dims=(8,) if conditional else None)
    gmm.double()
    if conditional:  # move the zero-started output layer so every layer gets a gradient
        torch.nn.init.normal_(gmm.network[-1].weight, std=0.1)
    nsf = _nsf(context_dim)
    context = torch.randn(4, 3, dtype=torch.float64) if conditional else None
    flow = zuko.lazy.Flow(nsf.transform, ZukoBase(gmm))
    assert set(flow.parameters()) == set(nsf.parameters()) | set(gmm.parameters())
    d = flow(context)
    assert d.batch_shape == ((4,) if conditional else ()) and d.event_shape == (2,)
    x = d.rsample((16,))
    mixture = gmm(context) if conditional else gmm()
    reference = MixtureBaseFlow(mixture, nsf, context=context)
    torch.testing.assert_close(d.log_prob(x), reference.log_prob(x))
    torch.sin(x).sum().backward()
    for name, p in gmm.named_parameters():
        assert p.grad is not None and p.grad.abs().amax() > 0, name


@pytest.mark.parametrize("conditional", [False, True], ids=["unconditional", "conditional"])
def test_zukos_own_gmm_base_drops_the_gradients_ours_keep(conditional):
    """zuko's ``GMM`` is a ``Mixture`` with ``has_rsample = False``, sampled under ``no_grad``."""
    context_dim = 3 if conditional else 0
    nsf = _nsf(context_dim)
    context = torch.randn(4, 3, dtype=torch.float64) if conditional else None
    theirs = zuko.mixtures.GMM(2, context_dim, components=3, covariance_type="diagonal").double()
    flow = zuko.lazy.Flow(nsf.transform, theirs)
    torch.sin(flow(context).rsample((16,))).sum().backward()
    x, _ = flow(context).rsample_and_log_prob((16,))
    torch.sin(x).sum().backward()
    assert all(p.grad is None for p in theirs.parameters())
    ours = GMM(2, 3, context_dim=context_dim or None, hidden_dims=(8,) if conditional else None)
    ours.double()
    x = zuko.lazy.Flow(nsf.transform, ZukoBase(ours))(context).rsample((16,))
    torch.sin(x).sum().backward()
    last = list(ours.parameters())[-2:]  # the output layer (or all three unconditional ones)
    assert all(p.grad is not None and p.grad.abs().amax() > 0 for p in last)


@pytest.mark.parametrize("context_dim", [None, 3])
@pytest.mark.parametrize(("input_dim", "autoregressive"), [(1, False), (2, False), (3, True)])
def test_mixture_flow_with_zuko_splines(input_dim, context_dim, autoregressive):
    torch.manual_seed(0)
    model = MixtureFlow(
        input_dim,
        3,
        num_transforms=2,
        hidden_dims=(8, 8),
        context_dim=context_dim,
        transforms="zuko",
        autoregressive=autoregressive,
    )
    if input_dim > 1:  # a coupling is two passes, an autoregressive layer one per feature
        assert all(t.passes == (input_dim if autoregressive else 2) for t in model.transforms)
    data = torch.randn(64, input_dim)
    context = None if context_dim is None else torch.randn(64, context_dim)
    model.init_from_data(data, context)
    flow = model(context)
    # Started at the identity: the model is the EM mixture of the standardized data.
    base = model.base(context)
    expected = base.log_prob((data - model.shift) / model.scale) - model.scale.log().sum()
    torch.testing.assert_close(flow.log_prob(data), expected, atol=1e-5, rtol=1e-5)
    x, log_q = flow.rsample_and_log_prob((3,))
    assert x.shape == (3, *flow.batch_shape, input_dim)
    torch.testing.assert_close(log_q, flow.log_prob(x.detach().clone()), atol=1e-4, rtol=1e-4)
    (-flow.log_prob(data).mean() + torch.sin(x).sum()).backward()
    for layer in model.transforms:
        assert is_zuko_lazy_transform(layer)
        assert any(p.grad is not None and p.grad.abs().amax() > 0 for p in layer.parameters())


def test_mixture_flow_rejects_an_unknown_library():
    with pytest.raises(ValueError, match="`transforms` must be 'nflows' or 'zuko', got 'flowjax'"):
        MixtureFlow(2, 3, transforms="flowjax")
    with pytest.raises(ValueError, match="`autoregressive=True` needs `transforms='zuko'`"):
        MixtureFlow(2, 3, autoregressive=True)


def test_detection_and_errors():
    nsf = _nsf(0)
    assert is_zuko_flow(nsf) and not is_zuko_lazy_transform(nsf)
    assert is_zuko_lazy_transform(nsf.transform) and not is_zuko_flow(nsf.transform)
    assert not is_zuko_lazy_transform(torch.nn.Identity())
    with pytest.raises(TypeError, match="`transform` must be a zuko LazyTransform, got Identity"):
        ZukoTransform(torch.nn.Identity())
    with pytest.raises(TypeError, match=r"`base` must be a torch Distribution or an nn\.Module"):
        ZukoBase(3.0)
    _, base = _mixture()
    with pytest.raises(ValueError, match=r"`context.shape\[:-1\]` \(4,\) does not broadcast"):
        MixtureBaseFlow(base.expand((3,)), nsf, context=torch.zeros(4, 3))
    with pytest.raises(TypeError, match="zuko lazy transform or flow, got Identity"):
        MixtureBaseFlow(base, [torch.nn.Identity()])


def test_zuko_transform_caches_the_log_det():
    nsf = _nsf(0)
    t = ZukoTransform(nsf.transform)
    z = torch.randn(5, 2, dtype=torch.float64)
    x = t(z)
    cached = t.log_abs_det_jacobian(z, x)
    assert cached is t._cached_log_det[2]
    torch.testing.assert_close(t.log_abs_det_jacobian(z.clone(), x.clone()), cached)
    torch.testing.assert_close(t.inv(x.clone()), z)


def test_no_module_imports_zuko_at_import_time():
    """Only function bodies may import zuko (``nn.MixtureFlow(transforms="zuko")`` does)."""
    for path in Path(pyro_mixflow.__file__).parent.rglob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                node.body = []  # imports inside functions run only when called
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            assert not any(n.split(".")[0] == "zuko" for n in names), (path, names)


@pytest.mark.slow
def test_import_does_not_import_zuko():
    code = (
        "import sys, pyro_mixflow, pyro_mixflow.transforms, pyro_mixflow.nn\n"
        "print(sorted(m for m in sys.modules if m == 'zuko' or m.startswith('zuko.')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr


@pytest.mark.parametrize(("input_dim", "autoregressive"), [(2, False), (3, True)])
def test_mixture_flow_with_zuko_splines_saves_and_loads(tmp_path, input_dim, autoregressive):
    torch.manual_seed(0)
    model = MixtureFlow(
        input_dim,
        3,
        num_transforms=2,
        hidden_dims=(8, 8),
        context_dim=2,
        transforms="zuko",
        autoregressive=autoregressive,
    )
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    save_model(model, tmp_path / "model.pt")
    loaded = load_model(tmp_path / "model.pt")
    x, context = torch.randn(5, input_dim), torch.randn(5, 2)
    assert loaded.init_arguments["transforms"] == "zuko"
    assert loaded.init_arguments["autoregressive"] is autoregressive
    torch.testing.assert_close(loaded(context).log_prob(x), model(context).log_prob(x))
