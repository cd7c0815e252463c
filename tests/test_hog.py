"""HOG features (MaskFeat's definition, MAETok's target): against a pixel-by-pixel computation written
out from REFERENCE.md, hand-worked cases, and the patch layout."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ctok.features import hog_cells, hog_feature_dim, hog_patch_targets
from ctok.features.hog import gaussian_window


def _direct_cell_histograms(channel: np.ndarray, cell: int = 8, bins: int = 9, window: int = 16) -> np.ndarray:
    """The definition of REFERENCE.md written out pixel by pixel with Python scalars."""
    h, w = channel.shape
    padded = np.pad(channel, 1, mode="reflect")
    sobel = [[1, 0, -1], [2, 0, -2], [1, 0, -1]]
    centre = (window - 1) / 2
    profile = [math.exp(-0.5 * ((i - centre) / (window / 2)) ** 2) for i in range(window)]
    total = sum(profile) ** 2
    out = np.zeros((h // cell, w // cell, bins))
    for r in range(h // cell * cell):
        for c in range(w // cell * cell):
            gx = sum(sobel[i][j] * padded[r + i, c + j] for i in range(3) for j in range(3))
            gy = sum(sobel[j][i] * padded[r + i, c + j] for i in range(3) for j in range(3))
            weight = profile[r % window] * profile[c % window] / total
            b = math.floor(math.atan2(gx, gy) / math.pi * bins) % bins
            out[r // cell, c // cell, b] += math.sqrt(gx * gx + gy * gy) * weight
    norms = np.sqrt((out**2).sum(-1, keepdims=True))
    return out / np.maximum(norms, 1e-12)


@pytest.mark.parametrize("size", [(24, 16), (32, 48), (20, 36)])
def test_matches_the_definition_pixel_by_pixel(size):
    image = np.random.default_rng(1).random((2, *size))
    ours = hog_cells(torch.from_numpy(image)[None]).numpy()[0]
    for channel in range(2):
        np.testing.assert_allclose(ours[channel], _direct_cell_histograms(image[channel]), atol=1e-12)


def test_gaussian_window_is_the_normalised_16px_std8_kernel():
    window = gaussian_window(16, 8.0, torch.float64)
    assert window.shape == (16, 16)
    torch.testing.assert_close(window.sum(), torch.tensor(1.0, dtype=torch.float64))
    # Symmetric about the middle; the corner over the centre is exp(-(7.5/8)^2) (both axes 7.5 px away).
    torch.testing.assert_close(window, window.flip(0).flip(1))
    assert window[0, 0] / window[7, 7] == pytest.approx(math.exp(-0.5 * ((7.5 / 8) ** 2 - (0.5 / 8) ** 2) * 2))


@pytest.mark.parametrize("image, expected_bin", [
    # Worked by hand: brightness growing down the rows gives gx = 0, gy = -8, atan2(0, -8) = pi -> 9 mod 9 = 0.
    (np.add.outer(np.arange(32.0), np.zeros(32)), 0),
    # Growing along the columns: gx = -8, gy = 0, atan2 = -pi/2 -> floor(-4.5) = -5 mod 9 = 4.
    (np.add.outer(np.zeros(32), np.arange(32.0)), 4),
    # Along the diagonal: gx = gy = -8, atan2 = -3pi/4 -> floor(-6.75) = -7 mod 9 = 2.
    (np.add.outer(np.arange(32.0), np.arange(32.0)), 2),
])
def test_ramps_fill_one_bin(image, expected_bin):
    # Cells away from the border, where reflect padding flattens one of the two gradients.
    cells = hog_cells(torch.from_numpy(image)[None, None])[0, 0, 1:-1, 1:-1]
    expected = torch.zeros(9, dtype=cells.dtype)
    expected[expected_bin] = 1.0
    torch.testing.assert_close(cells, expected.expand_as(cells), atol=1e-12, rtol=0)


def test_scale_and_offset_per_channel_do_not_change_the_target():
    images = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    scale = torch.tensor([2.0, 0.5, 3.0], dtype=torch.float64).view(1, 3, 1, 1)
    torch.testing.assert_close(hog_cells(images * scale - 0.7), hog_cells(images))


def test_flat_image_has_zero_histograms():
    assert hog_cells(torch.full((1, 3, 16, 16), 0.3)).abs().max() == 0


def test_works_at_512_px_and_tiles_the_window():
    images = torch.rand(1, 3, 512, 512)
    assert hog_patch_targets(images).shape == (1, 32 * 32, 108)
    # The window repeats every 16 px: in an image tiled with one random 16-px tile, interior cells one
    # whole tile apart see the same pixels, neighbours and weights, so their histograms are equal.
    tile = torch.rand(1, 1, 16, 16, dtype=torch.float64)
    cells = hog_cells(tile.repeat(1, 1, 3, 3))[0, 0]
    assert cells.shape == (6, 6, 9)
    torch.testing.assert_close(cells[1, 1], cells[3, 3], rtol=0, atol=1e-12)
    torch.testing.assert_close(cells[2, 1], cells[4, 3], rtol=0, atol=1e-12)


def test_patch_targets_regroup_cells_by_patch_in_maskfeat_order():
    images = torch.rand(2, 3, 32, 48, dtype=torch.float64)
    cells = hog_cells(images)  # (B, C, 4, 6, 9)
    patches = hog_patch_targets(images)
    assert patches.shape == (2, 2 * 3, 108) and hog_feature_dim() == 108
    for b in range(2):
        for pr in range(2):
            for pc in range(3):
                expected = torch.stack([
                    cells[b, ch, 2 * pr + i, 2 * pc + j, k]
                    for ch in range(3) for k in range(9) for i in range(2) for j in range(2)
                ])
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
