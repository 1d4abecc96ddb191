"""Every distribution, model, guide and ``fit`` on every available device.

CPU always; CUDA when present, skipped otherwise. Everything is built under
``torch.device(device)`` (the default device for new tensors and modules), so a tensor created
on the CPU inside the library meets one on the device and raises: that is what these tests
catch on a GPU machine. On a CPU-only machine they run the same code on the CPU.
"""

from __future__ import annotations

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO

from pyro_mixflow import fit
from pyro_mixflow.infer import (
    AutoClassifierWeightedMixture,
    AutoGaussianMixture,
    AutoMixtureBaseFlow,
    AutoRADFlow,
    RaoBlackwellELBO,
)
from pyro_mixflow.nn import CWM, GMM, RAD, MixtureFlow

DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
    ),
]


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)


def _on(device: torch.device, *tensors: torch.Tensor) -> None:
    for t in tensors:
        assert t.device.type == device.type, f"{tuple(t.shape)} tensor on {t.device}"


def test_distributions(example, device):
    """Sample, rsample, log_prob and backward of every registry distribution on the device."""
    dtype = torch.float32 if device.type == "mps" else torch.float64
    with torch.device(device):
        params, d = example((2,), dtype)
        x = d.sample((3,))
        log_prob = d.log_prob(x)
        _on(device, x, log_prob)
        assert torch.isfinite(log_prob).all()
        if example.has_rsample:
            z = d.rsample((3,))
            _on(device, z)
            (d.log_prob(z).sum() + z.sin().sum()).backward()
        else:
            log_prob.sum().backward()
    grads = [p.grad for p in params.values() if p.grad is not None]
    assert grads
    _on(device, *grads)


@pytest.mark.parametrize("cls", [GMM, MixtureFlow, CWM, RAD], ids=lambda c: c.__name__)
@pytest.mark.parametrize("conditional", [False, True], ids=["plain", "context"])
def test_models_train_and_sample(cls, conditional, device):
    """init_from_data, fit(device=...), log_prob and sample of each model on the device."""
    torch.manual_seed(0)
    data = torch.randn(256, 2)
    context = torch.randn(256, 3) if conditional else None
    model = cls(2, context_dim=3 if conditional else None)
    model.init_from_data(data, context) if context is not None else model.init_from_data(data)
    history = fit(
        model, data, context=context, steps=3, batch_size=64, progress=False, device=device
    )
    assert len(history.train_loss) == 3
    _on(device, *model.parameters())
    with torch.no_grad():
        given = None if context is None else context[:5].to(device)
        d = model(given) if given is not None else model()
        x = d.sample((4,))
        _on(device, x, d.log_prob(x))


GUIDES = {
    "AutoGaussianMixture": lambda m: AutoGaussianMixture(m, num_components=3),
    "AutoMixtureBaseFlow": lambda m: AutoMixtureBaseFlow(m, num_components=3),
    "AutoClassifierWeightedMixture": lambda m: AutoClassifierWeightedMixture(
        m, num_components=3, hidden_dims=(8,)
    ),
    "AutoRADFlow": lambda m: AutoRADFlow(m),
}


@pytest.mark.parametrize("loss", ["rao_blackwell", "trace"])
@pytest.mark.parametrize("name", list(GUIDES))
def test_guides_step_under_svi(name, loss, device):
    """SVI steps of each guide on a model whose tensors live on the device."""
    if loss == "rao_blackwell" and name == "AutoRADFlow":
        pytest.skip("AutoRADFlow has no components to sum out")
    with torch.device(device):
        data = torch.tensor([0.3, -1.2, 2.1])

        def model():
            loc = pyro.sample("loc", dist.Normal(torch.tensor(0.0), 2.0))
            scale = pyro.sample("scale", dist.LogNormal(torch.tensor(0.0), 0.5))
            with pyro.plate("data", len(data)):
                pyro.sample("obs", dist.Normal(loc, scale), obs=data)

        guide = GUIDES[name](model)
        elbo = RaoBlackwellELBO() if loss == "rao_blackwell" else Trace_ELBO()
        svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), elbo)
        for _ in range(2):
            assert np.isfinite(svi.step())
        draws = guide.get_posterior().sample((5,))
    _on(device, draws, *guide.parameters())


def test_cli_fit_takes_a_device(tmp_path, device):
    """``pyro-mixflow fit --device``: trains there, saves a model that loads on the CPU."""
    from pyro_mixflow.cli import main
    from pyro_mixflow.io import load_model

    np.save(tmp_path / "rows.npy", np.random.default_rng(0).normal(size=(200, 2)))
    args = ["fit", str(tmp_path / "rows.npy"), "--model", "gmm", "--components", "2"]
    args += ["--steps", "3", "--no-progress", "--device", device.type]
    assert main([*args, "--out", str(tmp_path / "m.pt")]) == 0
    _on(torch.device("cpu"), *load_model(tmp_path / "m.pt").parameters())


def test_cli_rejects_unknown_or_absent_devices(tmp_path, capsys):
    from pyro_mixflow.cli import main

    np.save(tmp_path / "rows.npy", np.zeros((20, 2)))
    base = ["fit", str(tmp_path / "rows.npy"), "--model", "gmm", "--out", str(tmp_path / "m.pt")]
    assert main([*base, "--device", "gpu0"]) != 0
    assert "`--device gpu0` is not a torch device" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main([*base, "--device", "cuda"]) != 0
        assert "`--device cuda`: CUDA is not available on this machine" in capsys.readouterr().err
