r"""Data-parallel training under ``torchrun``: the collectives that :func:`~pyro_mixflow.fit` uses.

A script that calls :func:`torch.distributed.init_process_group` (``gloo`` on CPUs, ``nccl``
on GPUs) and then :func:`~pyro_mixflow.fit` trains on every process of the group; see
:func:`~pyro_mixflow.fit` for what each rank does. The functions here are no-ops without an
initialized process group (or with one process), so the same script runs alone too.

Stochastic variational inference with our guides runs under
:class:`~torch.nn.parallel.DistributedDataParallel` the way Pyro documents it: the ELBO as a
module (``Trace_ELBO()(model, guide)``, whose ``forward`` returns the loss tensor that DDP
needs), its parameters created by one call before wrapping, each rank a disjoint shard of the
data, and the model's ``pyro.plate`` told the full data size so that the shards' averaged
gradient is that of the whole data set's ELBO. Save the result on rank 0 only.

.. code-block:: python

    # torchrun --nproc_per_node=2 svi_ddp.py
    import pyro, torch, torch.distributed as dist
    import pyro.distributions as pdist
    from pyro_mixflow.infer import AutoGaussianMixture

    dist.init_process_group("gloo")  # "nccl" on GPUs, with torch.cuda.set_device(local rank)
    rank, size = dist.get_rank(), dist.get_world_size()
    data = torch.randn(10_000) + 3.0  # every rank sees the same data set
    shard = data[rank::size]  # and takes a disjoint part of it

    def model(x):
        loc = pyro.sample("loc", pdist.Normal(0.0, 10.0))
        with pyro.plate("data", len(data), subsample_size=len(x)):  # full size: N / n scaling
            pyro.sample("x", pdist.Normal(loc, 1.0), obs=x)

    torch.manual_seed(0)  # the same start on every rank (DDP broadcasts rank 0's anyway)
    guide = AutoGaussianMixture(model, num_components=2)
    elbo = pyro.infer.Trace_ELBO()(model, guide)  # a torch.nn.Module: forward(x) -> loss
    elbo(shard[:256])  # creates the guide's parameters before DDP wraps them
    ddp = torch.nn.parallel.DistributedDataParallel(elbo)  # averages gradients over ranks
    optimizer = torch.optim.Adam(ddp.parameters(), lr=0.01)
    for step in range(500):
        batch = shard[torch.randint(len(shard), (256,))]
        optimizer.zero_grad()
        loss = ddp(batch)
        loss.backward()
        optimizer.step()
    if rank == 0:
        torch.save(guide.state_dict(), "guide.pt")
    dist.destroy_process_group()
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["all_reduce_sum", "broadcast_state", "rank_and_world_size"]


def rank_and_world_size() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group; ``(0, 1)`` without one.

    Returns:
        This process's rank and the number of processes.

    Example:
        >>> rank_and_world_size()  # no process group in this doctest
        (0, 1)
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def broadcast_state(module: nn.Module, *, src: int = 0) -> None:
    """Copies rank ``src``'s parameters and buffers into ``module`` on every rank, in place.

    One broadcast per tensor, in the order of ``module.parameters()`` then ``module.buffers()``
    (every rank must call it, with the same architecture). A no-op without a process group.

    Args:
        module: The module, on a device its process group's backend can use.
        src: The rank whose state the others receive.

    Example:
        >>> layer = torch.nn.Linear(2, 1)
        >>> before = layer.weight.clone()
        >>> broadcast_state(layer)  # one process: nothing to do
        >>> torch.equal(layer.weight, before)
        True
    """
    if rank_and_world_size()[1] == 1:
        return
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src)


def all_reduce_sum(tensors: Sequence[torch.Tensor]) -> None:
    """Sums each tensor over the ranks, in place, in one collective.

    The tensors (of one dtype and device) are flattened into one buffer, summed with
    :func:`torch.distributed.all_reduce` and copied back; every rank gets the same sums. A
    no-op without a process group.

    Args:
        tensors: The tensors to sum; each rank gives tensors of the same shapes.

    Raises:
        ValueError: If the tensors differ in dtype or device.

    Example:
        >>> values = [torch.ones(2), torch.zeros(())]
        >>> all_reduce_sum(values)  # one process: the sums are the values
        >>> values[0].tolist()
        [1.0, 1.0]
    """
    if rank_and_world_size()[1] == 1 or not tensors:
        return
    kinds = {(t.dtype, t.device) for t in tensors}
    if len(kinds) > 1:
        raise ValueError(
            f"`tensors` must share one dtype and device, got {sorted(map(str, kinds))}"
        )
    flat = torch.cat([t.detach().reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    start = 0
    with torch.no_grad():
        for tensor in tensors:
            tensor.copy_(flat[start : start + tensor.numel()].view_as(tensor))
            start += tensor.numel()
