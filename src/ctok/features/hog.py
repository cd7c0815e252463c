"""Histograms of oriented gradients (HOG), the low-level target of MAETok's auxiliary decoder.

The definition is Dalal & Triggs' as scikit-image computes it, run per colour channel and batched
on the accelerator: central-difference gradients (zero on the image border), unsigned orientation
``atan2(g_row, g_col) mod 180°`` split into ``bins`` equal bins, each pixel voting its gradient
magnitude into its bin (hard assignment), votes averaged over ``cell_size`` x ``cell_size`` cells,
and each cell's histogram L2-normalised on its own::

    h_c = v_c / sqrt(||v_c||^2 + eps^2)

For a 16-px patch with 8-px cells, 9 bins and RGB input this gives 3 x 2 x 2 x 9 = 108 numbers,
the target MAETok regresses at masked patches.
"""
from __future__ import annotations

import math

import torch

from ctok.validation import check_tensor


def hog_cells(images: torch.Tensor, cell_size: int = 8, bins: int = 9, eps: float = 1e-5) -> torch.Tensor:
    """Per-channel HOG of ``images`` (B, C, H, W): a (B, C, H // cell_size, W // cell_size, bins) tensor.

    Pixels beyond the last whole cell are ignored, as in scikit-image.
    """
    check_tensor("images", images, (None, None, None, None))
    if not images.is_floating_point():
        raise ValueError(f"images must be a floating-point tensor, got dtype {images.dtype}")
    b, c, h, w = images.shape
    if h < cell_size or w < cell_size:
        raise ValueError(f"images must be at least {cell_size}x{cell_size} (one cell), got {h}x{w}")

    g_row = torch.zeros_like(images)
    g_col = torch.zeros_like(images)
    g_row[:, :, 1:-1, :] = images[:, :, 2:, :] - images[:, :, :-2, :]
    g_col[:, :, :, 1:-1] = images[:, :, :, 2:] - images[:, :, :, :-2]
    magnitude = torch.hypot(g_row, g_col)
    orientation = torch.rad2deg(torch.atan2(g_row, g_col)) % 180.0
    # The clamp catches an angle that rounds to exactly 180 degrees.
    bin_index = torch.div(orientation, 180.0 / bins, rounding_mode="floor").long().clamp_(0, bins - 1)

    votes = torch.zeros(b, c, bins, h, w, dtype=images.dtype, device=images.device)
    votes.scatter_(2, bin_index.unsqueeze(2), magnitude.unsqueeze(2))
    rows, cols = h // cell_size, w // cell_size
    votes = votes[..., : rows * cell_size, : cols * cell_size]
    cells = votes.reshape(b, c, bins, rows, cell_size, cols, cell_size).mean(dim=(4, 6))
    cells = cells.permute(0, 1, 3, 4, 2)
    return cells / torch.sqrt(cells.square().sum(-1, keepdim=True) + eps**2)


def hog_patch_targets(
    images: torch.Tensor, patch_size: int = 16, cell_size: int = 8, bins: int = 9
) -> torch.Tensor:
    """HOG regrouped by ViT patch: (B, num_patches, C * (patch_size // cell_size)^2 * bins).

    Patches are in raster order (row-major), as a ViT's patch embedding orders them; within a
    patch the features are ordered (channel, cell row, cell column, bin).
    """
    if patch_size % cell_size:
        raise ValueError(f"patch_size ({patch_size}) must be a multiple of cell_size ({cell_size})")
    check_tensor("images", images, (None, None, None, None))
    h, w = images.shape[-2:]
    if h % patch_size or w % patch_size:
        raise ValueError(f"image size {h}x{w} must be a multiple of patch_size {patch_size}")
    cells = hog_cells(images, cell_size=cell_size, bins=bins)
    b, c, rows, cols, _ = cells.shape
    k = patch_size // cell_size
    patches = cells.reshape(b, c, rows // k, k, cols // k, k, bins).permute(0, 2, 4, 1, 3, 5, 6)
    return patches.reshape(b, (rows // k) * (cols // k), c * k * k * bins)


def hog_feature_dim(channels: int = 3, patch_size: int = 16, cell_size: int = 8, bins: int = 9) -> int:
    """Length of one patch's HOG vector: 108 for RGB, 16-px patches, 8-px cells and 9 bins."""
    return channels * int(math.pow(patch_size // cell_size, 2)) * bins
