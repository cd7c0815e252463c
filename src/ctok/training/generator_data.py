"""Where a generator's training latents come from: a latent cache, or images encoded on the fly.

Either way they are normalised, ``(z - mean) / std``, before the generator sees them. The two
scalars are the tokenizer config's ``vq_mean``/``vq_std`` when those are set (released tokenizers
carry them), else the cache's statistics (or, on the fly, statistics of a seeded random subset of
the training images: the first files in sorted order would be one ImageNet class).
Forgetting the normalisation is not possible: it is applied inside the data path, not left to the
user.

On the fly, images are encoded as a cache encodes them (:mod:`ctok.latent_encoding`: the same
mirror, the same precision rule), in the run's ``run.precision``; a cache records the precision
it was encoded in, and a run whose precision differs is warned (:func:`check_cache_precision`).
"""
from __future__ import annotations

import contextlib
import warnings

import torch
import torch.nn as nn
from torch.utils.data import Dataset

from ctok.latent_cache import LatentCache, LatentStatistics
from ctok.latent_encoding import DEFAULT_PRECISION, encode_latents, mirror
from ctok.models.diffusion_transformer import LatentStats
from ctok.numerics import effective_precision
from ctok.training.sharding import BatchRandom


def stats_subset(num_items: int, count: int, seed: int) -> list[int]:
    """``min(count, num_items)`` indices drawn without replacement over the whole dataset, seeded, in
    increasing order (so that files are read front to back)."""
    order = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed))
    return sorted(order[:count].tolist())


def choose_latent_stats(tokenizer, cache: LatentCache | None, images: Dataset | None, num_images: int,
                        seed: int = 0, precision: str = DEFAULT_PRECISION) -> LatentStats:
    """The tokenizer config's vq_mean/vq_std if set, else the cache's statistics, else those of
    ``num_images`` training images drawn at random with ``seed`` (:func:`stats_subset`), encoded
    in ``precision`` as on-the-fly training encodes them."""
    own = LatentStats.of_tokenizer(tokenizer)
    if (own.mean, own.std) != (0.0, 1.0):
        return own
    if cache is not None:
        return LatentStats(cache.info.mean, cache.info.std, f"latent cache {cache.info.folder}")
    subset = stats_subset(len(images), num_images, seed)
    stats = LatentStatistics(tokenizer.latent_dim)
    device = next(tokenizer.parameters()).device
    for start in range(0, len(subset), 64):
        batch = torch.stack([images[i][0] for i in subset[start:start + 64]])
        stats.update(encode_latents(tokenizer, batch.to(device), precision=precision))
    summary = stats.summary()
    return LatentStats(summary["mean"], summary["std"],
                       f"statistics of {len(subset)} training images drawn at random (seed {seed})")


def check_cache_precision(cache: LatentCache, precision: str, device: torch.device) -> None:
    """Warn when ``cache`` was encoded in another precision than this run's ``precision`` amounts to on ``device``.

    Such a generator trains on latents that differ, at bfloat16's rounding, from the ones the same
    run would encode on the fly; it still trains, so this is a warning, not an error.
    """
    run = effective_precision(precision, device)
    if cache.info.precision != run:
        warnings.warn(f"latent cache {cache.info.folder} was encoded in {cache.info.precision}, but this run "
                      f"computes in {run} (run.precision {precision} on {torch.device(device).type}); rebuild "
                      f"the cache with `ctok cache-latents --precision {run}` for latents that match", stacklevel=2)


class CachedLatents:
    """Batches of a :class:`LatentCache`: picks one stored view per sample and normalises."""

    def __init__(self, stats: LatentStats):
        self.stats = stats

    def __call__(self, batch, rng: BatchRandom) -> tuple[torch.Tensor, torch.Tensor]:
        views, labels = batch
        choice = rng.randint(views.shape[1])
        z = views[torch.arange(views.shape[0], device=views.device), choice]
        return self.stats.normalize(z), labels


class EncodedImages:
    """Batches of images, encoded by the frozen tokenizer in ``precision`` (mirrored at random when ``flip``).

    Only the first batch has its value range checked: the check reads back from the device, a wait
    per training step, and every later batch comes from the same dataset.
    """

    def __init__(self, tokenizer: nn.Module, stats: LatentStats, flip: bool, precision: str):
        self.tokenizer = tokenizer
        self.stats = stats
        self.flip = flip
        self.precision = precision
        self.range_checked = False

    def __call__(self, batch, rng: BatchRandom) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = batch[0], batch[1]
        if images.shape[0] != rng.split.micro_batch:
            skipped = list(getattr(batch, "skipped", ()))
            raise ValueError(f"a batch lost {rng.split.micro_batch - images.shape[0]} images to unreadable files "
                             f"{skipped[:5]}: remove them, or train from a latent cache")
        if self.flip:
            images = mirror(images, rng.rand() < 0.5)
        with self.tokenizer.images_checked() if self.range_checked else contextlib.nullcontext():
            z = encode_latents(self.tokenizer, images, precision=self.precision)
        self.range_checked = True
        return self.stats.normalize(z), labels
