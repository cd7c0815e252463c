"""Every pixel format an image folder may hold is read as 8-bit RGB with the right scaling, or refused
with the file named (and then skipped as broken by ImageFolder)."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ctok.data.images import ImageFolder, read_rgb

RAMP = np.linspace(0, 1, 16 * 16).reshape(16, 16)  # brightness 0 .. 1 across the image
LEVELS = np.floor(RAMP * 255 + 0.5).astype(np.uint8)  # what each pixel must become in 8 bits


def _gray_rgb(levels):
    return np.repeat(levels[..., None], 3, axis=-1)


@pytest.mark.parametrize("mode, make", [
    ("L", lambda: Image.fromarray(LEVELS, mode="L")),
    ("I;16", lambda: Image.fromarray((RAMP * 65535).round().astype(np.uint16))),
    ("I", lambda: Image.fromarray((RAMP * 65535).round().astype(np.int32), mode="I")),
    ("F", lambda: Image.fromarray(RAMP.astype(np.float32), mode="F")),
    ("RGBA", lambda: Image.fromarray(np.dstack([_gray_rgb(LEVELS), np.full((16, 16), 7, np.uint8)]), mode="RGBA")),
    ("LA", lambda: Image.fromarray(LEVELS, mode="L").convert("LA")),
    ("P", lambda: Image.fromarray(LEVELS, mode="L").convert("P")),
])
def test_each_mode_becomes_the_same_8_bit_gray_ramp(tmp_path, mode, make):
    image = make()
    assert image.mode == mode
    path = tmp_path / ("x.tiff" if mode in ("F", "I") else "x.png")
    image.save(path)
    got = np.asarray(read_rgb(path))
    assert got.dtype == np.uint8 and got.shape == (16, 16, 3)
    np.testing.assert_array_equal(got, _gray_rgb(LEVELS))


def test_sixteen_bit_is_scaled_not_saturated(tmp_path):
    # The failure this guards against: convert("RGB") clips 16-bit values at 255, whitening the picture.
    Image.fromarray((RAMP * 0.78 * 65535).astype(np.uint16)).save(tmp_path / "x.png")
    assert np.asarray(read_rgb(tmp_path / "x.png")).max() == round(0.78 * 255)


def test_cmyk_and_palette_with_transparency_convert_like_pil(tmp_path):
    cmyk = Image.fromarray(_gray_rgb(LEVELS)).convert("CMYK")
    cmyk.save(tmp_path / "c.jpg", quality=100)
    assert np.abs(np.asarray(read_rgb(tmp_path / "c.jpg")).astype(int) - _gray_rgb(LEVELS)).max() <= 3
    palette = Image.fromarray(LEVELS, mode="L").convert("P")
    palette.info["transparency"] = 0
    palette.save(tmp_path / "p.png", transparency=0)
    np.testing.assert_array_equal(np.asarray(read_rgb(tmp_path / "p.png")), _gray_rgb(LEVELS))


def test_exif_orientation_is_applied(tmp_path):
    wide = np.zeros((8, 16, 3), np.uint8)
    wide[:, :8] = 255  # left half white
    image = Image.fromarray(wide)
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    image.save(tmp_path / "r.jpg", exif=exif, quality=100)
    upright = np.asarray(read_rgb(tmp_path / "r.jpg"))
    assert upright.shape == (16, 8, 3)
    assert upright[:8].mean() > 200 and upright[8:].mean() < 50  # the white half is now on top


def test_out_of_range_float_images_are_refused_with_the_file_named_and_skipped_by_the_folder(tmp_path):
    bad = tmp_path / "images" / "bad.tiff"
    bad.parent.mkdir()
    Image.fromarray((RAMP * 3).astype(np.float32), mode="F").save(bad)
    Image.fromarray(_gray_rgb(LEVELS)).save(tmp_path / "images" / "good.png")
    with pytest.raises(ValueError, match=r"bad\.tiff: F pixel values lie in \[0, 3\], outside \[0, 1\]"):
        read_rgb(bad)
    folder = ImageFolder(tmp_path / "images", 16)
    batch = folder.collate([folder[i] for i in range(len(folder))])
    assert batch.images.shape[0] == 1 and batch.skipped == (str(bad),)
