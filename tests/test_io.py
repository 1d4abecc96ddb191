"""Model files: save/load round trips of every model kind, the recorded constructor arguments,
the file format (old files included) and safe loading."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

import pyro_mixflow
from pyro_mixflow.io import (
    MODELS,
    build_model,
    load_model,
    load_model_file,
    save_model,
    stored_arguments,
)
from pyro_mixflow.nn import CWM, GMM, RAD, MixtureFlow

# One small instance of every model of the registry.
SMALL = {
    "gmm": lambda: GMM(2, 3),
    "flow": lambda: MixtureFlow(2, num_components=3, num_transforms=2, hidden_dims=(8,)),
    "cwm": lambda: CWM(2, num_components=3, hidden_dims=[8, 8]),
    "rad": lambda: RAD(2, num_layers=2, hidden_dims=(8, 8)),
}


def _data(num_rows: int = 120, dim: int = 2, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.choice([-2.0, 2.0], size=(num_rows, 1))
    return centers + 0.5 * rng.standard_normal((num_rows, dim))


def _trained(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` started from data with parameters moved off their start, as after training."""
    x = torch.as_tensor(_data(), dtype=torch.float32)
    if hasattr(model, "init_from_data"):
        model.init_from_data(x)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model


def test_every_registry_model_has_a_small_instance():
    assert set(SMALL) == set(MODELS)


