"""The image sets an evaluation reads: an ADM batch ``.npz`` (samples or reference) or a folder of images.

Both give ``len()``, the image size, a fingerprint that changes when the files change (it keys
the reference statistics cache) and ``batches(batch_size)``: uint8 (B, 3, H, W) tensors from an
``.npz`` (exact pixel values; the feature extractor maps them to [-1, 1] on its device) or float
(B, 3, S, S) tensors in [-1, 1] from a folder, centre-cropped to S the ADM way.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from ctok.metrics.sample_npz import IMAGES_KEY, NpzImages, npz_keys

STATISTICS_KEYS = ("mu", "sigma", "mu_s", "sigma_s")


class NpzImageSet:
    """The ``arr_0`` images of an ADM batch file."""

    def __init__(self, path: Path):
        self.path = path
        self.images = NpzImages(path)
        self.image_size = self.images.shape[1]

    def __len__(self) -> int:
        return len(self.images)

    def describe(self) -> str:
        return f"{self.path} ({len(self)} images, {self.images.shape[1]}x{self.images.shape[2]})"

    def fingerprint(self) -> str:
        stat = self.path.stat()
        return f"npz:{stat.st_size}:{stat.st_mtime_ns}"

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        for batch in self.images.batches(batch_size):
            yield torch.from_numpy(batch.copy()).permute(0, 3, 1, 2)


class FolderImageSet:
    """Every image under a folder (flat or ImageNet layout), ADM centre crop to ``image_size``."""

    def __init__(self, path: Path, image_size: int, num_workers: int = 4):
        from ctok.data.images import ImageFolder

        self.path = path
        self.image_size = image_size
        self.num_workers = num_workers
        self.dataset = ImageFolder(path, image_size, crop="center")
        self.skipped: list[str] = []

    def __len__(self) -> int:
        return len(self.dataset)

    def describe(self) -> str:
        return f"{self.path} ({len(self)} files, centre crop {self.image_size})"

    def fingerprint(self) -> str:
        digest = hashlib.sha256(f"folder:{self.image_size}".encode())
        for file, _ in self.dataset.samples:
            stat = os.stat(file)
            digest.update(f"{os.path.relpath(file, self.path)}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
        return f"folder:{len(self)}:{digest.hexdigest()[:16]}"

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        from ctok.data.images import usable_workers

        loader = DataLoader(self.dataset, batch_size=batch_size, shuffle=False,
                            num_workers=usable_workers(self.num_workers), collate_fn=self.dataset.collate)
        for batch in loader:
            self.skipped.extend(batch.skipped)
            if len(batch.images):
                yield batch.images


def _first_image_size(folder: Path) -> int:
    from ctok.data.images import ImageFolder

    first = ImageFolder(folder, 1).samples[0][0]
    with Image.open(first) as image:
        return min(image.size)


def open_image_set(path: str | os.PathLike, image_size: int | None = None,
                   num_workers: int = 4) -> NpzImageSet | FolderImageSet:
    """An ``.npz`` with ``arr_0`` or a folder of images (cropped to ``image_size``; default: the
    short side of its first image, i.e. no crop for a folder of equal square samples)."""
    path = Path(path).expanduser()
    if path.is_dir():
        return FolderImageSet(path, image_size or _first_image_size(path), num_workers)
    if not path.is_file():
        raise FileNotFoundError(f"no image set at {path} (expected an .npz with {IMAGES_KEY} or a folder of images)")
    return NpzImageSet(path)


def stored_statistics(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The precomputed ``mu``, ``sigma``, ``mu_s``, ``sigma_s`` an ADM reference batch may hold."""
    path = Path(path)
    if not path.is_file():
        return {}
    keys = [k for k in npz_keys(path) if k in STATISTICS_KEYS]
    if not keys:
        return {}
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in keys}


def has_images(path: str | os.PathLike) -> bool:
    path = Path(path)
    return path.is_dir() or IMAGES_KEY in npz_keys(path)
