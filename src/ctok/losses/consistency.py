"""Consistency regularisation of the discriminator (bCR, Zhao et al., 2021).

The discriminator should score an image and a strongly augmented copy of it alike::

    L_cr = mean((D(x) - D(T(x)))^2)   over real and reconstructed images together

where ``D(x)`` are the logits the discriminator loss already computed and ``T`` is a strong
DiffAugment (cutout 0.5, always applied). Gradients flow through both terms, into the
discriminator only: the images are detached by the caller.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ctok.losses.diffaugment import DiffAugment, Uniform


def strong_augment() -> DiffAugment:
    """The augmentation MAETok's and SoftVQ's regulariser uses: every policy, always, cutout 0.5."""
    return DiffAugment(prob=1.0, cutout=0.5)


def consistency_loss(
    discriminator: Callable[[torch.Tensor], torch.Tensor],
    real: torch.Tensor,
    fake: torch.Tensor,
    logits_real: torch.Tensor,
    logits_fake: torch.Tensor,
    augment: DiffAugment,
    rand: Uniform | None = None,
) -> torch.Tensor:
    """``mean((D(x) - D(T(x)))^2)`` over the real and fake batches (see the module docstring)."""
    augmented_real = discriminator(augment(real, rand))
    augmented_fake = discriminator(augment(fake, rand))
    return F.mse_loss(torch.cat([logits_real, logits_fake]), torch.cat([augmented_real, augmented_fake]))
