"""Fashion-MNIST: IDX parsing, the search order and its error message, the 32x32 [-1, 1] images."""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from ctok.data import fashion_mnist as fm

FILES = (
    "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz",
)


def write_idx(path, array: np.ndarray, type_code: int, big_endian_dtype: str) -> None:
    """An IDX file written from the format's description, independently of the reader."""
    header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(big_endian_dtype).tobytes()
    if str(path).endswith(".gz"):
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def fake_copy(folder):
    """A folder holding the four file names (contents do not matter to the search)."""
    folder.mkdir(parents=True)
    for name in FILES:
        (folder / name).write_bytes(b"")
    return folder


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """No env var, no system copy, an empty cache: each test adds back what it needs."""
    monkeypatch.delenv(fm.ENV_VAR, raising=False)
    monkeypatch.setattr(fm, "SYSTEM_DIR", tmp_path / "system")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


def test_read_idx_matches_an_independent_writer(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "images.gz", images, 0x08, ">u1")
    got = fm.read_idx(tmp_path / "images.gz")
    assert got.dtype == np.uint8 and np.array_equal(got, images)

    values = np.array([-70000, 1, 2**30], dtype=np.int32)  # multi-byte: checks the big-endian decode
    write_idx(tmp_path / "values", values, 0x0C, ">i4")
    got = fm.read_idx(tmp_path / "values")
    assert got.dtype == np.int32 and got.tolist() == values.tolist()


def test_write_idx_round_trips_and_matches_the_independent_writer(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    fm.write_idx(tmp_path / "ours.gz", images)
    write_idx(tmp_path / "theirs.gz", images, 0x08, ">u1")
    assert (gzip.decompress((tmp_path / "ours.gz").read_bytes())
            == gzip.decompress((tmp_path / "theirs.gz").read_bytes()))
    values = np.array([[-1.5, 2.25]], dtype=np.float64)
    fm.write_idx(tmp_path / "values", values)
    write_idx(tmp_path / "values-theirs", values, 0x0E, ">f8")
    assert (tmp_path / "values").read_bytes() == (tmp_path / "values-theirs").read_bytes()
    with pytest.raises(ValueError, match="got int64 with 1"):
        fm.write_idx(tmp_path / "bad", np.zeros(3, dtype=np.int64))


def test_any_number_of_images_is_a_split_but_images_and_labels_must_agree(tmp_path):
    fm.write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((7, 28, 28), dtype=np.uint8))
    fm.write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.arange(7, dtype=np.uint8))
    fm.write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((3, 28, 28), dtype=np.uint8))
    fm.write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.arange(4, dtype=np.uint8))
    raw, labels = fm.load_fashion_mnist_raw("train", tmp_path)
    assert raw.shape == (7, 28, 28) and labels.tolist() == list(range(7))
    with pytest.raises(ValueError, match=r"got images \(3, 28, 28\) uint8 and labels \(4,\)"):
        fm.load_fashion_mnist_raw("test", tmp_path)


