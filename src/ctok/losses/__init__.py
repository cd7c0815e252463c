"""Losses for tokenizer training: perceptual, adversarial, augmentation, consistency, alignment."""
from ctok.losses.adversarial import (
    LeCAM,
    adaptive_generator_weight,
    gan_losses,
    gan_weight_at,
    hinge_discriminator_loss,
    hinge_generator_loss,
    non_saturating_discriminator_loss,
    non_saturating_generator_loss,
)
from ctok.losses.alignment import alignment_loss, alignment_projection, negative_cosine, repeat_tokens_to_patches
from ctok.losses.consistency import consistency_loss, strong_augment
from ctok.losses.diffaugment import DiffAugment
from ctok.losses.perceptual import LPIPSLoss, perceptual_weight_at

__all__ = [
    "DiffAugment",
    "LPIPSLoss",
    "LeCAM",
    "adaptive_generator_weight",
    "alignment_loss",
    "alignment_projection",
    "consistency_loss",
    "gan_losses",
    "gan_weight_at",
    "hinge_discriminator_loss",
    "hinge_generator_loss",
    "negative_cosine",
    "non_saturating_discriminator_loss",
    "non_saturating_generator_loss",
    "perceptual_weight_at",
    "repeat_tokens_to_patches",
    "strong_augment",
]
