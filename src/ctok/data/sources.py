"""Opening a training or evaluation image source by its path: Fashion-MNIST's files or an image folder."""
from __future__ import annotations

import os

from torch.utils.data import Dataset

from ctok.data import fashion_mnist
from ctok.data.images import ImageFolder


def open_images(path: str | os.PathLike, image_size: int, *, crop: str = "center") -> Dataset:
    """The images under ``path`` as (image in [-1, 1] (3, S, S), label) pairs.

    A folder with Fashion-MNIST's IDX files gives its training split (32 px, used whole); any
    other folder is read as an image folder (ImageNet class sub-folders, or flat) with ADM's
    ``crop`` ("center" or "random"). Nothing is downloaded: ``path`` names the data to use.
    """
    try:
        folder = fashion_mnist.find_fashion_mnist(path, download=False)
    except FileNotFoundError:
        return ImageFolder(path, image_size, crop=crop)
    if crop != "center":
        raise ValueError("Fashion-MNIST images are used whole (padded to 32 px), not cropped: set data.crop=center")
    if image_size != fashion_mnist.IMAGE_SIZE:
        raise ValueError(f"Fashion-MNIST images are {fashion_mnist.IMAGE_SIZE} px but the tokenizer takes "
                         f"{image_size} px images (model.image_size={fashion_mnist.IMAGE_SIZE} trains one that fits)")
    return fashion_mnist.FashionMNIST("train", folder, download=False)
