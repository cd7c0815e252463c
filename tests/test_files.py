"""The single homes of shared helpers: file writing, uint8 conversion, the settings guard, open_images."""
import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image

from ctok.atomic_files import file_sha256, save_image_grid, save_png, weights_sha256, write_json
from ctok.data import FashionMNIST, ImageFolder, open_images
from ctok.settings_check import changed_keys, check_same_settings
from ctok.uint8 import to_uint8, to_uint8_hwc


def test_write_json_round_trips_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "out.json"
    write_json(path, {"b": 1, "a": [1, 2]}, indent=1, sort_keys=True)
    assert json.loads(path.read_text()) == {"a": [1, 2], "b": 1}
    assert path.read_text().endswith("\n")
    assert [p.name for p in path.parent.iterdir()] == ["out.json"]


def test_png_and_grid_hold_the_given_pixels(tmp_path):
    image = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    save_png(tmp_path / "a.png", image, scale=2)
    with Image.open(tmp_path / "a.png") as saved:
        assert np.array_equal(np.array(saved), image.repeat(2, axis=0).repeat(2, axis=1))
    tiles = torch.full((3, 3, 4, 4), 7, dtype=torch.uint8)
    save_image_grid(tmp_path / "grid.png", tiles, nrow=2, pad_value=255)
    with Image.open(tmp_path / "grid.png") as grid:
        pixels = np.array(grid)
    assert pixels.shape == (2 + 2 * 6, 2 + 2 * 6, 3)  # torchvision's layout: a 2 px border round each tile
    assert pixels[2, 2, 0] == 7 and pixels[0, 0, 0] == 255


def test_hashes_of_a_file_and_of_a_weights_folder(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "config.json").write_text("{}")  # not a weight file: not hashed
    assert file_sha256(tmp_path / "model.safetensors") == hashlib.sha256(b"weights").hexdigest()
    assert weights_sha256(tmp_path) == hashlib.sha256(b"model.safetensors" + b"weights").hexdigest()


def test_uint8_quantisations_are_dits_and_adms_expressions():
    # x = 2 * (k + f) / 255 - 1 sits a fraction f past level k: ADM's truncation keeps k whatever f is;
    # DiT's clamp(127.5 x + 128) goes up from f = 0.5 on (halves included: 127.5 x + 128 = k + f + 0.5).
    levels = torch.tensor([0.0, 10.0, 127.0, 254.0])
    for fraction, up in ((0.25, 0), (0.5, 1), (0.75, 1)):
        x = (2 * (levels + fraction) / 255 - 1).double().view(1, 1, 2, 2).expand(1, 3, 2, 2)
        assert to_uint8(x, "truncate")[0, 0].ravel().tolist() == [0, 10, 127, 254]
        assert to_uint8(x)[0, 0].ravel().tolist() == [int(v) + up for v in levels]
    x = torch.rand(2, 3, 5, 4, generator=torch.Generator().manual_seed(0)) * 2.4 - 1.2
    for name, expected in (("round-half-up", torch.clamp(127.5 * x + 128.0, 0, 255).to(torch.uint8)),
                           ("truncate", ((x + 1) * 127.5).clamp(0, 255).to(torch.uint8))):
        assert torch.equal(to_uint8(x, name), expected)
        hwc = to_uint8_hwc(x, name)
        assert hwc.dtype == np.uint8 and hwc.shape == (2, 5, 4, 3) and np.array_equal(hwc, expected.permute(0, 2, 3, 1))
    with pytest.raises(ValueError, match=r"quantisation must be one of \('round-half-up', 'truncate'\)"):
        to_uint8(x, "round")


def test_settings_guard_stamps_then_names_the_changed_keys(tmp_path):
    stamp = tmp_path / "settings.json"
    check_same_settings(stamp, {"steps": 2, "seed": 0}, "a run", write=False)
    assert not stamp.exists()
    check_same_settings(stamp, {"steps": 2, "seed": 0}, "a run")
    check_same_settings(stamp, {"steps": 2, "seed": 0}, "a run")  # the same settings: continues
    with pytest.raises(ValueError, match=r"a run with other settings \(extra: None -> 1, steps: 2 -> 3\)"):
        check_same_settings(stamp, {"steps": 3, "seed": 0, "extra": 1}, "a run")
    assert changed_keys({"a": 1, "b": 2}, {"a": 5, "b": 3}, ignore={"a"}) == ["b"]


def test_open_images_reads_a_folder_and_fashion_mnist(tmp_path, synthetic_fashion_mnist):
    for i in range(2):
        Image.fromarray(np.full((40, 48, 3), 60 * i, np.uint8)).save(tmp_path / f"{i}.png")
    folder = open_images(tmp_path, 32)
    assert isinstance(folder, ImageFolder) and len(folder) == 2 and folder[0][0].shape == (3, 32, 32)
    fashion = open_images(synthetic_fashion_mnist, 32)
    assert isinstance(fashion, FashionMNIST) and len(fashion) == 1200 and fashion[0][0].shape == (3, 32, 32)
    with pytest.raises(ValueError, match="Fashion-MNIST images are 32 px"):
        open_images(synthetic_fashion_mnist, 64)
    with pytest.raises(ValueError, match="set data.crop=center"):
        open_images(synthetic_fashion_mnist, 32, crop="random")


def test_atomic_folder_appears_whole_or_not_at_all(tmp_path):
    from ctok.atomic_files import atomic_folder

    with atomic_folder(tmp_path / "out") as staging:
        (staging / "a.bin").write_bytes(b"a")
        assert not (tmp_path / "out").exists()  # nothing under the final name until the block ends
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["a.bin"]
    (tmp_path / "plain").mkdir()  # a folder made by mkdir has the permissions it should have, not mkdtemp's 0700
    assert (tmp_path / "out").stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777
    (tmp_path / "plain").rmdir()
    with pytest.raises(RuntimeError), atomic_folder(tmp_path / "failed") as staging:
        (staging / "half.bin").write_bytes(b"h")
        raise RuntimeError("interrupted")
    (tmp_path / "empty").mkdir()
    with atomic_folder(tmp_path / "empty") as staging:  # an empty folder is replaced
        (staging / "b.bin").write_bytes(b"b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "out"]  # no staging folder left
    assert [p.name for p in (tmp_path / "empty").iterdir()] == ["b.bin"]
