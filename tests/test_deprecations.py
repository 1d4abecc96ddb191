"""Old import paths work for one release, each with a DeprecationWarning naming the new one."""

from __future__ import annotations

import importlib

import pytest

import pyro_mixflow.fitting as fitting

MOVED = [
    ("pyro_mixflow.training", "fit"),
    ("pyro_mixflow.training", "History"),
    ("pyro_mixflow.deconvolution", "deconvolve"),
    ("pyro_mixflow.deconvolution", "DeconvolutionResult"),
    ("pyro_mixflow.nn.gmm", "em_diagonal"),
    ("pyro_mixflow.nn.gmm", "em_parameters"),
]


@pytest.mark.parametrize(("old", "name"), MOVED)
def test_old_path_warns_and_gives_the_same_object(old, name):
    module = importlib.import_module(old)
    message = rf"`{old}\.{name}` moved to `pyro_mixflow\.fitting\.{name}`"
    with pytest.warns(DeprecationWarning, match=message):
        value = getattr(module, name)
    assert value is getattr(fitting, name)


def test_old_path_without_the_name_raises_attribute_error():
    module = importlib.import_module("pyro_mixflow.training")
    with pytest.raises(AttributeError, match="has no attribute 'nothing'"):
        module.nothing  # noqa: B018
