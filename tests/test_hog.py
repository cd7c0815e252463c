"""HOG features: against scikit-image, against a pixel-by-pixel computation, and their patch layout."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage.feature import hog as skimage_hog

from ctok.features import hog_cells, hog_feature_dim, hog_patch_targets


@pytest.mark.parametrize("size", [(32, 48), (36, 52)])
def test_matches_scikit_image_per_channel(size):
    rng = np.random.default_rng(0)
    image = rng.random((3, *size))
    ours = hog_cells(torch.from_numpy(image)[None]).numpy()[0]
    for channel in range(3):
        reference = skimage_hog(image[channel], orientations=9, pixels_per_cell=(8, 8), cells_per_block=(1, 1),
                                block_norm="L2", feature_vector=False)[:, :, 0, 0]
        assert ours[channel].shape == reference.shape
        np.testing.assert_allclose(ours[channel], reference, atol=1e-6)


def _direct_cell_histograms(channel: np.ndarray, cell: int = 8, bins: int = 9, eps: float = 1e-5) -> np.ndarray:
    """HOG written out pixel by pixel, the textbook way."""
    h, w = channel.shape
    out = np.zeros((h // cell, w // cell, bins))
    for r in range(h // cell * cell):
        for c in range(w // cell * cell):
            g_row = channel[r + 1, c] - channel[r - 1, c] if 0 < r < h - 1 else 0.0
            g_col = channel[r, c + 1] - channel[r, c - 1] if 0 < c < w - 1 else 0.0
            angle = math.degrees(math.atan2(g_row, g_col)) % 180.0
            out[r // cell, c // cell, min(int(angle // (180.0 / bins)), bins - 1)] += math.hypot(g_row, g_col)
    out /= cell * cell
    return out / np.sqrt((out**2).sum(-1, keepdims=True) + eps**2)


def test_matches_direct_pixel_loop():
    image = np.random.default_rng(1).random((2, 24, 16))
    ours = hog_cells(torch.from_numpy(image)[None]).numpy()[0]
    for channel in range(2):
        np.testing.assert_allclose(ours[channel], _direct_cell_histograms(image[channel]), atol=1e-12)


@pytest.mark.parametrize("image, expected_bin", [
    (np.add.outer(np.arange(32.0), np.zeros(32)), 4),  # brightness grows down the rows: 90 degrees
    (np.add.outer(np.zeros(32), np.arange(32.0)), 0),  # grows along the columns: 0 degrees
    (np.add.outer(np.arange(32.0), np.arange(32.0)), 2),  # along the diagonal: 45 degrees
])
def test_ramps_fill_one_bin(image, expected_bin):
    # Cells away from the border, where one of the two gradients is forced to zero.
    cells = hog_cells(torch.from_numpy(image)[None, None])[0, 0, 1:-1, 1:-1]
    expected = torch.zeros(9, dtype=cells.dtype)
    expected[expected_bin] = 1.0
    torch.testing.assert_close(cells, expected.expand_as(cells), atol=1e-6, rtol=0)


def test_flat_image_has_zero_histograms():
    assert hog_cells(torch.full((1, 3, 16, 16), 0.3)).abs().max() == 0


def test_patch_targets_regroup_cells_by_patch():
    images = torch.rand(2, 3, 32, 48, dtype=torch.float64)
    cells = hog_cells(images)  # (B, C, 4, 6, 9)
    patches = hog_patch_targets(images)
    assert patches.shape == (2, 2 * 3, 108) and hog_feature_dim() == 108
    for b in range(2):
        for pr in range(2):
            for pc in range(3):
                expected = torch.stack([
                    cells[b, ch, 2 * pr + i, 2 * pc + j] for ch in range(3) for i in range(2) for j in range(2)
                ]).flatten()
                torch.testing.assert_close(patches[b, pr * 3 + pc], expected, rtol=0, atol=0)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="multiple of patch_size 16"):
        hog_patch_targets(torch.rand(1, 3, 24, 32))
    with pytest.raises(ValueError, match="multiple of cell_size"):
        hog_patch_targets(torch.rand(1, 3, 32, 32), patch_size=12)
    with pytest.raises(ValueError, match="floating-point"):
        hog_cells(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="shape"):
        hog_cells(torch.rand(3, 16, 16))