@pytest.mark.parametrize("name", list(SMALL))
def test_save_load_round_trip(name, tmp_path):
    torch.manual_seed(0)
    model = _trained(SMALL[name]())
    save_model(model, tmp_path / "m.pt")
    model2 = load_model(tmp_path / "m.pt")
    assert type(model2) is type(model) and not model2.training
    x = torch.as_tensor(_data(seed=1), dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(model2().log_prob(x), model().log_prob(x))
    assert stored_arguments(model2) == stored_arguments(model)


@pytest.mark.parametrize("name", list(SMALL))
def test_metadata_round_trip(name, tmp_path):
    model = SMALL[name]()
    info = {"steps": 3, "loss": -1.5, "best_step": None, "note": "x", "widths": (8, 8)}
    save_model(model, tmp_path / "m.pt", columns=["u", "v"], info=info)
    loaded = load_model_file(tmp_path / "m.pt")
    assert loaded.name == name and loaded.input_dim == 2
    assert loaded.kwargs == stored_arguments(model)
    assert loaded.columns == ("u", "v") and loaded.info == info
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    assert payload["model"] == name and payload["kwargs"] == loaded.kwargs


def test_models_record_their_constructor_arguments():
    assert GMM(2, 3).init_arguments == {
        "input_dim": 2,
        "num_components": 3,
        "covariance": "diag",
        "rank": None,
        "estimator": "exact",
        "temperature": 0.5,
        "context_dim": None,
        "hidden_dims": None,
    }
    cwm = CWM(2, hidden_dims=[8])
    assert cwm.init_arguments["hidden_dims"] == [8]
    assert cwm.init_arguments["activation"] is torch.nn.Tanh
    # Stored: lists as tuples, a non-plain default (the activation class) left out.
    assert stored_arguments(cwm) == {
        "input_dim": 2,
        "num_components": 50,
        "hidden_dims": (8,),
        "context_dim": None,
    }
    # The nested GMM of a flow records its own arguments, the flow its own.
    flow = MixtureFlow(2, num_components=3, num_transforms=1, hidden_dims=(8,))
    assert flow.init_arguments["num_components"] == 3 and "tail_bound" in flow.init_arguments
    assert flow.base.init_arguments["num_components"] == 3


def test_a_subclass_records_its_outermost_constructor():
    class Wide(GMM):
        def __init__(self, num_components: int, spread: float = 2.0) -> None:
            super().__init__(2, num_components)
            self.spread = spread

    assert Wide(4).init_arguments == {"num_components": 4, "spread": 2.0}
    # Not in the registry: a model file could not rebuild it.
    with pytest.raises(TypeError, match=r"`model` \(Wide\) is not one of the models"):
        save_model(Wide(4), "never-written.pt")
    assert not Path("never-written.pt").exists()
    with pytest.raises(TypeError, match=r"missing 1 required positional argument"):
        GMM()


def test_a_non_plain_argument_is_a_one_line_type_error(tmp_path):
    with pytest.raises(TypeError, match=r"^`activation` \(<class '\S+ReLU'>\) is not a plain"):
        save_model(CWM(2, hidden_dims=(8,), activation=torch.nn.ReLU), tmp_path / "m.pt")
    with pytest.raises(TypeError, match=r"`note` \(tensor\(1\.\)\) is not a plain value"):
        save_model(GMM(2), tmp_path / "m.pt", info={"note": torch.tensor(1.0)})
    assert not list(tmp_path.iterdir())


def test_saved_models_reload_bit_identical(tmp_path):
    x = torch.as_tensor(_data(), dtype=torch.float32)
    for name in MODELS:
        torch.manual_seed(1)
        options = {MODELS[name].components: 3}
        if MODELS[name].hidden_dims:
            options[MODELS[name].hidden_dims] = (8, 8)
        model = build_model(name, 2, **options)
        kwargs = stored_arguments(model)
        model.init_from_data(x)
        with torch.no_grad():  # parameters off their initial values, as after training
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        save_model(model, tmp_path / f"{name}.pt", columns=("u", "v"))
        loaded = load_model_file(tmp_path / f"{name}.pt")
        assert type(loaded.model) is type(model) and loaded.kwargs == kwargs
        assert loaded.columns == ("u", "v") and not loaded.model.training
        with torch.no_grad():
            assert torch.equal(loaded.model().log_prob(x), model().log_prob(x)), name
        # Every plain constructor argument is recorded, the defaults included.
        assert kwargs["input_dim"] == 2 and len(kwargs) >= 3


def test_model_file_from_before_an_added_argument_keeps_its_architecture(tmp_path):
    """A RAD file written before ``network`` existed (plain MLPs) reloads as plain MLPs, not
    with today's residual default; the same file with today's default would not fit."""
    torch.manual_seed(0)
    model = build_model("rad", 2, num_pieces=2, hidden_dims=(8, 8), network="mlp")
    save_model(model, tmp_path / "old.pt")
    payload = torch.load(tmp_path / "old.pt", weights_only=True)
    kwargs = payload["kwargs"]
    del kwargs["network"]  # what such a file holds
    torch.save(payload, tmp_path / "old.pt")
    loaded = load_model_file(tmp_path / "old.pt")
    assert loaded.kwargs["network"] == "mlp"
    x = torch.randn(20, 2)
    with torch.no_grad():
        assert torch.equal(loaded.model().log_prob(x), model().log_prob(x))
    today = RAD(**kwargs)
    with pytest.raises(RuntimeError, match="state_dict"):
        today.load_state_dict(model.state_dict())


def test_model_file_is_plain_and_safe_to_load(tmp_path):
    model = build_model("gmm", 2, num_components=2)
    kwargs = stored_arguments(model)
    save_model(model, tmp_path / "m.pt", info={"note": "x"})
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    assert payload["format"] == "pyro-mixflow-model" and payload["format_version"] == 1
    assert payload["pyro_mixflow_version"] == pyro_mixflow.__version__
    assert payload["model"] == "gmm" and payload["kwargs"] == kwargs
    assert set(payload["state_dict"]) == set(model.state_dict())
    with pytest.raises(TypeError, match=r"`activation` .* is not a plain value"):
        save_model(CWM(2, activation=torch.nn.ReLU), tmp_path / "n.pt")
    with pytest.raises(TypeError, match=r"`activation` .* is not a plain value"):
        build_model("cwm", 2, activation=torch.nn.ReLU)
    with pytest.raises(ValueError, match=r"unknown model 'vae'; choose one of gmm, flow, cwm"):
        build_model("vae", 2)


class _Boom:
    """A pickle that would run code when unpickled; a safe load must refuse it."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_an_arbitrary_pickle_is_refused(how, tmp_path):
    path = tmp_path / "boom.pt"
    payload = {"format": "pyro-mixflow-model", "x": _Boom(tmp_path / "SHOULD_NOT_EXIST")}
    if how == "pickle":
        path.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, path)
    with pytest.raises(ValueError, match=r"holds Python objects that a safe load refuses to run"):
        load_model(path)
    assert not (tmp_path / "SHOULD_NOT_EXIST").exists()


@pytest.mark.parametrize(
    "content,kind",
    [
        ("a,b\n1,2\n3,4\n", "CSV text"),
        ("1.5\n-2\n", "CSV text"),
        (np.zeros((3, 2)), "a .npy array"),
    ],
)
def test_data_given_as_a_model_says_it_is_not_a_model_file(content, kind, tmp_path):
    path = tmp_path / "data.csv"
    if isinstance(content, np.ndarray):
        np.save(path.with_suffix(".npy"), content)
        path = path.with_suffix(".npy")
    else:
        path.write_text(content)
    with pytest.raises(ValueError, match=rf"^MODEL \S+ is not a model file \(it looks like {kind}"):
        load_model(path)


def test_load_model_keeps_the_callers_random_state(tmp_path):
    save_model(SMALL["flow"](), tmp_path / "m.pt")
    torch.manual_seed(5)
    load_model(tmp_path / "m.pt")
    after_load = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(torch.rand(3), after_load)
