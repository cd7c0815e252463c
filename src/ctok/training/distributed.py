"""Process groups for torchrun: one process per GPU (or several on the CPU), one or many nodes.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT (or a rendezvous endpoint
for several nodes); :func:`init_distributed` reads them. A plain ``python``/``ctok`` process without
them is a world of one and needs no environment at all. NCCL carries the gradients between GPUs,
gloo between CPU processes. A collective waits ``timeout_min`` minutes for every process
(:mod:`ctok.training.dist_timeout` says why the default is long). Several nodes are torchrun's
business::

    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \
        -m ctok train-sit --config sit-xl tokenizer=MAETok/maetok-b-128 data.latents=DIR
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ctok.training.dist_timeout import DEFAULT_DIST_TIMEOUT_MIN, check_dist_timeout


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto", timeout_min: int = DEFAULT_DIST_TIMEOUT_MIN) -> DistContext:
    """Join the torchrun process group (if launched by torchrun) and pick this process's device.

    ``device`` is ``auto`` (the local GPU when there is one, else the CPU), ``cpu`` or ``cuda``;
    ``timeout_min``: how long a collective waits for the other processes before it fails.
    """
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    check_dist_timeout(timeout_min)
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for, but torch sees no CUDA device")
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        target = torch.device("cuda", local_rank)
    else:
        target = torch.device("cpu")
    if launched and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            init_method="env://",
            device_id=target if use_cuda else None,
            timeout=timedelta(minutes=timeout_min),
        )
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=target)


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def mean_over_processes(values: dict[str, float], ctx: DistContext) -> dict[str, float]:
    """Average logged scalars over every process (one collective for the whole dict)."""
    if not ctx.is_distributed or not values:
        return values
    keys = sorted(values)
    packed = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(packed)
    return {k: float(v) / ctx.world_size for k, v in zip(keys, packed.tolist())}


def gather_objects(obj: Any, ctx: DistContext) -> list[Any]:
    """``obj`` from every process, in rank order, on every process."""
    if not ctx.is_distributed:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out
