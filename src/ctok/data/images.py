"""Folders of images for training and evaluation: ImageNet layout or flat, ADM's crops, broken files skipped.

Layout. A root whose sub-folders hold the images is read the ImageNet way: each sub-folder is a
class, class ids are the folder names' sorted order (``n01440764`` -> 0, ...), and images may sit
at any depth below their class folder. A root that holds the images directly is a flat,
unlabelled folder (every label 0). The listing is sorted, so index i is the same file on every
rank and every run, which is what makes ``DistributedSampler`` shards deterministic.

Broken files. A file that cannot be decoded does not stop an epoch: ``__getitem__`` returns a
:class:`BrokenImage` marker instead of raising, and :meth:`ImageFolder.collate` drops the
markers and reports their paths in the batch (``batch.skipped``). The count therefore travels
with the batch through the DataLoader's queues and is right for any ``num_workers``; a counter
kept inside the dataset would live in the worker processes, out of the training loop's sight.
So a batch may hold fewer images than the batch size (none at all, in the limit).

Pixel formats. :func:`read_rgb` turns every file into 8-bit RGB the same way, or refuses it with
its name: EXIF orientation is applied; grayscale, palette and CMYK images are converted; an alpha
channel is dropped, as ImageNet loaders do; 16-bit images (``I;16`` and its byte orders, and
``I`` holding 16-bit values) are scaled from 65535, not clipped at 255 as ``convert("RGB")`` would;
float images (``F``) are read as [0, 1] and refused outside it. A refused file counts as broken.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import BinaryIO, Callable, NamedTuple

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

IMAGE_EXTENSIONS = (".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")
CROPS = ("center", "random")


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def center_crop_adm(image: Image.Image, size: int) -> Image.Image:
    """ADM's centre crop (guided-diffusion), the crop behind the reported FIDs.

    1. While the short side is at least ``2 * size``, halve both sides (integer division) with a
       BOX filter: a cheap, alias-free downsampling that keeps the final bicubic step small.
    2. Resize with BICUBIC so the short side is exactly ``size`` (the long side is rounded).
    3. Cut the central ``size x size`` square; when the excess is odd the extra pixel is cut
       from the right/bottom (offset = excess // 2).
    """
    if size < 1:
        raise ValueError(f"crop size must be a positive number of pixels, got {size}")
    return _crop_adm(image, size, size, centred=True)


def random_crop_adm(
    image: Image.Image, size: int, *, min_fraction: float = 0.8, max_fraction: float = 1.0
) -> Image.Image:
    """The random counterpart used when training the tokenizers: scale, then crop at a random place.

    A short side s is drawn uniformly from the integers in
    [ceil(size / max_fraction), ceil(size / min_fraction)], the image is brought to short side s
    as in :func:`center_crop_adm`, and a ``size x size`` square is cut at a uniformly random
    offset, so the crop covers between ``min_fraction`` and ``max_fraction`` of the short side.
    Randomness comes from torch's generator, which DataLoader seeds per worker.
    """
    if size < 1:
        raise ValueError(f"crop size must be a positive number of pixels, got {size}")
    if not 0 < min_fraction <= max_fraction <= 1:
        raise ValueError(f"need 0 < min_fraction <= max_fraction <= 1, got {min_fraction}, {max_fraction}")
    low, high = math.ceil(size / max_fraction), math.ceil(size / min_fraction)
    short = int(torch.randint(low, high + 1, ()).item())
    return _crop_adm(image, short, size, centred=False)


def _crop_adm(image: Image.Image, short: int, size: int, *, centred: bool) -> Image.Image:
    while min(image.size) >= 2 * short:
        image = image.resize((image.width // 2, image.height // 2), resample=Image.Resampling.BOX)
    scale = short / min(image.size)
    image = image.resize(
        (round(image.width * scale), round(image.height * scale)), resample=Image.Resampling.BICUBIC
    )
    spare_x, spare_y = image.width - size, image.height - size
    if centred:
        left, top = spare_x // 2, spare_y // 2
    else:
        left = int(torch.randint(spare_x + 1, ()).item())
        top = int(torch.randint(spare_y + 1, ()).item())
    return image.crop((left, top, left + size, top + size))


# Modes whose values are not 8-bit levels, by the value that means full brightness.
_WIDE_MODES = {"I;16": 65535.0, "I;16L": 65535.0, "I;16B": 65535.0, "I;16N": 65535.0, "I": 65535.0, "F": 1.0}


def read_rgb(path: str | os.PathLike | BinaryIO, name: str | None = None) -> Image.Image:
    """The image file at ``path`` (or an open binary file, e.g. bytes from a shard) as an 8-bit RGB
    image, upright (see the module docstring for each mode).

    Raises ValueError naming the file (``name``, default ``path``) for values that cannot be mapped
    to 8 bits, and PIL's errors for files that cannot be decoded.
    """
    with Image.open(path) as opened:
        image = ImageOps.exif_transpose(opened)  # also forces the full decode
        if image.mode in _WIDE_MODES:
            return _wide_to_rgb(image, _WIDE_MODES[image.mode], path if name is None else name)
        if image.mode == "P" and "transparency" in image.info:
            image = image.convert("RGBA")  # PIL's way to resolve palette transparency before dropping it
        return image.convert("RGB")


def _wide_to_rgb(image: Image.Image, full_scale: float, path) -> Image.Image:
    values = np.asarray(image, dtype=np.float64)
    low, high = float(values.min()), float(values.max())
    if low < 0 or high > full_scale or not np.isfinite(values).all():
        raise ValueError(f"{path}: {image.mode} pixel values lie in [{low:g}, {high:g}], outside [0, {full_scale:g}]; "
                         "save it as an 8- or 16-bit image")
    levels = np.floor(values / full_scale * 255.0 + 0.5).astype(np.uint8)
    return Image.fromarray(np.repeat(levels[..., None], 3, axis=-1), mode="RGB")


def usable_workers(requested: int) -> int:
    """``requested`` DataLoader workers, at most the CPUs this process may run on: more only queue
    for the same cores (PyTorch warns about it), so a default of 4 on a 2-core machine becomes 2."""
    if requested < 0:
        raise ValueError(f"num_workers must be at least 0, got {requested}")
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return min(requested, cpus)


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 (3, H, W) in [-1, 1] (x / 127.5 - 1)."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1).div_(127.5).sub_(1.0)


class BrokenImage(NamedTuple):
    """What ImageFolder returns in place of a sample whose file cannot be decoded."""

    path: str
    reason: str


class ImageBatch(NamedTuple):
    """A collated batch: images (B, 3, S, S) in [-1, 1], labels (B,), paths of the files skipped."""

    images: torch.Tensor
    labels: torch.Tensor
    skipped: tuple[str, ...]


class CroppedImages(Dataset):
    """What every image source for training shares: decode, ADM crop to ``image_size`` squares in
    [-1, 1], optional flip, and a :class:`BrokenImage` in place of a sample that cannot be decoded.

    ``crop``: "center" (ADM's centre crop; evaluation and the DiT/SiT recipes) or "random"
    (:func:`random_crop_adm`; tokenizer training). ``hflip``: flip left-right with probability 1/2.
    Use ``DataLoader(dataset, collate_fn=dataset.collate)`` to get :class:`ImageBatch` es.
    A subclass lists its samples and says how to read one (:meth:`sample`).
    """

    classes: list[str]  # class names by class id; empty when the images are unlabelled

    def __init__(self, image_size: int, *, crop: str = "center", hflip: bool = False):
        if crop not in CROPS:
            raise ValueError(f"crop must be one of {CROPS}, got {crop!r}")
        if image_size < 1:
            raise ValueError(f"image_size must be a positive number of pixels, got {image_size}")
        self.image_size = image_size
        self.crop = crop
        self.hflip = hflip

    @property
    def has_labels(self) -> bool:
        """True for labelled images (the ImageNet layout); unlabelled ones are all label 0."""
        return bool(self.classes)

    def sample(self, index: int) -> tuple[str, int, Callable[[], Image.Image]]:
        """(name for messages, label, a function that reads the image as RGB) of sample ``index``."""
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | BrokenImage:
        name, label, read = self.sample(index)
        try:
            image = read()
        # PIL signals undecodable data with OSError (UnidentifiedImageError, truncation), ValueError,
        # SyntaxError (some broken headers) and DecompressionBombError (absurd sizes).
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            return BrokenImage(name, f"{type(err).__name__}: {err}")
        if self.crop == "center":
            image = center_crop_adm(image, self.image_size)
        else:
            image = random_crop_adm(image, self.image_size)
        x = pil_to_tensor(image)
        if self.hflip and bool(torch.rand(()) < 0.5):
            x = x.flip(-1)
        return x, label

    def collate(self, samples: list) -> ImageBatch:
        """Stack the good samples; name the broken ones in ``skipped``."""
        good = [s for s in samples if not isinstance(s, BrokenImage)]
        skipped = tuple(s.path for s in samples if isinstance(s, BrokenImage))
        if good:
            images = torch.stack([x for x, _ in good])
        else:
            images = torch.empty(0, 3, self.image_size, self.image_size)
        labels = torch.tensor([y for _, y in good], dtype=torch.long)
        return ImageBatch(images, labels, skipped)


class ImageFolder(CroppedImages):
    """Images under ``root`` (ImageNet layout or flat), cropped to ``image_size`` squares in [-1, 1]
    (``crop`` and ``hflip`` as :class:`CroppedImages`)."""

    def __init__(self, root: str | os.PathLike, image_size: int, *, crop: str = "center", hflip: bool = False):
        super().__init__(image_size, crop=crop, hflip=hflip)
        self.root = Path(root)
        self.classes, self.samples = list_images(self.root)

    def __len__(self) -> int:
        return len(self.samples)

    def sample(self, index: int) -> tuple[str, int, Callable[[], Image.Image]]:
        path, label = self.samples[index]
        return str(path), label, lambda: read_rgb(path)


def _walk_images(folder: Path) -> list[Path]:
    """Every image below ``folder``, sorted by path (hidden files and folders left out)."""
    found = []
    for here, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(Path(here) / f for f in sorted(files) if _is_image(f))
    return sorted(found)


def list_images(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """(class names, [(path, label)]) of an image folder in either layout, in the order ImageFolder
    indexes them; FileNotFoundError for a missing folder, ValueError when the layout is unclear."""
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist or is not a directory")
    entries = sorted(os.scandir(root), key=lambda e: e.name)
    direct = [Path(e.path) for e in entries if e.is_file() and _is_image(e.name)]
    subdirs = [e for e in entries if e.is_dir() and not e.name.startswith(".")]
    extensions = "/".join(ext[1:] for ext in IMAGE_EXTENSIONS)
    if direct:
        if any(_walk_images(Path(d.path)) for d in subdirs):
            raise ValueError(
                f"{root} holds images both directly and in sub-folders; use class sub-folders only "
                f"(ImageNet layout) or images only (a flat, unlabelled folder)"
            )
        return [], [(p, 0) for p in direct]
    classes, samples = [], []
    for label, folder in enumerate(subdirs):
        images = _walk_images(Path(folder.path))
        if not images:
            # Skipping it would shift every later class id; the user must decide.
            raise ValueError(
                f"class folder {folder.path} holds no images ({extensions}); class ids come from "
                f"the sorted folder names, so remove the folder or add its images"
            )
        classes.append(folder.name)
        samples.extend((p, label) for p in images)
    if not samples:
        raise ValueError(f"no images ({extensions}, any case) found in {root}")
    return classes, samples
