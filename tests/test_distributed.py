"""`fit` under torch.distributed: two CPU processes (gloo) train to the parameters of one process
on the same batches, agree on validation, early stopping and the best state, and only rank 0
shows a progress bar."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from pyro_mixflow.fitting import fit
from pyro_mixflow.fitting.distributed import all_reduce_sum, broadcast_state, rank_and_world_size

# Each process runs the same three fits: a mixture on tensors with a validation split (the last
# batch of each epoch has 1 row: shares of 1 and 0 rows), a conditional model on a Dataset of
# (row, context) pairs, and a run that rank 1's callback alone stops.
WORKER = textwrap.dedent(
    """
    import sys
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.distributions import Independent, Normal
    from torch.utils.data import Dataset

    from pyro_mixflow import DiagNormalMixture
    from pyro_mixflow.fitting import fit


    class Mixture(nn.Module):
        def __init__(self, seed):
            super().__init__()
            gen = torch.Generator().manual_seed(seed)  # a different start on each rank
            self.locs = nn.Parameter(torch.randn(3, 2, generator=gen, dtype=torch.float64))
            self.log_scales = nn.Parameter(torch.zeros(3, 2, dtype=torch.float64))
            self.logits = nn.Parameter(torch.zeros(3, dtype=torch.float64))

        def forward(self):
            return DiagNormalMixture(self.locs, self.log_scales.exp(), self.logits)


    class ConditionalNormal(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Parameter(torch.zeros((), dtype=torch.float64))
            self.b = nn.Parameter(torch.zeros((), dtype=torch.float64))

        def forward(self, context):
            return Independent(Normal(self.a * context + self.b, 1.0), 1)


    class Pairs(Dataset):
        def __init__(self, rows, context):
            self.rows, self.context = rows, context

        def __len__(self):
            return len(self.rows)

        def __getitem__(self, i):
            return self.rows[i], self.context[i]


    def data():
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(201, 2, generator=gen, dtype=torch.float64)
        x[::2] += 3.0
        c = torch.randn(300, 1, generator=gen, dtype=torch.float64)
        y = 2.0 * c - 1.0 + torch.randn(300, 1, generator=gen, dtype=torch.float64)
        return x, c, y


    def run(rank, progress):
        x, c, y = data()
        options = {"batch_size": 40, "lr": 0.05, "seed": 0}
        results = []
        model = Mixture(seed=rank)
        history = fit(model, x, epochs=3, validation=0.2, progress=progress, **options)
        results.append((model.state_dict(), history))
        model = ConditionalNormal()
        history = fit(model, Pairs(y, c), epochs=2, progress=False, **options)
        results.append((model.state_dict(), history))
        model = Mixture(seed=0)
        stop = (lambda step, history: step >= 4) if rank == 1 else None
        history = fit(model, x, steps=20, eval_every=2, callback=stop, progress=False, **options)
        results.append((model.state_dict(), history))
        return results


    if __name__ == "__main__":
        rank, world_size, rendezvous, out = int(sys.argv[1]), int(sys.argv[2]), *sys.argv[3:]
        dist.init_process_group(
            "gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world_size
        )
        torch.save(run(rank, progress=True), out)
        dist.destroy_process_group()
    """
)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Runs the worker on 2 processes; returns each rank's results and stderr, and the worker."""
    folder = tmp_path_factory.mktemp("ranks")
    script = folder / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                str(script),
                str(rank),
                "2",
                str(folder / "rendezvous"),
                str(folder / f"{rank}.pt"),
            ],
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for rank in range(2)
    ]
    errors = []
    for process in processes:
        try:
            errors.append(process.communicate(timeout=120)[1])
        finally:
            process.kill()
    for process, err in zip(processes, errors, strict=True):
        assert process.returncode == 0, err[-3000:]
    results = [torch.load(folder / f"{rank}.pt", weights_only=False) for rank in range(2)]
    return results, errors, script


def _single_process(script: Path) -> list:
    """The worker's fits in this process, without a process group (rank 0's start)."""
    namespace: dict = {"__name__": "worker"}
    exec(compile(script.read_text(), str(script), "exec"), namespace)
    return namespace["run"](0, progress=False)


def test_two_ranks_train_to_the_single_process_parameters_on_the_same_batches(two_ranks):
    (rank0, rank1), _, script = two_ranks
    single = _single_process(script)
    for (state, history), (state1, history1), (expected, reference) in zip(
        rank0[:2], rank1[:2], single[:2], strict=True
    ):
        for key in expected:  # every rank holds the same model, that of one process
            torch.testing.assert_close(state[key], expected[key], rtol=1e-12, atol=1e-12)
            assert torch.equal(state[key], state1[key])
        torch.testing.assert_close(history.train_loss, reference.train_loss, rtol=1e-12, atol=0)
        torch.testing.assert_close(history.val_loss, reference.val_loss, rtol=1e-12, atol=0)
        assert history.val_steps == history1.val_steps == reference.val_steps
        assert history.best_step == history1.best_step == reference.best_step
        assert history.val_loss == history1.val_loss and history.train_loss == history1.train_loss
    assert len(rank0[0][1].train_loss) == 3 * 5  # 161 training rows: batches of 40, 40, 40, 40, 1


def test_rank_1_callback_stops_every_rank_and_only_rank_0_shows_progress(two_ranks):
    (rank0, rank1), errors, _ = two_ranks
    for _, history in (rank0[2], rank1[2]):
        assert history.stopped_early and len(history.train_loss) == 4
    for key, value in rank0[2][0].items():
        assert torch.equal(value, rank1[2][0][key])
    assert "fit: 100%" in errors[0] and "fit:" not in errors[1]


def test_helpers_are_no_ops_without_a_process_group():
    assert rank_and_world_size() == (0, 1)
    values = [torch.ones(3), torch.zeros((), dtype=torch.float64)]
    all_reduce_sum(values)  # one process: mixed dtypes are not even looked at
    assert values[0].tolist() == [1.0, 1.0, 1.0]
    layer = torch.nn.Linear(2, 2)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    broadcast_state(layer)
    assert all(torch.equal(v, before[k]) for k, v in layer.state_dict().items())
    history = fit(layer_model(), torch.randn(20, 2), steps=2, progress=False)
    assert len(history.train_loss) == 2


def layer_model() -> torch.nn.Module:
    class Gaussian(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.loc = torch.nn.Parameter(torch.zeros(2))

        def forward(self) -> torch.distributions.Distribution:
            return torch.distributions.Independent(torch.distributions.Normal(self.loc, 1.0), 1)

    return Gaussian()
