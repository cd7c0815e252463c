"""Quantising images in [-1, 1] to uint8: the one home of the conversions ctok uses.

Which rounding a result used is part of its protocol (``quantisation`` on every protocol card),
because the baselines differ and FID moves by a few hundredths between them (REFERENCE.md):

* ``"round-half-up"`` (the default): ``clamp(127.5 x + 128, 0, 255)`` then truncation, i.e. the
  nearest level with halves going up; DiT's, SiT's and LlamaGen's sampling scripts write this;
* ``"truncate"``: ``clamp((x + 1) * 127.5, 0, 255)`` then truncation; ADM's sampling script writes
  this, about half a level darker on average.

Generated samples, reconstructions, the demo, training sample grids and the Inception network's
requantisation of float inputs all go through :func:`to_uint8`.
"""
from __future__ import annotations

import numpy as np
import torch

QUANTISATIONS = ("round-half-up", "truncate")
DEFAULT_QUANTISATION = "round-half-up"


def check_quantisation(quantisation: str) -> str:
    """``quantisation`` if it is one of :data:`QUANTISATIONS`, else a ValueError naming them."""
    if quantisation not in QUANTISATIONS:
        raise ValueError(f"quantisation must be one of {QUANTISATIONS}, got {quantisation!r}")
    return quantisation


def to_uint8(images: torch.Tensor, quantisation: str = DEFAULT_QUANTISATION) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1] -> a uint8 tensor of the same shape on the same device."""
    check_quantisation(quantisation)
    x = images.float()
    levels = 127.5 * x + 128.0 if quantisation == "round-half-up" else (x + 1.0) * 127.5
    return levels.clamp_(0, 255).to(torch.uint8)


def to_uint8_hwc(images: torch.Tensor, quantisation: str = DEFAULT_QUANTISATION) -> np.ndarray:
    """:func:`to_uint8` as a NumPy array (B, H, W, 3) on the CPU, as PNG files and samples.npz hold images."""
    return to_uint8(images, quantisation).permute(0, 2, 3, 1).cpu().numpy()
