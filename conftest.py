"""Doctest setup: every example runs with ``torch`` in scope and a fixed seed."""

import pyro
import pytest
import torch


@pytest.fixture(autouse=True)
def _doctest_namespace(doctest_namespace):
    doctest_namespace["torch"] = torch
    torch.manual_seed(0)
    pyro.clear_param_store()
