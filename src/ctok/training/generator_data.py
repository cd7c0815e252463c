"""Where a generator's training latents come from: a latent cache, or images encoded on the fly.

Either way they are normalised, ``(z - mean) / std``, before the generator sees them. The two
scalars are the tokenizer config's ``vq_mean``/``vq_std`` when those are set (released tokenizers
carry them), else the cache's statistics (or, on the fly, statistics of a seeded random subset of
the training images: the first files in sorted order would be one ImageNet class).
Forgetting the normalisation is not possible: it is applied inside the data path, not left to the
user.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.data import Dataset

from ctok.latent_cache import LatentCache, LatentStatistics
from ctok.models.diffusion_transformer import LatentStats
from ctok.training.sharding import BatchRandom


def stats_subset(num_items: int, count: int, seed: int) -> list[int]:
    """``min(count, num_items)`` indices drawn without replacement over the whole dataset, seeded, in
    increasing order (so that files are read front to back)."""
    order = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed))
    return sorted(order[:count].tolist())


def choose_latent_stats(tokenizer, cache: LatentCache | None, images: Dataset | None, num_images: int,
                        seed: int = 0) -> LatentStats:
    """The tokenizer config's vq_mean/vq_std if set, else the cache's statistics, else those of
    ``num_images`` training images drawn at random with ``seed`` (:func:`stats_subset`)."""
    own = LatentStats.of_tokenizer(tokenizer)
    if (own.mean, own.std) != (0.0, 1.0):
        return own
    if cache is not None:
        return LatentStats(cache.info.mean, cache.info.std, f"latent cache {cache.info.folder}")
    subset = stats_subset(len(images), num_images, seed)
    stats = LatentStatistics(tokenizer.latent_dim)
    device = next(tokenizer.parameters()).device
    with torch.no_grad():
        for start in range(0, len(subset), 64):
            batch = torch.stack([images[i][0] for i in subset[start:start + 64]])
            stats.update(tokenizer.encode(batch.to(device)))
    summary = stats.summary()
    return LatentStats(summary["mean"], summary["std"],
                       f"statistics of {len(subset)} training images drawn at random (seed {seed})")


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
    """Batches of images, encoded by the frozen tokenizer (mirrored at random when ``flip``)."""

    def __init__(self, tokenizer: nn.Module, stats: LatentStats, flip: bool):
        self.tokenizer = tokenizer
        self.stats = stats
        self.flip = flip

    def __call__(self, batch, rng: BatchRandom) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = batch[0], batch[1]
        if images.shape[0] != rng.split.micro_batch:
            skipped = list(getattr(batch, "skipped", ()))
            raise ValueError(f"a batch lost {rng.split.micro_batch - images.shape[0]} images to unreadable files "
                             f"{skipped[:5]}: remove them, or train from a latent cache")
        if self.flip:
            mirror = rng.rand() < 0.5
            images = torch.where(mirror[:, None, None, None], images.flip(-1), images)
        with torch.no_grad():
            z = self.tokenizer.encode(images).float()
        return self.stats.normalize(z), labels