def test_read_idx_rejects_bad_files_naming_them(tmp_path):
    (tmp_path / "junk").write_bytes(b"\x89PNG\r\n")
    with pytest.raises(ValueError, match=r"junk: not an IDX file \(magic bytes 89504e47\)"):
        fm.read_idx(tmp_path / "junk")
    write_idx(tmp_path / "short", np.zeros((4, 5), np.uint8), 0x08, ">u1")
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-3])
    with pytest.raises(ValueError, match=r"short: IDX shape \(4, 5\) needs 32 bytes, the file has 29"):
        fm.read_idx(tmp_path / "short")
    (tmp_path / "broken.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="broken.gz: cannot read IDX data"):
        fm.read_idx(tmp_path / "broken.gz")


def test_search_order_path_then_env_then_system_then_cache(isolated, monkeypatch):
    cached = fake_copy(isolated / "cache" / "ctok" / "fashion-mnist" / "FashionMNIST" / "raw")
    assert fm.find_fashion_mnist() == cached
    system = fake_copy(isolated / "system")
    assert fm.find_fashion_mnist() == system
    env = fake_copy(isolated / "env")
    monkeypatch.setenv(fm.ENV_VAR, str(env))
    assert fm.find_fashion_mnist() == env
    explicit = fake_copy(isolated / "explicit")
    assert fm.find_fashion_mnist(explicit) == explicit
    assert fm.find_fashion_mnist(str(explicit)) == explicit


def test_unpacked_files_are_accepted(isolated):
    folder = isolated / "unpacked"
    folder.mkdir()
    for name in FILES:
        (folder / name.removesuffix(".gz")).write_bytes(b"")
    assert fm.find_fashion_mnist(folder) == folder


def test_explicit_folder_missing_a_file_is_an_error_not_a_fallback(isolated, monkeypatch):
    fake_copy(isolated / "system")
    partial = fake_copy(isolated / "partial")
    (partial / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"partial \(from path argument\) lacks t10k-labels-idx1-ubyte.gz"):
        fm.find_fashion_mnist(partial)
    monkeypatch.setenv(fm.ENV_VAR, str(isolated / "nowhere"))
    with pytest.raises(FileNotFoundError, match=rf"nowhere \(from {fm.ENV_VAR}\) lacks train-images"):
        fm.find_fashion_mnist()


def test_not_found_offline_names_every_way_to_provide_it(isolated, monkeypatch):
    def no_download(root):
        raise AssertionError("must not download while HF_HUB_OFFLINE=1")

    monkeypatch.setattr(fm, "_download", no_download)
    with pytest.raises(FileNotFoundError) as info:
        fm.find_fashion_mnist()
    message = str(info.value)
    assert "downloading is off (offline)" in message
    assert "--data DIR" in message and f"{fm.ENV_VAR}=DIR" in message
    assert "apt-get install dataset-fashion-mnist" in message and str(isolated / "system") in message
    assert "torchvision" in message and str(isolated / "cache" / "ctok" / "fashion-mnist") in message
    for name in FILES:
        assert name in message


def test_failed_download_is_reported(isolated, monkeypatch):
    import torchvision.datasets

    class Unreachable:
        def __init__(self, root, train, download):
            raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", Unreachable)
    with pytest.raises(FileNotFoundError, match="the download failed .RuntimeError: Error downloading"):
        fm.find_fashion_mnist(download=True)


def test_download_lands_where_the_next_search_finds_it(isolated, monkeypatch):
    import torchvision.datasets

    calls = []

    class FakeTorchvision:  # writes what torchvision writes: <root>/FashionMNIST/raw/<files>
        def __init__(self, root, train, download):
            calls.append(train)
            raw = Path(root) / "FashionMNIST" / "raw"
            raw.mkdir(parents=True, exist_ok=True)
            for name in FILES:
                if name.startswith("train" if train else "t10k"):
                    (raw / name).write_bytes(b"")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", FakeTorchvision)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    found = fm.find_fashion_mnist()
    assert found == isolated / "cache" / "ctok" / "fashion-mnist" / "FashionMNIST" / "raw"
    assert calls == [True, False]
    assert fm.find_fashion_mnist() == found and len(calls) == 2  # second time from the cache


def test_real_splits_have_the_published_sizes_and_labels(real_fashion_mnist):
    train_raw, train_labels = fm.load_fashion_mnist_raw("train", real_fashion_mnist)
    test_raw, test_labels = fm.load_fashion_mnist_raw("test", real_fashion_mnist)
    assert train_raw.shape == (60000, 28, 28) and train_raw.dtype == torch.uint8
    assert test_raw.shape == (10000, 28, 28) and test_labels.shape == (10000,)
    assert int(train_labels[0]) == 9 and fm.CLASS_NAMES[9] == "Ankle boot"
    # Balanced by construction: 6000 / 1000 images of each of the 10 classes.
    assert torch.bincount(train_labels, minlength=10).tolist() == [6000] * 10
    assert torch.bincount(test_labels, minlength=10).tolist() == [1000] * 10


def test_model_images_are_padded_rgb_in_minus_one_to_one(synthetic_fashion_mnist):
    raw, labels = fm.load_fashion_mnist_raw("test", synthetic_fashion_mnist)
    images, labels8 = fm.load_fashion_mnist("test", synthetic_fashion_mnist, limit=8)
    assert images.shape == (8, 3, 32, 32) and images.dtype == torch.float32
    assert torch.equal(labels8, labels[:8])
    assert float(images.min()) == -1.0 and float(images.max()) <= 1.0
    assert torch.equal(images[:, 0], images[:, 1]) and torch.equal(images[:, 0], images[:, 2])
    inner = raw[:8].double() / 127.5 - 1
    assert torch.allclose(images[:, 0, 2:30, 2:30].double(), inner, atol=1e-6)
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert bool((images[:, :, border] == -1).all())


def test_dataset_items_match_the_in_memory_path(synthetic_fashion_mnist):
    dataset = fm.FashionMNIST("test", synthetic_fashion_mnist)
    images, labels = fm.load_fashion_mnist("test", synthetic_fashion_mnist, limit=3)
    assert len(dataset) == 300 and dataset.classes == fm.CLASS_NAMES
    for i in range(3):
        x, y = dataset[i]
        assert torch.equal(x, images[i]) and y == int(labels[i])


def test_bad_arguments_say_what_was_expected(synthetic_fashion_mnist):
    with pytest.raises(ValueError, match="split must be 'train' or 'test', got 'val'"):
        fm.load_fashion_mnist("val", synthetic_fashion_mnist)
    with pytest.raises(ValueError, match="limit must be a positive number of images, got 0"):
        fm.load_fashion_mnist("test", synthetic_fashion_mnist, limit=0)
    with pytest.raises(ValueError,
                       match=r"expected uint8 images of shape \(N, 28, 28\), got torch.float32 \(2, 32, 32\)"):
        fm.to_model_images(torch.zeros(2, 32, 32))
