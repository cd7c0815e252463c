"""Quantising images in [-1, 1] to uint8: the one home of both roundings ctok uses.

The rounding is in each function's name because the two are not interchangeable:

* :func:`to_uint8_truncate` is what the original samplers did before their FID-50k (clamp, then
  truncate 255 * (x + 1) / 2); generated samples must use it, since rounding to nearest would be
  half a level brighter on average and shift FID;
* :func:`to_uint8_round` rounds to the nearest level, as an image file stores a float image; the
  reconstruction metrics (PSNR, SSIM) and training sample grids use it.
"""
from __future__ import annotations

import numpy as np
import torch


def to_uint8_truncate(images: torch.Tensor) -> np.ndarray:
    """Images (B, 3, H, W) in [-1, 1] -> uint8 NumPy (B, H, W, 3), truncated as PNG files and ADM's
    samples.npz hold them.
    """
    pixels = (255.0 * ((images.float().clamp(-1, 1) + 1) / 2)).to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()


def to_uint8_round(images: torch.Tensor) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1] -> uint8 tensor (B, 3, H, W) on the same device, rounded to the nearest level."""
    return ((images.float() + 1) * 127.5).round_().clamp_(0, 255).to(torch.uint8)
