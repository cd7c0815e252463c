"""ADM's image batch files: ``.npz`` whose ``arr_0`` holds uint8 images (N, H, W, 3).

50k images at 512 px are 39 GB, so the file is read a batch at a time straight from the ``.npy``
member of the zip archive, and written from pieces that are never all in memory at once.
"""
from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from ctok.atomic_files import atomic_write

IMAGES_KEY = "arr_0"


def npz_keys(path: str | os.PathLike) -> list[str]:
    """The array names in an ``.npz`` (without loading any of them)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return [n[:-4] for n in archive.namelist() if n.endswith(".npy")]
    except zipfile.BadZipFile:
        raise ValueError(f"{path} is not an .npz archive") from None


def _read_header(member, path) -> tuple[tuple[int, ...], np.dtype]:
    version = np.lib.format.read_magic(member)
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    if version not in readers:
        raise ValueError(f"{path}: .npy format version {version} is not supported (1.0 and 2.0 are)")
    shape, fortran_order, dtype = readers[version](member)
    if fortran_order or dtype.hasobject:
        raise ValueError(f"{path}: image arrays must be C-ordered plain numbers "
                         f"({'Fortran order' if fortran_order else 'Python objects'} found); "
                         "save them with np.savez(path, arr_0=np.ascontiguousarray(images))")
    return shape, dtype


class NpzImages:
    """The images of an ADM batch file: ``len()``, ``shape`` (N, H, W, 3) and ``batches(size)``."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no file at {self.path}")
        if IMAGES_KEY not in npz_keys(self.path):
            raise ValueError(f"{self.path} holds no images ({IMAGES_KEY}); it has {npz_keys(self.path)}")
        with zipfile.ZipFile(self.path) as archive, archive.open(f"{IMAGES_KEY}.npy") as member:
            self.shape, dtype = _read_header(member, self.path)
        if dtype != np.uint8 or len(self.shape) != 4 or self.shape[-1] != 3:
            raise ValueError(
                f"{self.path}: {IMAGES_KEY} must hold uint8 RGB images (N, H, W, 3), got {dtype} {self.shape}"
            )

    def __len__(self) -> int:
        return self.shape[0]

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """uint8 arrays (b, H, W, 3) in file order, each at most ``batch_size`` images."""
        per_image = int(np.prod(self.shape[1:]))
        with zipfile.ZipFile(self.path) as archive, archive.open(f"{IMAGES_KEY}.npy") as member:
            _read_header(member, self.path)
            for start in range(0, len(self), batch_size):
                count = min(batch_size, len(self) - start)
                data = member.read(count * per_image)
                if len(data) != count * per_image:
                    raise ValueError(f"{self.path} ends early: {IMAGES_KEY} is shorter than its header says")
                yield np.frombuffer(data, dtype=np.uint8).reshape(count, *self.shape[1:])


def write_npz_images(path: str | os.PathLike, pieces: Iterable[np.ndarray], count: int) -> Path:
    """Write ``arr_0`` = the concatenation of uint8 ``pieces`` (n_i, H, W, 3), ``count`` images in all.

    The file appears whole or not at all (temporary file, then rename).
    """
    path = Path(path)
    written, shape = 0, None
    with atomic_write(path, "wb") as f, zipfile.ZipFile(f, "w", allowZip64=True) as archive:
        with archive.open(f"{IMAGES_KEY}.npy", "w", force_zip64=True) as member:
            for piece in pieces:
                piece = np.ascontiguousarray(piece, dtype=np.uint8)
                if shape is None:
                    shape = (count, *piece.shape[1:])
                    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
                              "fortran_order": False, "shape": shape}
                    np.lib.format.write_array_header_2_0(member, header)
                elif piece.shape[1:] != shape[1:]:
                    raise ValueError(f"image pieces differ in shape: {piece.shape[1:]} vs {shape[1:]}")
                member.write(piece.tobytes())
                written += piece.shape[0]
        if shape is None or written != count:
            raise ValueError(f"expected {count} images, got {written}")
    return path
