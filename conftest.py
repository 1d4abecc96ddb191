"""Test and doctest setup: one CPU thread, ``torch`` in every doctest's scope, a fixed seed."""

import pyro
import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    # The suite's tensors are small: a second OpenMP thread adds nothing on an idle machine, and
    # when another process keeps a core busy its spin-waits made the suite about 25 times slower.
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(num_threads)


@pytest.fixture(autouse=True)
def _doctest_namespace(doctest_namespace):
    doctest_namespace["torch"] = torch
    torch.manual_seed(0)
    pyro.clear_param_store()
