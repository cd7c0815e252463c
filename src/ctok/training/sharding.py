"""How one training step's global batch is split over processes and gradient-accumulation steps.

Two things must not depend on the split, so that 2 processes x batch b compute the same update as
1 process x batch 2b (and as 1 process x batch b x 2 accumulation steps), and so that a resumed run
continues exactly where the killed one stopped:

* which samples a step sees: :class:`GlobalBatchSampler` walks a seeded permutation per epoch, and
  the global batch of step s is the s-th run of ``global_batch`` indices in it; every process takes
  its own slice. Its whole state is (seed, step), stored in every checkpoint. Each index it yields
  is a :class:`ctok.seeding.SeededIndex` whose seed is derived from (seed, epoch, index), from which
  the dataset draws that sample's random crop and flip: the same for any worker, process or resume.
* the random numbers drawn per sample (noise, time, label dropout, flips): :class:`BatchRandom`
  draws them for the whole global batch from a generator seeded by (seed, step, draw number) and
  hands each process its slice, so sample i gets the same noise whichever process holds it; a
  draw for the whole batch (one crop window) is the same in every process.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from torch.utils.data import Sampler

from ctok.seeding import SeededIndex, derived_seed

# Separate seed streams, so that the data order, the per-sample draws of the step and the dataset's
# per-sample augmentation never share numbers.
# Seed streams (2 is ctok.training.masking's): the epoch order, the per-step draws, each sample's crop and
# flip, and the DataLoader's own generator (worker seeds), which must not draw from the global one.
_DATA_STREAM, _DRAW_STREAM, _SAMPLE_STREAM, _LOADER_STREAM = 0, 1, 3, 4


@dataclass(frozen=True)
class BatchSplit:
    """Where this process's micro-batches sit inside each step's global batch."""

    global_batch: int
    grad_accum: int
    world_size: int
    rank: int

    def __post_init__(self):
        if self.global_batch < 1:
            raise ValueError(f"data.batch_size (the global batch) must be at least 1, got {self.global_batch}")
        parts = self.grad_accum * self.world_size
        if self.global_batch % parts:
            raise ValueError(
                f"global batch {self.global_batch} must be divisible by grad_accum x processes "
                f"= {self.grad_accum} x {self.world_size} = {parts}"
            )

    @property
    def micro_batch(self) -> int:
        """Samples per process per forward pass."""
        return self.global_batch // (self.grad_accum * self.world_size)

    def offset(self, micro_step: int) -> int:
        """First index, inside the global batch, of this process's share of one micro-step."""
        return micro_step * (self.global_batch // self.grad_accum) + self.rank * self.micro_batch


class GlobalBatchSampler(Sampler[list[int]]):
    """Dataset indices of this process's micro-batches, step after step, from ``start_step`` on.

    Epochs follow each other without end; the incomplete global batch at the end of an epoch is
    dropped, so that every step has exactly ``global_batch`` samples. The indices are
    :class:`SeededIndex` es with the stream (seed, sample stream, epoch): a sample drawn in two
    epochs gets two crops, and the same crop in every run of the same seed.
    """

    def __init__(self, dataset_size: int, split: BatchSplit, seed: int, start_step: int = 0):
        if dataset_size < split.global_batch:
            raise ValueError(
                f"the dataset has {dataset_size} samples, fewer than one global batch of {split.global_batch}"
            )
        self.dataset_size = dataset_size
        self.split = split
        self.seed = seed
        self.start_step = start_step
        self.steps_per_epoch = dataset_size // split.global_batch

    def permutation(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(derived_seed(self.seed, _DATA_STREAM, epoch))
        return torch.randperm(self.dataset_size, generator=generator)

    def loader_generator(self) -> torch.Generator:
        """The DataLoader's generator. Given none, a DataLoader draws its workers' base seed from the
        global generator when it starts: a resumed run would draw at its restart and shift every later
        global draw (drop path, dropout) away from the uninterrupted run's."""
        return torch.Generator().manual_seed(derived_seed(self.seed, _LOADER_STREAM, self.start_step))

    def state(self, step: int) -> dict:
        """The data-order position of ``step`` (what a checkpoint records)."""
        epoch, position = divmod(step, self.steps_per_epoch)
        return {"seed": self.seed, "epoch": epoch, "position": position,
                "global_batch": self.split.global_batch, "dataset_size": self.dataset_size}

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start_step
        epoch, order = None, None
        b = self.split.micro_batch
        while True:
            step_epoch, position = divmod(step, self.steps_per_epoch)
            if step_epoch != epoch:
                epoch, order = step_epoch, self.permutation(step_epoch)
                stream = (self.seed, _SAMPLE_STREAM, epoch)
            start = position * self.split.global_batch
            for micro in range(self.split.grad_accum):
                first = start + self.split.offset(micro)
                yield [SeededIndex(i, stream) for i in order[first:first + b].tolist()]
            step += 1


class BatchRandom:
    """Per-sample random numbers for one micro-step that do not depend on the batch split.

    Each call draws for the whole global batch from its own seeded generator and returns the rows
    of this process's micro-batch, shape ``(micro_batch, *shape)``. Calls must come in the same
    order on every micro-step (they do: it is the same code).
    """

    def __init__(self, seed: int, step: int, split: BatchSplit, micro_step: int, device: torch.device):
        self.seed = seed
        self.step = step
        self.split = split
        self.device = torch.device(device)
        self._rows = slice(split.offset(micro_step), split.offset(micro_step) + split.micro_batch)
        self._draws = 0

    def _generator(self, device: torch.device | None = None) -> torch.Generator:
        seed = derived_seed(self.seed, _DRAW_STREAM, self.step, self._draws)
        self._draws += 1
        return torch.Generator(device=device or self.device).manual_seed(seed)

    def rand(self, *shape: int) -> torch.Tensor:
        """Uniform in [0, 1)."""
        g = self._generator()
        return torch.rand(self.split.global_batch, *shape, generator=g, device=self.device)[self._rows]

    def randn(self, *shape: int) -> torch.Tensor:
        """Standard normal."""
        g = self._generator()
        return torch.randn(self.split.global_batch, *shape, generator=g, device=self.device)[self._rows]

    def shared_rand(self, *shape: int) -> torch.Tensor:
        """Uniform in [0, 1), one draw of ``shape`` for the whole global batch: the same numbers in
        every process and every micro-step of the step. On the CPU whatever the device: these are
        few numbers that steer Python code (a crop window), which would otherwise wait on the GPU."""
        return torch.rand(*shape, generator=self._generator(torch.device("cpu")))

    def randint(self, high: int, *shape: int) -> torch.Tensor:
        """Integers in [0, high)."""
        g = self._generator()
        size = (self.split.global_batch, *shape)
        return torch.randint(high, size, generator=g, device=self.device)[self._rows]
