"""The runner's bookkeeping of one trained module: its device copy, DDP wrapper, AdamW and EMA."""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn as nn
from timm.utils.model_ema import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel

from ctok.training.distributed import DistContext
from ctok.training.sections import OptimSection
from ctok.training.task import TrainedModule

# DDP's switch for copying rank 0's buffers before every forward: recent torch renamed it (the old
# name warns there, and also skips the copy at construction, which ctok does not need either).
_DDP_OPTIONS = inspect.signature(DistributedDataParallel).parameters
_NO_BUFFER_SYNC = "forward_sync_buffers" if "forward_sync_buffers" in _DDP_OPTIONS else "broadcast_buffers"

@dataclass
class Member:
    """A registered module and everything that updates it."""

    module: nn.Module  # the plain module: state dicts, EMA, final weights
    ddp: DistributedDataParallel | None
    wrapped: nn.Module  # what the task calls: compiled and/or DDP-wrapped
    optimizer: torch.optim.Optimizer
    optim: OptimSection
    base_lr: float
    ema: ModelEmaV3 | None

    @property
    def params(self) -> list[nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]

    def handle(self) -> TrainedModule:
        """The module as the task sees it."""
        return TrainedModule(self.module, self.wrapped, self.ema.module if self.ema is not None else None)


def register(module: nn.Module, ctx: DistContext, *, optim: OptimSection, global_batch: int, compile: bool,
             ema_decay: float | None, find_unused_parameters: bool = False) -> Member:
    """Put ``module`` on the device, wrap it for DDP (under torchrun) and compile, give it AdamW and an EMA.

    With ``optim.scale_lr`` the learning rate is multiplied by ``global_batch / 256``;
    ``find_unused_parameters`` is DDP's (see :meth:`ctok.training.runner.Runner.add_model`).
    """
    module = module.to(ctx.device)
    trainable = [p for p in module.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError(f"{type(module).__name__} has no trainable parameters: there is nothing to optimise")
    ddp = None
    wrapped = module
    if ctx.is_distributed:
        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        # broadcast_buffers=False: no copy of rank 0's buffers before every forward, because no buffer
        # of a ctok module needs one. They are constants (RoPE position tables, the discriminator's input
        # scale and shift) or kept equal on every rank by design: SoftVQ's code-usage history and the
        # LeCAM anchors take their updates from all ranks (models/collectives.py, losses/adversarial.py),
        # and the spectral-norm vectors of the discriminator follow from its weights, which DDP keeps
        # equal, by the same computation everywhere. Batch norm keeps no running statistics
        # (GlobalBatchNorm). The 1-vs-2-process tests compare every buffer of both replicas.
        # gradient_as_bucket_view: the gradients are views into DDP's all-reduce buckets instead of
        # a second copy of them (2.7 GB for SiT-XL's 675M fp32 parameters).
        ddp = wrapped = DistributedDataParallel(module, device_ids=ids, **{_NO_BUFFER_SYNC: False},
                                                gradient_as_bucket_view=True,
                                                find_unused_parameters=find_unused_parameters)
    if compile:
        wrapped = torch.compile(wrapped)
    base_lr = optim.lr * (global_batch / 256 if optim.scale_lr else 1.0)
    optimizer = torch.optim.AdamW(trainable, lr=base_lr, betas=optim.betas, eps=optim.eps,
                                  weight_decay=optim.weight_decay, fused=ctx.device.type == "cuda")
    ema = ModelEmaV3(module, decay=ema_decay, dtype=torch.float32, exclude_buffers=True) \
        if ema_decay is not None else None
    return Member(module, ddp, wrapped, optimizer, optim, base_lr, ema)
