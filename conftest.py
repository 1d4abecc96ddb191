"""Test and doctest setup: one CPU thread, ``torch`` in every doctest's scope, a fixed seed."""

import importlib.util

import pyro
import pytest
import torch

from tests.torch_globals import restore, snapshot

# Importing sbi or zuko (collecting pyro_mixflow/sbi.py, tests/test_sbi.py, tests/test_zuko.py)
# switches torch's argument validation off for the whole process: put torch's state back after
# collection and after every test.
_TORCH_STATE = snapshot()


def pytest_collection_finish(session):
    """Undoes what importing sbi or zuko during collection did to torch."""
    restore(_TORCH_STATE)


# The doctests of the optional sbi adapter need the `[sbi]` extra (tests/test_sbi.py skips itself).
collect_ignore = [] if importlib.util.find_spec("sbi") else ["pyro_mixflow/sbi.py"]


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    # The suite's tensors are small: a second OpenMP thread adds nothing on an idle machine, and
    # when another process keeps a core busy its spin-waits made the suite about 25 times slower.
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(num_threads)


@pytest.fixture(autouse=True)
def _torch_globals():
    yield
    restore(_TORCH_STATE)


@pytest.fixture(autouse=True)
def _doctest_namespace(doctest_namespace):
    doctest_namespace["torch"] = torch
    torch.manual_seed(0)
    pyro.clear_param_store()


@pytest.fixture(autouse=True)
def _sbi_logs_in_tmp_path(request, monkeypatch):
    # sbi's trainers write TensorBoard logs to ./sbi-logs: its tests run in a temporary folder.
    if request.node.path.stem in {"sbi", "test_sbi"}:
        monkeypatch.chdir(request.getfixturevalue("tmp_path"))
