"""What a trainer plugs into :class:`ctok.training.runner.Runner`: a task, the losses its step
returns, and the registered modules it is handed.

A task is an object with

* ``training_step(batch, step, rng) -> StepLosses``: this process's micro-batch losses. Per-sample
  random numbers come from ``rng`` (a :class:`~ctok.training.sharding.BatchRandom`), never from the
  global generators, so that the result does not depend on the number of processes.
* ``sample_images(step) -> Tensor | None``: images in [-1, 1], shape (B, 3, H, W), saved as a PNG
  grid every ``run.sample_every`` steps (called on rank 0 only).

It receives the modules it trains as :class:`TrainedModule` objects (``Runner.add_model``,
``Runner.add_discriminator``) and never sees the runner itself.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn as nn

from ctok.training.sharding import BatchRandom


@dataclass
class StepLosses:
    """One micro-batch's losses: each trains its own module, and everything here is logged.

    ``model`` is minimised for the model's parameters only and ``discriminator`` for the
    discriminator's only, even where the model's loss runs through the discriminator (an adversarial
    term). ``discriminator`` is None in a step that does not train the discriminator. ``logs`` are
    extra scalars for the log (detached or not: they are never back-propagated).
    """

    model: torch.Tensor
    discriminator: torch.Tensor | None = None
    logs: dict[str, torch.Tensor] = field(default_factory=dict)

    def logged(self) -> dict[str, torch.Tensor]:
        """The scalars the log shows: ``loss``, ``loss/discriminator`` (when trained) and ``logs``."""
        losses = {"loss": self.model}
        if self.discriminator is not None:
            losses["loss/discriminator"] = self.discriminator
        return {**losses, **self.logs}


@dataclass(frozen=True)
class TrainedModule:
    """A module the runner trains, in the three forms a task needs.

    ``wrapped`` is what the training step calls: the module itself in one process, its
    DistributedDataParallel wrapper under torchrun, compiled with ``run.compile``. Under DDP a
    forward through ``wrapped`` must be followed by a backward of that module's own loss in the
    same step, so a pass that only feeds another module's loss (the discriminator's verdict in the
    model's adversarial term) goes through ``module``, the plain network (also the way to its
    submodules and parameters). ``ema`` is the fp32 exponential moving average (None without one),
    for sample grids and the final weights.
    """

    module: nn.Module
    wrapped: nn.Module
    ema: nn.Module | None = None


class TrainingTask(Protocol):
    """The runner's view of a trainer (see the module docstring)."""

    def training_step(self, batch: Any, step: int, rng: BatchRandom) -> StepLosses: ...

    def sample_images(self, step: int) -> torch.Tensor | None: ...
