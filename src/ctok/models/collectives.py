"""Batch statistics over every torchrun process, for the training-time layers that need them.

A statistic of the batch (batch norm's moments, SoftVQ's average code assignment, its code-usage
history) must span the global batch, or N processes would train differently from one process
that holds the whole batch. Outside a process group (or in a group of one) both helpers return
their input unchanged, so the layers that use them need no distributed setup at all.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def sum_over_processes(values: torch.Tensor) -> torch.Tensor:
    """The sum of ``values`` over every process, differentiable.

    Its backward sums the incoming gradients over processes as well (torch.distributed.nn's
    all-reduce), which is what makes a loss of a global statistic train like one process: every
    process holds the same loss, and DistributedDataParallel's gradient average divides the
    summed gradient by the process count again.
    """
    if _world_size() == 1:
        return values
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(values)


@torch.no_grad()
def gather_over_processes(values: torch.Tensor, dim: int) -> torch.Tensor:
    """Every process's ``values`` concatenated along ``dim`` in rank order (not differentiable).

    The processes may hold different lengths along ``dim`` (a micro-batch short of unreadable
    files), so the lengths are exchanged first and each part is padded to the longest.
    """
    world = _world_size()
    if world == 1:
        return values
    length = torch.tensor([values.shape[dim]], device=values.device)
    lengths = [torch.zeros_like(length) for _ in range(world)]
    dist.all_gather(lengths, length)
    longest = int(max(lengths))
    pad = list(values.shape)
    pad[dim] = longest - values.shape[dim]
    padded = torch.cat([values, values.new_zeros(pad)], dim=dim)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p.narrow(dim, 0, int(n)) for p, n in zip(parts, lengths)], dim=dim)
