"""Fashion-MNIST, the demo's dataset: found on disk, parsed from its IDX files, served as 32x32 RGB.

The four files are searched in this order, and the first place that holds all four wins:

1. an explicit folder (``path=``, the commands' ``--data``);
2. the folder named by the environment variable ``CTOK_FASHION_MNIST``;
3. the Debian/Ubuntu package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``);
4. a previous download in the cache (``$XDG_CACHE_HOME/ctok/fashion-mnist``, default ``~/.cache``);
5. a fresh download there with torchvision, unless offline (``download=False`` or ``HF_HUB_OFFLINE=1``).

A folder given explicitly (1 or 2) that lacks a file is an error rather than a reason to look
elsewhere: silently training on a different copy than the one asked for is worse than stopping.

Images are 28x28 greyscale, zero-padded by 2 px on each side to 32x32 (the size the demo's
tokenizer patchifies), repeated to 3 channels and scaled to [-1, 1]: the same convention as every
other image in ctok.
"""
from __future__ import annotations

import functools
import gzip
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ctok.atomic_files import atomic_write
from ctok.downloads import offline

CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
IMAGE_SIZE = 32
ENV_VAR = "CTOK_FASHION_MNIST"
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")

_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_PAD = (IMAGE_SIZE - 28) // 2

# IDX type codes (third byte of the magic number) and the big-endian numpy dtypes they denote.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(file: str | os.PathLike) -> np.ndarray:
    """Parse an IDX file (gzip-compressed if its name ends in .gz) into a read-only numpy array.

    The format: two zero bytes, a type code, the number of dimensions n, then n big-endian
    uint32 sizes, then the values in C order.
    """
    file = Path(file)
    opener = gzip.open if file.suffix == ".gz" else open
    try:
        with opener(file, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as err:  # gzip reports corruption as OSError/EOFError
        raise ValueError(f"{file}: cannot read IDX data ({err})") from err
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{file}: not an IDX file (magic bytes {data[:4].hex() or 'missing'})")
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{file}: IDX header declares {ndim} dimensions but the file is {len(data)} bytes")
    shape = tuple(int(s) for s in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise ValueError(f"{file}: IDX shape {shape} needs {expected} bytes, the file has {len(data)}")
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=False)


def write_idx(file: str | os.PathLike, array: np.ndarray) -> None:
    """Write ``array`` as an IDX file (gzip-compressed if the name ends in .gz): :func:`read_idx`'s inverse.

    Useful for subsets of Fashion-MNIST, or other small images in its format, that the demo and the
    commands then read like the real files.
    """
    codes = {v[1:]: k for k, v in _IDX_DTYPES.items()}  # "u1", "f4", ...: kind and size, any byte order
    array = np.asarray(array)
    code = codes.get(array.dtype.str[1:])
    if code is None or not 1 <= array.ndim <= 255:
        raise ValueError(f"IDX holds uint8, int8, int16, int32, float32 or float64 arrays of 1-255 "
                         f"dimensions, got {array.dtype} with {array.ndim}")
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    data = header + np.ascontiguousarray(array, dtype=_IDX_DTYPES[code]).tobytes()
    file = Path(file)
    with atomic_write(file) as f:
        f.write(gzip.compress(data, mtime=0) if file.suffix == ".gz" else data)


def _idx_file(folder: Path, stem: str) -> Path | None:
    """The gzip'd file if present, else an already-unpacked one (torchvision keeps both)."""
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def _missing_files(folder: Path) -> list[str]:
    return [stem + ".gz" for pair in _FILES.values() for stem in pair if _idx_file(folder, stem) is None]


def cache_dir() -> Path:
    """Where a download goes: ``$XDG_CACHE_HOME/ctok/fashion-mnist`` (default ``~/.cache``)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ctok" / "fashion-mnist"


def _download(root: Path) -> Path:
    """Fetch the four files with torchvision; return the folder that holds them."""
    from torchvision.datasets import FashionMNIST

    for split_is_train in (True, False):
        FashionMNIST(str(root), train=split_is_train, download=True)
    return root / "FashionMNIST" / "raw"


def find_fashion_mnist(path: str | os.PathLike | None = None, *, download: bool | None = None) -> Path:
    """The folder that holds Fashion-MNIST's four IDX files, searched in the module's order.

    ``download=None`` downloads when no local copy exists unless ``HF_HUB_OFFLINE=1`` (the
    project's offline switch); ``True`` / ``False`` force the choice.
    Raises FileNotFoundError that lists the ways to provide the data.
    """
    for source, folder in (("path argument", path), (ENV_VAR, os.environ.get(ENV_VAR))):
        if folder:
            folder = Path(folder).expanduser()
            missing = _missing_files(folder)
            if missing:
                raise FileNotFoundError(
                    f"Fashion-MNIST folder {folder} (from {source}) lacks {', '.join(missing)}"
                )
            return folder
    cached = cache_dir() / "FashionMNIST" / "raw"
    for folder in (SYSTEM_DIR, cached):
        if not _missing_files(folder):
            return folder
    if download is None:
        download = not offline()
    failure = "downloading is off (offline)"
    if download:
        try:
            folder = _download(cache_dir())
        except Exception as err:  # torchvision raises RuntimeError, URLError, ... : all mean "no copy"
            failure = f"the download failed ({type(err).__name__}: {err})"
        else:
            if not _missing_files(folder):
                return folder
            failure = f"the download left {', '.join(_missing_files(folder))} missing in {folder}"
    raise FileNotFoundError(
        f"Fashion-MNIST not found and {failure}. Provide it in one of these ways: "
        f"(1) pass its folder (--data DIR) or set {ENV_VAR}=DIR, where DIR holds "
        f"train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and "
        f"t10k-labels-idx1-ubyte.gz (from https://github.com/zalandoresearch/fashion-mnist); "
        f"(2) `apt-get install dataset-fashion-mnist`, which puts them in {SYSTEM_DIR}; "
        f"(3) run once online, which downloads them with torchvision into {cache_dir()}"
    )


def _check_split(split: str) -> None:
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")


@functools.lru_cache(maxsize=4)
def _read_split(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    images_stem, labels_stem = _FILES[split]
    images = read_idx(_idx_file(folder, images_stem))
    labels = read_idx(_idx_file(folder, labels_stem))
    # Any number of images is accepted (a subset of the real split, or small test data in the same
    # format); the published split sizes are 60,000 and 10,000.
    n = len(labels)
    if images.shape != (n, 28, 28) or images.dtype != np.uint8 or labels.shape != (n,) or n == 0:
        raise ValueError(
            f"{folder}: the {split} split should hold N > 0 uint8 images of 28x28 and as many labels, "
            f"got images {images.shape} {images.dtype} and labels {labels.shape}"
        )
    if labels.max() >= len(CLASS_NAMES):
        raise ValueError(f"{folder}: {split} labels must lie in [0, 9], found {int(labels.max())}")
    images.setflags(write=False)  # cached and shared between callers
    labels.setflags(write=False)
    return images, labels


def load_fashion_mnist_raw(
    split: str = "train", path: str | os.PathLike | None = None, *, download: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The split as stored: uint8 images (N, 28, 28) and int64 labels (N,). Cached after the first read.

    Use :func:`to_model_images` on batches of these to train without holding 60k float images.
    """
    _check_split(split)
    images, labels = _read_split(find_fashion_mnist(path, download=download), split)
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def to_model_images(raw: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float32 (N, 3, 32, 32) in [-1, 1], zero (black, -1) padded by 2 px a side."""
    if raw.dtype != torch.uint8 or raw.dim() != 3 or tuple(raw.shape[1:]) != (28, 28):
        raise ValueError(f"expected uint8 images of shape (N, 28, 28), got {raw.dtype} {tuple(raw.shape)}")
    x = raw.float().div_(127.5).sub_(1.0)
    x = torch.nn.functional.pad(x, (_PAD, _PAD, _PAD, _PAD), value=-1.0)
    return x.unsqueeze(1).expand(-1, 3, -1, -1).contiguous()


def load_fashion_mnist(
    split: str = "train",
    path: str | os.PathLike | None = None,
    *,
    limit: int | None = None,
    download: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``limit`` images of a split, in memory: float (N, 3, 32, 32) in [-1, 1] and int64 labels.

    Each image takes 12 KiB as float32, so the whole training split is 720 MiB; use ``limit``
    (the demo's subsets) or :class:`FashionMNIST` for streaming.
    """
    raw, labels = load_fashion_mnist_raw(split, path, download=download)
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be a positive number of images, got {limit}")
        raw, labels = raw[:limit], labels[:limit]
    return to_model_images(raw), labels


class FashionMNIST(Dataset):
    """A split as a Dataset of (image float (3, 32, 32) in [-1, 1], label int).

    Holds the 28x28 uint8 images (47 MB for the training split) and pads/scales one at a time.
    """

    classes = CLASS_NAMES

    def __init__(
        self, split: str = "train", path: str | os.PathLike | None = None, *, download: bool | None = None
    ):
        self.split = split
        self.raw, self.labels = load_fashion_mnist_raw(split, path, download=download)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return to_model_images(self.raw[index : index + 1])[0], int(self.labels[index])
