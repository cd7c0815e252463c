"""Images to generator latents: the one encoding path of the latent cache and of on-the-fly training.

A generator trained from a latent cache (``ctok cache-latents``) and one trained on images encoded
on the fly (``data.images``) should see the same latent for the same picture, so both go through
this module: the images as the dataset gives them (in [-1, 1]), the mirror as the one flip
augmentation (:func:`mirror`), the tokenizer's ``encode``, and the runner's precision rule
(:func:`ctok.numerics.autocast_dtype`). Latents come back in float32 whatever the compute precision.
"""
from __future__ import annotations

import torch

from ctok.numerics import autocast_dtype

# What the generator recipes train with (run.precision in sit-xl.yaml and dit-xl.yaml; a test
# checks that they agree), so that a cache built with the default matches on-the-fly training.
DEFAULT_PRECISION = "bf16"


def mirror(images: torch.Tensor, which: torch.Tensor | None = None) -> torch.Tensor:
    """Images (B, C, H, W) mirrored left to right; with ``which`` (B,) bool, only those images."""
    flipped = images.flip(-1)
    return flipped if which is None else torch.where(which[:, None, None, None], flipped, images)


@torch.no_grad()
def encode_latents(tokenizer, images: torch.Tensor, *, precision: str = DEFAULT_PRECISION) -> torch.Tensor:
    """Latents (B, N, D) float32 of images (B, C, H, W) in [-1, 1], computed as ``precision`` says on their device."""
    dtype = autocast_dtype(precision, images.device)
    # enabled=False also turns off an enclosing autocast (the runner's), so fp32 means fp32 here.
    with torch.autocast(images.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        return tokenizer.encode(images).float()


def encode_views(tokenizer, images: torch.Tensor, *, flip: bool,
                 precision: str = DEFAULT_PRECISION) -> torch.Tensor:
    """Latents (B, V, N, D) float32: each image (V = 1) and, with ``flip``, also its mirror (V = 2).

    Both views go through one forward pass of twice the batch: the encoders treat every sample on
    its own, so the result is that of two passes (up to kernel choice), in half the launches.
    """
    batch = torch.cat([images, mirror(images)]) if flip else images
    z = encode_latents(tokenizer, batch, precision=precision)
    return z.unflatten(0, (2 if flip else 1, images.shape[0])).transpose(0, 1)
