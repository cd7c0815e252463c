"""Gaussian noise for samplers, drawn either from one stream or from one stream per sample.

A per-sample stream makes a sample's noise independent of which other samples share its batch,
which is what lets ``ctok generate`` give image i the same pixels however the work is split.
Image i of a run with seed s draws from a generator seeded with :func:`image_seed` (s, i); the
command line and :class:`ctok.pipeline.LatentPipeline` both go through :func:`image_generators`.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from ctok.seeding import derived_seed

Generators = torch.Generator | Sequence[torch.Generator] | None


def image_seed(seed: int, index: int) -> int:
    """The seed of image ``index``'s noise stream in a run seeded with ``seed``."""
    return derived_seed(seed, index)


def image_generators(seed: int, indices: Iterable[int], device: str | torch.device = "cpu") -> list[torch.Generator]:
    """One generator per image, seeded with :func:`image_seed` (seed, i), on ``device``."""
    return [torch.Generator(device).manual_seed(image_seed(seed, i)) for i in indices]


def check_generators(generator: Generators, batch: int, device: torch.device) -> None:
    """Raise ValueError unless ``generator`` is None, one generator, or one per sample, on ``device``."""
    if generator is None:
        return
    gens = [generator] if isinstance(generator, torch.Generator) else list(generator)
    if not isinstance(generator, torch.Generator) and len(gens) != batch:
        raise ValueError(f"generator must be one torch.Generator or a list of {batch} (one per sample), "
                         f"got a list of {len(gens)}")
    for g in gens:
        if not isinstance(g, torch.Generator):
            raise ValueError(f"generator entries must be torch.Generator, got {type(g).__name__}")
        if g.device.type != device.type:
            raise ValueError(f"generator is on {g.device.type} but the samples are on {device.type}")


def randn(shape: tuple[int, ...], generator: Generators, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Standard normal noise of ``shape``; with a generator list, row i comes from generator i."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)
    return torch.stack([torch.randn(shape[1:], generator=g, device=device, dtype=dtype) for g in generator])
