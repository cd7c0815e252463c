"""Histograms of oriented gradients (HOG), the low-level target of MAETok's auxiliary decoder.

The definition is MaskFeat's, which MAETok's training code uses (REFERENCE.md, "Details that
decide reproductions"), run per colour channel and batched on the accelerator:

1. gradients from the 3x3 Sobel kernel ``kx = [[1, 0, -1], [2, 0, -2], [1, 0, -1]]`` and its
   transpose ``ky``, correlated with the image after one pixel of reflect padding;
2. magnitude ``sqrt(gx^2 + gy^2)``, weighted by a ``window`` x ``window`` Gaussian (std
   ``window / 2``, normalised to sum 1) tiled over the image from its top-left corner;
3. orientation bin ``floor(atan2(gx, gy) / pi * bins) mod bins``: note the argument order, which
   is the original's (gx in the numerator's place); the modulo folds opposite directions together,
   so the bins cover [0, pi);
4. each pixel votes its weighted magnitude into its bin; votes are summed over ``cell_size`` x
   ``cell_size`` cells and each cell's histogram is L2-normalised on its own, per channel
   (``h / max(||h||, 1e-12)``).

For a 16-px patch with 8-px cells, 9 bins and RGB input this gives 3 x 9 x 2 x 2 = 108 numbers,
the target MAETok regresses at masked patches. The original hard-codes a 16 x 16 grid of patches
(256 px images); nothing here depends on the image size, so 512-px training gets the same target.
The image's scale and offset per channel do not matter: gradients ignore the offset and the
per-channel normalisation cancels the scale.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ctok.validation import check_tensor

# Sobel kernel of the horizontal gradient; its transpose gives the vertical one.
_SOBEL = ((1.0, 0.0, -1.0), (2.0, 0.0, -2.0), (1.0, 0.0, -1.0))


def gaussian_window(size: int, std: float, dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu") -> torch.Tensor:
    """A (size, size) Gaussian centred between the middle pixels, normalised to sum 1."""
    offsets = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    profile = torch.exp(-0.5 * (offsets / std) ** 2)
    window = torch.outer(profile, profile)
    return window / window.sum()


def sobel_gradients(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(gx, gy) of every channel of ``images`` (B, C, H, W), each (B, C, H, W), reflect-padded."""
    channels = images.shape[1]
    kx = torch.tensor(_SOBEL, dtype=images.dtype, device=images.device)
    kernels = torch.stack([kx, kx.T]).unsqueeze(1).repeat(channels, 1, 1, 1)  # (2C, 1, 3, 3): gx, gy per channel
    padded = F.pad(images, (1, 1, 1, 1), mode="reflect")
    grads = F.conv2d(padded, kernels, groups=channels)  # channel c -> outputs 2c (gx) and 2c + 1 (gy)
    return grads[:, 0::2], grads[:, 1::2]


def hog_cells(images: torch.Tensor, cell_size: int = 8, bins: int = 9, window: int = 16) -> torch.Tensor:
    """Per-channel HOG of ``images`` (B, C, H, W): a (B, C, H // cell_size, W // cell_size, bins) tensor.

    Pixels beyond the last whole cell are ignored; the Gaussian window (``window`` px, std
    ``window / 2``) is tiled over the image and cut at its right and bottom edges.
    """
    check_tensor("images", images, (None, None, None, None))
    if not images.is_floating_point():
        raise ValueError(f"images must be a floating-point tensor, got dtype {images.dtype}")
    b, c, h, w = images.shape
    if h < cell_size or w < cell_size:
        raise ValueError(f"images must be at least {cell_size}x{cell_size} (one cell), got {h}x{w}")
    if h < 2 or w < 2:
        raise ValueError(f"images must be at least 2x2 for reflect padding, got {h}x{w}")

    gx, gy = sobel_gradients(images)
    weights = gaussian_window(window, window / 2, images.dtype, images.device)
    weights = weights.repeat(-(-h // window), -(-w // window))[:h, :w]
    magnitude = torch.sqrt(gx.square() + gy.square()) * weights
    bin_index = torch.floor(torch.atan2(gx, gy) / torch.pi * bins).long() % bins

    votes = torch.zeros(b, c, bins, h, w, dtype=images.dtype, device=images.device)
    votes.scatter_add_(2, bin_index.unsqueeze(2), magnitude.unsqueeze(2))
    rows, cols = h // cell_size, w // cell_size
    votes = votes[..., : rows * cell_size, : cols * cell_size]
    cells = votes.reshape(b, c, bins, rows, cell_size, cols, cell_size).sum(dim=(4, 6))
    return F.normalize(cells, p=2.0, dim=2, eps=1e-12).permute(0, 1, 3, 4, 2)


def hog_patch_targets(images: torch.Tensor, patch_size: int = 16, cell_size: int = 8, bins: int = 9) -> torch.Tensor:
    """HOG regrouped by ViT patch: (B, num_patches, C * bins * (patch_size // cell_size)^2).

    Patches are in raster order (row-major), as a ViT's patch embedding orders them; within a
    patch the features are ordered (channel, bin, cell row, cell column), as MaskFeat's target
    flattens them.
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
    patches = cells.reshape(b, c, rows // k, k, cols // k, k, bins).permute(0, 2, 4, 1, 6, 3, 5)
    return patches.reshape(b, (rows // k) * (cols // k), c * bins * k * k)


def hog_feature_dim(channels: int = 3, patch_size: int = 16, cell_size: int = 8, bins: int = 9) -> int:
    """Length of one patch's HOG vector: 108 for RGB, 16-px patches, 8-px cells and 9 bins."""
    return channels * bins * (patch_size // cell_size) ** 2
